//! `cio migrate`: moves a VM whose `vfio-user-pci` device is served by
//! `cio vfio-user --handoff-to` to another QEMU while the device stays on
//! its host. QEMU carries no state for a vfio-user device, so the device is
//! unplugged before the move and plugged back after it; the cio session
//! (and with it the open device, never reset) goes to a `cio vfio-user
//! --adopt` next to the destination through the handoff ticket.
//!
//! The steps, each waited for: `device_del` on the source and its
//! `DEVICE_DELETED` (the guest's hot-unplug: its driver lets go), the ticket
//! the source's server writes when QEMU lets go of its socket, the adopter
//! listening (started before the migration, so that the ticket does not
//! expire while the VM's memory travels), `migrate` until it completes, and
//! `device_add` on the destination (the guest's hot-plug).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::detached;

/// What `cio migrate` needs (its command line).
#[derive(Debug, clap::Args)]
pub struct Plan {
    /// The source QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off).
    #[arg(long, value_name = "QMP")]
    pub from: PathBuf,
    /// The destination QEMU's QMP socket.
    #[arg(long, value_name = "QMP")]
    pub to: PathBuf,
    /// The vfio-user-pci device's QEMU id.
    #[arg(long, value_name = "ID")]
    pub device: String,
    /// The PCIe root port the device is plugged back into.
    #[arg(long, value_name = "BUS")]
    pub bus: String,
    /// The ticket the source's `cio vfio-user --handoff-to` writes.
    #[arg(long, value_name = "FILE")]
    pub ticket: PathBuf,
    /// The socket the adopter serves the destination's device on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Where the source QEMU migrates to (unix:PATH, tcp:HOST:PORT, …).
    #[arg(long, value_name = "URI")]
    pub uri: String,
    /// Seconds each step may take (the migration itself: at least 600).
    #[arg(long = "timeout", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout_secs: u64,
    /// The re-plugged device's reply timeout (QEMU's x-msg-timeout).
    #[arg(long = "msg-timeout", value_name = "MS", default_value_t = 60000)]
    pub msg_timeout_ms: u64,
}

/// A QMP connection.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    what: String,
    /// Events read so far, by name.
    events: Vec<String>,
}

impl Qmp {
    fn connect(sock: &Path, what: &str) -> Result<Qmp, String> {
        let s =
            UnixStream::connect(sock).map_err(|e| format!("{what} QMP {}: {e}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| format!("{what} QMP: {e}"))?;
        let w = s.try_clone().map_err(|e| format!("{what} QMP: {e}"))?;
        let mut q = Qmp {
            w,
            r: BufReader::new(s),
            what: what.into(),
            events: Vec::new(),
        };
        let greeting = q.next()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("{what} QMP: not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn next(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err(format!("{} QMP: QEMU closed the connection", self.what)),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| format!("{} QMP sent {line:?}: {e}", self.what)),
            Err(e) => Err(format!("{} QMP: {e}", self.what)),
        }
    }

    /// Runs a command; its `return`, or QEMU's error.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.w, "{msg}").map_err(|e| format!("{} QMP: {e}", self.what))?;
        loop {
            let m = self.next()?;
            if let Some(e) = m.get("event").and_then(Value::as_str) {
                self.events.push(e.to_string());
            } else if let Some(r) = m.get("return") {
                return Ok(r.clone());
            } else {
                let why = m["error"]["desc"]
                    .as_str()
                    .unwrap_or("no answer")
                    .to_string();
                return Err(format!("{} QEMU refused {command}: {why}", self.what));
            }
        }
    }

    /// Waits for the event `name` (polling with a cheap command, which
    /// reads the events in).
    fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.events.iter().any(|e| e == name) {
            if Instant::now() > deadline {
                return Err(format!("{} QEMU: no {name} within {timeout:?}", self.what));
            }
            self.execute("query-status", json!({}))?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

/// Waits until `ok` holds, checking every 50 ms.
fn wait_until(
    timeout: Duration,
    mut ok: impl FnMut() -> Result<bool, String>,
) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if ok()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the plan, saying what happens on stderr; `link_args` go to the
/// adopter (`--psk-file`, …).
pub fn run(p: &Plan, link_args: &[std::ffi::OsString]) -> Result<(), String> {
    let timeout = Duration::from_secs(p.timeout_secs);
    let started = Instant::now();
    let say = |what: &str| {
        eprintln!(
            "cio migrate: [{:6.1}s] {what}",
            started.elapsed().as_secs_f64()
        )
    };
    let mut src = Qmp::connect(&p.from, "source")?;
    let mut dst = Qmp::connect(&p.to, "destination")?;
    if p.ticket.exists() {
        return Err(format!(
            "{} exists already: a ticket of an earlier move? (remove it)",
            p.ticket.display()
        ));
    }

    src.execute("device_del", json!({"id": p.device}))?;
    say(&format!(
        "device_del {}: waiting for the guest to let go of it",
        p.device
    ));
    src.wait_event("DEVICE_DELETED", timeout)
        .map_err(|e| format!("{e} (does a program in the guest keep the device open?)"))?;
    say("unplugged; waiting for the source's server to write the ticket");
    if !wait_until(timeout, || Ok(p.ticket.exists()))? {
        return Err(format!(
            "no ticket at {} (was the source's cio vfio-user started with --handoff-to {}?)",
            p.ticket.display(),
            p.ticket.display()
        ));
    }

    let adopter = spawn_adopter(p, link_args, timeout)?;
    say(&format!(
        "adopter (pid {}) serves the session on {}",
        adopter,
        p.socket.display()
    ));

    src.execute("migrate", json!({"uri": p.uri}))?;
    say(&format!("migrating to {}", p.uri));
    let mut last = Value::Null;
    let done = wait_until(timeout.max(Duration::from_secs(600)), || {
        last = src.execute("query-migrate", json!({}))?;
        Ok(matches!(
            last["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ))
    })?;
    match last["status"].as_str() {
        Some("completed") if done => {}
        _ => {
            return Err(format!(
                "the migration did not complete: {} (the device stays unplugged; the adopter, pid {adopter}, keeps the session)",
                last["error-desc"].as_str().unwrap_or(last["status"].as_str().unwrap_or("no status"))
            ))
        }
    }
    say(&format!(
        "migrated in {} ms",
        last["total-time"].as_u64().unwrap_or_default()
    ));

    dst.execute(
        "device_add",
        json!({
            "driver": "vfio-user-pci",
            "id": p.device,
            "bus": p.bus,
            "socket": {"type": "unix", "path": p.socket},
            "x-msg-timeout": p.msg_timeout_ms,
        }),
    )?;
    say("plugged back on the destination (the guest sees a hot-plug)");
    Ok(())
}

/// Starts `cio vfio-user --adopt` detached (its log next to the ticket)
/// and waits until it listens.
fn spawn_adopter(
    p: &Plan,
    link_args: &[std::ffi::OsString],
    timeout: Duration,
) -> Result<u32, String> {
    let log_path = p.ticket.with_extension("adopter.log");
    let mut args = link_args.to_vec();
    args.extend([
        "vfio-user".into(),
        "--adopt".into(),
        p.ticket.clone().into(),
    ]);
    args.extend(["--socket".into(), p.socket.clone().into()]);
    let mut child =
        detached::spawn(&args, &p.socket, &log_path).map_err(|e| format!("the adopter: {e}"))?;
    detached::wait_listening(&mut child, &p.socket, &log_path, timeout)
        .map_err(|e| format!("the adopter: {e}"))?;
    Ok(child.id())
}
