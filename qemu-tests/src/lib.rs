//! The harness for tests that need QEMU guests: boots a guest from the rig
//! `qemu-tests/rig.sh` builds, collects its serial console, waits for the
//! `CIO-` marker lines its init prints, and always kills QEMU.
//!
//! Tests find the rig through `CIO_QEMU_RIG` (set by `.ci/run`). Without it
//! they skip with a printed reason on a developer machine, and fail loudly
//! in CI (`CI=true`), where a missing rig is an error.
#![deny(missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the rig is, or why the test cannot run here. Panics in CI.
pub fn rig() -> Option<PathBuf> {
    let reason = match std::env::var_os("CIO_QEMU_RIG") {
        Some(p) => {
            let p = PathBuf::from(p);
            if p.join("vmlinuz").is_file() && p.join("initramfs.gz").is_file() {
                return Some(p);
            }
            format!(
                "CIO_QEMU_RIG={} holds no vmlinuz and initramfs.gz",
                p.display()
            )
        }
        None => {
            "CIO_QEMU_RIG is not set (build the rig with qemu-tests/rig.sh and export it)".into()
        }
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("QEMU tests cannot run in CI: {reason}");
    }
    // Straight to stderr: libtest hides eprintln! of passing tests.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipping QEMU test: {reason}");
    None
}

/// QEMU 11 (the first with a vfio-user client), which the rig links as
/// `qemu11` (qemu-tests/qemu11.sh builds it). Panics if it is missing.
pub fn qemu11(rig: &std::path::Path) -> PathBuf {
    let q = rig.join("qemu11");
    assert!(
        q.exists(),
        "{} is missing: rebuild the rig with qemu-tests/rig.sh",
        q.display()
    );
    q
}

/// A static binary of the rig (`cio` or `ciod`, the ones in the guests),
/// which runs on the host as well.
pub fn rig_binary(rig: &std::path::Path, name: &str) -> PathBuf {
    let b = rig.join(name);
    assert!(b.is_file(), "{} is missing: rebuild the rig", b.display());
    b
}

/// A child process killed (and reaped) when dropped: a server a test
/// started.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A ciod of the rig on the host serving the emulated edu as `edu0`, on
/// an ephemeral loopback port with a pre-shared key.
#[derive(Debug)]
pub struct HostCiod {
    /// Its address, `127.0.0.1:PORT`.
    pub listen: String,
    /// Its key file (for `--psk-file`).
    pub psk: PathBuf,
    _child: Killed,
}

