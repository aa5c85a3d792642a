//! `cio`: use PCI devices served by a `ciod` on another host.
// The doc comments below are clap's --help text, where brackets mean
// "optional", not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use cio_core::error_chain;
use cio_core::{DeviceInfo, RegionKind};
use cio_frontend::usb::{self, RelayEnd, UsbSource, Vhci};
use cio_frontend::{Client, ClientOptions};
use cio_transports::{Endpoint, Fingerprint, Identity};
use clap::{Parser, Subcommand};

/// `println!` that does not panic when stdout is gone (`cio usb list | grep -q`).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that does not panic when stdout is gone.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

mod bench;
mod demo;
mod detached;
mod discover;
mod json;
mod keys;
mod libvirt;
mod migrate;
mod progress;
mod regress;
mod regs;
mod soak;

/// Use PCI and USB devices served by a ciod on another host, as if they were local.
///
/// HOST is HOST[:PORT] (default port 7451), tcp:HOST:PORT or unix:PATH.
/// Links beyond loopback are TLS 1.3 with pinned keys (see --tls, --identity,
/// --known-backends); plaintext there needs --insecure-plaintext.
///
/// Examples:
///   cio demo                      # self-contained: embedded ciod + emulated edu
///   cio demo --handoff            # ... and the session moves to a second process
///   cio session show TICKET       # what a handoff ticket hands on
///   cio read 127.0.0.1 edu0 bar0 factorial   # a register, by name or offset
///   cio dump 127.0.0.1 mem0 bar0 --len 256
///   cio list 127.0.0.1
///   cio info 127.0.0.1 edu0
///   cio keygen                    # this client's TLS key; prints its fingerprint
///   cio trust 192.0.2.10 sha256:… # the backend's key (from `ciod keygen`)
///   cio list 192.0.2.10           # TLS beyond loopback, keys checked both ways
///   cio usb list 192.0.2.10          # USB devices; see cio usb --help
///
/// Log verbosity follows RUST_LOG (e.g. RUST_LOG=debug).
#[derive(Debug, Parser)]
#[command(name = "cio", version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    link: keys::LinkArgs,

    /// A hw profile (TOML, as in hw-profiles/profiles/) naming the
    /// registers of devices with its vendor:device ids, instead of the
    /// built-in one (for `info`, `read`, `write`, `dump`).
    #[arg(long, global = true, value_name = "FILE")]
    profile: Option<PathBuf>,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make this client's TLS identity and print its fingerprint.
    ///
    /// The identity is a key in a self-signed certificate; the fingerprint
    /// is the line the backend's administrator adds to ciod's
    /// authorized_clients file.
    Keygen {
        /// Where to write it (never overwritten)
        /// [default: ~/.config/cio/identity.pem].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// A name for the key, kept in its certificate.
        #[arg(long, default_value = "cio client")]
        name: String,
    },
    /// Trust a backend's key for TLS.
    ///
    /// Adds `HOST FINGERPRINT` to the known-backends file. Get the
    /// fingerprint from the backend's administrator (`ciod keygen` printed
    /// it) over a channel you trust.
    Trust {
        /// Backend address, as given to the other commands.
        host: String,
        /// The key, sha256:…
        fingerprint: Fingerprint,
    },
    /// Find backends on the local networks (mDNS/DNS-SD `_cio._tcp`, which
    /// ciod announces) and list their devices.
    Discover {
        /// How long to wait for answers, in seconds.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
        /// Only the announcements; do not connect to list devices.
        #[arg(long)]
        no_list: bool,
        /// Print JSON instead of text (fields in docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// List the devices a backend serves.
    List {
        /// Backend address.
        host: String,
        /// Print JSON instead of text (fields in docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Describe one device: ids, regions, interrupts, named registers.
    Info {
        /// Backend address.
        host: String,
        /// Device name (from `cio list`).
        device: String,
        /// Print JSON instead of text (fields in docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Drive an edu through the real TCP path: factorials, interrupts, DMA
    /// round trip, reset. Without HOST it starts an embedded backend with
    /// an emulated edu.
    ///
    /// With --handoff it shows the migration primitive: the first half runs
    /// here, then the live session is handed to a second cio process, which
    /// finishes with the device state intact (no reset).
    Demo {
        /// A running ciod serving an edu (e.g. `ciod --emulate edu`).
        host: Option<String>,
        /// The edu to drive.
        #[arg(long, default_value = "edu0")]
        device: String,
        /// Leave out the reset check (QEMU's real edu has no reset method).
        #[arg(long)]
        skip_reset: bool,
        /// Hand the session to a second cio process halfway through.
        #[arg(long)]
        handoff: bool,
    },
    /// Read one register: REGION is 0-5 / bar0-bar5 / config, OFFSET a
    /// number or a register name from the device's hw profile.
    ///
    /// Each cio command is a session of its own: when it ends the device is
    /// released, and reset if it has a reset (`cio info` says), so a value
    /// written by one `cio write` is gone for the next `cio read` on such a
    /// device. Sequences that must keep state belong in one program (the
    /// library) or a resumable session.
    ///
    /// Example: cio read 127.0.0.1 edu0 bar0 factorial
    Read {
        /// Backend address.
        host: String,
        /// Device name.
        device: String,
        /// Region.
        region: String,
        /// Offset (decimal, 0x hex) or register name.
        offset: String,
        /// Access width in bytes (1, 2, 4, 8) [default: the register's, else 4].
        width: Option<usize>,
    },
    /// Write one register (posted, then a round trip that reports an error).
    ///
    /// Example: cio write 127.0.0.1 edu0 bar0 factorial 10
    Write {
        /// Backend address.
        host: String,
        /// Device name.
        device: String,
        /// Region.
        region: String,
        /// Offset (decimal, 0x hex) or register name.
        offset: String,
        /// Value (decimal or 0x hex).
        value: String,
        /// Access width in bytes (1, 2, 4, 8) [default: the register's, else 4].
        width: Option<usize>,
    },
    /// The config header and capability list, decoded (like lspci -vv).
    Config {
        /// Backend address.
        host: String,
        /// Device name.
        device: String,
    },
    /// Dump a region (or part of it) as hex, or raw to a file.
    Dump {
        /// Backend address.
        host: String,
        /// Device name.
        device: String,
        /// Region.
        region: String,
        /// First byte.
        #[arg(long, default_value = "0", value_parser = regs::number)]
        offset: u64,
        /// Bytes [default: to the end of the region].
        #[arg(long, value_parser = regs::number)]
        len: Option<u64>,
        /// Write the raw bytes to FILE instead.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Handoff tickets (written by a program that called
    /// `Client::suspend`, or by `cio demo --handoff`).
    Session {
        #[command(subcommand)]
        cmd: SessionCmd,
    },
    /// The second half of `cio demo --handoff`: adopt the session in a
    /// ticket file and finish.
    #[command(hide = true)]
    AdoptDemo {
        /// Ticket file written by the first half.
        ticket: PathBuf,
    },
    /// Measure cio against the raw transport in the same run (P1 read
    /// latency, P2 posted writes/s, P3 DMA sync bandwidth, P4 interrupt
    /// latency, P7 sync cost vs mapping size, P8 bulk BAR access; T1 and T3: the same read and
    /// DMA sync over TLS against plaintext, T0 rustls alone against TCP)
    /// and print ratios.
    Bench {
        /// A few seconds instead of minutes: checks the code paths, the
        /// numbers are not meant to be read.
        #[arg(long)]
        quick: bool,
        /// Transports to measure.
        #[arg(long, value_enum, default_value = "all")]
        transport: TransportArg,
        /// Where to write the results as JSON.
        #[arg(long, value_name = "FILE", default_value = "cio-bench.json")]
        json: PathBuf,
        /// Run only these measurements (comma-separated: P1,P2,P3,P4,P7,P8,T0,T1,T3).
        #[arg(long, value_delimiter = ',', value_name = "IDS")]
        only: Vec<String>,
        /// With --transport rdma: an address of this machine's RDMA device
        /// interface (e.g. soft-RoCE's netdev); the rows listen on it from
        /// port 7460 up and connect to it.
        #[arg(long, value_name = "IP")]
        rdma_addr: Option<std::net::IpAddr>,
        /// Run the suite --runs times and write FILE: per row the median,
        /// best and worst ratio seen (this machine's run-to-run noise) and
        /// the limit a later --check may not pass (the worst, 1.5 times
        /// worse again). Leave the machine otherwise idle while it runs.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["quick", "check"])]
        record_baseline: Option<PathBuf>,
        /// How many full runs --record-baseline measures.
        #[arg(long, default_value_t = 5, requires = "record_baseline",
              value_parser = clap::value_parser!(u32).range(2..=50))]
        runs: u32,
        /// Measure the rows FILE (from --record-baseline) holds and exit
        /// non-zero when a ratio is past its limit; a row past it is
        /// measured up to twice more and fails only if it is past it every
        /// time, so a noisy run does not fail the check.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["quick", "only", "transport"])]
        check: Option<PathBuf>,
    },
    /// Soak an embedded backend: CLIENTS clients with mixed IO (edu
    /// self-tests with MSI and DMA; posted-write bursts and DMA round trips
    /// on memory devices; a new session every few rounds) and one hostile
    /// client (garbage, cut frames, silence) for SECS seconds, reporting
    /// operations, errors, RSS and fds as it goes. Exits non-zero on any
    /// error or if the backend is not idle at the end.
    ///
    /// With --backend it soaks a running ciod instead, one client per
    /// --edu and --memory device (edu self-tests without the reset check:
    /// a real edu has no reset method), with the hostile client beside them
    /// on the same link, e.g.
    ///   cio soak --backend rdma:10.0.0.1:7451 --insecure-plaintext \
    ///       --psk-file key --edu vedu0 --memory mem0 --seconds 30
    #[command(group(clap::ArgGroup::new("devices").multiple(true)))]
    Soak {
        /// How long, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Well-behaved clients (embedded backend).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64),
              conflicts_with = "backend")]
        clients: u64,
        /// Soak this running backend instead of an embedded one.
        #[arg(long, value_name = "HOST", requires = "devices")]
        backend: Option<String>,
        /// An edu of that backend to drive (repeatable).
        #[arg(long = "edu", value_name = "NAME", group = "devices")]
        edus: Vec<String>,
        /// A memory device of that backend to drive (repeatable).
        #[arg(long = "memory", value_name = "NAME", group = "devices")]
        memories: Vec<String>,
        /// Rounds a client's session runs before it starts a new one (0:
        /// one session per client for the whole soak, e.g. to watch it
        /// ride out a link loss).
        #[arg(long, default_value_t = 4)]
        session_rounds: u64,
        /// Seconds between report lines.
        #[arg(long, default_value_t = 10)]
        every: u64,
    },
    /// Print shell completions for cio (e.g. `cio completions bash >
    /// /etc/bash_completion.d/cio`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print cio's man page (roff; `cio man | man -l -`).
    Man,
    /// libvirt's QEMU hook: start the vfio-user servers a domain names.
    ///
    /// Installed as /etc/libvirt/hooks/qemu (dist/libvirt/qemu calls it),
    /// libvirt runs it with the domain XML on stdin. At "prepare begin" it
    /// starts `cio vfio-user HOST NAME --socket SOCKET` for every
    /// <cio:device> in the domain's metadata (namespace urn:cio:libvirt:1;
    /// attributes host, name, socket, and psk-file, identity,
    /// known-backends, backend-key, tls, insecure-plaintext as cio's
    /// options) and waits until each listens; if one fails, the domain does
    /// not start and libvirt shows why. At "release end" it stops what is
    /// left of them.
    ///
    /// Migration: with handoff="yes" a device's server is started with
    /// --handoff-to RUN_DIR/DOMAIN/N.ticket, so unplugging the device
    /// (device_del) suspends its session into that ticket; `cio
    /// libvirt-handoff` puts the tickets into the migration XML. On the
    /// destination "migrate begin" takes them out of the XML, refuses a
    /// device that comes without a valid one (the guest would find it dead)
    /// and drops its -device argument (the source no longer has it);
    /// "prepare begin" then serves it with `cio vfio-user --adopt`, and
    /// RUN_DIR/DOMAIN/N.device holds the device_add arguments that plug it
    /// back. At "release end" a ticket nobody adopted is ended, so the
    /// backend releases the device at once. Other operations do nothing.
    ///
    /// Example metadata (see docs/guide.md for the QEMU arguments):
    ///   <cio:devices xmlns:cio="urn:cio:libvirt:1">
    ///     <cio:device host="192.0.2.10" name="vnvme0" socket="/run/cio/vm1-nvme.sock"
    ///                 handoff="yes"/>
    ///   </cio:devices>
    #[command(verbatim_doc_comment)]
    LibvirtHook {
        /// The domain's name.
        domain: String,
        /// libvirt's operation (prepare, start, started, stopped, release, migrate...).
        operation: String,
        /// Its sub-operation (begin, end, -).
        sub_operation: String,
        /// libvirt's extra argument (unused).
        extra: Option<String>,
        /// Where the servers' pids, sockets and logs are kept.
        #[arg(long, value_name = "DIR", default_value = libvirt::RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Put a domain's handoff tickets into its migration XML.
    ///
    /// Reads the domain's XML on stdin (`virsh dumpxml --migratable`) and
    /// prints it with the ticket of each of its cio devices inside that
    /// device's element, for `virsh migrate --xml`. Each device must be
    /// served with handoff="yes" and unplugged already (device_del), so
    /// that its session waits in RUN_DIR/DOMAIN/N.ticket. The output holds
    /// the sessions' secrets: keep it private (the destination's hook takes
    /// them out again). Tickets expire with the backend's resume window
    /// (ciod --resume-grace, 30 s by default).
    ///
    /// Example (docs/guide.md has the whole move):
    ///   virsh dumpxml --migratable vm1 | cio libvirt-handoff vm1 > vm1.xml
    ///   virsh migrate --live --xml vm1.xml vm1 qemu+ssh://C/system
    #[command(verbatim_doc_comment)]
    LibvirtHandoff {
        /// The domain's name.
        domain: String,
        /// Where the hook keeps the domain's servers and tickets.
        #[arg(long, value_name = "DIR", default_value = libvirt::RUN_DIR)]
        run_dir: PathBuf,
    },
    /// USB devices of another host, attached here through vhci-hcd.
    ///
    /// SOURCE is a ciod (HOST[:PORT], unix:PATH; authenticated, relayed by
    /// `cio usb attach`, which keeps running while the device is attached)
    /// or a stock USB/IP server (usbip://HOST[:PORT], port 3240 by default;
    /// the kernel carries the device, attach returns at once).
    ///
    /// Examples:
    ///   cio usb list 192.0.2.10
    ///   cio --psk-file key usb attach --background 192.0.2.10 1-1
    ///   cio --psk-file key usb attach --direct 192.0.2.10 1-1
    ///   cio usb attach usbip://192.0.2.11 2-1.4
    ///   cio usb port
    ///   cio usb detach 15
    #[command(verbatim_doc_comment)]
    Usb {
        #[command(subcommand)]
        cmd: UsbCmd,
    },
    /// Present a device to a VMM as a vfio-user server on a Unix socket
    /// (QEMU 10.1+: -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"PATH"}}').
    ///
    /// DEVICE of the ciod at HOST, or with --emulate a model in this
    /// process. Serves one client and exits when it disconnects. SIGTERM or
    /// Ctrl-C stops it at once: it says goodbye to the backend (which then
    /// releases the device rather than keep the session for a resume) and
    /// removes the socket.
    ///
    /// DMA is cheapest with guest RAM shared by fd and a vIOMMU in the
    /// guest (only what its driver maps is compared with the device's copy):
    ///   -object memory-backend-memfd,id=mem,size=1G,share=on
    ///   -machine q35,memory-backend=mem -device intel-iommu,caching-mode=on
    /// Without shared RAM the server reaches guest memory by DMA_READ and
    /// DMA_WRITE messages (slower; see README). A remote device answers
    /// slower than a local one and its link may be resumed underneath: raise
    /// the client's reply timeout (QEMU: x-msg-timeout=MILLISECONDS, default
    /// 5000) above cio's resume time.
    ///
    /// Moving the VM (the device stays where it is): with --handoff-to, the
    /// cio session outlives the client (QEMU after `device_del`) in a ticket
    /// file; a `cio vfio-user --adopt TICKET` next to the VM's new QEMU
    /// serves the same open device, whose state QEMU's realize-time reset
    /// does not touch, to the re-plugged device.
    ///
    /// Examples:
    ///   cio vfio-user 192.0.2.10 vnvme0 --socket /tmp/nvme.sock
    ///   cio vfio-user --emulate edu --socket /tmp/edu.sock
    ///   cio vfio-user 192.0.2.10 vedu0 --socket /tmp/a.sock --handoff-to /tmp/t
    ///   cio vfio-user --adopt /tmp/t --socket /tmp/b.sock
    #[command(verbatim_doc_comment)]
    VfioUser {
        /// Backend address (not with --emulate or --adopt).
        #[arg(
            required_unless_present_any = ["emulate", "adopt"],
            conflicts_with_all = ["emulate", "adopt"]
        )]
        host: Option<String>,
        /// Device name (from `cio list`).
        #[arg(required_unless_present_any = ["emulate", "adopt"])]
        device: Option<String>,
        /// When the client disconnects, suspend the cio session into this
        /// ticket file (mode 0600: it holds the session's secret) instead of
        /// ending it: the device stays open, for `--adopt`.
        #[arg(long, value_name = "FILE", conflicts_with = "emulate")]
        handoff_to: Option<PathBuf>,
        /// Serve the device of a session another `cio vfio-user
        /// --handoff-to` suspended into this ticket, without resetting it.
        #[arg(long, value_name = "TICKET", conflicts_with = "emulate")]
        adopt: Option<PathBuf>,
        /// Serve an emulated model of this process instead of a remote device.
        #[arg(long, value_enum)]
        emulate: Option<EmulateArg>,
        /// The Unix socket to listen on (a stale socket there is replaced;
        /// the socket is removed on exit).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The DMA_READ/DMA_WRITE layout of the client, used when guest RAM
        /// is not shared by fd: `spec` (QEMU 11) or `qemu10` (QEMU 10.x's
        /// 32-bit count).
        #[arg(long, value_enum, default_value = "spec")]
        dma_layout: DmaLayoutArg,
        /// Seconds the client has to answer the server's DMA_READs (guest
        /// RAM not shared) before it is dropped.
        #[arg(long, value_name = "SECS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        dma_timeout: u64,
    },
    /// Move a VM to another QEMU while its vfio-user device stays on its host.
    ///
    /// QEMU carries no state for a vfio-user device, so the device is
    /// unplugged for the move and plugged back after it; the cio session,
    /// and with it the open device (never reset), goes from the source's
    /// `cio vfio-user --handoff-to TICKET` to a `cio vfio-user --adopt
    /// TICKET` this command starts (detached, its log next to the ticket).
    /// Steps, each waited for: device_del on the source (the guest sees a
    /// PCIe hot-unplug; a program in it holding the device must let go),
    /// the ticket, the adopter listening on --socket, migrate to --uri, and
    /// device_add on the destination's --bus (a hot-plug: the guest's driver
    /// probes the device again).
    ///
    /// Both QMP sockets and the ticket must be reachable from here, which is
    /// where the adopter runs: next to the destination QEMU. The device must
    /// sit on a hot-pluggable PCIe root port (-device pcie-root-port,id=rp0,…
    /// and bus=rp0 on the vfio-user-pci); the destination QEMU runs with
    /// -incoming and the same machine, without the device.
    ///
    /// Example:
    ///   cio --psk-file key migrate --from /run/src.qmp --to /run/dst.qmp \
    ///       --device vu0 --bus rp0 --ticket /run/vu0.ticket \
    ///       --socket /run/vu0-b.sock --uri unix:/run/mig.sock
    #[command(verbatim_doc_comment)]
    Migrate(migrate::Plan),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DmaLayoutArg {
    /// As the vfio-user spec and QEMU 11.
    Spec,
    /// As QEMU 10.x.
    Qemu10,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum EmulateArg {
    /// QEMU's edu (1234:11e8).
    Edu,
    /// cio's memory device (1 MiB BAR).
    Memory,
}

#[derive(Debug, Subcommand)]
enum UsbCmd {
    /// List the USB devices SOURCE exports.
    List {
        /// ciod address or usbip://HOST[:PORT].
        source: String,
        /// Print JSON instead of text (fields in docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Attach a device of SOURCE to this host (needs root and vhci-hcd).
    /// With a ciod it stays in the foreground carrying the device and exits
    /// when the device is detached (0) or the link is lost (1).
    Attach {
        /// ciod address or usbip://HOST[:PORT].
        source: String,
        /// Bus id of the device (from `cio usb list`).
        busid: String,
        /// ciod only: after the authenticated handshake, let both kernels
        /// speak USB/IP on the session's connection (no relay, fastest,
        /// returns at once; a lost link is noticed by TCP keepalive, about
        /// 25 s). Real (usbip-host) devices only.
        #[arg(long)]
        direct: bool,
        /// ciod only, relayed: carry the device from a background process
        /// and return once it is attached (its log goes to /run/cio/usb).
        #[arg(long, conflicts_with = "direct")]
        background: bool,
        /// Relayed: ping an idle backend every SECS seconds and give the
        /// link up after four intervals without a word from it (keep it
        /// below the backend's --usb-idle-timeout).
        #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        keepalive: u64,
    },
    /// Detach the device on a vhci port (from `cio usb port`).
    Detach {
        /// Port number.
        port: u32,
    },
    /// Show the devices attached through vhci-hcd.
    Port {
        /// Print JSON instead of text (fields in docs/json.md).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SessionCmd {
    /// What a ticket hands on: backend, session, devices and their DMA
    /// mappings and interrupt routes, expiry.
    Show {
        /// Ticket file.
        ticket: PathBuf,
        /// Print JSON instead of text (fields in docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Adopt the session and end it at once: its devices are released
    /// (reset) now instead of when the ticket expires.
    Release {
        /// Ticket file.
        ticket: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Tcp,
    Unix,
    /// TLS against plaintext TCP (rows T0, T1, T3).
    Tls,
    /// RDMA on --rdma-addr (a build with the rdma feature and an RDMA
    /// device); not part of `all`.
    Rdma,
    All,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cio: {e}");
            ExitCode::FAILURE
        }
    }
}

fn connect(host: &str, link: &keys::LinkArgs) -> Result<Client, String> {
    let ep: Endpoint = host.parse().map_err(|e| error_chain(&e))?;
    Client::connect(&ep, link.options(&ep)?).map_err(|e| error_chain(&e))
}

fn run(args: Args) -> Result<(), String> {
    let link = &args.link;
    if let Some(p) = &args.profile {
        regs::load_profile(p)?;
    }
    let psk = link.psk()?;
    match args.cmd {
        Cmd::Usb { cmd } => usb_cmd(cmd, link),
        Cmd::Discover {
            timeout,
            no_list,
            json: as_json,
        } => discover::run(
            std::time::Duration::from_secs(timeout.max(1)),
            as_json,
            !no_list,
            link,
        ),
        Cmd::Soak {
            seconds,
            clients,
            backend,
            edus,
            memories,
            session_rounds,
            every,
        } => {
            let target = match backend {
                None => soak::Target::Embedded {
                    clients: clients as usize,
                },
                Some(host) => {
                    let ep: Endpoint = host.parse().map_err(|e| error_chain(&e))?;
                    let opts = Box::new(link.options(&ep)?);
                    soak::Target::Remote {
                        ep,
                        opts,
                        edus,
                        memories,
                    }
                }
            };
            soak::run(&soak::Options {
                duration: std::time::Duration::from_secs(seconds),
                target,
                session_rounds,
                every: std::time::Duration::from_secs(every.max(1)),
            })
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "cio", &mut buf);
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &buf);
            Ok(())
        }
        Cmd::LibvirtHook {
            domain,
            operation,
            sub_operation,
            extra: _,
            run_dir,
        } => libvirt::hook(&domain, &operation, &sub_operation, &run_dir, link),
        Cmd::LibvirtHandoff { domain, run_dir } => {
            let mut xml = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml)
                .map_err(|e| format!("reading the domain XML: {e}"))?;
            let out = libvirt::with_tickets(&domain, &xml, &run_dir)?;
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
            Ok(())
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_mangen::Man::new(Args::command())
                .render(&mut buf)
                .map_err(|e| format!("writing the man page: {e}"))?;
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &buf);
            Ok(())
        }
        Cmd::Keygen { out, name } => {
            let out = out.unwrap_or_else(keys::default_identity);
            let id = Identity::create(&out, &name).map_err(|e| error_chain(&e))?;
            outln!("{}", id.fingerprint());
            eprintln!(
                "identity written to {}; give the line above to the backend's administrator for its authorized_clients file",
                out.display()
            );
            Ok(())
        }
        Cmd::Trust { host, fingerprint } => link.trust(&host, fingerprint),
        Cmd::List {
            host,
            json: as_json,
        } => {
            let client = connect(&host, link)?;
            let devices = client.list().map_err(|e| error_chain(&e))?;
            if as_json {
                outln!("{}", json::device_list(&host, &devices));
                return Ok(());
            }
            if devices.is_empty() {
                outln!("no devices");
            }
            for d in devices {
                let state = if d.busy { "in use" } else { "free" };
                outln!(
                    "{:<16} {:04x}:{:04x}  class {:06x}  {state}",
                    d.name,
                    d.vendor,
                    d.device,
                    d.class
                );
            }
            Ok(())
        }
        Cmd::Info {
            host,
            device,
            json: as_json,
        } => {
            let client = connect(&host, link)?;
            let dev = client.open(&device).map_err(|e| error_chain(&e))?;
            if as_json {
                outln!("{}", json::device_info(cio_core::Device::info(&dev)));
            } else {
                out!("{}", describe(cio_core::Device::info(&dev)));
            }
            Ok(())
        }
        Cmd::Demo {
            host,
            device,
            skip_reset,
            handoff,
        } => demo::run(demo::Options {
            host,
            device,
            psk,
            psk_file: link.psk_file.clone(),
            skip_reset,
            handoff,
        }),
        Cmd::AdoptDemo { ticket } => demo::second_half(&ticket, &psk),
        Cmd::Session { cmd } => session_cmd(cmd, link),
        Cmd::Read {
            host,
            device,
            region,
            offset,
            width,
        } => {
            let client = connect(&host, link)?;
            let mut dev = client.open(&device).map_err(|e| error_chain(&e))?;
            outln!("{}", regs::read(&mut dev, &region, &offset, width)?);
            Ok(())
        }
        Cmd::Write {
            host,
            device,
            region,
            offset,
            value,
            width,
        } => {
            let client = connect(&host, link)?;
            let mut dev = client.open(&device).map_err(|e| error_chain(&e))?;
            outln!(
                "{}",
                regs::write(&mut dev, &region, &offset, &value, width)?
            );
            Ok(())
        }
        Cmd::Config { host, device } => {
            let client = connect(&host, link)?;
            let mut dev = client.open(&device).map_err(|e| error_chain(&e))?;
            outln!("{}", regs::config(&mut dev)?);
            Ok(())
        }
        Cmd::Dump {
            host,
            device,
            region,
            offset,
            len,
            out,
        } => {
            let client = connect(&host, link)?;
            let mut dev = client.open(&device).map_err(|e| error_chain(&e))?;
            outln!(
                "{}",
                regs::dump(&mut dev, &region, offset, len, out.as_deref())?
            );
            Ok(())
        }
        Cmd::VfioUser {
            host,
            device,
            emulate,
            socket,
            dma_layout,
            dma_timeout,
            handoff_to,
            adopt,
        } => {
            let dma = (dma_layout, std::time::Duration::from_secs(dma_timeout));
            let source = match (emulate, adopt, host, device) {
                (Some(e), ..) => VuSource::Emulate(e),
                (None, Some(ticket), ..) => VuSource::Adopt(ticket),
                (None, None, Some(host), Some(device)) => VuSource::Remote(host, device),
                _ => return Err("give HOST and DEVICE, --emulate or --adopt".into()),
            };
            vfio_user(source, &socket, dma, handoff_to.as_deref(), link)
        }
        Cmd::Migrate(plan) => migrate::run(&plan, &link.to_args()),
        Cmd::Bench {
            quick,
            transport,
            json,
            only,
            rdma_addr,
            record_baseline,
            runs,
            check,
        } => {
            let transports = match transport {
                TransportArg::Tcp => vec![bench::Transport::Tcp],
                TransportArg::Unix => vec![bench::Transport::Unix],
                TransportArg::Tls => vec![bench::Transport::Tls],
                TransportArg::Rdma => vec![bench::Transport::Rdma],
                TransportArg::All => vec![
                    bench::Transport::Tcp,
                    bench::Transport::Unix,
                    bench::Transport::Tls,
                ],
            };
            let opts = bench::Options {
                quick,
                transports,
                only,
                rdma_addr,
            };
            match (record_baseline, check) {
                (Some(file), _) => bench_record(opts, runs, &json, &file),
                (None, Some(file)) => bench_check(rdma_addr, &json, &file),
                (None, None) => bench_run(&opts, &json).map(drop),
            }
        }
    }
}

