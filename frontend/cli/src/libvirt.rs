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
//!               psk-file="/etc/cio/psk" handoff="yes"/>
//! </cio:devices>
//! ```
//!
//! and gives QEMU the matching `-device vfio-user-pci` (docs/guide.md).
//! Each server is a detached process; its pid, socket and log are kept in
//! `RUN_DIR/DOMAIN/`.
//!
//! Migration (QEMU carries no state for a vfio-user device, so the device
//! is unplugged before the move and plugged back after it, kept open in
//! between): a device with `handoff="yes"` is served with `--handoff-to
//! RUN_DIR/DOMAIN/N.ticket`, so unplugging it suspends its cio session
//! into that ticket; [`with_tickets`] (`cio libvirt-handoff`) puts the
//! tickets into the migration XML; on the destination, `migrate begin`
//! takes them out again (the XML libvirt keeps holds no secret), checks
//! them, and drops the unplugged device's `-device` argument (the source
//! QEMU no longer has it), and `prepare begin` serves each handed-off
//! device with `cio vfio-user --adopt`. What is to be plugged back is left
//! in `RUN_DIR/DOMAIN/N.device` (`device_add`'s arguments).

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use cio_core::error_chain;
use cio_frontend::{Client, Ticket};

use crate::detached;
use crate::keys::LinkArgs;

/// The namespace of cio's elements in a domain's metadata.
pub const NAMESPACE: &str = "urn:cio:libvirt:1";

/// libvirt's namespace for QEMU arguments (`<qemu:commandline>`).
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

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
    /// `handoff="yes"`: when QEMU lets go of the device, its session is
    /// suspended into a ticket for a VM move instead of ended.
    pub handoff: bool,
}

/// The `<cio:device>` elements of a domain, in document order.
fn device_nodes<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.tag_name().namespace() == Some(NAMESPACE) && n.tag_name().name() == "device")
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>, String> {
    roxmltree::Document::parse(xml).map_err(|e| format!("the domain XML: {e}"))
}

/// A yes/no attribute (absent: no).
fn yes_no(node: roxmltree::Node, a: &str) -> Result<bool, String> {
    match node.attribute(a) {
        None | Some("no") => Ok(false),
        Some("yes") => Ok(true),
        Some(v) => Err(format!("<cio:device {a}=\"{v}\">: give yes or no")),
    }
}

fn device(node: roxmltree::Node) -> Result<HookDevice, String> {
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
        if yes_no(node, a)? {
            link.push(format!("--{a}"));
        }
    }
    Ok(HookDevice {
        host: attr("host")?.to_owned(),
        name: attr("name")?.to_owned(),
        socket,
        link,
        handoff: yes_no(node, "handoff")?,
    })
}

/// The cio devices named in a domain's XML (none if it names none).
pub fn devices(xml: &str) -> Result<Vec<HookDevice>, String> {
    device_nodes(&parse(xml)?).map(device).collect()
}

/// `cio libvirt-hook DOMAIN OPERATION SUB-OPERATION EXTRA`, with the
/// domain XML on stdin (libvirt gives it to every operation).
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
    let xml = || {
        let mut xml = String::new();
        std::io::stdin()
            .read_to_string(&mut xml)
            .map_err(|e| format!("reading the domain XML: {e}"))?;
        Ok::<_, String>(xml)
    };
    match (operation, sub_operation) {
        // On the destination of a migration, first: the XML filter.
        ("migrate", "begin") => {
            let out = incoming(domain, &xml()?, run_dir)?;
            print!("{out}");
            Ok(())
        }
        ("prepare", "begin") => {
            let devices = devices(&xml()?)?;
            // Leftovers of an earlier run of this domain go first.
            stop_all(&dir, &devices, link)?;
            let arrived = incoming_dir(run_dir, domain);
            let started = start_all(&dir, &arrived, &devices, link);
            let _ = std::fs::remove_dir_all(&arrived);
            started.map_err(|e| format!("{domain}: {e}"))
        }
        ("release", "end") => {
            // libvirt gives the XML here too; without it (or with XML that
            // no longer parses) unspent tickets are left to expire.
            let devices = xml().and_then(|x| devices(&x)).unwrap_or_default();
            stop_all(&dir, &devices, link)
        }
        // Everything else (start, started, stopped, restore, reconnect,
        // attach) leaves the servers as they are.
        _ => Ok(()),
    }
}

