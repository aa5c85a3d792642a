//! `ciod`: serves PCI devices to cio frontends.
// The doc comments below are clap's --help text, where brackets mean
// "optional", not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use std::net::SocketAddr;
use std::sync::Arc;

use cio_backend::access::Access;
use cio_backend::announce::{Announcement, Announcer};
use cio_backend::config::parse_size;
use cio_backend::usb::{stock::UsbipServer, CdcAcmEcho, UsbFilter, UsbModel, UsbProvider};
use cio_backend::{DeviceSpec, FileConfig, Limits, Security, Server, ServerConfig};
use cio_core::error_chain;
use cio_core::usbip::USBIP_PORT;
use cio_transports::{AuthorizedClients, Endpoint, Psk, DEFAULT_PORT};
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

/// Serve PCI and USB devices to cio frontends over TCP or Unix sockets.
///
/// Devices come from `--emulate` specs and/or a TOML config file. By default
/// ciod listens on 127.0.0.1 only, in plaintext. Any other address needs
/// TLS: an identity (`ciod keygen`) and the keys of the clients it lets in
/// (`--authorized-clients`, reloaded on SIGHUP), and/or a pre-shared key
/// every client must prove; nothing is visible before that.
///
/// Examples:
///   ciod --emulate edu                       # edu0 on 127.0.0.1:7451
///   ciod --emulate edu --emulate memory:mem0:64M --listen unix:/run/ciod.sock
///   ciod keygen /etc/cio/ciod.pem            # prints the key clients trust
///   ciod --listen 0.0.0.0:7451 --identity /etc/cio/ciod.pem \
///        --authorized-clients /etc/cio/authorized_clients --config /etc/cio/ciod.toml
///   ciod --vfio 0000:00:02.0=edu0            # a real function bound to vfio-pci
///   ciod probe 0000:00:02.0 --reads 1000     # check and time it locally first
///   ciod --usb 1-1 --usbip-listen 127.0.0.1   # a USB device, also to stock usbip
///   ciod --emulate-usb cdc-acm               # an emulated USB serial port (emu-1)
///
/// Make a key with: head -c 32 /dev/urandom | base64 > key; chmod 600 key
///
/// Log verbosity follows RUST_LOG (e.g. RUST_LOG=debug).
#[derive(Debug, Parser)]
#[command(
    name = "ciod",
    version,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,

    /// Where to listen: HOST:PORT, tcp:HOST:PORT or unix:PATH [default: 127.0.0.1:7451]
    #[arg(short, long)]
    listen: Option<String>,

    /// File holding the pre-shared key clients must prove (at least 16
    /// bytes). With TLS it is optional; its proof is then bound to each TLS
    /// session, so a man in the middle fails even where keys are not pinned.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,

    /// This backend's TLS identity (make it with `ciod keygen FILE`): every
    /// connection is then TLS 1.3. Required to listen beyond loopback.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,

    /// Client keys let in over TLS: one `sha256:… NAME` per line (the
    /// fingerprints `cio keygen` printed). Without it, with --psk-file, any
    /// client key that proves the pre-shared key is let in.
    #[arg(long, value_name = "FILE")]
    authorized_clients: Option<PathBuf>,

    /// Do not announce this backend by mDNS/DNS-SD (`_cio._tcp`, found by
    /// `cio discover`). A loopback listener is announced on loopback only.
    #[arg(long)]
    no_announce: bool,

    /// Listen beyond loopback in plaintext (needs --psk-file): register
    /// writes and DMA cross the network in the clear. Only on a network
    /// where every host is trusted.
    #[arg(long, conflicts_with = "identity")]
    insecure_plaintext: bool,

    /// TOML config file (listen, psk_file, [[device]] tables; see
    /// docs/config.md).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check a config file (syntax, unknown keys, device specs, release
    /// policies, the listen address, that the key file reads as a key) and
    /// exit: 0 if it is valid. Devices are not opened.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,

    /// Serve an emulated device: MODEL[:NAME[:SIZE]]; models: edu, memory.
    /// Repeat for several devices.
    #[arg(short, long, value_name = "SPEC")]
    emulate: Vec<DeviceSpec>,

    /// Serve a real PCI function bound to vfio-pci: BDF[=NAME], e.g.
    /// 0000:00:02.0=edu0, or VENDOR:DEVICE[=NAME] for the one function with
    /// that id, e.g. 8086:10d3=nic0. Bind it first: echo vfio-pci >
    /// /sys/bus/pci/devices/BDF/driver_override, unbind its driver, then
    /// echo BDF > /sys/bus/pci/drivers_probe.
    #[arg(long, value_name = "BDF|ID[=NAME]", value_parser = DeviceSpec::parse_vfio)]
    vfio: Vec<DeviceSpec>,

    /// Export real USB devices through the kernel's usbip-host: a bus id
    /// (1-1.2), a vendor:product id (0781:5567) or `all` (every device but
    /// hubs). Repeatable. Needs the usbip-host module. A device goes back to
    /// its own driver when its import ends, however it ends.
    #[arg(long, value_name = "BUSID|VID:PID|all")]
    usb: Vec<UsbFilter>,

    /// Export an emulated USB device (bus id emu-N): cdc-acm (a serial port
    /// that echoes what is written to it). Repeatable.
    #[arg(long, value_name = "MODEL")]
    emulate_usb: Vec<UsbModelName>,

    /// Also answer plain USB/IP (the stock `usbip` client) on ADDR, e.g.
    /// 0.0.0.0:3240 or 127.0.0.1 (port 3240 if omitted). Plain USB/IP has no
    /// authentication: use it only where every peer is trusted.
    #[arg(long, value_name = "ADDR")]
    usbip_listen: Option<String>,

    /// End a USB import whose client sent nothing (not even its keepalive
    /// pings) for SECS seconds, and give the device back. [default: 60]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    usb_idle_timeout: Option<u64>,

    /// Keep a PCI session whose link broke for SECS seconds, its devices
    /// untouched (no reset, interrupts and DMA data queued), so that its
    /// client can reconnect and resume it with nothing lost. 0 ends
    /// sessions with their connection (devices reset at once). [default: 30]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86400))]
    resume_grace: Option<u64>,

    /// Authenticated sessions at once (parked ones included); more are
    /// refused with a LIMIT error at Hello. [default: 64]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_sessions: Option<u64>,

    /// Connections in their handshake at once, in slots of their own; when
    /// all are taken a new connection evicts the oldest, so idle or
    /// unauthenticated connections cannot lock clients out. [default: 32]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_handshakes: Option<u64>,

    /// Connections in their handshake at once from one IP address. [default: 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_handshakes_per_peer: Option<u64>,

    /// Seconds a connection has to complete its handshake. [default: 5]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    handshake_timeout: Option<u64>,

    /// Hand device NAME on to the next session exactly as the last one left
    /// it, when it has no reset that clears its state (the default clears
    /// bus mastering and INTx). Repeatable; config files say `release =
    /// "as-is"` in the device's table.
    #[arg(long, value_name = "NAME")]
    keep_state: Vec<String>,

    /// DMA address space one session may map (e.g. 4G): the most shadow
    /// memory it can make ciod commit [default: a quarter of this
    /// machine's memory, at most 64G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_mapped_per_session: Option<u64>,

    /// DMA address space all sessions together may map: the bound on
    /// ciod's shadow memory [default: half of this machine's memory].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_mapped_total: Option<u64>,

    /// Replies one session may have waiting for a slow client before it
    /// stops reading that client's requests [default: 32M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_queued_per_session: Option<u64>,

    /// Replies all sessions together may have waiting; past it, sessions
    /// holding more than their share (this over --max-sessions) stop
    /// reading [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_queued_total: Option<u64>,

    /// Take the link of a resumable session as lost when its client sent
    /// nothing (frontends ping every few seconds) for SECS seconds. [default: 20]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    link_timeout: Option<u64>,

    /// Polling mode: after each request a session polls for the next one
    /// for US microseconds before it sleeps (lower latency, a core spinning
    /// while a client is busy; as SPDK and DPDK do). [default: 0, sleep at
    /// once]
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=100000))]
    poll_us: Option<u64>,
}