impl HostCiod {
    /// Starts it (the key file goes into `dir`) and waits until it listens.
    pub fn start(rig: &std::path::Path, dir: &std::path::Path) -> HostCiod {
        let port = free_port();
        let psk = dir.join("psk");
        std::fs::write(&psk, format!("host-ciod-key-{port}-0123456789abcdef")).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let child = Killed(
            Command::new(rig_binary(rig, "ciod"))
                .args(["--listen", &listen, "--emulate", "edu", "--psk-file"])
                .arg(&psk)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting ciod"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "the host ciod does not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        HostCiod {
            listen,
            psk,
            _child: child,
        }
    }

    /// The key file's path, as an argument.
    pub fn psk_arg(&self) -> &str {
        self.psk.to_str().expect("a UTF-8 temp path")
    }
}

/// Starts `cio vfio-user ARGS --socket SOCK` from the rig with its log in
/// `log`, and waits until it listens.
pub fn vfio_user_server(
    rig: &std::path::Path,
    args: &[&str],
    sock: &std::path::Path,
    log: &std::path::Path,
) -> Killed {
    let child = Command::new(rig_binary(rig, "cio"))
        .arg("vfio-user")
        .args(args)
        .arg("--socket")
        .arg(sock)
        // CIO_TEST_RUST_LOG=debug for a closer look at a failing test.
        .env(
            "RUST_LOG",
            std::env::var("CIO_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("server log"))
        .spawn()
        .expect("starting cio vfio-user");
    let server = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "cio vfio-user did not listen:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// The `-device` value of QEMU 11's vfio-user client on `sock`, at PCI slot
/// `addr`, with a reply timeout fit for a device on another host.
pub fn vfio_user_device(sock: &std::path::Path, addr: u8) -> String {
    format!(
        "{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}},\"addr\":\"{addr:#x}\",\"x-msg-timeout\":60000}}",
        sock.display()
    )
}

/// QEMU arguments giving a guest of the harness's 512 MiB RAM shared by
/// memfd, as a vfio-user server needs for DMA.
pub const SHARED_RAM: [&str; 4] = [
    "-object",
    "memory-backend-memfd,id=mem,size=512M,share=on",
    "-machine",
    "memory-backend=mem",
];

/// A running guest. Dropping it kills QEMU; if the test is failing, the
/// console is printed first.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    /// QEMU's stdin: the guest's serial console input ([`Guest::run`]).
    input: Option<std::process::ChildStdin>,
    commands: u32,
    /// Host port forwarded to the guest's ciod (127.0.0.1 only).
    pub port: u16,
    /// Pre-shared key the guest's ciod requires.
    pub key: String,
}

/// A TCP port free on the host's loopback (for a port forward, or the
/// socket that wires two guests together).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip ESC [ ... final byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Guest {
    /// Boots a guest with an IOMMU, user networking (restricted, one host
    /// port forward on 127.0.0.1) and `devices` (QEMU `-device` values).
    pub fn boot(rig: &std::path::Path, devices: &[&str]) -> Self {
        let args: Vec<&str> = devices.iter().flat_map(|d| ["-device", d]).collect();
        Self::boot_with(rig, &args, "")
    }

    /// Boots a guest with QEMU's nvme (serial `serial`) backed by the raw
    /// image file `image` and a QMP socket at `qmp` (for a clean quit that
    /// flushes the image), and waits until its ciod serves the nvme through
    /// VFIO as `vnvme0`. `cmdline`: more kernel arguments (e.g.
    /// `cio.nvme-local`: measure the nvme through the guest's own driver
    /// first, a `CIO-LOCAL` line).
    pub fn boot_nvme(
        rig: &std::path::Path,
        serial: &str,
        image: &std::path::Path,
        qmp: &std::path::Path,
        cmdline: &str,
    ) -> Self {
        let drive = format!("if=none,id=nvm,file={},format=raw", image.display());
        let device = format!("nvme,serial={serial},drive=nvm");
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
        let mut g = Self::boot_with(
            rig,
            &["-drive", &drive, "-device", &device, "-qmp", &qmp_arg],
            cmdline,
        );
        g.wait_for("CIO-READY", Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}"));
        let vfio = g.lines_with("CIO-VFIO vnvme0");
        assert_eq!(vfio.len(), 1, "nvme bound to vfio-pci: {vfio:?}");
        g
    }

    /// Like [`boot`](Self::boot) with raw QEMU arguments and words added
    /// to the kernel command line (`cio.test=usb` runs the USB scenario).
    pub fn boot_with(rig: &std::path::Path, qemu_args: &[&str], cmdline: &str) -> Self {
        Self::boot_qemu(
            std::path::Path::new("qemu-system-x86_64"),
            rig,
            qemu_args,
            cmdline,
        )
    }

    /// Like [`boot_with`](Self::boot_with) with another QEMU binary (e.g.
    /// [`qemu11`]).
    pub fn boot_qemu(
        qemu: &std::path::Path,
        rig: &std::path::Path,
        qemu_args: &[&str],
        cmdline: &str,
    ) -> Self {
        let port = free_port();
        let key = format!("qemu-test-key-{port}-0123456789abcdef");
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-machine",
            "q35,kernel-irqchip=split",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args(["-m", "512", "-smp", "1", "-nographic", "-no-reboot"])
        .args(["-device", "intel-iommu,intremap=on,caching-mode=on"])
        .arg("-kernel")
        .arg(rig.join("vmlinuz"))
        .arg("-initrd")
        .arg(rig.join("initramfs.gz"))
        // no_timer_check: on a loaded TCG host the kernel's IO-APIC timer
        // check can fail ("timer doesn't work through Interrupt-remapped
        // IO-APIC", a panic at boot).
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 intel_iommu=on random.trust_cpu=on no_timer_check cio.psk={key} {cmdline}"
        ))
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:7451"
        ))
        .args(["-device", "virtio-net-pci,netdev=n0"]);
        cmd.args(qemu_args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", qemu.display()));
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let console = Arc::clone(&console);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
                    c.push_str(&strip_ansi(&line));
                    c.push('\n');
                }
            });
        }
        let input = child.stdin.take();
        Self {
            child,
            console,
            input,
            commands: 0,
            port,
            key,
        }
    }

    /// The console so far, without terminal escapes.
    pub fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the console has a line containing `marker`; fails with
    /// the console if it does not appear in `timeout`, QEMU exits, or the
    /// guest reports `CIO-FAIL` or `CIO-STUCK`.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            let c = self.console();
            if let Some(l) = c.lines().find(|l| l.contains("CIO-FAIL")) {
                return Err(format!("guest reported a failure: {l}"));
            }
            if let Some(l) = c.lines().find(|l| l.contains("CIO-STUCK")) {
                // What the guest prints after it (its kernel log) comes
                // with the console the failing test prints.
                std::thread::sleep(Duration::from_secs(2));
                return Err(format!("guest is stuck: {l}"));
            }
            if c.lines().any(|l| l.contains(marker)) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("qemu exited ({status}) before {marker:?}"));
            }
            if Instant::now() >= end {
                return Err(format!("no {marker:?} on the console within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until QEMU exits (after the guest powers off, or a QMP
    /// `quit`) and returns its status; fails if it still runs after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let end = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() >= end => {
                    return Err(format!("qemu still runs after {timeout:?}"))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("waiting for qemu: {e}")),
            }
        }
    }

    /// Runs `command` in the guest's shell (guest-init.sh reads commands
    /// from the console once it is ready) and returns its exit status and
    /// output; fails if it does not finish within `timeout`.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<(i32, String), String> {
        use std::io::Write;
        assert!(!command.contains('\n'), "one line: {command:?}");
        self.commands += 1;
        let id = self.commands;
        let input = self.input.as_mut().ok_or("no console input")?;
        writeln!(input, "{id} {command}")
            .and_then(|()| input.flush())
            .map_err(|e| format!("writing to the guest console: {e}"))?;
        let end_marker = format!("CIO-END {id} ");
        self.wait_for(&end_marker, timeout)
            .map_err(|e| format!("{command:?}: {e}"))?;
        let out_marker = format!("CIO-OUT {id} ");
        let console = self.console();
        let mut status = None;
        let mut out = String::new();
        for line in console.lines() {
            if let Some((_, l)) = line.split_once(&out_marker) {
                out.push_str(l);
                out.push('\n');
            } else if let Some((_, rc)) = line.split_once(&end_marker) {
                status = rc.trim().parse().ok();
            }
        }
        let status = status.ok_or_else(|| format!("{command:?}: no status"))?;
        Ok((status, out))
    }

    /// Console lines containing `marker`.
    pub fn lines_with(&self, marker: &str) -> Vec<String> {
        self.console()
            .lines()
            .filter(|l| l.contains(marker))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- guest console ----\n{}---- end of console ----",
                self.console()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_sequences_are_removed() {
        assert_eq!(strip_ansi("\u{1b}[2mtime\u{1b}[0m INFO x"), "time INFO x");
        assert_eq!(strip_ansi("plain"), "plain");
    }
}

/// A directory removed when the test ends, however it ends.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `len` pseudo-random bytes from `seed` (xorshift): test data whose every
/// block differs, the same in every run.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Runs one QMP command (`stop`, `cont`, `quit`, …) on QEMU's QMP socket
/// `sock` and waits for its answer.
pub fn qmp(sock: &std::path::Path, command: &str) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("qmp {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "qmp greeting: {line}");
    let mut w = s;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("return"), "qmp capabilities: {line}");
    writeln!(w, "{{\"execute\":\"{command}\"}}").unwrap();
    // Wait for the answer (or the end): QEMU drops queued commands of a
    // client that has gone.
    line.clear();
    let _ = r.read_line(&mut line);
}

/// Asks QEMU to quit through its QMP socket `sock` (a clean exit: its
/// block layer flushes the image) and waits for its answer.
pub fn qmp_quit(sock: &std::path::Path) {
    qmp(sock, "quit");
}
