//! `cio bench`: how much slower a remote device is than the transport it
//! runs on. Every cio measurement is paired with a raw-transport measurement
//! of the same shape taken in the same run, and reported as a ratio.
//!
//! | id | cio | raw baseline | target |
//! |---|---|---|---|
//! | P1 | non-posted BAR read (4 and 8 bytes) | ping-pong of the same payload | ratio ≤ 1.10 |
//! | P2 | posted BAR writes per second, fenced by one read | the same writes one frame per syscall | ≥ 2 M/s on TCP; ≥ 20× unbatched |
//! | P3 | DMA sync bandwidth, device → target and target → device | a raw stream of the same size | ≥ 0.90 of raw from 1 MiB |
//! | P4 | device raises an interrupt → frontend eventfd readable (one-way, stamped on a shared clock) | one-way send → receiver has it | ratio ≤ 1.20 |
//! | P7 | one dirty 4 KiB page synced with 1 GiB mapped vs 1 MiB mapped | (the 1 MiB case) | ratio ≤ 2 |
//!
//! On RDMA the baselines are raw verbs (`cio_transports::rdma::RawVerbs`):
//! P1 against a SEND/RECV ping-pong, P3 against RDMA WRITE bandwidth.
//!
//! Runs alternate cio and raw in blocks so that drift on a shared machine
//! hits both alike.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_backend::models::memory::{self, CMD_TO_MEMORY};
use cio_backend::models::{Edu, Memory};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_core::{Device, DmaDir, DmaRegion, EventFd, IrqKind, PAGE_SIZE};
use cio_transports::rdma::{RawVerbs, RdmaListener};
use cio_transports::{
    sys, AuthorizedClients, ClientTls, Conn, Endpoint, Identity, Listener, Pin, Psk, ServerTls,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use cio_frontend::{Client, ClientOptions, RemoteDevice};

/// A transport to measure on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP over loopback.
    Tcp,
    /// Unix stream socket.
    Unix,
    /// TLS over loopback TCP, measured against plaintext TCP (rows T0, T1, T3).
    Tls,
    /// RDMA, both ends on this machine's RDMA device ([`Options::rdma_addr`]).
    Rdma,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
            Self::Tls => "tls",
            Self::Rdma => "rdma",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds instead of minutes: few iterations, small sizes. Keeps the
    /// code path alive in CI; its numbers are not meant to be read.
    pub quick: bool,
    /// Transports to measure.
    pub transports: Vec<Transport>,
    /// Only these measurements (e.g. `["P1", "P3"]`); empty runs all.
    pub only: Vec<String>,
    /// The address of this machine's RDMA device interface, where the RDMA
    /// rows listen and connect (ports from [`RDMA_PORTS`] up).
    pub rdma_addr: Option<std::net::IpAddr>,
}

/// The first port the RDMA rows listen on (each listener takes the next:
/// the connection manager does not say which port 0 became).
pub const RDMA_PORTS: u16 = 7460;

/// Where RDMA rows listen: set once by [`run`].
static RDMA_ADDR: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();
static RDMA_NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(RDMA_PORTS);

/// The key of RDMA rows' backends (an RDMA listener is plaintext and
/// needs one): random, made once per run.
fn rdma_psk() -> BenchResult<Psk> {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let key = match KEY.get() {
        Some(k) => k.clone(),
        None => {
            let mut k = String::new();
            for _ in 0..4 {
                let n = cio_transports::auth::session_id().map_err(err("a random key"))?;
                k.push_str(&format!("{n:016x}"));
            }
            KEY.get_or_init(|| k).clone()
        }
    };
    Psk::new(key).map_err(err("the bench key"))
}

impl Options {
    fn wants(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o.eq_ignore_ascii_case(id))
    }
}

/// Median and 99th percentile of one series.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// 99th percentile (for throughputs: the 1st percentile, the slow tail).
    pub p99: f64,
    /// Samples.
    pub samples: usize,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// P1, P2, …
    pub id: &'static str,
    /// What was measured.
    pub what: String,
    /// Transport.
    pub transport: Transport,
    /// Unit of `cio` and `raw`.
    pub unit: &'static str,
    /// cio's numbers.
    pub cio: Stat,
    /// The baseline's numbers.
    pub raw: Stat,
    /// What the ratio compares (cio/raw, raw/cio, …).
    pub ratio_is: &'static str,
    /// The ratio.
    pub ratio: f64,
    /// The target, as text.
    pub target: String,
    /// Whether the target was met.
    pub met: bool,
    /// A latency whose ratio depends on where the scheduler put the two
    /// ends' threads (left unpinned, sleeping ends): one core for the
    /// baseline and two for cio, or the other way round, changes it by a
    /// factor of four on a VM. `cio bench --check` does not check these.
    pub placement_bound: bool,
}

impl Row {
    pub(crate) fn placement_bound(mut self, yes: bool) -> Self {
        self.placement_bound = yes;
        self
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Cores the machine has.
    pub cores: usize,
    /// Quick mode.
    pub quick: bool,
    /// Results.
    pub rows: Vec<Row>,
}

fn stat(mut v: Vec<f64>, low_is_tail: bool) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = v[n / 2];
    let tail_idx = ((n as f64) * 0.99).ceil() as usize;
    let p99 = if low_is_tail {
        v[(n - tail_idx.min(n)).min(n - 1)]
    } else {
        v[tail_idx.min(n) - 1]
    };
    Stat {
        median,
        p99,
        samples: n,
    }
}

type BenchResult<T> = Result<T, String>;

/// Nanoseconds on a clock shared by every thread of the process, so a
/// stamp taken on one thread can be compared on another.
fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Forwards everything to `inner`, noting when a write to `doorbell`
/// reaches the device: the moment the device raises its interrupt.
struct Stamped<D> {
    inner: D,
    doorbell: (u32, u64),
    stamp: Arc<std::sync::atomic::AtomicU64>,
}