/// Emulated USB models `--emulate-usb` knows.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UsbModelName {
    /// CDC-ACM serial port that echoes its input.
    CdcAcm,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Print shell completions for ciod (e.g. `ciod completions bash >
    /// /etc/bash_completion.d/ciod`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print ciod's man page (roff; `ciod man | man -l -`).
    Man,
    /// Make this backend's TLS identity in FILE and print its fingerprint.
    ///
    /// The identity is a key in a self-signed certificate; clients trust
    /// it with `cio trust HOST FINGERPRINT`.
    Keygen {
        /// Where to write it (never overwritten), e.g. /etc/cio/ciod.pem.
        file: PathBuf,
        /// A name for the key, kept in its certificate.
        #[arg(long, default_value = "ciod")]
        name: String,
    },
    /// Open a function bound to vfio-pci here, describe it and time local
    /// reads of one register (the local baseline for remote reads).
    Probe {
        /// PCI address, e.g. 0000:00:02.0.
        bdf: String,
        /// Region to read (0-5 for BARs, 7 for config space).
        #[arg(long, default_value_t = 0)]
        region: u32,
        /// Offset of the 4-byte register to read.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Number of timed reads.
        #[arg(long, default_value_t = 1000)]
        reads: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ciod: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(bdf: &str, region: u32, offset: u64, reads: usize) -> Result<(), String> {
    use cio_core::Device;
    let mut dev = cio_backend::vfio::VfioPci::open(bdf, bdf).map_err(|e| error_chain(&e))?;
    let info = dev.info().clone();
    println!(
        "{bdf}: {:04x}:{:04x} rev {:02x} class {:06x}",
        info.vendor, info.device, info.revision, info.class
    );
    for r in &info.regions {
        println!(
            "  region {}: {:?}, {:#x} bytes, widths {:#x}",
            r.index, r.kind, r.size, r.widths
        );
    }
    let mut times = Vec::with_capacity(reads.max(1));
    let mut value = 0;
    for _ in 0..reads.max(1) {
        let t = std::time::Instant::now();
        value = dev.read32(region, offset).map_err(|e| error_chain(&e))?;
        times.push(t.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "local 4-byte reads of region {region} at {offset:#x} via {} = {value:#010x}: {} reads, median {} ns, p99 {p99} ns",
        if dev.mapped_regions().contains(&region) { "mmap" } else { "read/write" },
        times.len(),
        times[times.len() / 2]
    );
    Ok(())
}

/// `--check-config`: everything about the file that can be checked without
/// opening a device.
fn check_config(path: &std::path::Path) -> Result<(), String> {
    let file = FileConfig::load(path)?;
    let specs = file.specs()?;
    let policies = file.release_policies()?;
    let listen: Endpoint = file
        .listen
        .clone()
        .unwrap_or_else(|| format!("127.0.0.1:{DEFAULT_PORT}"))
        .parse()
        .map_err(|e| format!("listen: {}", error_chain(&e)))?;
    if let Some(p) = &file.psk_file {
        Psk::from_file(p).map_err(|e| format!("psk_file: {}", error_chain(&e)))?;
    }
    let security = Security::load(
        file.identity.as_deref(),
        file.authorized_clients.as_deref(),
        file.insecure_plaintext,
        file.psk_file.is_some(),
    )?;
    security
        .check(&listen, file.psk_file.is_some())
        .map_err(|e| format!("ciod would refuse to start: {e}"))?;
    let mut names = std::collections::BTreeSet::new();
    for s in &specs {
        if !names.insert(s.name().to_owned()) {
            return Err(format!("two devices are named {:?}", s.name()));
        }
    }
    Access::new(file.access.clone())?;
    limits(&Args::parse_from(["ciod"]), &file)?;
    if let (Some(path), false) = (&file.authorized_clients, file.access.is_empty()) {
        let clients = AuthorizedClients::load(path).map_err(|e| error_chain(&e))?;
        let known: Vec<String> = clients.names().map(str::to_string).collect();
        for r in &file.access {
            if r.client != "*" && !known.contains(&r.client) {
                return Err(format!(
                    "[[access]] names client {:?}, which {} does not list",
                    r.client,
                    path.display()
                ));
            }
        }
    }
    println!("{}: valid", path.display());
    let link = match &security {
        Security::Tls(t) => format!("TLS as {}", t.fingerprint()),
        Security::LocalPlaintext => "plaintext (local)".into(),
        Security::InsecurePlaintext => "plaintext (insecure)".into(),
    };
    println!(
        "  listen {listen}, {link}, pre-shared key {}",
        if file.psk_file.is_some() {
            "set"
        } else {
            "none"
        }
    );
    for r in &file.access {
        println!("  access {:?}: {}", r.client, r.devices.join(", "));
    }
    for s in &specs {
        let release = policies
            .iter()
            .find(|(n, _)| n == s.name())
            .map_or("clear (default)".to_string(), |(_, r)| r.to_string());
        println!("  device {:?}: {s:?}, release {release}", s.name());
    }
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    if let Some(p) = &args.check_config {
        return check_config(p);
    }
    match &args.cmd {
        Some(Cmd::Completions { shell }) => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "ciod", &mut buf);
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &buf);
            return Ok(());
        }
        Some(Cmd::Man) => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_mangen::Man::new(Args::command())
                .render(&mut buf)
                .map_err(|e| format!("writing the man page: {e}"))?;
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &buf);
            return Ok(());
        }
        Some(Cmd::Probe {
            bdf,
            region,
            offset,
            reads,
        }) => return probe(bdf, *region, *offset, *reads),
        Some(Cmd::Keygen { file, name }) => {
            let id = cio_transports::Identity::create(file, name).map_err(|e| error_chain(&e))?;
            println!("{}", id.fingerprint());
            eprintln!(
                "identity written to {}; clients trust it with: cio trust HOST {}",
                file.display(),
                id.fingerprint()
            );
            return Ok(());
        }
        None => {}
    }
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let mut specs = file.specs()?;
    specs.extend(args.emulate.iter().cloned());
    specs.extend(args.vfio.iter().cloned());
    let models: Vec<Arc<dyn UsbModel>> = args
        .emulate_usb
        .iter()
        .map(|m| match m {
            UsbModelName::CdcAcm => Arc::new(CdcAcmEcho) as Arc<dyn UsbModel>,
        })
        .collect();
    let usb = Arc::new(UsbProvider::new(args.usb.clone(), models));
    if specs.is_empty() && usb.is_empty() {
        return Err(
            "no devices to serve: add --emulate edu, --usb BUSID, --emulate-usb cdc-acm or [[device]] tables in --config".into(),
        );
    }
    for busid in usb.recover() {
        info!(
            busid,
            "gave back a USB device an earlier ciod left on usbip-host"
        );
    }
    for d in usb.list() {
        info!(busid = %d.busid, "exporting USB {:04x}:{:04x} {}", d.vendor, d.product, d.product_name);
    }
    let usbip_addr: Option<SocketAddr> = match &args.usbip_listen {
        None => None,
        Some(a) => Some(
            a.parse()
                .or_else(|_| format!("{a}:{USBIP_PORT}").parse())
                .map_err(|_| {
                    format!("--usbip-listen {a:?}: expected IP[:PORT], e.g. 0.0.0.0:3240")
                })?,
        ),
    };
    let listen = args
        .listen
        .clone()
        .or(file.listen.clone())
        .unwrap_or_else(|| format!("127.0.0.1:{DEFAULT_PORT}"));
    let listen: Endpoint = listen.parse().map_err(|e| error_chain(&e))?;
    let psk = match args.psk_file.as_ref().or(file.psk_file.as_ref()) {
        Some(p) => Some(Psk::from_file(p).map_err(|e| error_chain(&e))?),
        None => None,
    };
    let clients_file = args
        .authorized_clients
        .clone()
        .or(file.authorized_clients.clone());
    let security = Security::load(
        args.identity.as_deref().or(file.identity.as_deref()),
        clients_file.as_deref(),
        args.insecure_plaintext || file.insecure_plaintext,
        psk.is_some(),
    )?;
    let tls = match &security {
        Security::Tls(t) => Some(t.clone()),
        _ => None,
    };
    let mut devices = Vec::new();
    for s in &specs {
        let d = s
            .build()
            .map_err(|e| format!("building {s:?}: {}", error_chain(&e)))?;
        info!(device = %d.info().name, "serving {:04x}:{:04x}", d.info().vendor, d.info().device);
        devices.push(d);
    }
    let limits = limits(&args, &file)?;
    let n_devices = devices.len() + usb.list().len();
    let server = Server::bind(ServerConfig {
        listen,
        psk,
        devices,
        limits,
        usb: Arc::clone(&usb),
        security,
    })
    .map_err(|e| error_chain(&e))?;
    for (name, release) in file.release_policies()? {
        server
            .set_release(&name, release)
            .map_err(|e| error_chain(&e))?;
    }
    server.set_access(Access::new(file.access.clone())?);
    for name in &args.keep_state {
        server
            .set_release(name, cio_backend::registry::Release::AsIs)
            .map_err(|e| error_chain(&e))?;
    }
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let usbip = match usbip_addr {
        Some(a) => Some(
            UsbipServer::bind(a, Arc::clone(&usb))
                .and_then(UsbipServer::spawn)
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let handle = server.spawn().map_err(|e| error_chain(&e))?;
    let _announcer = if args.no_announce {
        None
    } else {
        let a = Announcement {
            endpoint: handle.endpoint().clone(),
            key: tls.as_ref().map(|t| t.fingerprint()),
            devices: n_devices,
        };
        match Announcer::start(&a) {
            Ok(Some(a)) => {
                info!(name = a.fullname(), "announced by mDNS (_cio._tcp)");
                Some(a)
            }
            Ok(None) => None,
            Err(e) => {
                warn!("not announced by mDNS: {e}");
                None
            }
        }
    };
    for sig in signals.forever() {
        if sig != SIGHUP {
            info!("signal {sig}: shutting down");
            break;
        }
        // Reload the authorized clients and the access rules: new
        // connections and requests follow them, sessions keep going.
        reload(
            &handle,
            args.config.as_deref(),
            tls.as_ref(),
            clients_file.as_deref(),
        );
    }
    // Both end their USB imports, which gives the devices back.
    if let Some(u) = usbip {
        u.shutdown();
    }
    handle.shutdown();
    Ok(())
}

/// The limits: each from its flag, else the config file's `[limits]`
/// table, else the default; every value checked against its range.
fn limits(args: &Args, file: &FileConfig) -> Result<Limits, String> {
    use std::time::Duration;
    let d = Limits::default();
    let f = file.limits.clone().unwrap_or_default();
    let pick =
        |name: &str, flag: Option<u64>, file: Option<u64>, default: u64, lo: u64, hi: u64| {
            let v = flag.or(file).unwrap_or(default);
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(format!("{name} = {v}: must be between {lo} and {hi}"))
            }
        };
    let size =
        |name: &str, flag: Option<u64>, file: &Option<String>, default: u64| match (flag, file) {
            (Some(v), _) => Ok(v),
            (None, Some(t)) => parse_size(t).map_err(|e| format!("[limits] {name}: {e}")),
            (None, None) => Ok(default),
        };
    let secs = Duration::from_secs;
    let count = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(Limits {
        usb_idle_timeout: secs(pick(
            "usb_idle_timeout",
            args.usb_idle_timeout,
            f.usb_idle_timeout,
            d.usb_idle_timeout.as_secs(),
            1,
            86400,
        )?),
        resume_grace: secs(pick(
            "resume_grace",
            args.resume_grace,
            f.resume_grace,
            d.resume_grace.as_secs(),
            0,
            86400,
        )?),
        max_sessions: count(pick(
            "max_sessions",
            args.max_sessions,
            f.max_sessions,
            d.max_sessions as u64,
            1,
            4096,
        )?),
        max_handshakes: count(pick(
            "max_handshakes",
            args.max_handshakes,
            f.max_handshakes,
            d.max_handshakes as u64,
            1,
            4096,
        )?),
        max_handshakes_per_peer: count(pick(
            "max_handshakes_per_peer",
            args.max_handshakes_per_peer,
            f.max_handshakes_per_peer,
            d.max_handshakes_per_peer as u64,
            1,
            4096,
        )?),
        handshake_timeout: secs(pick(
            "handshake_timeout",
            args.handshake_timeout,
            f.handshake_timeout,
            d.handshake_timeout.as_secs(),
            1,
            600,
        )?),
        link_timeout: secs(pick(
            "link_timeout",
            args.link_timeout,
            f.link_timeout,
            d.link_timeout.as_secs(),
            1,
            86400,
        )?),
        poll: Duration::from_micros(pick(
            "poll_us",
            args.poll_us,
            f.poll_us,
            d.poll.as_micros() as u64,
            0,
            100000,
        )?),
        max_mapped_bytes: size(
            "max_mapped_per_session",
            args.max_mapped_per_session,
            &f.max_mapped_per_session,
            d.max_mapped_bytes,
        )?,
        max_mapped_total: size(
            "max_mapped_total",
            args.max_mapped_total,
            &f.max_mapped_total,
            d.max_mapped_total,
        )?,
        max_queued_bytes: count(size(
            "max_queued_per_session",
            args.max_queued_per_session,
            &f.max_queued_per_session,
            d.max_queued_bytes as u64,
        )?),
        max_queued_total: count(size(
            "max_queued_total",
            args.max_queued_total,
            &f.max_queued_total,
            d.max_queued_total as u64,
        )?),
        ..d
    })
}

/// SIGHUP: reads the authorized clients and the config file's access rules
/// again; keeps the old ones when a file is unusable.
fn reload(
    handle: &cio_backend::ServerHandle,
    config: Option<&std::path::Path>,
    tls: Option<&cio_transports::ServerTls>,
    clients: Option<&std::path::Path>,
) {
    if let (Some(tls), Some(path)) = (tls, clients) {
        match AuthorizedClients::load(path) {
            Ok(c) => {
                info!(clients = c.len(), file = %path.display(), "SIGHUP: authorized clients reloaded");
                tls.set_clients(c);
            }
            Err(e) => warn!(
                "SIGHUP: keeping the authorized clients: {}",
                error_chain(&e)
            ),
        }
    }
    if let Some(path) = config {
        match FileConfig::load(path).and_then(|f| Access::new(f.access)) {
            Ok(a) => {
                info!(file = %path.display(), open = a.is_open(), "SIGHUP: access rules reloaded");
                handle.set_access(a);
            }
            Err(e) => warn!("SIGHUP: keeping the access rules: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Args::command().debug_assert();
    }
}
