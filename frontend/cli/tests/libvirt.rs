//! The libvirt hook (`dist/libvirt/qemu` calling `cio libvirt-hook`), run
//! as libvirt runs it: the domain XML on stdin, `prepare begin` before QEMU
//! starts and `release end` after it stopped. A small vfio-user client
//! stands in for QEMU.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cio_frontend::vfio_user::wire::{self, HEADER_SIZE};
use cio_frontend::vfio_user::{
    Body, Capabilities, Codec, Message, RegionAccess, Reply, Request, Version,
};

/// Runs the installed-style hook script with `args` and `xml` on stdin.
fn hook(run_dir: &Path, args: &[&str], xml: &str) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/libvirt/qemu");
    let mut child = Command::new(script)
        .env("CIO", env!("CARGO_BIN_EXE_cio"))
        .args(args)
        .arg("--run-dir")
        .arg(run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the hook");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// What QEMU does first: VERSION, then a read of the config space's ids.
fn vendor_device(socket: &Path) -> u32 {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let codec = Codec::default();
    let mut call = |id: u16, req: Request| -> Reply {
        let msg = Message {
            id,
            no_reply: false,
            body: Body::Request(req),
        };
        s.write_all(&codec.encode(&msg).unwrap()).unwrap();
        let mut frame = vec![0u8; HEADER_SIZE];
        s.read_exact(&mut frame).unwrap();
        let h = wire::Header::parse(&frame, codec.limits.max_msg_size).unwrap();
        frame.resize(h.size as usize, 0);
        s.read_exact(&mut frame[HEADER_SIZE..]).unwrap();
        match codec.decode(&frame).unwrap().body {
            Body::Reply(r) => r,
            other => panic!("{other:?}"),
        }
    };
    call(
        1,
        Request::Version(Version {
            major: 0,
            minor: 1,
            capabilities: Some(Capabilities::default()),
        }),
    );
    let Reply::RegionRead(d) = call(
        2,
        Request::RegionRead(RegionAccess {
            offset: 0,
            region: 7,
            count: 4,
        }),
    ) else {
        panic!("no region data")
    };
    u32::from_le_bytes(d.data.try_into().unwrap())
}

fn domain(devices: &[(&str, &str, &Path)]) -> String {
    let devs: String = devices
        .iter()
        .map(|(host, name, sock)| {
            format!(
                r#"<cio:device host="{host}" name="{name}" socket="{}"/>"#,
                sock.display()
            )
        })
        .collect();
    format!(
        r#"<domain type="kvm"><name>vm1</name><metadata>
        <cio:devices xmlns:cio="urn:cio:libvirt:1">{devs}</cio:devices>
        </metadata></domain>"#
    )
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| t.lines().next().and_then(|p| p.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for the purpose: its parent, the hook, has exited
    // and init reaps it.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn starts_the_servers_a_domain_names_and_stops_them_on_release() {
    let backend = common::backend(None);
    let host = backend.endpoint().to_string();
    let tmp = std::env::temp_dir().join(format!("cio-libvirt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let run_dir = tmp.join("run");
    let (edu, mem): (PathBuf, PathBuf) = (tmp.join("edu.sock"), tmp.join("mem.sock"));
    let xml = domain(&[(&host, "edu0", &edu), (&host, "mem0", &mem)]);

    // Not ours to act on: a domain without cio devices, other operations.
    let (ok, out) = hook(&run_dir, &["vm0", "prepare", "begin", "-"], "<domain/>");
    assert!(ok, "{out}");
    let (ok, out) = hook(&run_dir, &["vm1", "started", "begin", "-"], &xml);
    assert!(ok && !edu.exists(), "{out}");

    let (ok, out) = hook(&run_dir, &["vm1", "prepare", "begin", "-"], &xml);
    assert!(ok, "{out}");
    let started = pids(&run_dir.join("vm1"));
    assert_eq!(started.len(), 2, "two servers");
    // Each listens and serves its device, as QEMU would find it.
    assert_eq!(vendor_device(&edu), 0x11e8_1234, "edu's ids");
    assert!(mem.exists());

    let (ok, out) = hook(&run_dir, &["vm1", "release", "end", "-"], &xml);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "servers still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!edu.exists() && !mem.exists(), "sockets removed");
    assert!(!run_dir.join("vm1").exists(), "state removed");
    // The servers said goodbye when they were stopped (SIGTERM): the
    // backend lets go of the devices at once, not after the 30 s it keeps
    // a session whose link was lost for a resume.
    backend
        .wait_stats(Duration::from_secs(10), |st| st.open_devices == 0)
        .expect("the stopped servers' devices released within 10 s (a goodbye, not a lost link)");

    // A device the backend does not have: the domain does not start, the
    // reason is given, and the server already started is stopped.
    let xml = domain(&[(&host, "edu0", &edu), (&host, "nodev", &mem)]);
    let (ok, out) = hook(&run_dir, &["vm1", "prepare", "begin", "-"], &xml);
    assert!(!ok, "{out}");
    assert!(
        out.contains("nodev") && out.contains("no device named"),
        "{out}"
    );
    assert!(!edu.exists() && !run_dir.join("vm1").exists(), "{out}");

    // Bad XML and a name that is no directory are refused with a reason.
    let (ok, out) = hook(&run_dir, &["vm1", "prepare", "begin", "-"], "<domain>");
    assert!(!ok && out.contains("the domain XML"), "{out}");
    let (ok, out) = hook(&run_dir, &["../x", "prepare", "begin", "-"], "<domain/>");
    assert!(!ok && out.contains("cannot name a directory"), "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}
