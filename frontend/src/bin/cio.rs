//! `cio`: use PCI devices served by a `ciod` on another host.
// The doc comments below are clap's --help text, where brackets mean
// "optional", not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use cio_backend::models::Edu;
use cio_backend::{Limits, Server, ServerConfig};
use cio_core::error_chain;
use cio_core::{DeviceInfo, RegionKind};
use cio_frontend::drivers::edu;
use cio_frontend::{Client, ClientOptions};
use cio_hw_profiles::Profile;
use cio_transports::{Endpoint, Psk};
use clap::{Parser, Subcommand};

/// Use PCI devices served by a ciod on another host, as if they were local.
///
/// HOST is HOST[:PORT] (default port 7451), tcp:HOST:PORT or unix:PATH.
///
/// Examples:
///   cio demo                      # self-contained: embedded ciod + emulated edu
///   cio list 127.0.0.1
///   cio info 127.0.0.1 edu0
///   cio --psk-file key list 192.0.2.10:7451
///
/// Log verbosity follows RUST_LOG (e.g. RUST_LOG=debug).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// File with the pre-shared key the backend requires.
    #[arg(long, global = true, value_name = "FILE")]
    psk_file: Option<PathBuf>,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the devices a backend serves.
    List {
        /// Backend address.
        host: String,
    },
    /// Describe one device: ids, regions, interrupts, named registers.
    Info {
        /// Backend address.
        host: String,
        /// Device name (from `cio list`).
        device: String,
    },
    /// Start an embedded backend with an emulated edu device and drive it
    /// through the real TCP path: factorials, interrupts, DMA round trip.
    Demo,
    /// Measure cio against the raw transport in the same run (P1 read
    /// latency, P2 posted writes/s, P3 DMA sync bandwidth, P4 interrupt
    /// latency, P7 sync cost vs mapping size) and print ratios.
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
        /// Run only these measurements (comma-separated: P1,P2,P3,P4,P7).
        #[arg(long, value_delimiter = ',', value_name = "IDS")]
        only: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Tcp,
    Unix,
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

fn connect(host: &str, psk: &Option<Psk>) -> Result<Client, String> {
    let ep: Endpoint = host.parse().map_err(|e| error_chain(&e))?;
    Client::connect(
        &ep,
        ClientOptions {
            psk: psk.clone(),
            ..ClientOptions::default()
        },
    )
    .map_err(|e| error_chain(&e))
}

fn run(args: Args) -> Result<(), String> {
    let psk = match &args.psk_file {
        Some(p) => Some(Psk::from_file(p).map_err(|e| error_chain(&e))?),
        None => None,
    };
    match args.cmd {
        Cmd::List { host } => {
            let client = connect(&host, &psk)?;
            let devices = client.list().map_err(|e| error_chain(&e))?;
            if devices.is_empty() {
                println!("no devices");
            }
            for d in devices {
                let state = if d.busy { "in use" } else { "free" };
                println!(
                    "{:<16} {:04x}:{:04x}  class {:06x}  {state}",
                    d.name, d.vendor, d.device, d.class
                );
            }
            Ok(())
        }
        Cmd::Info { host, device } => {
            let client = connect(&host, &psk)?;
            let dev = client.open(&device).map_err(|e| error_chain(&e))?;
            print!("{}", describe(cio_core::Device::info(&dev)));
            Ok(())
        }
        Cmd::Demo => demo(),
        Cmd::Bench {
            quick,
            transport,
            json,
            only,
        } => bench(quick, transport, &json, only),
    }
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
    let profile = Profile::builtin_for(info.vendor, info.device);
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

fn bench(
    quick: bool,
    transport: TransportArg,
    json: &std::path::Path,
    only: Vec<String>,
) -> Result<(), String> {
    use cio_frontend::bench::{self, Transport};
    let transports = match transport {
        TransportArg::Tcp => vec![Transport::Tcp],
        TransportArg::Unix => vec![Transport::Unix],
        TransportArg::All => vec![Transport::Tcp, Transport::Unix],
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cio bench: {} run on {cores} cores; cio and its baseline alternate in one process",
        if quick {
            "quick (numbers not meaningful)"
        } else {
            "full"
        }
    );
    println!("{}", bench::header());
    let report = bench::run(
        &bench::Options {
            quick,
            transports,
            only,
        },
        |r| {
            println!("{}", bench::format_row(r));
        },
    )?;
    let text = serde_json::to_string_pretty(&report).map_err(|e| format!("encoding JSON: {e}"))?;
    std::fs::write(json, text).map_err(|e| format!("writing {}: {e}", json.display()))?;
    let missed = report.rows.iter().filter(|r| !r.met).count();
    println!(
        "{} rows, {missed} targets missed; JSON written to {}",
        report.rows.len(),
        json.display()
    );
    Ok(())
}

fn demo() -> Result<(), String> {
    let server = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("valid endpoint"),
        psk: None,
        devices: vec![Box::new(Edu::new("edu0"))],
        limits: Limits::default(),
    })
    .and_then(|s| s.spawn())
    .map_err(|e| error_chain(&e))?;
    let ep = server.endpoint().clone();
    println!("embedded ciod serving an emulated edu on {ep}");
    let client = Client::connect(&ep, ClientOptions::default()).map_err(|e| error_chain(&e))?;
    println!("connected over TCP: session {}", client.session());
    for d in client.list().map_err(|e| error_chain(&e))? {
        println!("  listed {} ({:04x}:{:04x})", d.name, d.vendor, d.device);
    }
    let mut dev = client.open("edu0").map_err(|e| error_chain(&e))?;
    println!("opened edu0:");
    for line in describe(cio_core::Device::info(&dev)).lines().take(5) {
        println!("  {line}");
    }
    let report = edu::self_test(&mut dev, 0x10_0000, |step| println!("  {step}"))
        .map_err(|e| error_chain(&e))?;
    let msi = dev.irq_events();
    drop(dev);
    drop(client);
    server.shutdown();
    println!(
        "demo passed: {} factorials, {} interrupts ({} delivered as events), {} DMA bytes, checksum {:#018x}",
        report.factorials.len(),
        report.interrupts,
        msi,
        report.dma_bytes,
        report.dma_checksum
    );
    Ok(())
}