/// What `cio vfio-user` serves.
enum VuSource {
    Emulate(EmulateArg),
    Remote(String, String),
    /// A session in a handoff ticket.
    Adopt(PathBuf),
}

/// `cio vfio-user`: serve one device to one vfio-user client.
fn vfio_user(
    source: VuSource,
    socket: &std::path::Path,
    (dma_layout, dma_timeout): (DmaLayoutArg, std::time::Duration),
    handoff_to: Option<&std::path::Path>,
    link: &keys::LinkArgs,
) -> Result<(), String> {
    use cio_backend::models::{Edu, Memory};
    use cio_frontend::vfio_user::{DmaLayout, Server, ServerConfig};
    // The client outlives the device it opened.
    let mut _client = None;
    let adopted = matches!(source, VuSource::Adopt(_));
    let mut dev: Box<dyn cio_core::Device> = match source {
        VuSource::Emulate(EmulateArg::Edu) => Box::new(Edu::new("edu0")),
        VuSource::Emulate(EmulateArg::Memory) => Box::new(
            Memory::new("mem0", cio_backend::models::memory::DEFAULT_SIZE)
                .map_err(|e| error_chain(&e))?,
        ),
        VuSource::Remote(host, device) => {
            let client = connect(&host, link)?;
            let dev = client.open(&device).map_err(|e| error_chain(&e))?;
            _client = Some(client);
            Box::new(dev)
        }
        VuSource::Adopt(ticket) => {
            let t = cio_frontend::Ticket::load(&ticket).map_err(|e| error_chain(&e))?;
            let opts = link.options(&t.endpoint)?;
            let (client, devs) = Client::adopt(&t, opts).map_err(|e| error_chain(&e))?;
            let mut devs = devs.into_iter();
            let (Some(dev), None) = (devs.next(), devs.next()) else {
                return Err(format!(
                    "{} must hold exactly one device (it holds {})",
                    ticket.display(),
                    t.devices().len()
                ));
            };
            eprintln!(
                "cio: adopted session {:#x} with {} from {}",
                client.session(),
                cio_core::Device::info(&dev).name,
                ticket.display()
            );
            _client = Some(client);
            Box::new(dev)
        }
    };
    let config = ServerConfig {
        dma_layout: match dma_layout {
            DmaLayoutArg::Spec => DmaLayout::Spec,
            DmaLayoutArg::Qemu10 => DmaLayout::Qemu,
        },
        dma_timeout,
        ..ServerConfig::default()
    };
    let server = Server::bind(socket, config).map_err(|e| error_chain(&e))?;
    if adopted {
        server.keep_device_state();
    }
    stop_on_signal(_client.clone(), socket)?;
    let info = dev.info();
    eprintln!(
        "cio: serving {} ({:04x}:{:04x}) on {} (vfio-user); waiting for a client",
        info.name,
        info.vendor,
        info.device,
        socket.display()
    );
    let served = server
        .serve_next(dev.as_mut())
        .map_err(|e| error_chain(&e))?;
    eprintln!(
        "cio: client disconnected after {} requests ({} answered with an error)",
        served.requests, served.errors
    );
    if let Some(path) = handoff_to {
        // The device stays open: it goes with the session (its handle's
        // Close, when `dev` drops after this, no longer reaches the
        // backend).
        let client = _client.ok_or("--handoff-to needs a remote device")?;
        let ticket = client.suspend().map_err(|e| error_chain(&e))?;
        ticket.save(path).map_err(|e| error_chain(&e))?;
        let left = ticket
            .expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        eprintln!(
            "cio: session {:#x} suspended into {} (adopt it within {:.0} s)",
            ticket.session,
            path.display(),
            left.as_secs_f64()
        );
    }
    Ok(())
}