/// Where `migrate begin` leaves the tickets and device arguments of an
/// incoming domain for its `prepare begin` (a domain name cannot start with
/// a dot, so this is no domain's directory).
fn incoming_dir(run_dir: &Path, domain: &str) -> PathBuf {
    run_dir.join(".incoming").join(domain)
}

/// Starts every server of a domain (adopting the sessions that arrived in
/// `arrived`); on the first failure, stops those already started.
fn start_all(
    dir: &Path,
    arrived: &Path,
    devices: &[HookDevice],
    link: &LinkArgs,
) -> Result<(), String> {
    for (i, d) in devices.iter().enumerate() {
        let ticket = arrived.join(format!("{i}.ticket"));
        let adopt = ticket.exists().then_some(ticket.as_path());
        let started = start(dir, i, d, link, adopt).and_then(|()| {
            let plug = arrived.join(format!("{i}.device"));
            match plug.exists() {
                true => std::fs::rename(&plug, dir.join(format!("{i}.device")))
                    .map_err(|e| format!("keeping {}: {e}", plug.display())),
                false => Ok(()),
            }
        });
        if let Err(e) = started {
            stop_all(dir, devices, link)?;
            return Err(format!("{} of {}: {e}", d.name, d.host));
        }
    }
    Ok(())
}

/// Starts one server (serving the session in `adopt`, or opening the
/// device afresh) and waits until it listens (or fails).
fn start(
    dir: &Path,
    index: usize,
    d: &HookDevice,
    link: &LinkArgs,
    adopt: Option<&Path>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let log_path = dir.join(format!("{index}.log"));
    let mut args = link.to_args();
    args.extend(d.link.iter().map(Into::into));
    args.push("vfio-user".into());
    match adopt {
        Some(ticket) => args.extend(["--adopt".into(), ticket.into()]),
        None => args.extend([(&d.host).into(), (&d.name).into()]),
    }
    args.extend(["--socket".into(), d.socket.clone().into_os_string()]);
    if d.handoff {
        args.extend([
            "--handoff-to".into(),
            dir.join(format!("{index}.ticket")).into_os_string(),
        ]);
    }
    let mut child = detached::spawn(&args, &d.socket, &log_path)?;
    // Recorded first: a server that does not come up is stopped with the
    // others.
    let pid_path = dir.join(format!("{index}.pid"));
    std::fs::write(
        &pid_path,
        format!("{}\n{}\n", child.id(), d.socket.display()),
    )
    .map_err(|e| format!("writing {}: {e}", pid_path.display()))?;
    detached::wait_listening(&mut child, &d.socket, &log_path, START_TIMEOUT)?;
    if let Some(ticket) = adopt {
        // Spent: the adopter listens only once it holds the session.
        let _ = std::fs::remove_file(ticket);
    }
    Ok(())
}

