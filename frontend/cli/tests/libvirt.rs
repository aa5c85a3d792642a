//! The libvirt hook (`dist/libvirt/qemu` calling `cio libvirt-hook`), run
//! as libvirt runs it: the domain XML on stdin, `prepare begin` before QEMU
//! starts and `release end` after it stopped. A small vfio-user client
//! stands in for QEMU.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cio_hw_profiles::edu;
use common::Vu;

/// Runs the installed-style hook script with `args` and `xml` on stdin:
/// whether it succeeded, and what it printed (stdout, then stderr).
fn hook(run_dir: &Path, args: &[&str], xml: &str) -> (bool, String) {
    let (ok, out, err) = filter(run_dir, args, xml);
    (ok, out + &err)
}

/// Runs the hook (or, with `args` starting with "handoff", `cio
/// libvirt-handoff`) with `xml` on stdin: whether it succeeded, its stdout
/// and its stderr.
fn filter(run_dir: &Path, args: &[&str], xml: &str) -> (bool, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/libvirt/qemu");
    let mut cmd = match args.first() {
        Some(&"handoff") => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_cio"));
            c.arg("libvirt-handoff").args(&args[1..]);
            c
        }
        _ => {
            let mut c = Command::new(script);
            c.env("CIO", env!("CARGO_BIN_EXE_cio")).args(args);
            c
        }
    };
    let mut child = cmd
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
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
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
    assert_eq!(Vu::connect(&edu).config32(0), 0x11e8_1234, "edu's ids");
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

/// A domain as `virsh dumpxml --migratable` gives it: one cio device (with
/// `extra` attributes) and its `-device` argument among others.
fn migratable(host: &str, socket: &Path, extra: &str) -> String {
    let sock = socket.display();
    format!(
        r#"<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
  <name>vm1</name>
  <metadata>
    <c:devices xmlns:c="urn:cio:libvirt:1">
      <c:device host="{host}" name="edu0" socket="{sock}" {extra}/>
    </c:devices>
  </metadata>
  <qemu:commandline>
    <qemu:arg value="-device"/>
    <qemu:arg value="pcie-root-port,id=rp0,chassis=1"/>
    <qemu:arg value="-device"/>
    <qemu:arg value='{{"driver":"vfio-user-pci","id":"vu0","bus":"rp0","socket":{{"type":"unix","path":"{sock}"}}}}'/>
  </qemu:commandline>
</domain>"#
    )
}

/// Waits (at most 20 s) until the server has suspended its session into
/// the ticket at `path`.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "no ticket at {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_handed_off_device_moves_with_its_domain() {
    let backend = common::backend(None);
    let host = backend.endpoint().to_string();
    let tmp = std::env::temp_dir().join(format!("cio-libvirt-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // Two hosts' run directories; the socket path is the same on both, as
    // a domain's XML names it.
    let (src, dst) = (tmp.join("src"), tmp.join("dst"));
    let sock = tmp.join("edu.sock");
    let xml = migratable(&host, &sock, r#"handoff="yes""#);

    // The source: the domain starts, its guest leaves a result in the edu.
    let (ok, out) = hook(&src, &["vm1", "prepare", "begin", "-"], &xml);
    assert!(ok, "{out}");
    let mut qemu = Vu::connect(&sock);
    qemu.write32(edu::reg::FACTORIAL, 5);
    assert_eq!(qemu.read32(edu::reg::FACTORIAL), 120);

    // Still plugged in: there is no ticket to move yet.
    let (ok, _, err) = filter(&src, &["handoff", "vm1"], &xml);
    assert!(!ok && err.contains("unplug it first"), "{err}");

    // device_del: QEMU lets go of the socket; the session waits in a ticket.
    drop(qemu);
    wait_for(&src.join("vm1/0.ticket"));
    let (ok, moving, err) = filter(&src, &["handoff", "vm1"], &xml);
    assert!(ok, "{err}");
    assert!(
        moving.contains("<ticket xmlns=\"urn:cio:libvirt:1\">"),
        "{moving}"
    );

    // The destination refuses XML without tickets, and a forged one.
    let (ok, out) = hook(&dst, &["vm1", "migrate", "begin", "-"], &xml);
    assert!(!ok && out.contains("without a handoff ticket"), "{out}");
    let forged = moving.replace("\"cio_ticket\": 1", "\"cio_ticket\": 9");
    let (ok, out) = hook(&dst, &["vm1", "migrate", "begin", "-"], &forged);
    assert!(!ok && out.contains("ticket format 9"), "{out}");
    assert!(
        !dst.join(".incoming/vm1").exists(),
        "nothing kept of a refused move"
    );

    // migrate begin: the filtered XML keeps the device's metadata, holds
    // no secret, and QEMU is started without the unplugged device.
    let (ok, incoming, err) = filter(&dst, &["vm1", "migrate", "begin", "-"], &moving);
    assert!(ok, "{err}");
    let doc = roxmltree::Document::parse(&incoming).expect("the filtered XML parses");
    let args: Vec<_> = doc
        .descendants()
        .filter_map(|n| n.attribute("value"))
        .collect();
    assert_eq!(
        args,
        ["-device", "pcie-root-port,id=rp0,chassis=1"],
        "{incoming}"
    );
    assert!(
        !incoming.contains("secret") && incoming.contains("c:device"),
        "{incoming}"
    );
    let kept = dst.join(".incoming/vm1/0.ticket");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the kept ticket is private");

    // prepare begin: the adopter serves the same open device.
    let (ok, out) = hook(&dst, &["vm1", "prepare", "begin", "-"], &incoming);
    assert!(ok, "{out}");
    assert!(!dst.join(".incoming/vm1").exists(), "the ticket is spent");
    let plug: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("vm1/0.device")).unwrap()).unwrap();
    assert_eq!(plug["driver"], "vfio-user-pci");
    assert_eq!(plug["socket"]["path"], sock.to_str().unwrap());
    let mut qemu = Vu::connect(&sock);
    qemu.reset(); // the destination QEMU's realize (device_add)
    assert_eq!(
        qemu.read32(edu::reg::FACTORIAL),
        120,
        "the device was reset or opened afresh on the way"
    );
    assert_eq!(backend.stats().open_devices, 1);

    // The source lets go of the domain; the destination keeps it.
    let (ok, out) = hook(&src, &["vm1", "release", "end", "-"], &xml);
    assert!(ok, "{out}");
    assert!(!out.contains("ended the session"), "{out}");
    assert_eq!(qemu.read32(edu::reg::FACTORIAL), 120);

    // The destination's QEMU stops: its adopter, also serving with
    // handoff, leaves a ticket that nobody adopts; release ends it, and the
    // backend lets go of the device at once (not when the ticket expires).
    drop(qemu);
    wait_for(&dst.join("vm1/0.ticket"));
    let (ok, out) = hook(&dst, &["vm1", "release", "end", "-"], &incoming);
    assert!(
        ok && out.contains("ended the session nobody adopted"),
        "{out}"
    );
    backend
        .wait_stats(Duration::from_secs(5), |st| st.open_devices == 0)
        .expect("the unadopted session ended by release");
    let _ = std::fs::remove_dir_all(&tmp);
}