/// On SIGTERM or SIGINT (libvirt's hook stopping the server, or Ctrl-C),
/// `cio vfio-user` ends its session with a Goodbye, so that the backend
/// releases the device at once instead of keeping the session for a
/// resume, removes its socket and exits 0. The serving thread may be in
/// the middle of a request: that request fails, which nobody waits for.
fn stop_on_signal(
    client: Option<cio_frontend::Client>,
    socket: &std::path::Path,
) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let socket = socket.to_path_buf();
    std::thread::Builder::new()
        .name("cio-signals".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
            eprintln!("cio: {name}: ending the session and stopping");
            if let Some(client) = client {
                client.close();
            }
            let _ = std::fs::remove_file(&socket);
            std::process::exit(0);
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    Ok(())
}

fn size_str(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// A short `lspci -v`-like description.
fn describe(info: &DeviceInfo) -> String {
    use std::fmt::Write;
    let profile = regs::profile_for(info.vendor, info.device);
    let mut s = String::new();
    let label = profile
        .as_ref()
        .map_or(String::new(), |p| format!(" [{}]", p.description));
    let _ = writeln!(
        s,
        "{}: {:04x}:{:04x} (rev {:02x}) class {:06x}{label}",
        info.name, info.vendor, info.device, info.revision, info.class
    );
    let _ = writeln!(
        s,
        "\tSubsystem: {:04x}:{:04x}",
        info.subsystem_vendor, info.subsystem_device
    );
    let _ = writeln!(
        s,
        "\tReset: {}{}",
        info.reset,
        if info.reset.clears_state() || info.reset == cio_core::ResetMethod::Unknown {
            ""
        } else {
            " (the next session inherits what the last left, as far as the backend's release policy allows)"
        }
    );
    for r in &info.regions {
        let widths: Vec<String> = [1u8, 2, 4, 8]
            .iter()
            .filter(|w| r.widths & **w != 0)
            .map(|w| w.to_string())
            .collect();
        let widths = widths.join("/");
        match r.kind {
            RegionKind::Config => {
                let _ = writeln!(
                    s,
                    "\tConfig space: {} bytes, accesses {widths} bytes",
                    r.size
                );
            }
            kind => {
                let what = if kind == RegionKind::Pio {
                    "I/O ports"
                } else {
                    "Memory"
                };
                let bits = if r.flags & cio_core::device::REGION_64BIT != 0 {
                    "64-bit"
                } else {
                    "32-bit"
                };
                let pf = if r.flags & cio_core::device::REGION_PREFETCH != 0 {
                    "prefetchable"
                } else {
                    "non-prefetchable"
                };
                let _ = writeln!(
                    s,
                    "\tRegion {}: {what}, size {}, {bits}, {pf}, accesses {widths} bytes",
                    r.index,
                    size_str(r.size)
                );
            }
        }
    }
    let irqs: Vec<String> = info
        .irqs
        .iter()
        .filter(|i| i.count > 0)
        .map(|i| format!("{} x{}", i.kind, i.count))
        .collect();
    let _ = writeln!(
        s,
        "\tInterrupts: {}",
        if irqs.is_empty() {
            "none".into()
        } else {
            irqs.join(", ")
        }
    );
    if let Some(p) = profile {
        if let Some(d) = &p.dma {
            let _ = writeln!(s, "\tDMA: {}-bit addresses", d.address_bits);
        }
        for bar in &p.bars {
            if bar.registers.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                "\tRegisters of region {} (profile {}):",
                bar.index, p.name
            );
            for r in &bar.registers {
                let mut flags = Vec::new();
                if r.doorbell {
                    flags.push("doorbell");
                }
                if r.read_side_effects {
                    flags.push("read-side-effects");
                }
                if r.cacheable {
                    flags.push("cacheable");
                }
                let access = format!("{:?}", r.access).to_lowercase();
                let _ = writeln!(
                    s,
                    "\t  {:#06x} {:<11} {}  {access:<2} {:<18} {}",
                    r.offset,
                    r.name,
                    r.width,
                    flags.join(","),
                    r.description
                );
            }
        }
        for q in &p.quirks {
            let _ = writeln!(s, "\tQuirk: {q}");
        }
    }
    s
}

