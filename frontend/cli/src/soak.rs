//! `cio soak`: many clients doing mixed IO against one backend (embedded,
//! or a running ciod) for a given time, with one hostile client, reporting
//! errors, operations, memory (RSS) and file descriptors as it goes. Not a
//! test with a verdict on speed: it exits non-zero only when a client saw a
//! wrong value or an unexpected error, or when an embedded backend did not
//! end idle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_backend::models::memory::{reg, CMD_FROM_MEMORY, CMD_TO_MEMORY};
use cio_backend::models::{Edu, Memory};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_core::{Device, DmaDir, DmaRegion};
use cio_frontend::drivers::edu;
use cio_frontend::{Client, ClientOptions};
use cio_transports::Endpoint;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long.
    pub duration: Duration,
    /// The backend and its devices.
    pub target: Target,
    /// Rounds each session runs before the client starts a new one; 0: one
    /// session per client for the whole soak.
    pub session_rounds: u64,
    /// Time between report lines.
    pub every: Duration,
}

/// Which backend the clients use.
#[derive(Debug, Clone)]
pub enum Target {
    /// An embedded backend with an emulated device per client (edus and
    /// memory devices by turns).
    Embedded {
        /// Well-behaved clients.
        clients: usize,
    },
    /// A running ciod: one client per device named.
    Remote {
        /// Its address.
        ep: Endpoint,
        /// How to connect.
        opts: Box<ClientOptions>,
        /// Edus to drive (self-tests without the reset check).
        edus: Vec<String>,
        /// Memory devices to drive.
        memories: Vec<String>,
    },
}

/// One client's device: an edu (with the reset check or without) or a
/// memory device.
#[derive(Debug, Clone)]
enum Job {
    Edu { name: String, reset: bool },
    Memory(String),
}

#[derive(Debug, Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
    sessions: AtomicU64,
    hostile: AtomicU64,
}

fn proc_status(key: &str) -> u64 {
    cio_backend::procfs::kb("/proc/self/status", key).unwrap_or(0)
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One round on an edu: the driver's self-test (factorials, MSI, DMA both
/// ways, and reset if asked).
fn edu_round(c: &Client, name: &str, reset: bool) -> Result<u64, String> {
    let mut d = c.open(name).map_err(|e| e.to_string())?;
    let r =
        edu::self_test_parts(&mut d, Some(0x10_0000), reset, |_| {}).map_err(|e| e.to_string())?;
    Ok(r.factorials.len() as u64 + r.interrupts as u64 + 2)
}

/// One round on a memory device: a burst of posted writes read back, and
/// DMA both ways compared byte for byte.
fn mem_round(c: &Client, name: &str, round: u64) -> Result<u64, String> {
    let e = |e: cio_core::DeviceError| e.to_string();
    let mut d = c.open(name).map_err(|e| e.to_string())?;
    for i in 0..256u64 {
        d.write64(0, i * 8, round ^ i).map_err(e)?;
    }
    for i in [0u64, 17, 255] {
        let v = d.read64(0, i * 8).map_err(e)?;
        if v != round ^ i {
            return Err(format!(
                "posted write {i} read back {v:#x}, wrote {:#x}",
                round ^ i
            ));
        }
    }
    const LEN: u64 = 256 * 1024;
    let src =
        Arc::new(DmaRegion::new(0x100_0000, LEN, DmaDir::ToDevice).map_err(|e| e.to_string())?);
    let dst =
        Arc::new(DmaRegion::new(0x200_0000, LEN, DmaDir::FromDevice).map_err(|e| e.to_string())?);
    d.dma_map(Arc::clone(&src)).map_err(e)?;
    d.dma_map(Arc::clone(&dst)).map_err(e)?;
    let data: Vec<u8> = (0..LEN).map(|i| (i as u8) ^ (round as u8)).collect();
    src.write(0, &data).map_err(|e| e.to_string())?;
    for (addr, cmd) in [(0x100_0000, CMD_FROM_MEMORY), (0x200_0000, CMD_TO_MEMORY)] {
        d.write64(2, reg::DMA_ADDR, addr).map_err(e)?;
        d.write64(2, reg::BAR_OFFSET, 0x1000).map_err(e)?;
        d.write64(2, reg::LEN, LEN).map_err(e)?;
        d.write64(2, reg::CMD, cmd).map_err(e)?;
    }
    d.read64(2, reg::COMPLETED).map_err(e)?;
    let mut back = vec![0u8; LEN as usize];
    dst.read(0, &mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err("DMA round trip differs".into());
    }
    d.dma_unmap(src.iova()).map_err(e)?;
    d.dma_unmap(dst.iova()).map_err(e)?;
    Ok(256 + 3 + 6)
}

/// A client that connects and misbehaves in turn: garbage, a frame cut in
/// the middle, a silent connection, a request for a device it does not
/// hold. Its failures are expected; only a crash of the backend shows.
fn hostile(ep: &Endpoint, stop: &AtomicBool, tally: &Tally) {
    use std::io::Write;
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let Ok(conn) = cio_transports::Conn::connect(ep, Duration::from_secs(2)) else {
            continue;
        };
        let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
        let junk: Vec<u8> = (0..(k % 512) + 1).map(|i| (i * 7 + k) as u8).collect();
        let _ = match k % 4 {
            0 => (&conn).write_all(&junk),
            1 => (&conn).write_all(&[0xff, 0xff, 0, 0, 1, 0]), // a huge frame, cut
            2 => {
                std::thread::sleep(Duration::from_millis(50)); // silent
                Ok(())
            }
            _ => (&conn).write_all(&[24, 0, 0, 0, 0x12, 0, 0, 0, 1, 0, 0, 0]),
        };
        drop(conn);
        tally.hostile.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn backend(clients: usize) -> Result<ServerHandle, String> {
    let mut devices: Vec<Box<dyn Device>> = Vec::new();
    for i in 0..clients {
        if i % 2 == 0 {
            devices.push(Box::new(Edu::new(&format!("edu{i}"))));
        } else {
            devices.push(Box::new(
                Memory::new(&format!("mem{i}"), 1 << 20).map_err(|e| e.to_string())?,
            ));
        }
    }
    Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("valid"),
        psk: None,
        devices,
        limits: Limits::default(),
        usb: Default::default(),
        security: Default::default(),
    })
    .and_then(|s| s.spawn())
    .map_err(|e| e.to_string())
}

