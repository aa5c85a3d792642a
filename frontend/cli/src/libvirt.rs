//! `cio libvirt-hook`: libvirt's QEMU hook (`/etc/libvirt/hooks/qemu`,
//! installed from `dist/libvirt/qemu`). Before libvirt starts a domain's
//! QEMU it starts a `cio vfio-user` server for every remote device the
//! domain's metadata names, so the socket QEMU's `vfio-user-pci` opens is
//! listening; when the domain is released it stops what is left of them.
//!
//! The domain names its devices in its `<metadata>`:
//!
//! ```xml
//! <cio:devices xmlns:cio="urn:cio:libvirt:1">
//!   <cio:device host="192.0.2.10" name="vnvme0" socket="/run/cio/vm1-nvme.sock"
//!               psk-file="/etc/cio/psk"/>
//! </cio:devices>
//! ```
//!
//! and gives QEMU the matching `-device vfio-user-pci` (docs/guide.md).
//! Each server is a detached process; its pid, socket and log are kept in
//! `RUN_DIR/DOMAIN/`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::detached;
use crate::keys::LinkArgs;

/// The namespace of cio's elements in a domain's metadata.
pub const NAMESPACE: &str = "urn:cio:libvirt:1";

/// Where the servers' pids, sockets and logs are kept by default.
pub const RUN_DIR: &str = "/run/cio/libvirt";

/// How long a server may take to connect to its backend and listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server is given to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One remote device of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDevice {
    /// Backend address.
    pub host: String,
    /// Device name at the backend.
    pub name: String,
    /// The Unix socket QEMU's vfio-user-pci connects to.
    pub socket: PathBuf,
    /// Link options for this device (`psk-file`, `identity`,
    /// `backend-key`, `tls`, `insecure-plaintext` attributes), as cio's
    /// global options.
    pub link: Vec<String>,
}

/// The cio devices named in a domain's XML (none if it names none).
pub fn devices(xml: &str) -> Result<Vec<HookDevice>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the domain XML: {e}"))?;
    let mut out = Vec::new();
    for node in doc
        .descendants()
        .filter(|n| n.tag_name().namespace() == Some(NAMESPACE) && n.tag_name().name() == "device")
    {
        let attr = |a: &str| {
            node.attribute(a)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("<cio:device> without {a}=\"...\""))
        };
        let socket = PathBuf::from(attr("socket")?);
        if !socket.is_absolute() {
            return Err(format!(
                "<cio:device socket=\"{}\">: give an absolute path",
                socket.display()
            ));
        }
        let mut link = Vec::new();
        for a in ["psk-file", "identity", "known-backends", "backend-key"] {
            if let Some(v) = node.attribute(a) {
                link.push(format!("--{a}"));
                link.push(v.to_owned());
            }
        }
        for a in ["tls", "insecure-plaintext"] {
            match node.attribute(a) {
                None | Some("no") => {}
                Some("yes") => link.push(format!("--{a}")),
                Some(v) => return Err(format!("<cio:device {a}=\"{v}\">: give yes or no")),
            }
        }
        out.push(HookDevice {
            host: attr("host")?.to_owned(),
            name: attr("name")?.to_owned(),
            socket,
            link,
        });
    }
    Ok(out)
}

/// `cio libvirt-hook DOMAIN OPERATION SUB-OPERATION EXTRA`, with the
/// domain XML on stdin for the operations that start and stop servers.
pub fn hook(
    domain: &str,
    operation: &str,
    sub_operation: &str,
    run_dir: &Path,
    link: &LinkArgs,
) -> Result<(), String> {
    if domain.is_empty() || domain.contains('/') || domain.starts_with('.') {
        return Err(format!("domain name {domain:?} cannot name a directory"));
    }
    let dir = run_dir.join(domain);
    match (operation, sub_operation) {
        ("prepare", "begin") => {
            let mut xml = String::new();
            std::io::stdin()
                .read_to_string(&mut xml)
                .map_err(|e| format!("reading the domain XML: {e}"))?;
            let devices = devices(&xml)?;
            // Leftovers of an earlier run of this domain go first.
            stop_all(&dir)?;
            for (i, d) in devices.iter().enumerate() {
                if let Err(e) = start(&dir, i, d, link) {
                    stop_all(&dir)?;
                    return Err(format!("{domain}: {} of {}: {e}", d.name, d.host));
                }
            }
            Ok(())
        }
        ("release", "end") => stop_all(&dir),
        // Everything else (start, started, stopped, migrate, restore,
        // reconnect, attach) leaves the servers as they are.
        _ => Ok(()),
    }
}