/// One run of `cio bench`: the table as it is measured, then the JSON.
fn bench_run(opts: &bench::Options, json: &std::path::Path) -> Result<bench::Report, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    outln!(
        "cio bench: {} run on {cores} cores; cio and its baseline alternate in one process",
        if opts.quick {
            "quick (numbers not meaningful)"
        } else {
            "full"
        }
    );
    outln!("{}", bench::header());
    let spin = progress::spinner("measuring (cio and its baseline alternate)");
    let report = bench::run(opts, |r| {
        spin.suspend(|| outln!("{}", bench::format_row(r)));
    })?;
    spin.finish_and_clear();
    let text = serde_json::to_string_pretty(&report).map_err(|e| format!("encoding JSON: {e}"))?;
    std::fs::write(json, text).map_err(|e| format!("writing {}: {e}", json.display()))?;
    let missed = report.rows.iter().filter(|r| !r.met).count();
    outln!(
        "{} rows, {missed} targets missed; JSON written to {}",
        report.rows.len(),
        json.display()
    );
    Ok(report)
}

/// `cio bench --record-baseline FILE --runs N`.
fn bench_record(
    opts: bench::Options,
    runs: u32,
    json: &std::path::Path,
    file: &std::path::Path,
) -> Result<(), String> {
    let mut reports = Vec::new();
    for i in 1..=runs {
        outln!("\nrun {i} of {runs}");
        reports.push(bench_run(&opts, json)?);
    }
    let b = regress::Baseline::record(&reports)?;
    std::fs::write(file, b.to_text()).map_err(|e| format!("writing {}: {e}", file.display()))?;
    outln!("\nbaseline of {runs} runs, {} rows:", b.rows.len());
    for r in &b.rows {
        outln!(
            "{:3} {:5} {:48} median {:8.2}, {:.2}..{:.2} (noise {:3.0}%), limit {} {:.2}",
            r.id,
            r.transport.to_string(),
            r.what,
            r.median,
            r.best,
            r.worst,
            r.noise * 100.0,
            if r.higher_is_better { ">=" } else { "<=" },
            r.limit
        );
    }
    for u in &b.unchecked {
        outln!("not checked: {u}");
    }
    outln!("written to {}", file.display());
    Ok(())
}

