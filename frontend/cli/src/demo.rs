//! `cio demo`: the edu driver self-test through the real TCP path, against
//! an embedded backend or a running ciod; with `--handoff`, the session is
//! handed to a second `cio` process halfway through.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cio_backend::models::Edu as EduModel;
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_core::{error_chain, Device, DmaDir, DmaRegion, EventFd, IrqKind, PAGE_SIZE};
use cio_frontend::drivers::edu::{self, fnv1a, Edu, DMA_IRQ, EDU_BUFFER, MAX_TRANSFER};
use cio_frontend::{Client, ClientOptions, Ticket};
use cio_transports::{Endpoint, Psk};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

/// IOVA of the demo's DMA buffer (two pages, below edu's 28-bit mask).
const IOVA: u64 = 0x10_0000;
/// What the first half leaves in the factorial register.
const FACT_N: u32 = 10;
const FACT: u32 = 3_628_800;

/// How `cio demo` was asked to run.
pub struct Options {
    /// A running ciod, or `None` for an embedded one.
    pub host: Option<String>,
    /// The edu device to drive.
    pub device: String,
    /// The key, and the file it came from (for the second process).
    pub psk: Option<Psk>,
    pub psk_file: Option<PathBuf>,
    /// Leave out the reset check (QEMU's real edu has no reset method).
    pub skip_reset: bool,
    /// Hand the session to a second process halfway.
    pub handoff: bool,
}

fn err(e: impl std::error::Error) -> String {
    error_chain(&e)
}

fn opts(psk: &Option<Psk>) -> ClientOptions {
    ClientOptions {
        psk: psk.clone(),
        ..ClientOptions::default()
    }
}

/// An embedded backend serving an emulated edu on loopback.
fn embedded() -> Result<ServerHandle, String> {
    let s = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("valid endpoint"),
        psk: None,
        devices: vec![Box::new(EduModel::new("edu0"))],
        limits: Limits::default(),
        usb: Default::default(),
        security: Default::default(),
    })
    .and_then(|s| s.spawn())
    .map_err(err)?;
    outln!("embedded ciod serving an emulated edu on {}", s.endpoint());
    Ok(s)
}

/// Runs the demo.
pub fn run(o: Options) -> Result<(), String> {
    let server = match &o.host {
        None => Some(embedded()?),
        Some(_) => None,
    };
    let ep: Endpoint = match (&o.host, &server) {
        (Some(h), _) => h.parse().map_err(err)?,
        (None, Some(s)) => s.endpoint().clone(),
        (None, None) => unreachable!("a server was started"),
    };
    let client = Client::connect(&ep, opts(&o.psk)).map_err(err)?;
    outln!("connected to {ep}: session {:#x}", client.session());
    for d in client.list().map_err(err)? {
        outln!("  listed {} ({:04x}:{:04x})", d.name, d.vendor, d.device);
    }
    let mut dev = client.open(&o.device).map_err(err)?;
    outln!("opened {}:", o.device);
    for line in crate::describe(dev.info()).lines().take(5) {
        outln!("  {line}");
    }
    if o.handoff {
        first_half(&client, &mut dev, &o)?;
    } else {
        let report = edu::self_test_parts(&mut dev, Some(IOVA), !o.skip_reset, |step| {
            outln!("  {step}")
        })
        .map_err(err)?;
        outln!(
            "demo passed: {} factorials, {} interrupts ({} delivered as events), {} DMA bytes, checksum {:#018x}",
            report.factorials.len(),
            report.interrupts,
            dev.irq_events(),
            report.dma_bytes,
            report.dma_checksum
        );
    }
    drop(dev);
    drop(client);
    if let Some(s) = server {
        s.shutdown();
    }
    Ok(())
}

fn pattern() -> Vec<u8> {
    (0..MAX_TRANSFER).map(|i| (i * 13 + 1) as u8).collect()
}