/// Runs the soak; prints a line every `every` and a summary.
pub fn run(o: &Options) -> Result<(), String> {
    let (s, ep, opts, jobs) = match &o.target {
        Target::Embedded { clients } => {
            let s = backend(*clients)?;
            let ep = s.endpoint().clone();
            let jobs = (0..*clients)
                .map(|i| match i % 2 {
                    0 => Job::Edu {
                        name: format!("edu{i}"),
                        reset: true,
                    },
                    _ => Job::Memory(format!("mem{i}")),
                })
                .collect();
            (Some(s), ep, ClientOptions::default(), jobs)
        }
        Target::Remote {
            ep,
            opts,
            edus,
            memories,
        } => {
            let edus = edus.iter().map(|n| Job::Edu {
                name: n.clone(),
                reset: false,
            });
            let jobs = edus.chain(memories.iter().cloned().map(Job::Memory));
            (None, ep.clone(), (**opts).clone(), jobs.collect::<Vec<_>>())
        }
    };
    let clients = jobs.len();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let (rss0, fds0) = (proc_status("VmRSS:"), fds());
    let mut threads = Vec::new();
    for (i, job) in jobs.into_iter().enumerate() {
        let (ep, stop, tally) = (ep.clone(), Arc::clone(&stop), Arc::clone(&tally));
        let opts = opts.clone();
        let session_rounds = o.session_rounds;
        threads.push(std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A new session every few rounds: churn.
                let c = match Client::connect(&ep, opts.clone()) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("soak: client {i}: connect: {e}");
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                tally.sessions.fetch_add(1, Ordering::Relaxed);
                let rounds = match session_rounds {
                    0 => u64::MAX,
                    n => n,
                };
                for _ in 0..rounds {
                    round += 1;
                    let r = match &job {
                        Job::Edu { name, reset } => edu_round(&c, name, *reset),
                        Job::Memory(name) => mem_round(&c, name, round),
                    };
                    match r {
                        Ok(n) => {
                            tally.ops.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("soak: client {i} round {round}: {e}");
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        }));
    }
    {
        let (ep, stop, tally) = (ep.clone(), Arc::clone(&stop), Arc::clone(&tally));
        threads.push(std::thread::spawn(move || hostile(&ep, &stop, &tally)));
    }
    let start = Instant::now();
    println!("  time   operations  sessions  hostile  errors   RSS MiB  fds  shadow MiB");
    let line = |t: Duration| {
        // The shadow memory of an embedded backend (a remote one's is its own).
        let shadow = s.as_ref().map_or_else(
            || "-".to_string(),
            |s| format!("{:.1}", s.stats().shadow_bytes as f64 / (1u64 << 20) as f64),
        );
        println!(
            "{:>5.0}s {:>12} {:>9} {:>8} {:>7} {:>9.1} {:>4} {:>11}",
            t.as_secs_f64(),
            tally.ops.load(Ordering::Relaxed),
            tally.sessions.load(Ordering::Relaxed),
            tally.hostile.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed),
            proc_status("VmRSS:") as f64 / 1024.0,
            fds(),
            shadow,
        );
    };
    while start.elapsed() < o.duration {
        std::thread::sleep(o.every.min(o.duration.saturating_sub(start.elapsed())));
        line(start.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let idle = match s {
        Some(s) => {
            let idle = s.wait_stats(Duration::from_secs(10), |st| {
                st.sessions == 0 && st.open_devices == 0 && st.shadow_bytes == 0 && st.irq_fds == 0
            });
            s.shutdown();
            idle.map(|_| ())
        }
        None => Ok(()),
    };
    let errors = tally.errors.load(Ordering::Relaxed);
    println!(
        "soak: {clients} clients + 1 hostile on {ep} for {:.0}s: {} operations in {} sessions, {} hostile connections, {errors} errors; RSS {:.1} -> {:.1} MiB, fds {fds0} -> {}",
        start.elapsed().as_secs_f64(),
        tally.ops.load(Ordering::Relaxed),
        tally.sessions.load(Ordering::Relaxed),
        tally.hostile.load(Ordering::Relaxed),
        rss0 as f64 / 1024.0,
        proc_status("VmRSS:") as f64 / 1024.0,
        fds(),
    );
    match (errors, idle) {
        (0, Ok(())) if tally.ops.load(Ordering::Relaxed) == 0 => {
            Err("no operation completed".into())
        }
        (0, Ok(())) => Ok(()),
        (0, Err(st)) => Err(format!("the backend did not end idle: {st:?}")),
        (n, _) => Err(format!("{n} errors")),
    }
}