/// How often `cio bench --check` measures a row before it counts as
/// regressed.
const CHECK_ATTEMPTS: usize = 3;

/// `cio bench --check FILE`: the rows the baseline holds, measured again;
/// a row past its limit is measured again (up to [`CHECK_ATTEMPTS`] in all)
/// and fails only if it is past it every time.
fn bench_check(
    rdma_addr: Option<std::net::IpAddr>,
    json: &std::path::Path,
    file: &std::path::Path,
) -> Result<(), String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let b = regress::Baseline::from_text(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let opts = b.options(|_| true, rdma_addr);
    let mut verdicts = b.check(&bench_run(&opts, json)?)?;
    // A row past its limit is measured again (only its measurement and
    // transport), up to twice: it fails when every measurement put it past.
    for _ in 1..CHECK_ATTEMPTS {
        let past: Vec<usize> = (0..verdicts.len())
            .filter(|&i| verdicts[i].regressed)
            .collect();
        if past.is_empty() {
            break;
        }
        outln!("\npast their limits in this run:");
        for &i in &past {
            outln!("{}", b.line(i, &verdicts[i]));
        }
        outln!("measuring them again, to tell a regression from a noisy run");
        let again = b.options(|i| past.contains(&i), rdma_addr);
        let second = b.check(&bench_run(&again, json)?)?;
        for &i in &past {
            verdicts[i] = second[i];
        }
    }
    outln!(
        "\nagainst {} ({} runs recorded; limit: the worst recorded ratio, {}x worse again):",
        file.display(),
        b.runs,
        b.margin
    );
    for (i, v) in verdicts.iter().enumerate() {
        outln!("{}", b.line(i, v));
    }
    for u in &b.unchecked {
        outln!("not checked: {u}");
    }
    let failed = verdicts.iter().filter(|v| v.regressed).count();
    if failed > 0 {
        return Err(format!(
            "{failed} of {} rows regressed past their recorded limits",
            verdicts.len()
        ));
    }
    outln!("no regression in {} rows", verdicts.len());
    Ok(())
}