impl<D: Device> Device for Stamped<D> {
    fn info(&self) -> &cio_core::DeviceInfo {
        self.inner.info()
    }
    fn read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), cio_core::DeviceError> {
        self.inner.read(region, offset, data)
    }
    fn write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), cio_core::DeviceError> {
        if (region, offset) == self.doorbell {
            self.stamp
                .store(now_ns(), std::sync::atomic::Ordering::Release);
        }
        self.inner.write(region, offset, data)
    }
    fn read_bulk(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), cio_core::DeviceError> {
        self.inner.read_bulk(region, offset, data)
    }
    fn write_bulk(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), cio_core::DeviceError> {
        self.inner.write_bulk(region, offset, data)
    }
    fn set_irqs(
        &mut self,
        kind: IrqKind,
        start: u32,
        fds: &[EventFd],
    ) -> Result<(), cio_core::DeviceError> {
        self.inner.set_irqs(kind, start, fds)
    }
    fn unmask_intx(&mut self) -> Result<(), cio_core::DeviceError> {
        self.inner.unmask_intx()
    }
    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), cio_core::DeviceError> {
        self.inner.dma_map(region)
    }
    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, cio_core::DeviceError> {
        self.inner.dma_unmap(iova)
    }
    fn reset(&mut self) -> Result<(), cio_core::DeviceError> {
        self.inner.reset()
    }
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Where a row's threads run: left to the scheduler, or both ends pinned,
/// cio and its baseline alike. On a VM a wake-up on another, idle vCPU
/// costs tens of microseconds more than one on the waker's own, and the
/// scheduler may keep the baseline's two threads on one core while cio's
/// run on two: pinning shows what each placement costs.
#[derive(Debug, Clone, Copy)]
struct Placement {
    /// The core of the caller (and the client's pump).
    client: usize,
    /// The core of the backend's session thread (and the raw peer).
    server: usize,
}

impl Placement {
    /// One core for both ends, and (with two or more) one core each: the
    /// first two cores this process may run on.
    fn pinned() -> BenchResult<Vec<Placement>> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .map_err(err("sched_getaffinity"))?;
        let cores: Vec<usize> = (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .take(2)
            .collect();
        let mut v = vec![Placement {
            client: cores[0],
            server: cores[0],
        }];
        if let Some(&other) = cores.get(1) {
            v.push(Placement {
                client: cores[0],
                server: other,
            });
        }
        Ok(v)
    }

    fn describe(&self) -> String {
        if self.client == self.server {
            format!("one core ({})", self.client)
        } else {
            format!("two cores ({}, {})", self.client, self.server)
        }
    }
}

/// A backend of its own in polling mode (`ciod --poll-us`), polling as
/// long as the rows' clients.
fn polling_backend(t: Transport) -> BenchResult<(ServerHandle, Arc<std::sync::atomic::AtomicU64>)> {
    let limits = Limits {
        poll: POLL,
        ..Limits::default()
    };
    start_backend_limits(t, Default::default(), limits, "ciod-poll")
}

/// A backend of its own for a pinned row: its threads on the backend's core.
fn pinned_backend(
    t: Transport,
    p: Placement,
) -> BenchResult<(ServerHandle, Arc<std::sync::atomic::AtomicU64>)> {
    let _pin = CorePin::to(p.server)?;
    start_backend_limits(t, Default::default(), Limits::default(), "ciod-pin")
}

/// The calling thread pinned to one core until dropped; threads it spawns
/// meanwhile inherit the pin and keep it.
struct CorePin(nix::sched::CpuSet);

impl CorePin {
    fn to(core: usize) -> BenchResult<CorePin> {
        let me = nix::unistd::Pid::from_raw(0);
        let before = nix::sched::sched_getaffinity(me).map_err(err("sched_getaffinity"))?;
        let mut one = nix::sched::CpuSet::new();
        one.set(core).map_err(err("a core number"))?;
        nix::sched::sched_setaffinity(me, &one).map_err(err("sched_setaffinity"))?;
        Ok(CorePin(before))
    }
}

impl Drop for CorePin {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// A raw-transport peer in a thread: mode `P` echoes fixed-size messages,
/// mode `S` runs stream transfers on request.
struct RawServer {
    listener: Option<Listener>,
    endpoint: Endpoint,
}

impl RawServer {
    fn start(t: Transport, tag: &str) -> BenchResult<Self> {
        let ep = endpoint(t, &format!("raw-{tag}"));
        let listener = Listener::bind(&ep).map_err(err("raw listener"))?;
        let endpoint = listener.local_endpoint().map_err(err("raw listener"))?;
        Ok(Self {
            listener: Some(listener),
            endpoint,
        })
    }

    /// Accepts one connection and serves it on a thread.
    fn serve_one(&mut self) -> BenchResult<std::thread::JoinHandle<()>> {
        let listener = self.listener.take().ok_or("raw server already used")?;
        Ok(std::thread::spawn(move || {
            let start = Instant::now();
            let conn = loop {
                match listener.accept() {
                    Ok(c) => break c,
                    Err(_) if start.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(_) => return,
                }
            };
            let _ = raw_peer(&conn);
            drop(listener);
        }))
    }
}

fn raw_peer(conn: &Conn) -> std::io::Result<()> {
    let mut r = conn;
    let mut mode = [0u8; 9];
    r.read_exact(&mut mode)?;
    let n = u64::from_le_bytes(mode[1..].try_into().expect("8 bytes")) as usize;
    let mut buf = vec![0u8; n.max(1 << 20)];
    if mode[0] == b'P' || mode[0] == b'Q' {
        // Echo (`Q`: polling for each message instead of sleeping).
        loop {
            raw_read_exact(conn, &mut buf[..n], mode[0] == b'Q')?;
            (&*conn).write_all(&buf[..n])?;
        }
    }
    if mode[0] == b'O' || mode[0] == b'o' {
        // One-way: on each trigger byte, send the time of sending (`o`:
        // polling for the trigger).
        loop {
            raw_read_exact(conn, &mut buf[..1], mode[0] == b'o')?;
            (&*conn).write_all(&now_ns().to_le_bytes())?;
        }
    }
    loop {
        let mut cmd = [0u8; 9];
        r.read_exact(&mut cmd)?;
        let mut left = u64::from_le_bytes(cmd[1..].try_into().expect("8 bytes")) as usize;
        if cmd[0] == b'>' {
            // Server to client.
            while left > 0 {
                let k = left.min(buf.len());
                (&*conn).write_all(&buf[..k])?;
                left -= k;
            }
        } else {
            while left > 0 {
                let k = left.min(buf.len());
                r.read_exact(&mut buf[..k])?;
                left -= k;
            }
            (&*conn).write_all(&[1])?;
        }
    }
}

fn raw_client(
    srv: &mut RawServer,
    mode: u8,
    n: u64,
) -> BenchResult<(Conn, std::thread::JoinHandle<()>)> {
    let t = srv.serve_one()?;
    let conn = Conn::connect(&srv.endpoint, Duration::from_secs(5)).map_err(err("raw connect"))?;
    let mut hello = [0u8; 9];
    hello[0] = mode;
    hello[1..].copy_from_slice(&n.to_le_bytes());
    (&conn).write_all(&hello).map_err(err("raw hello"))?;
    Ok((conn, t))
}

/// The raw side of an RDMA row: a raw verbs server on a port of its own
/// (a thread, serving until the client is dropped) and a client connected
/// to it, polling each wait for `spin` on both ends.
fn raw_verbs(spin: Duration) -> BenchResult<(RawVerbs, std::thread::JoinHandle<()>)> {
    let Endpoint::Rdma(addr) = endpoint(Transport::Rdma, "raw-verbs") else {
        unreachable!("an RDMA endpoint");
    };
    let addr: std::net::SocketAddr = addr.parse().map_err(err("raw verbs address"))?;
    let listener = RdmaListener::bind(addr).map_err(err("raw verbs listener"))?;
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match listener.accept_raw() {
                Ok(conn) => {
                    let _ = conn.serve();
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let fd = std::os::fd::AsFd::as_fd(&listener);
                    let _ = sys::poll_readable(&[&fd], Some(Duration::from_millis(100)));
                }
                Err(_) => return,
            }
        }
    });
    let client =
        RawVerbs::connect(addr, spin, Duration::from_secs(5)).map_err(err("raw verbs connect"))?;
    Ok((client, server))
}

