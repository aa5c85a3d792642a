//! `cio discover` finds a backend that announces itself by mDNS, and lists
//! its devices. Run inside a private network namespace (only loopback), so
//! nothing is sent beyond this machine.

mod common;

use std::process::Command;

use cio_backend::announce::{Announcement, Announcer};

#[test]
fn discover_finds_an_announced_backend() {
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "ip link set lo up && exec {} --exact in_a_network_namespace --ignored --nocapture",
        exe.display()
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) and ip (iproute2) are needed for this test");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "the test in a network namespace failed:\n{text}"
    );
}

#[test]
#[ignore = "run by discover_finds_an_announced_backend inside a network namespace"]
fn in_a_network_namespace() {
    let s = common::backend(None);
    let port = match s.endpoint() {
        cio_transports::Endpoint::Tcp(hp) => hp.rsplit(':').next().unwrap().to_string(),
        e => panic!("{e}"),
    };
    let a = Announcer::start(&Announcement {
        endpoint: s.endpoint().clone(),
        key: None,
        devices: 3,
    })
    .unwrap()
    .expect("a TCP listener is announced");
    let (ok, out) = common::cio(&["discover", "--timeout", "3", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let b = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| {
            b["address"]
                .as_str()
                .is_some_and(|a| a.ends_with(&format!(":{port}")))
        })
        .unwrap_or_else(|| panic!("our backend is not among {out}"));
    assert_eq!(b["devices"], 3);
    assert_eq!(b["tls"], false);
    assert_eq!(b["listed"], serde_json::json!(["edu0", "mem0"]));
    // Withdrawn when the announcer goes.
    drop(a);
    let (ok, out) = common::cio(&["discover", "--timeout", "2", "--no-list"]);
    assert!(ok && !out.contains(&format!(":{port}")), "{out}");
}