/// Stops every server recorded in `dir`, ends the sessions of tickets
/// nobody adopted (so that the backend releases their devices now, not
/// when the tickets expire), and removes `dir`.
fn stop_all(dir: &Path, devices: &[HookDevice], link: &LinkArgs) -> Result<(), String> {
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
    for (i, d) in devices.iter().enumerate() {
        let ticket = dir.join(format!("{i}.ticket"));
        if ticket.exists() {
            release(&ticket, d, link);
        }
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

/// Ends the session in an unspent ticket (adopts it and says goodbye);
/// says on stderr what became of it. A spent or expired one is left.
fn release(ticket: &Path, d: &HookDevice, link: &LinkArgs) {
    let end = || -> Result<bool, String> {
        let t = Ticket::load(ticket).map_err(|e| error_chain(&e))?;
        if t.expired() {
            return Ok(false);
        }
        let opts = device_link(link, d)?.options(&t.endpoint)?;
        match Client::adopt(&t, opts) {
            Ok((client, _devices)) => {
                client.close();
                Ok(true)
            }
            // Adopted by the destination of a migration: nothing to end.
            Err(_) => Ok(false),
        }
    };
    match end() {
        Ok(true) => eprintln!(
            "cio: {} of {}: ended the session nobody adopted ({})",
            d.name,
            d.host,
            ticket.display()
        ),
        Ok(false) => {}
        Err(e) => eprintln!(
            "cio: {} of {}: {e} (its session ends when the ticket expires)",
            d.name, d.host
        ),
    }
}

/// The hook's link options with a device's own attributes on top.
fn device_link(link: &LinkArgs, d: &HookDevice) -> Result<LinkArgs, String> {
    #[derive(Parser)]
    struct Options {
        #[command(flatten)]
        link: LinkArgs,
    }
    let args = std::iter::once("cio".into())
        .chain(link.to_args())
        .chain(d.link.iter().map(Into::into));
    Options::try_parse_from::<_, std::ffi::OsString>(args)
        .map(|o| o.link)
        .map_err(|e| format!("the link options of <cio:device name=\"{}\">: {e}", d.name))
}

/// The text of `xml` with each range replaced (ranges do not overlap).
fn edit(xml: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_owned();
    for (r, with) in edits {
        out.replace_range(r, &with);
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `cio libvirt-handoff`: the domain's migration XML (`virsh dumpxml
/// --migratable`) with the ticket of each of its cio devices inside that
/// device's element, for `virsh migrate --xml`. Every device must have been
/// unplugged already (its ticket written).
pub fn with_tickets(domain: &str, xml: &str, run_dir: &Path) -> Result<String, String> {
    let doc = parse(xml)?;
    let dir = run_dir.join(domain);
    let mut edits = Vec::new();
    for (i, node) in device_nodes(&doc).enumerate() {
        let d = device(node)?;
        if !d.handoff {
            return Err(format!(
                "{domain}: {} of {} is not served with handoff=\"yes\": it cannot move with the VM",
                d.name, d.host
            ));
        }
        let path = dir.join(format!("{i}.ticket"));
        let ticket = std::fs::read_to_string(&path).map_err(|_| {
            format!(
                "{domain}: no ticket for {} of {} at {} yet: unplug it first (device_del) and wait until the guest lets go of it",
                d.name,
                d.host,
                path.display()
            )
        })?;
        let child = format!(
            r#"<ticket xmlns="{NAMESPACE}">{}</ticket>"#,
            escape(&ticket)
        );
        let r = node.range();
        let element = &xml[r.clone()];
        if element.ends_with("/>") {
            // <cio:device .../> becomes <cio:device ...>TICKET</cio:device>.
            let name_len = element[1..]
                .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
                .unwrap_or(0);
            let qname = &element[1..1 + name_len];
            edits.push((r.end - 2..r.end, format!(">{child}</{qname}>")));
        } else {
            let at = r.start + element.rfind("</").unwrap_or(element.len());
            edits.push((at..at, child));
        }
    }
    Ok(edit(xml, edits))
}

/// `migrate begin` on the destination: checks the ticket each cio device
/// brings, keeps it (and the device's `-device` argument, for the re-plug)
/// in the domain's incoming directory, and returns the XML without the
/// tickets and without those `-device` arguments.
fn incoming(domain: &str, xml: &str, run_dir: &Path) -> Result<String, String> {
    let arrived = incoming_dir(run_dir, domain);
    let _ = std::fs::remove_dir_all(&arrived);
    let out = take_tickets(domain, xml, &arrived);
    if out.is_err() {
        let _ = std::fs::remove_dir_all(&arrived);
    }
    out
}

fn take_tickets(domain: &str, xml: &str, arrived: &Path) -> Result<String, String> {
    let doc = parse(xml)?;
    let args: Vec<_> = doc
        .descendants()
        .filter(|n| {
            n.tag_name().namespace() == Some(QEMU_NAMESPACE) && n.tag_name().name() == "arg"
        })
        .collect();
    let mut edits = Vec::new();
    for (i, node) in device_nodes(&doc).enumerate() {
        let d = device(node)?;
        let what = format!("{domain}: {} of {}", d.name, d.host);
        let Some(tnode) = node.children().find(|c| {
            c.tag_name().namespace() == Some(NAMESPACE) && c.tag_name().name() == "ticket"
        }) else {
            return Err(format!(
                "{what} arrives without a handoff ticket: QEMU carries no state for a vfio-user device, so the guest would find it dead after the move. Unplug it on the source and make the migration XML with `cio libvirt-handoff` (docs/guide.md)"
            ));
        };
        let text = tnode.text().unwrap_or_default();
        let ticket = Ticket::from_text(text)
            .map_err(|e| format!("{what}: its ticket: {}", error_chain(&e)))?;
        if ticket.expired() {
            let ago = SystemTime::now()
                .duration_since(ticket.expires)
                .unwrap_or_default();
            return Err(format!(
                "{what}: its ticket expired {:.0} s ago (the backend keeps a handed-off session for its resume window, ciod --resume-grace)",
                ago.as_secs_f64()
            ));
        }
        match ticket.devices() {
            [t] if t.info.name == d.name => {}
            held => {
                return Err(format!(
                    "{what}: its ticket holds {:?}, not this device",
                    held.iter()
                        .map(|t| t.info.name.as_str())
                        .collect::<Vec<_>>()
                ))
            }
        }
        // The source QEMU no longer has the device: neither may the
        // destination's, until it is plugged back.
        let socket = d.socket.to_string_lossy();
        let at = args
            .iter()
            .position(|a| names_socket(a.attribute("value").unwrap_or_default(), &socket))
            .filter(|&j| j > 0 && args[j - 1].attribute("value") == Some("-device"))
            .ok_or_else(|| {
                format!(
                    "{what}: no -device argument in <qemu:commandline> names the socket {socket}"
                )
            })?;
        let plug = args[at].attribute("value").unwrap_or_default();
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(plug).is_err() {
            return Err(format!(
                "{what}: give its -device argument as JSON ({{\"driver\":\"vfio-user-pci\",...}}): device_add takes it as it is to plug the device back"
            ));
        }
        std::fs::create_dir_all(arrived)
            .map_err(|e| format!("creating {}: {e}", arrived.display()))?;
        ticket
            .save(&arrived.join(format!("{i}.ticket")))
            .map_err(|e| format!("{what}: {}", error_chain(&e)))?;
        let plug_path = arrived.join(format!("{i}.device"));
        std::fs::write(&plug_path, format!("{plug}\n"))
            .map_err(|e| format!("writing {}: {e}", plug_path.display()))?;
        edits.push((tnode.range(), String::new()));
        edits.push((args[at - 1].range(), String::new()));
        edits.push((args[at].range(), String::new()));
    }
    Ok(edit(xml, edits))
}

/// Whether a QEMU argument is a device on `socket` (JSON or key=value).
fn names_socket(arg: &str, socket: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(arg) {
        Ok(v) => {
            v["socket"]["path"].as_str() == Some(socket) || v["socket"].as_str() == Some(socket)
        }
        Err(_) => arg
            .split(',')
            .any(|kv| kv == format!("socket={socket}") || kv == format!("socket.path={socket}")),
    }
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