fn endpoint(t: Transport, tag: &str) -> Endpoint {
    match t {
        Transport::Rdma => {
            let ip = RDMA_ADDR.get().copied().unwrap_or([127, 0, 0, 1].into());
            let port = RDMA_NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Endpoint::Rdma(std::net::SocketAddr::new(ip, port).to_string())
        }
        Transport::Tcp | Transport::Tls => "127.0.0.1:0".parse().expect("valid"),
        Transport::Unix => Endpoint::Unix(
            std::env::temp_dir().join(format!("cio-bench-{}-{tag}.sock", std::process::id())),
        ),
    }
}

const BIG_BAR: u64 = 64 << 20;

/// The embedded backend, and the stamp mem0 takes when its doorbell rings.
fn start_backend(t: Transport) -> BenchResult<(ServerHandle, Arc<std::sync::atomic::AtomicU64>)> {
    start_backend_with(t, Default::default())
}

fn start_backend_with(
    t: Transport,
    security: cio_backend::Security,
) -> BenchResult<(ServerHandle, Arc<std::sync::atomic::AtomicU64>)> {
    start_backend_limits(t, security, Limits::default(), "ciod")
}

/// How long polling mode polls after activity (`ciod --poll-us`, the
/// client's `ClientOptions::poll`), in the rows that measure it.
const POLL: Duration = Duration::from_micros(50);

fn start_backend_limits(
    t: Transport,
    security: cio_backend::Security,
    limits: Limits,
    tag: &str,
) -> BenchResult<(ServerHandle, Arc<std::sync::atomic::AtomicU64>)> {
    let stamp = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mem = Stamped {
        inner: Memory::new("mem0", BIG_BAR).map_err(err("memory device"))?,
        doorbell: (2, memory::reg::DOORBELL),
        stamp: Arc::clone(&stamp),
    };
    let (security, psk) = match t {
        Transport::Rdma => (cio_backend::Security::InsecurePlaintext, Some(rdma_psk()?)),
        _ => (security, None),
    };
    let server = Server::bind(ServerConfig {
        listen: endpoint(t, tag),
        psk,
        devices: vec![Box::new(Edu::new("edu0")), Box::new(mem)],
        limits,
        usb: Default::default(),
        security,
    })
    .and_then(|s| s.spawn())
    .map_err(err("embedded backend"))?;
    Ok((server, stamp))
}

fn client(s: &ServerHandle, batch: bool) -> BenchResult<Client> {
    client_with(s, batch, None)
}

fn client_with(s: &ServerHandle, batch: bool, tls: Option<ClientTls>) -> BenchResult<Client> {
    client_opts(s, batch, tls, Duration::ZERO)
}

fn client_opts(
    s: &ServerHandle,
    batch: bool,
    tls: Option<ClientTls>,
    poll: Duration,
) -> BenchResult<Client> {
    // An RDMA backend is plaintext with a key (see `rdma_psk`).
    let rdma = matches!(s.endpoint(), Endpoint::Rdma(_));
    Client::connect(
        s.endpoint(),
        ClientOptions {
            batch_writes: batch,
            tls,
            poll,
            psk: if rdma { Some(rdma_psk()?) } else { None },
            insecure_plaintext: rdma,
            ..ClientOptions::default()
        },
    )
    .map_err(err("connect"))
}