fn session_cmd(cmd: SessionCmd, link: &keys::LinkArgs) -> Result<(), String> {
    match cmd {
        SessionCmd::Show {
            ticket,
            json: as_json,
        } => {
            let t = cio_frontend::Ticket::load(&ticket).map_err(|e| error_chain(&e))?;
            if as_json {
                outln!("{}", json::ticket(&t));
                return Ok(());
            }
            outln!("backend:  {}", t.endpoint);
            outln!("session:  {:#x}", t.session);
            let left = t.expires.duration_since(std::time::SystemTime::now());
            match left {
                Ok(d) => outln!("expires:  in {:.0}s", d.as_secs_f64()),
                Err(e) => outln!("expires:  expired {:.0}s ago", e.duration().as_secs_f64()),
            }
            for d in t.devices() {
                outln!("device:   {} (handle {})", d.info.name, d.handle);
                for (iova, len, dir) in &d.mappings {
                    outln!("  dma     {iova:#x}+{len:#x} {dir:?}");
                }
                for (kind, vector) in &d.irqs {
                    outln!("  irq     {kind} {vector}");
                }
            }
            Ok(())
        }
        SessionCmd::Release { ticket } => {
            let t = cio_frontend::Ticket::load(&ticket).map_err(|e| error_chain(&e))?;
            let (client, devices) =
                Client::adopt(&t, link.options(&t.endpoint)?).map_err(|e| error_chain(&e))?;
            let n = devices.len();
            drop(devices);
            drop(client);
            outln!(
                "session {:#x} adopted and ended: {n} device(s) released",
                t.session
            );
            Ok(())
        }
    }
}

