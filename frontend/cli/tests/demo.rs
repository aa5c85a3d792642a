//! `cio demo` as a user runs it: embedded, against a running backend, and
//! with the session handed to a second process.

mod common;

use cio_transports::Psk;
use common::{backend, cio};

#[test]
fn the_embedded_demo_hands_its_session_to_a_second_process() {
    let (ok, out) = cio(&["demo", "--handoff"]);
    assert!(ok, "{out}");
    let pids: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("[1/2, pid ")
                .or(l.strip_prefix("[2/2, pid "))
        })
        .filter_map(|l| l.split(']').next())
        .collect();
    assert!(pids.len() >= 3, "{out}");
    assert_ne!(pids[0], pids[pids.len() - 1], "two processes: {out}");
    assert!(out.contains("factorial register still 3628800"), "{out}");
    assert!(out.contains("demo passed: the session moved"), "{out}");
    assert!(!out.contains("WARN"), "no warnings on the way: {out}");
}

#[test]
fn the_demo_runs_against_a_running_backend_with_a_key() {
    let dir = std::env::temp_dir().join(format!("cio-demo-key-{}", std::process::id()));
    std::fs::write(&dir, "demo-key-0123456789abcdef\n").unwrap();
    let s = backend(Some(Psk::from_file(&dir).unwrap()));
    let host = s.endpoint().to_string();
    let key = dir.to_str().unwrap();
    let (ok, out) = cio(&["--psk-file", key, "demo", &host]);
    assert!(ok, "{out}");
    assert!(out.contains("demo passed: 6 factorials"), "{out}");
    let (ok, out) = cio(&["--psk-file", key, "demo", "--handoff", &host]);
    assert!(ok, "{out}");
    assert!(out.contains("demo passed: the session moved"), "{out}");
    // Both sessions ended and gave the device back.
    let st = s
        .wait_stats(std::time::Duration::from_secs(5), |st| {
            st.sessions == 0 && st.open_devices == 0
        })
        .unwrap();
    assert_eq!(st.resumes, 1, "one adoption: {st:?}");
    // Without the key it fails, clearly.
    let (ok, out) = cio(&["demo", &host]);
    assert!(!ok);
    assert!(out.contains("pre-shared key"), "{out}");
    std::fs::remove_file(&dir).unwrap();
}

#[test]
fn a_ticket_can_be_shown_and_its_session_released_from_the_command_line() {
    use cio_core::{Device, DmaDir, DmaRegion};
    let s = backend(None);
    let c = cio_frontend::Client::connect(s.endpoint(), Default::default()).unwrap();
    let mut d = c.open("edu0").unwrap();
    let r = std::sync::Arc::new(DmaRegion::new(0x10_0000, 8192, DmaDir::Bidirectional).unwrap());
    d.dma_map(r).unwrap();
    let ticket = c.suspend().unwrap();
    let path = std::env::temp_dir().join(format!("cio-cli-ticket-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    ticket.save(&path).unwrap();
    let p = path.to_str().unwrap();
    let (ok, out) = cio(&["session", "show", p]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{:#x}", ticket.session)), "{out}");
    assert!(out.contains("device:   edu0 (handle 1)"), "{out}");
    assert!(out.contains("dma     0x100000+0x2000"), "{out}");
    assert!(out.contains("expires:  in "), "{out}");
    assert_eq!(s.stats().open_devices, 1, "kept for the adopter");
    let (ok, out) = cio(&["session", "release", p]);
    assert!(ok, "{out}");
    assert!(out.contains("1 device(s) released"), "{out}");
    let st = s.wait_stats(std::time::Duration::from_secs(5), |st| {
        st.open_devices == 0 && st.sessions == 0
    });
    assert!(st.is_ok(), "{st:?}");
    // Spent: a second release says why.
    let (ok, out) = cio(&["session", "release", p]);
    assert!(!ok);
    assert!(out.contains("no session"), "{out}");
    let (ok, out) = cio(&["session", "show", "/nonexistent/ticket"]);
    assert!(!ok && out.contains("reading /nonexistent/ticket"), "{out}");
    std::fs::remove_file(&path).unwrap();
}