/// Leaves state in the device (a factorial in its register, a pattern in
/// its own buffer, MSI routed), suspends the session and has a second
/// `cio` process adopt it and finish.
fn first_half(
    client: &Client,
    dev: &mut cio_frontend::RemoteDevice,
    o: &Options,
) -> Result<(), String> {
    let pid = std::process::id();
    let region = Arc::new(DmaRegion::new(IOVA, 2 * PAGE_SIZE, DmaDir::Bidirectional).map_err(err)?);
    let data = pattern();
    region.write(0, &data).map_err(err)?;
    {
        let mut edu = Edu::new(&mut *dev).map_err(err)?;
        let f = edu.factorial(FACT_N).map_err(err)?;
        if f != FACT {
            return Err(format!("{FACT_N}! = {f}"));
        }
        edu.device().dma_map(Arc::clone(&region)).map_err(err)?;
        edu.dma(IOVA, EDU_BUFFER, MAX_TRANSFER, false, false)
            .map_err(err)?;
        let msi = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        edu.device()
            .set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&msi))
            .map_err(err)?;
    }
    outln!(
        "[1/2, pid {pid}] factorial register holds {FACT_N}! = {FACT}; the device's own buffer holds {MAX_TRANSFER} bytes (fnv1a {:#018x}) DMA'd from this process's memory; MSI routed here",
        fnv1a(&data)
    );
    let ticket = client.suspend().map_err(err)?;
    let path = std::env::temp_dir().join(format!("cio-demo-ticket-{pid}.json"));
    let _ = std::fs::remove_file(&path);
    ticket.save(&path).map_err(err)?;
    outln!(
        "[1/2, pid {pid}] session {:#x} suspended (ticket {}, valid {:.0}s); handing it to a second cio process",
        ticket.session,
        path.display(),
        ticket.expires.duration_since(std::time::SystemTime::now()).unwrap_or_default().as_secs_f64()
    );
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(p) = &o.psk_file {
        cmd.arg("--psk-file").arg(p);
    }
    let status = cmd.arg("adopt-demo").arg(&path).status();
    let _ = std::fs::remove_file(&path);
    match status {
        Ok(s) if s.success() => {
            outln!("demo passed: the session moved between two processes, device state intact");
            Ok(())
        }
        Ok(s) => Err(format!("the adopting process failed ({s})")),
        Err(e) => Err(format!("starting the adopting process: {e}")),
    }
}

/// The second half, in the adopting process: the state the first half
/// left must still be there.
pub fn second_half(ticket: &Path, psk: &Option<Psk>) -> Result<(), String> {
    let pid = std::process::id();
    let ticket = Ticket::load(ticket).map_err(err)?;
    let (client, devs) = Client::adopt(&ticket, opts(psk)).map_err(err)?;
    let mut dev = devs
        .into_iter()
        .next()
        .ok_or("the ticket holds no device")?;
    outln!(
        "[2/2, pid {pid}] adopted session {:#x} with {} (handle {})",
        client.session(),
        dev.info().name,
        dev.handle()
    );
    let f = dev.read32(0, edu::reg::FACTORIAL).map_err(err)?;
    if f != FACT {
        return Err(format!(
            "factorial register reads {f}, not {FACT}: the device was reset or the session lost"
        ));
    }
    let region = dev
        .dma_region(IOVA)
        .ok_or("the DMA mapping did not come with the session")?;
    let data = pattern();
    let mut page = vec![0u8; data.len()];
    region.read(0, &mut page).map_err(err)?;
    if page != data {
        return Err(
            "this process's copy of the DMA buffer is not what the first process wrote".into(),
        );
    }
    let msi = dev
        .irq_eventfd(IrqKind::Msi, 0)
        .ok_or("the MSI route did not come with the session")?;
    let mut edu = Edu::new(&mut dev).map_err(err)?;
    edu.dma(EDU_BUFFER, IOVA + PAGE_SIZE, MAX_TRANSFER, true, true)
        .map_err(err)?;
    edu::wait_eventfd(&msi, Duration::from_secs(10)).map_err(err)?;
    edu.ack(DMA_IRQ).map_err(err)?;
    region.read(PAGE_SIZE, &mut page).map_err(err)?;
    if page != data {
        return Err("the device buffer lost its content across the handoff".into());
    }
    outln!(
        "[2/2, pid {pid}] factorial register still {FACT}; the device buffer still held its {MAX_TRANSFER} bytes and DMA'd them into this process's memory (fnv1a {:#018x}); completion by MSI on this process's eventfd",
        fnv1a(&page)
    );
    Ok(())
}