/// Reads exactly `buf`; with `polling`, polling for up to [`POLL`] before
/// it waits: the raw side of a polling-mode row waits as cio's polling
/// mode does.
fn raw_read_exact(conn: &Conn, buf: &mut [u8], polling: bool) -> std::io::Result<()> {
    if !polling {
        return (&*conn).read_exact(buf);
    }
    let start = Instant::now();
    let mut at = 0;
    while at < buf.len() {
        let spin = start.elapsed() < POLL;
        match conn.recv_slice(&mut buf[at..], spin) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && spin => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// T1 and T3: what TLS costs. The same work through a TLS backend and a
/// plaintext one (both loopback TCP, both embedded), alternating: a 4-byte
/// BAR read, and DMA sync both ways.
fn tls_cost(opts: &Options) -> BenchResult<Vec<Row>> {
    let quick = opts.quick;
    let t = Transport::Tls;
    let backend = Identity::generate("bench backend").map_err(err("identity"))?;
    let me = Identity::generate("bench client").map_err(err("identity"))?;
    let mut allowed = AuthorizedClients::default();
    allowed.insert(me.fingerprint(), "bench");
    let tls = ServerTls::new(&backend, allowed, false).map_err(err("tls"))?;
    let (ts, _) = start_backend_with(t, cio_backend::Security::Tls(tls.clone()))?;
    let (ps, _) = start_backend(Transport::Tcp)?;
    let pin = ClientTls {
        identity: me,
        pin: Pin::Key(backend.fingerprint()),
    };
    let mut rows = Vec::new();
    if opts.wants("T0") {
        rows.push(tls_floor(quick, &tls, &pin)?);
    }
    if !opts.wants("T1") && !opts.wants("T3") {
        return Ok(rows);
    }
    let (tc, pc) = (client_with(&ts, true, Some(pin))?, client(&ps, true)?);
    let mut td = tc.open("mem0").map_err(err("open"))?;
    let mut pd = pc.open("mem0").map_err(err("open"))?;
    let (blocks, per) = if quick { (4, 200) } else { (20, 1500) };
    let mut buf = [0u8; 4];
    let mut pbuf = [0u8; 4];
    let (vt, vp) = alternate(
        blocks,
        per,
        || td.read(0, 0x40, &mut buf).map_err(err("read")),
        || pd.read(0, 0x40, &mut pbuf).map_err(err("read")),
    )?;
    let (tls_s, plain) = (stat(vt, false), stat(vp, false));
    let ratio = tls_s.median / plain.median;
    rows.push(
        row(
            "T1",
            "BAR read 4 B round trip, TLS vs plaintext".into(),
            t,
            "us",
            tls_s,
            plain,
            "tls/plain",
            ratio,
            ("<= 1.05", ratio <= 1.05),
        )
        .placement_bound(true),
    );
    let size: u64 = if quick { 1 << 20 } else { 16 << 20 };
    let iters = if quick { 3 } else { 24 };
    for (dir, cmd) in [("dev->target", Some(CMD_TO_MEMORY)), ("target->dev", None)] {
        let mut runs = Vec::new();
        for (k, d) in [&mut td, &mut pd].into_iter().enumerate() {
            let flow = if cmd.is_some() {
                DmaDir::FromDevice
            } else {
                DmaDir::ToDevice
            };
            let r = Arc::new(
                DmaRegion::new(0x1_0000_0000 + k as u64 * BIG_BAR, size, flow)
                    .map_err(err("region"))?,
            );
            d.dma_map(Arc::clone(&r)).map_err(err("map"))?;
            d.write64(2, memory::reg::DMA_ADDR, r.iova())
                .map_err(err("write"))?;
            d.write64(2, memory::reg::BAR_OFFSET, 0)
                .map_err(err("write"))?;
            d.write64(2, memory::reg::LEN, size).map_err(err("write"))?;
            runs.push(r);
        }
        let once = |d: &mut RemoteDevice, r: &DmaRegion| -> BenchResult<()> {
            match cmd {
                Some(c) => d.write64(2, memory::reg::CMD, c).map_err(err("cmd"))?,
                None => r.with_mut(0, size as usize, |_| ()).map_err(err("mark"))?,
            }
            d.read64(2, memory::reg::COMPLETED)
                .map(|_| ())
                .map_err(err("fence"))
        };
        let (vt, vp) = alternate(
            iters,
            1,
            || once(&mut td, &runs[0]),
            || once(&mut pd, &runs[1]),
        )?;
        let (tls_s, plain) = (
            stat(bandwidths(size, vt, 0.0), true),
            stat(bandwidths(size, vp, 0.0), true),
        );
        let ratio = tls_s.median / plain.median;
        rows.push(row(
            "T3",
            format!("DMA sync {dir}, {}, TLS vs plaintext", size_label(size)),
            t,
            "MiB/s",
            tls_s,
            plain,
            "tls/plain",
            ratio,
            (">= 0.80", ratio >= 0.80),
        ));
        for (d, r) in [&mut td, &mut pd].into_iter().zip(&runs) {
            d.dma_unmap(r.iova()).map_err(err("unmap"))?;
        }
    }
    drop((td, pd, tc, pc));
    ts.shutdown();
    ps.shutdown();
    Ok(rows)
}

/// T0: TLS itself, without cio: `size` bytes one way through rustls
/// driven directly (64 KiB socket reads fed to it, 64 KiB plaintext writes,
/// blocking sockets) against the same through plain TCP, each answered by
/// a 1-byte acknowledgement, alternating. What the machine's cipher costs:
/// T3 cannot do better than this ratio.
fn tls_floor(quick: bool, server: &ServerTls, client: &ClientTls) -> BenchResult<Row> {
    use std::net::{TcpListener, TcpStream};
    let size: usize = if quick { 1 << 20 } else { 16 << 20 };
    let iters = if quick { 3 } else { 24 };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("bind"))?;
    let addr = listener.local_addr().map_err(err("bind"))?;
    let config = server.rustls_config();
    // The receiving side: the first connection is TLS, the second plain.
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut tls_sock, _) = listener.accept()?;
        let (mut plain, _) = listener.accept()?;
        let mut conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
        let mut raw = vec![0u8; 64 << 10];
        let mut out = vec![0u8; 64 << 10];
        loop {
            // One transfer each, in the order the client sends them.
            let mut got = 0;
            while got < size || conn.is_handshaking() {
                if conn.wants_write() {
                    conn.write_tls(&mut tls_sock)?;
                    continue;
                }
                let n = tls_sock.read(&mut raw)?;
                if n == 0 {
                    return Ok(());
                }
                let mut at = &raw[..n];
                while !at.is_empty() {
                    conn.read_tls(&mut at)?;
                    conn.process_new_packets().map_err(std::io::Error::other)?;
                    loop {
                        match conn.reader().read(&mut out) {
                            Ok(0) => break,
                            Ok(k) => got += k,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            conn.writer().write_all(&[1])?;
            while conn.wants_write() {
                conn.write_tls(&mut tls_sock)?;
            }
            let mut got = 0;
            while got < size {
                let n = plain.read(&mut out)?;
                if n == 0 {
                    return Ok(());
                }
                got += n;
            }
            plain.write_all(&[1])?;
        }
    });
    let mut tls_sock = TcpStream::connect(addr).map_err(err("connect"))?;
    let mut plain = TcpStream::connect(addr).map_err(err("connect"))?;
    let name = rustls::pki_types::ServerName::try_from("cio").map_err(err("name"))?;
    let mut conn = rustls::ClientConnection::new(client.rustls_config().map_err(err("tls"))?, name)
        .map_err(err("tls"))?;
    conn.complete_io(&mut tls_sock).map_err(err("handshake"))?;
    let data = vec![0x5au8; 64 << 10];
    let mut tls_once = || -> BenchResult<()> {
        let mut sent = 0;
        while sent < size {
            let n = conn.writer().write(&data).map_err(err("tls write"))?;
            sent += n;
            while conn.wants_write() {
                conn.write_tls(&mut tls_sock).map_err(err("tls send"))?;
            }
        }
        // The acknowledgement.
        let mut b = [0u8; 1];
        loop {
            conn.read_tls(&mut tls_sock).map_err(err("tls recv"))?;
            conn.process_new_packets().map_err(err("tls"))?;
            match conn.reader().read(&mut b) {
                Ok(1) => return Ok(()),
                Ok(_) => return Err("the TLS sink closed".into()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(err("tls read")(e)),
            }
        }
    };
    let mut plain_once = || -> BenchResult<()> {
        let mut sent = 0;
        while sent < size {
            sent += plain.write(&data).map_err(err("tcp write"))?;
        }
        let mut b = [0u8; 1];
        plain.read_exact(&mut b).map_err(err("tcp read"))
    };
    let (vt, vp) = alternate(iters, 1, &mut tls_once, &mut plain_once)?;
    drop((tls_sock, plain));
    let _ = sink.join();
    let (tls_s, plain_s) = (
        stat(bandwidths(size as u64, vt, 0.0), true),
        stat(bandwidths(size as u64, vp, 0.0), true),
    );
    let ratio = tls_s.median / plain_s.median;
    Ok(row(
        "T0",
        format!(
            "rustls alone vs TCP stream, {} one way",
            size_label(size as u64)
        ),
        Transport::Tls,
        "MiB/s",
        tls_s,
        plain_s,
        "tls/plain",
        ratio,
        ("(the floor of T3)", true),
    ))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs `a` and `b` alternately in `blocks` blocks of `per_block` calls,
/// timing each call; returns both series in microseconds.
fn alternate(
    blocks: usize,
    per_block: usize,
    mut a: impl FnMut() -> BenchResult<()>,
    mut b: impl FnMut() -> BenchResult<()>,
) -> BenchResult<(Vec<f64>, Vec<f64>)> {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        for _ in 0..per_block {
            let t = Instant::now();
            a()?;
            va.push(us(t.elapsed()));
        }
        for _ in 0..per_block {
            let t = Instant::now();
            b()?;
            vb.push(us(t.elapsed()));
        }
    }
    Ok((va, vb))
}

#[allow(clippy::too_many_arguments)]
fn row(
    id: &'static str,
    what: String,
    transport: Transport,
    unit: &'static str,
    cio: Stat,
    raw: Stat,
    ratio_is: &'static str,
    ratio: f64,
    target: (&str, bool),
) -> Row {
    Row {
        id,
        what,
        transport,
        unit,
        cio,
        raw,
        ratio_is,
        ratio,
        target: target.0.to_owned(),
        met: target.1,
        placement_bound: false,
    }
}

/// P1: a BAR read against a raw ping-pong of the same payload. With
/// `poll` (polling mode: a backend started with it and a client with it)
/// the raw side polls too, on both ends.
fn p1(
    t: Transport,
    quick: bool,
    s: &ServerHandle,
    raw: &mut RawServer,
    width: usize,
    poll: Duration,
    placed: Option<Placement>,
) -> BenchResult<Row> {
    let (blocks, per) = if quick { (4, 200) } else { (20, 1500) };
    let polling = !poll.is_zero();
    let mut buf = [0u8; 8];
    // The raw peer's thread starts on the backend's core; the client, its
    // pump and this thread then run on the caller's.
    let server_pin = placed.map(|p| CorePin::to(p.server)).transpose()?;
    let mut raw_op: Box<dyn FnMut() -> BenchResult<()>> = if t == Transport::Rdma {
        let (mut verbs, _t) = raw_verbs(poll)?;
        Box::new(move || verbs.ping(width).map_err(err("raw verbs ping")))
    } else {
        let (conn, _t) = raw_client(raw, if polling { b'Q' } else { b'P' }, width as u64)?;
        let mut rbuf = [0u8; 8];
        Box::new(move || {
            (&conn)
                .write_all(&rbuf[..width])
                .map_err(err("raw write"))?;
            raw_read_exact(&conn, &mut rbuf[..width], polling).map_err(err("raw read"))
        })
    };
    drop(server_pin);
    let _client_pin = placed.map(|p| CorePin::to(p.client)).transpose()?;
    let c = client_opts(s, true, None, poll)?;
    let mut dev = c.open("mem0").map_err(err("open"))?;
    let (vc, vr) = alternate(
        blocks,
        per,
        || dev.read(0, 0x40, &mut buf[..width]).map_err(err("read")),
        &mut raw_op,
    )?;
    let (cio, raw_s) = (stat(vc, false), stat(vr, false));
    let ratio = cio.median / raw_s.median;
    let (mut what, target) = if polling {
        (
            format!("BAR read {width} B, polling {}us", poll.as_micros()),
            1.10,
        )
    } else {
        (format!("BAR read {width} B round trip"), 1.15)
    };
    if let Some(p) = placed {
        what = format!("BAR read {width} B, {}", p.describe());
    }
    if t == Transport::Rdma {
        what.push_str(" (raw: verbs)");
    }
    Ok(row(
        "P1",
        what,
        t,
        "us",
        cio,
        raw_s,
        "cio/raw",
        ratio,
        (&format!("<= {target:.2}"), ratio <= target),
    )
    .placement_bound(placed.is_none() && !polling))
}

fn write_burst(dev: &mut RemoteDevice, n: usize) -> BenchResult<f64> {
    let start = Instant::now();
    for i in 0..n {
        dev.write32(0, ((i % 1024) * 4) as u64, i as u32)
            .map_err(err("write"))?;
    }
    dev.read32(0, 0).map_err(err("fence read"))?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn p2(t: Transport, quick: bool, s: &ServerHandle) -> BenchResult<Vec<Row>> {
    let (rounds, n, n_unbatched) = if quick {
        (3, 20_000, 2_000)
    } else {
        (7, 1_000_000, 50_000)
    };
    let batched = client(s, true)?;
    let unbatched = client(s, false)?;
    let mut dev = batched.open("mem0").map_err(err("open"))?;
    let mut vb = Vec::new();
    let mut vu = Vec::new();
    for _ in 0..rounds {
        vb.push(write_burst(&mut dev, n)?);
    }
    drop(dev);
    let mut dev = unbatched.open("mem0").map_err(err("open"))?;
    for _ in 0..rounds {
        vu.push(write_burst(&mut dev, n_unbatched)?);
    }
    let (b, u) = (stat(vb, true), stat(vu, true));
    let ratio = b.median / u.median;
    let rate_target = t != Transport::Tcp || b.median >= 2e6;
    Ok(vec![row(
        "P2",
        "posted 4 B writes/s, batched vs one per syscall".into(),
        t,
        "writes/s",
        b,
        u,
        "batched/unbatched",
        ratio,
        (
            if t == Transport::Tcp {
                ">= 20x and >= 2M/s"
            } else {
                ">= 20x"
            },
            ratio >= 20.0 && rate_target,
        ),
    )])
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1 << 20) as f64
}

/// Transfers of `size` bytes timed in microseconds (less `minus` each, at
/// least 1 µs), as MiB/s.
fn bandwidths(size: u64, micros: Vec<f64>, minus: f64) -> Vec<f64> {
    micros
        .into_iter()
        .map(|u| mib_s(size, Duration::from_secs_f64((u - minus).max(1.0) / 1e6)))
        .collect()
}

/// The raw side of a stream row, on a `S` raw peer: `dir` `>` asks for
/// `size` bytes and reads them, `<` sends `size` bytes and reads the
/// peer's 1-byte answer; `sink` is the buffer either way.
fn raw_stream(conn: &Conn, dir: u8, size: u64, sink: &mut [u8]) -> BenchResult<()> {
    let mut c = [dir, 0, 0, 0, 0, 0, 0, 0, 0];
    c[1..].copy_from_slice(&size.to_le_bytes());
    (&*conn).write_all(&c).map_err(err("raw"))?;
    let mut left = size as usize;
    while left > 0 {
        let k = left.min(sink.len());
        if dir == b'>' {
            (&*conn).read_exact(&mut sink[..k]).map_err(err("raw"))?;
        } else {
            (&*conn).write_all(&sink[..k]).map_err(err("raw"))?;
        }
        left -= k;
    }
    if dir == b'<' {
        (&*conn).read_exact(&mut sink[..1]).map_err(err("raw"))?;
    }
    Ok(())
}

fn size_label(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}

fn p3(t: Transport, quick: bool, s: &ServerHandle, raw: &mut RawServer) -> BenchResult<Vec<Row>> {
    let sizes: &[u64] = if quick {
        &[4 << 10, 1 << 20]
    } else if t == Transport::Rdma {
        &[4 << 10, 64 << 10, 1 << 20]
    } else {
        &[4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
    };
    let c = client(s, true)?;
    let mut dev = c.open("mem0").map_err(err("open"))?;
    // On RDMA the raw side is RDMA WRITE bandwidth (both directions: the
    // fastest a NIC moves the bytes), on a connection of its own per size;
    // else a raw stream each way.
    let mut verbs = None;
    let mut conn = None;
    if t != Transport::Rdma {
        conn = Some(raw_client(raw, b'S', 0)?);
    }
    let mut sink = vec![0u8; 1 << 20];
    let mut rows = Vec::new();
    let iova_base = 0x1_0000_0000u64;
    for (k, &size) in sizes.iter().enumerate() {
        // RDMA moves 16 MiB a size each way, not 256 (and sizes stop at
        // 1 MiB): soft-RoCE, the only RDMA here, runs at tens of MiB/s
        // under TCG, and the guest kernel's (6.1) stopped completing RDMA
        // WRITEs, on every queue pair, after some 200 MiB of them.
        let volume: u64 = if t == Transport::Rdma {
            16 << 20
        } else {
            256 << 20
        };
        let iters = if quick {
            3
        } else {
            (volume / size).clamp(8, 400) as usize
        };
        if t == Transport::Rdma {
            verbs = Some(raw_verbs(Duration::ZERO)?);
        }
        let from = Arc::new(
            DmaRegion::new(iova_base + 2 * k as u64 * BIG_BAR, size, DmaDir::FromDevice)
                .map_err(err("region"))?,
        );
        let to = Arc::new(
            DmaRegion::new(
                iova_base + (2 * k as u64 + 1) * BIG_BAR,
                size,
                DmaDir::ToDevice,
            )
            .map_err(err("region"))?,
        );
        dev.dma_map(Arc::clone(&from)).map_err(err("map"))?;
        dev.dma_map(Arc::clone(&to)).map_err(err("map"))?;
        // What the emulated device itself spends copying BAR0 into DMA
        // memory, measured on an identical local model: not sync cost.
        let device_us = local_device_copy_us(size, iters)?;
        for (dir, region, raw_dir) in [("dev->target", &from, b'>'), ("target->dev", &to, b'<')] {
            dev.write64(2, memory::reg::DMA_ADDR, region.iova())
                .map_err(err("write"))?;
            dev.write64(2, memory::reg::BAR_OFFSET, 0)
                .map_err(err("write"))?;
            dev.write64(2, memory::reg::LEN, size)
                .map_err(err("write"))?;
            let (vc, vr) = alternate(
                iters,
                1,
                || {
                    if raw_dir == b'>' {
                        // The device writes the buffer; the fence pulls it.
                        dev.write64(2, memory::reg::CMD, CMD_TO_MEMORY)
                            .map_err(err("cmd"))?;
                    } else {
                        // The driver rewrote the buffer; the fence pushes it
                        // (and orders after its arrival in the shadow).
                        region
                            .with_mut(0, size as usize, |_| ())
                            .map_err(err("mark"))?;
                    }
                    dev.read64(2, memory::reg::COMPLETED)
                        .map(|_| ())
                        .map_err(err("fence"))
                },
                || match (&mut verbs, &conn) {
                    (Some((v, _)), _) => v.write(size).map_err(err("raw verbs write")),
                    (None, Some((c, _))) => raw_stream(c, raw_dir, size, &mut sink),
                    (None, None) => unreachable!("a raw side"),
                },
            )?;
            let minus = if raw_dir == b'>' { device_us } else { 0.0 };
            let (cio, raw_s) = (
                stat(bandwidths(size, vc, minus), true),
                stat(bandwidths(size, vr, 0.0), true),
            );
            let ratio = cio.median / raw_s.median;
            let (target, met) = if size >= 1 << 20 {
                (">= 0.90", ratio >= 0.90)
            } else {
                ("(info)", true)
            };
            let mut note = if minus > 0.0 {
                format!(" (-{minus:.0}us device)")
            } else {
                String::new()
            };
            if t == Transport::Rdma {
                note.push_str(" (raw: WRITE)");
            }
            rows.push(row(
                "P3",
                format!("DMA sync {dir}, {}{note}", size_label(size)),
                t,
                "MiB/s",
                cio,
                raw_s,
                "cio/raw",
                ratio,
                (target, met),
            ));
        }
        dev.dma_unmap(from.iova()).map_err(err("unmap"))?;
        dev.dma_unmap(to.iova()).map_err(err("unmap"))?;
    }
    Ok(rows)
}

/// P8: bulk BAR access, `read_bulk`/`write_bulk` of mem0's BAR0 (plain
/// memory, which the model copies), against a raw stream of the same size
/// in the same direction: the raw server sends N bytes on request, or takes
/// N bytes and answers one. cio's write is fenced by `flush` (a round trip
/// after the posted data), like the raw side's acknowledgement.
fn p8(t: Transport, quick: bool, s: &ServerHandle, raw: &mut RawServer) -> BenchResult<Vec<Row>> {
    let sizes: &[u64] = if quick {
        &[4 << 10, 1 << 20]
    } else {
        &[4 << 10, 64 << 10, 1 << 20, 16 << 20]
    };
    let c = client(s, true)?;
    let mut dev = c.open("mem0").map_err(err("open"))?;
    let (conn, _t) = raw_client(raw, b'S', 0)?;
    let mut buf = vec![0x6bu8; *sizes.last().unwrap_or(&0) as usize];
    let mut sink = vec![0u8; 1 << 20];
    let mut rows = Vec::new();
    for &size in sizes {
        let n = size as usize;
        let iters = if quick {
            3
        } else {
            ((256u64 << 20) / size).clamp(8, 400) as usize
        };
        for (dir, raw_dir) in [("read", b'>'), ("write", b'<')] {
            let (vc, vr) = alternate(
                iters,
                1,
                || {
                    if raw_dir == b'>' {
                        dev.read_bulk(0, 0, &mut buf[..n]).map_err(err("read"))
                    } else {
                        dev.write_bulk(0, 0, &buf[..n])
                            .and_then(|()| dev.flush())
                            .map_err(err("write"))
                    }
                },
                || raw_stream(&conn, raw_dir, size, &mut sink),
            )?;
            let (cio, raw_s) = (
                stat(bandwidths(size, vc, 0.0), true),
                stat(bandwidths(size, vr, 0.0), true),
            );
            let ratio = cio.median / raw_s.median;
            let (target, met) = if size >= 64 << 10 {
                (">= 0.90", ratio >= 0.90)
            } else {
                ("(info)", true)
            };
            rows.push(row(
                "P8",
                format!("bulk BAR {dir}, {}", size_label(size)),
                t,
                "MiB/s",
                cio,
                raw_s,
                "cio/raw",
                ratio,
                (target, met),
            ));
        }
    }
    Ok(rows)
}

/// Median time the memory model takes for a BAR0 -> DMA memory command of
/// `size` bytes when driven locally (no transport at all).
fn local_device_copy_us(size: u64, iters: usize) -> BenchResult<f64> {
    let mut m = Memory::new("local", BIG_BAR).map_err(err("memory device"))?;
    let r =
        Arc::new(DmaRegion::new(0x1_0000_0000, size, DmaDir::FromDevice).map_err(err("region"))?);
    m.dma_map(Arc::clone(&r)).map_err(err("map"))?;
    m.write64(2, memory::reg::DMA_ADDR, r.iova())
        .map_err(err("write"))?;
    m.write64(2, memory::reg::LEN, size).map_err(err("write"))?;
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters.max(3) {
        let t0 = Instant::now();
        m.write64(2, memory::reg::CMD, CMD_TO_MEMORY)
            .map_err(err("cmd"))?;
        v.push(us(t0.elapsed()));
        // Clear the dirty bits as a pull would.
        r.take_dirty_runs(0, size, usize::MAX);
    }
    Ok(stat(v, false).median)
}

fn p4(
    t: Transport,
    quick: bool,
    s: &ServerHandle,
    stamp: &std::sync::atomic::AtomicU64,
    raw: &mut RawServer,
    placed: Option<Placement>,
    poll: Duration,
) -> BenchResult<Row> {
    let (blocks, per) = if quick { (4, 100) } else { (20, 500) };
    let polling = !poll.is_zero();
    let (conn, _t) = {
        let _pin = placed.map(|p| CorePin::to(p.server)).transpose()?;
        raw_client(raw, if polling { b'o' } else { b'O' }, 0)?
    };
    let _client_pin = placed.map(|p| CorePin::to(p.client)).transpose()?;
    let c = client_opts(s, true, None, poll)?;
    let mut dev = c.open("mem0").map_err(err("open"))?;
    let fd = EventFd::new(EFD_NONBLOCK).map_err(err("eventfd"))?;
    dev.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
        .map_err(err("irqs"))?;
    let (mut vc, mut vr) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        for _ in 0..per {
            dev.write32(2, memory::reg::DOORBELL, 1)
                .map_err(err("doorbell"))?;
            // As a driver waits (`Device::wait_irq`): this thread reads the
            // connection meanwhile.
            let n = dev
                .wait_irq(&fd, Duration::from_secs(5))
                .map_err(err("waiting for the interrupt"))?;
            let seen = now_ns();
            if n == 0 {
                return Err("interrupt did not arrive within 5 s".into());
            }
            let raised = stamp.load(std::sync::atomic::Ordering::Acquire);
            vc.push(seen.saturating_sub(raised) as f64 / 1e3);
        }
        for _ in 0..per {
            (&conn).write_all(&[1]).map_err(err("raw write"))?;
            let mut b = [0u8; 8];
            raw_read_exact(&conn, &mut b, polling).map_err(err("raw read"))?;
            let seen = now_ns();
            vr.push(seen.saturating_sub(u64::from_le_bytes(b)) as f64 / 1e3);
        }
    }
    let (cio, raw_s) = (stat(vc, false), stat(vr, false));
    let ratio = cio.median / raw_s.median;
    let mut what = "irq: device raises -> eventfd readable, one-way".to_owned();
    if let Some(p) = placed {
        what = format!("irq: raised -> eventfd, {}", p.describe());
    }
    if polling {
        what = format!("irq: raised -> eventfd, polling {}us", poll.as_micros());
    }
    Ok(row(
        "P4",
        what,
        t,
        "us",
        cio,
        raw_s,
        "cio/raw",
        ratio,
        ("<= 1.20", ratio <= 1.20),
    )
    .placement_bound(placed.is_none() && !polling))
}

fn p7(t: Transport, quick: bool, s: &ServerHandle) -> BenchResult<Row> {
    let (blocks, per) = if quick { (3, 50) } else { (10, 500) };
    let c = client(s, true)?;
    let mut dev = c.open("mem0").map_err(err("open"))?;
    let small =
        Arc::new(DmaRegion::new(0x10_0000, 1 << 20, DmaDir::ToDevice).map_err(err("region"))?);
    let big =
        Arc::new(DmaRegion::new(0x1_0000_0000, 1 << 30, DmaDir::ToDevice).map_err(err("region"))?);
    dev.dma_map(Arc::clone(&small)).map_err(err("map"))?;
    let page = vec![0x5au8; PAGE_SIZE as usize];
    let mut i = 0u64;
    let mut one = |dev: &mut RemoteDevice, r: &DmaRegion| -> BenchResult<()> {
        i += 1;
        let pages = r.len() / PAGE_SIZE;
        // A different page each time, spread over the whole mapping.
        let p = (i.wrapping_mul(0x9e37_79b9)) % pages;
        r.write(p * PAGE_SIZE, &page).map_err(err("write"))?;
        dev.read64(2, memory::reg::COMPLETED)
            .map(|_| ())
            .map_err(err("read"))
    };
    let mut vs = Vec::new();
    let mut vb = Vec::new();
    // Two devices cannot share one session's IOVA space here, so measure
    // the small mapping, then the big one, in alternating blocks.
    for _ in 0..blocks {
        for _ in 0..per {
            let t0 = Instant::now();
            one(&mut dev, &small)?;
            vs.push(us(t0.elapsed()));
        }
        dev.dma_unmap(small.iova()).map_err(err("unmap"))?;
        dev.dma_map(Arc::clone(&big)).map_err(err("map"))?;
        for _ in 0..per {
            let t0 = Instant::now();
            one(&mut dev, &big)?;
            vb.push(us(t0.elapsed()));
        }
        dev.dma_unmap(big.iova()).map_err(err("unmap"))?;
        dev.dma_map(Arc::clone(&small)).map_err(err("map"))?;
    }
    let (b, sm) = (stat(vb, false), stat(vs, false));
    let ratio = b.median / sm.median;
    Ok(row(
        "P7",
        "sync 1 dirty page, 1 GiB mapped vs 1 MiB".into(),
        t,
        "us",
        b,
        sm,
        "1GiB/1MiB",
        ratio,
        ("<= 2.0", ratio <= 2.0),
    ))
}

/// Runs the suite.
pub fn run(opts: &Options, mut progress: impl FnMut(&Row)) -> BenchResult<Report> {
    if opts.transports.contains(&Transport::Rdma) {
        let ip = opts.rdma_addr.ok_or(
            "--transport rdma needs --rdma-addr IP: an address of this machine's RDMA device interface",
        )?;
        if *RDMA_ADDR.get_or_init(|| ip) != ip {
            return Err("the RDMA address is set once per process".into());
        }
    }
    let mut rows = Vec::new();
    let mut push = |r: Row, rows: &mut Vec<Row>| {
        progress(&r);
        rows.push(r);
    };
    for &t in &opts.transports {
        if t == Transport::Tls {
            if opts.wants("T0") || opts.wants("T1") || opts.wants("T3") {
                for r in tls_cost(opts)? {
                    if opts.wants(r.id) {
                        push(r, &mut rows);
                    }
                }
            }
            continue;
        }
        let (s, stamp) = start_backend(t)?;
        if opts.wants("P1") {
            for width in [4, 8] {
                let mut raw = RawServer::start(t, &format!("p1-{width}"))?;
                push(
                    p1(t, opts.quick, &s, &mut raw, width, Duration::ZERO, None)?,
                    &mut rows,
                );
            }
            if t != Transport::Rdma {
                // Pinned: a backend of its own, its threads on the
                // backend's core.
                for p in Placement::pinned()? {
                    let (ps, _) = pinned_backend(t, p)?;
                    let mut raw = RawServer::start(t, "p1-pinned")?;
                    let row = p1(t, opts.quick, &ps, &mut raw, 4, Duration::ZERO, Some(p))?;
                    push(row, &mut rows);
                    ps.shutdown();
                }
            }
            // Polling mode: its own backend, polling as long as its clients.
            let (ps, _) = polling_backend(t)?;
            for width in [4, 8] {
                let mut raw = RawServer::start(t, &format!("p1p-{width}"))?;
                push(
                    p1(t, opts.quick, &ps, &mut raw, width, POLL, None)?,
                    &mut rows,
                );
            }
            ps.shutdown();
        }
        if opts.wants("P2") {
            for r in p2(t, opts.quick, &s)? {
                push(r, &mut rows);
            }
        }
        if opts.wants("P3") {
            let mut raw = RawServer::start(t, "p3")?;
            for r in p3(t, opts.quick, &s, &mut raw)? {
                push(r, &mut rows);
            }
        }
        if opts.wants("P8") {
            let mut raw = RawServer::start(t, "p8")?;
            for r in p8(t, opts.quick, &s, &mut raw)? {
                push(r, &mut rows);
            }
        }
        if opts.wants("P4") {
            let mut raw = RawServer::start(t, "p4")?;
            push(
                p4(t, opts.quick, &s, &stamp, &mut raw, None, Duration::ZERO)?,
                &mut rows,
            );
            if t != Transport::Rdma {
                for p in Placement::pinned()? {
                    let (ps, stamp) = pinned_backend(t, p)?;
                    let mut raw = RawServer::start(t, "p4-pinned")?;
                    push(
                        p4(
                            t,
                            opts.quick,
                            &ps,
                            &stamp,
                            &mut raw,
                            Some(p),
                            Duration::ZERO,
                        )?,
                        &mut rows,
                    );
                    ps.shutdown();
                }
                // Polling mode: backend and client poll, and so does the
                // raw side on both ends.
                let (ps, stamp) = polling_backend(t)?;
                let mut raw = RawServer::start(t, "p4-poll")?;
                push(
                    p4(t, opts.quick, &ps, &stamp, &mut raw, None, POLL)?,
                    &mut rows,
                );
                ps.shutdown();
            }
        }
        if opts.wants("P7") {
            push(p7(t, opts.quick, &s)?, &mut rows);
        }
        s.shutdown();
    }
    Ok(Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        quick: opts.quick,
        rows,
    })
}

fn fmt_num(v: f64) -> String {
    if v >= 1e5 {
        format!("{:.3}M", v / 1e6)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Formats one row as a table line.
pub fn format_row(r: &Row) -> String {
    format!(
        "{:<3} {:<5} {:<44} {:>9} {:>18} {:>18} {:>6.2} {:<18} {}",
        r.id,
        r.transport.to_string(),
        r.what,
        r.unit,
        format!("{} / {}", fmt_num(r.cio.median), fmt_num(r.cio.p99)),
        format!("{} / {}", fmt_num(r.raw.median), fmt_num(r.raw.p99)),
        r.ratio,
        format!("{} {}", r.ratio_is, r.target),
        if r.met { "ok" } else { "MISSED" }
    )
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<3} {:<5} {:<44} {:>9} {:>18} {:>18} {:>6} {:<18} {}",
        "id",
        "tport",
        "measurement",
        "unit",
        "cio med / tail",
        "base med / tail",
        "ratio",
        "target",
        ""
    )
}