/// Runs `cio usb attach SOURCE BUSID` again as a detached process (own
/// process group, log in the state directory), waits for it to report the
/// port, and leaves it carrying the device.
fn attach_in_background(
    source: &str,
    busid: &str,
    link: &keys::LinkArgs,
    keepalive: u64,
) -> Result<(), String> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let dir = std::path::Path::new(usb::STATE_DIR);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let log_path = dir.join(format!("attach-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(link.to_args());
    let mut child = cmd
        .args([
            "usb",
            "attach",
            "--keepalive",
            &keepalive.to_string(),
            source,
            busid,
        ])
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting the relay: {e}"))?;
    let mut line = String::new();
    let out = child.stdout.take().expect("piped");
    let spin = progress::spinner(&format!(
        "attaching {busid} (the relay waits for the kernel)"
    ));
    let _ = std::io::BufReader::new(out).read_line(&mut line);
    spin.finish_and_clear();
    if line.starts_with("port ") {
        outln!(
            "{} (relay pid {}, log {})",
            line.trim_end(),
            child.id(),
            log_path.display()
        );
        return Ok(());
    }
    let _ = child.wait();
    let why = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    Err(why.trim().trim_start_matches("cio: ").to_owned())
}

fn usb_cmd(cmd: UsbCmd, link: &keys::LinkArgs) -> Result<(), String> {
    let opts_for = |src: &UsbSource| match src {
        UsbSource::Cio(ep) => link.options(ep),
        UsbSource::Usbip(_) => Ok(ClientOptions::default()),
    };
    let source = |s: &str| s.parse::<UsbSource>();
    let e = |e: usb::UsbError| error_chain(&e);
    match cmd {
        UsbCmd::List {
            source: s,
            json: as_json,
        } => {
            let src = source(&s)?;
            let devices = usb::list(&src, &opts_for(&src)?).map_err(e)?;
            if as_json {
                outln!("{}", json::usb_devices(&s, &devices));
                return Ok(());
            }
            outln!("Exportable USB devices at {src}");
            outln!("======================");
            if devices.is_empty() {
                outln!(" (none)");
            }
            for d in devices {
                let name = if d.product_name.is_empty() {
                    "unknown product"
                } else {
                    &d.product_name
                };
                outln!(
                    " - {}: {name} ({:04x}:{:04x})",
                    d.busid,
                    d.vendor,
                    d.product
                );
                outln!("   {:>w$}: {}", "", d.speed.name(), w = d.busid.len());
                outln!(
                    "   {:>w$}: bus/dev {:03}/{:03}, class {:02x}/{:02x}/{:02x}",
                    "",
                    d.busnum,
                    d.devnum,
                    d.class,
                    d.subclass,
                    d.protocol,
                    w = d.busid.len()
                );
                for (i, f) in d.interfaces.iter().enumerate() {
                    outln!(
                        "   {:>w$}: {i} - class {:02x}/{:02x}/{:02x}",
                        "",
                        f.class,
                        f.subclass,
                        f.protocol,
                        w = d.busid.len()
                    );
                }
            }
            Ok(())
        }
        UsbCmd::Attach {
            source: s,
            busid,
            direct,
            background,
            keepalive,
        } => {
            let src = source(&s)?;
            if background && !direct && matches!(src, UsbSource::Cio(_)) {
                return attach_in_background(&s, &busid, link, keepalive);
            }
            let opts = ClientOptions {
                keepalive: std::time::Duration::from_secs(keepalive),
                ..opts_for(&src)?
            };
            let vhci = Vhci::default();
            vhci.ports().map_err(e)?; // fail before importing if vhci is missing
            let spin = progress::spinner(&format!("importing {busid} from {src}"));
            let imported = usb::import(&src, &busid, &opts, direct).map_err(e)?;
            spin.set_message(format!("attaching {busid}: waiting for the kernel"));
            let attached = imported.attach(&vhci).map_err(e)?;
            spin.finish_and_clear();
            outln!(
                "port {}: attached {}/{} ({:04x}:{:04x} {})",
                attached.port,
                attached.source,
                busid,
                attached.device.vendor,
                attached.device.product,
                attached.device.product_name
            );
            if !attached.needs_relay() {
                return Ok(());
            }
            let port = attached.port;
            match attached.relay() {
                RelayEnd::Detached => {
                    outln!("port {port}: detached");
                    Ok(())
                }
                RelayEnd::Lost(why) => Err(format!("port {port}: {why}; the port was freed")),
            }
        }
        UsbCmd::Detach { port } => {
            Vhci::default().detach(port).map_err(e)?;
            outln!("port {port}: detached");
            Ok(())
        }
        UsbCmd::Port { json: as_json } => {
            let ports: Vec<json::PortView> = Vhci::default()
                .ports()
                .map_err(e)?
                .into_iter()
                .filter(|p| !p.is_free())
                .map(|p| {
                    let dev = std::path::Path::new("/sys/bus/usb/devices").join(&p.local_busid);
                    let attr = |n: &str| {
                        std::fs::read_to_string(dev.join(n))
                            .map(|s| s.trim().to_owned())
                            .unwrap_or_default()
                    };
                    json::PortView {
                        vendor: attr("idVendor"),
                        product_id: attr("idProduct"),
                        product: attr("product"),
                        source: usb::port_record(p.port).map(|s| s.trim().to_owned()),
                        port: p,
                    }
                })
                .collect();
            if as_json {
                outln!("{}", json::usb_ports(&ports));
                return Ok(());
            }
            outln!("Imported USB devices");
            outln!("====================");
            for v in &ports {
                let p = &v.port;
                outln!("Port {:02}: <Port in Use> at {}", p.port, p.speed.name());
                outln!("       {}:{} {}", v.vendor, v.product_id, v.product);
                let from = v.source.as_deref().unwrap_or("(unknown source)");
                outln!("       {} -> {}", p.local_busid, from);
                outln!(
                    "           -> remote bus/dev {:03}/{:03}",
                    p.devid >> 16,
                    p.devid & 0xffff
                );
            }
            Ok(())
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