/// Starts one server and waits until it listens (or fails).
fn start(dir: &Path, index: usize, d: &HookDevice, link: &LinkArgs) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let log_path = dir.join(format!("{index}.log"));
    let mut args = link.to_args();
    args.extend(d.link.iter().map(Into::into));
    args.extend(["vfio-user".into(), (&d.host).into(), (&d.name).into()]);
    args.extend(["--socket".into(), d.socket.clone().into_os_string()]);
    let mut child = detached::spawn(&args, &d.socket, &log_path)?;
    // Recorded first: a server that does not come up is stopped with the
    // others.
    let pid_path = dir.join(format!("{index}.pid"));
    std::fs::write(
        &pid_path,
        format!("{}\n{}\n", child.id(), d.socket.display()),
    )
    .map_err(|e| format!("writing {}: {e}", pid_path.display()))?;
    detached::wait_listening(&mut child, &d.socket, &log_path, START_TIMEOUT)
}

/// Stops every server recorded in `dir` and removes it.
fn stop_all(dir: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "pid") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut lines = text.lines();
            if let Some(pid) = lines.next().and_then(|p| p.parse::<i32>().ok()) {
                stop(pid);
            }
            if let Some(socket) = lines.next() {
                let _ = std::fs::remove_file(socket);
            }
        }
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

/// SIGTERM, then SIGKILL if it is still there after [`STOP_TIMEOUT`]; only
/// a process that still is a cio vfio-user server (pids are reused).
fn stop(pid: i32) {
    let is_ours = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"vfio-user"))
    };
    // A zombie child of ours has no cmdline; its parent (an earlier hook
    // run) is gone, so init reaps it.
    if !is_ours() {
        return;
    }
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while is_ours() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if is_ours() {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_from_metadata() {
        let xml = r#"<domain type="kvm"><name>vm1</name><metadata>
            <cio:devices xmlns:cio="urn:cio:libvirt:1">
              <cio:device host="192.0.2.10" name="vnvme0" socket="/run/cio/a.sock" psk-file="/etc/cio/psk" tls="yes"/>
              <cio:device host="h2" name="edu0" socket="/run/cio/b.sock"/>
            </cio:devices>
            <other:device xmlns:other="urn:someone-else" host="x" name="y" socket="/z"/>
            </metadata></domain>"#;
        let d = devices(xml).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].host, "192.0.2.10");
        assert_eq!(d[0].name, "vnvme0");
        assert_eq!(d[0].socket, Path::new("/run/cio/a.sock"));
        assert_eq!(d[0].link, ["--psk-file", "/etc/cio/psk", "--tls"]);
        assert!(d[1].link.is_empty());
        assert!(devices("<domain><name>plain</name></domain>")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_metadata_is_explained() {
        let ns = r#"xmlns:cio="urn:cio:libvirt:1""#;
        for (xml, want) in [
            ("<domain>".to_string(), "the domain XML"),
            (
                format!(r#"<domain {ns}><cio:device host="h" socket="/s"/></domain>"#),
                "without name=",
            ),
            (
                format!(
                    r#"<domain {ns}><cio:device host="h" name="d" socket="rel.sock"/></domain>"#
                ),
                "absolute path",
            ),
            (
                format!(
                    r#"<domain {ns}><cio:device host="h" name="d" socket="/s" tls="maybe"/></domain>"#
                ),
                "yes or no",
            ),
        ] {
            let e = devices(&xml).unwrap_err();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }
}
