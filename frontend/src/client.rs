//! A connection to a `ciod`: handshake, requests and replies, and the pump
//! thread that delivers what arrives unasked (interrupts, device-written DMA
//! data, errors of posted writes) and flushes posted writes.
//!
//! Replies are read by the thread that waits for them (no hand-off between
//! threads on the read path); the pump reads only when no caller does.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cio_core::wire::{
    AuthMethod, DeviceSummary, ErrorCode, Message, FEATURES, MAX_DMA_CHUNK, PROTOCOL_VERSION,
};
use cio_core::{DeviceError, DmaRegion, DmaSpace, EventFd, FrameDecoder, IrqKind};
use cio_transports::{auth, sys, Conn, Endpoint, FrameReader, OutQueue, Psk, Side};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::remote::RemoteDevice;

/// Posted writes are sent at once when this many bytes are queued.
const FLUSH_THRESHOLD: usize = 64 * 1024;
/// A posted write this long after the previous one is sent at once.
const ISOLATED_NS: u64 = 20_000;
/// The pump sends queued writes once no write was added for this long.
const COALESCE: Duration = Duration::from_micros(20);
/// While callers read the socket themselves the pump stops watching it and
/// looks again this often.
const PUMP_RECHECK: Duration = Duration::from_micros(200);

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Key to prove (and to demand the server proves).
    pub psk: Option<Psk>,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Bound on waiting for any reply.
    pub reply_timeout: Duration,
    /// Name sent in the handshake, for the server's logs.
    pub name: String,
    /// Batch posted writes (the default). When false every write leaves in
    /// its own system call at once: lower latency for a lone doorbell,
    /// much lower throughput for many writes.
    pub batch_writes: bool,
    /// Long-lived USB relays ping an idle backend this often, and give the
    /// link up after four intervals without a frame from it.
    pub keepalive: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            psk: None,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(30),
            name: format!("cio/{}", env!("CARGO_PKG_VERSION")),
            batch_writes: true,
            keepalive: Duration::from_secs(5),
        }
    }
}

/// Frontend errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, resolving or key loading failed.
    #[error(transparent)]
    Transport(#[from] cio_transports::Error),
    /// The backend refused the request.
    #[error("backend refused: {message} ({})", code.name())]
    Server {
        /// Code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The backend requires a key and none was given.
    #[error("the backend requires a pre-shared key: pass --psk-file")]
    KeyRequired,
    /// A key was given but the backend did not authenticate itself.
    #[error("a pre-shared key was given but the backend did not ask for it: refusing an unauthenticated backend")]
    ServerNotAuthenticated,
    /// The backend's proof of the key did not verify.
    #[error("the backend's key proof did not verify: it does not hold the same key")]
    BadServerProof,
    /// The peer broke the protocol.
    #[error("protocol violation by the backend: {0}")]
    Protocol(String),
    /// The connection is gone.
    #[error("connection to the backend lost: {0}")]
    Disconnected(String),
    /// No reply in time.
    #[error("no reply from the backend within {0:?}")]
    Timeout(Duration),
    /// A device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl ClientError {
    /// True if reconnecting may help.
    pub fn should_reconnect(&self) -> bool {
        match self {
            Self::Transport(t) => t.should_reconnect(),
            Self::Disconnected(_) | Self::Timeout(_) => true,
            _ => false,
        }
    }
}

impl From<ClientError> for DeviceError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server { code, message } => DeviceError::Remote { code, message },
            ClientError::Device(d) => d,
            e @ (ClientError::Disconnected(_) | ClientError::Timeout(_)) => {
                DeviceError::Disconnected(e.to_string())
            }
            other => DeviceError::Failed(other.to_string()),
        }
    }
}

/// What the frontend keeps per open device: its DMA mappings (target
/// memory) and where its interrupts go.
#[derive(Debug, Default)]
pub(crate) struct Target {
    pub(crate) dma: Mutex<DmaSpace>,
    pub(crate) irqs: Mutex<HashMap<(IrqKind, u32), EventFd>>,
    pub(crate) irq_count: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Rx {
    reader: FrameReader,
    /// Replies read by another thread than the one waiting for them (few:
    /// a short list beats hashing on the request path).
    replies: Vec<(u64, Message)>,
    posted_errors: Vec<(u64, ErrorCode, String)>,
    closed: Option<String>,
}

/// Connection state shared by the client, its devices and the pump.
#[derive(Debug)]
pub(crate) struct Inner {
    conn: Conn,
    session: u64,
    features: u64,
    reply_timeout: Duration,
    batch_writes: bool,
    tx: Mutex<OutQueue>,
    rx: Mutex<Rx>,
    /// Requests sent and not yet answered (usually one).
    pending: Mutex<Vec<u64>>,
    pub(crate) targets: Mutex<HashMap<u32, Arc<Target>>>,
    kick: EventFd,
    stop: EventFd,
    stopping: AtomicBool,
    /// Callers reading replies from the socket right now.
    readers: AtomicUsize,
    epoch: Instant,
    last_post: AtomicU64,
}

impl Inner {
    pub(crate) fn target(&self, handle: u32) -> Option<Arc<Target>> {
        lock(&self.targets).get(&handle).cloned()
    }

    /// Queues the dirty device-readable target pages of `target` (all, or
    /// those in `range`) as `DmaData` frames ahead of whatever comes next.
    fn push_dirty(out: &mut OutQueue, handle: u32, target: &Target, range: Option<(u64, u64)>) {
        let dma = lock(&target.dma);
        for region in dma.regions() {
            if !region.dir().device_reads() || region.dirty_pages() == 0 {
                continue;
            }
            let Some((off, len)) = range.map_or(Some((0, region.len())), |(iova, len)| {
                region.clip(iova, len)
            }) else {
                continue;
            };
            for (run, n) in region.take_dirty_runs(off, len, MAX_DMA_CHUNK) {
                out.push_dma_region(handle, region, run, n);
            }
        }
    }

    /// Where a pulled `DmaData` payload goes, for direct receives.
    fn resolve(&self, handle: u32, iova: u64, len: usize) -> Option<(Arc<DmaRegion>, u64)> {
        let target = self.target(handle)?;
        let dma = lock(&target.dma);
        let (region, off) = dma.resolve(iova, len as u64).ok()?;
        Some((Arc::clone(region), off))
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(ClientError::Disconnected("client is closing".into()));
        }
        Ok(())
    }

    fn write_out(&self, out: &mut OutQueue) -> Result<(), ClientError> {
        out.write_to(&self.conn, Some(self.reply_timeout))
            .map(|_| ())
            .map_err(|e| ClientError::Disconnected(format!("sending: {e}")))
    }

    /// Queues a posted region write (after the device's dirty target
    /// pages). It leaves at once when `urgent` (a doorbell), when it follows
    /// no other write closely (a lone write gains nothing from waiting),
    /// when enough is queued, or at the next request; otherwise the pump
    /// sends it, together with whatever was queued meanwhile.
    pub(crate) fn post_write(
        &self,
        handle: u32,
        target: &Target,
        region: u32,
        offset: u64,
        data: &[u8],
        urgent: bool,
    ) -> Result<(), ClientError> {
        self.check_open()?;
        let now = self.epoch.elapsed().as_nanos() as u64;
        let isolated =
            now.saturating_sub(self.last_post.swap(now, Ordering::Relaxed)) > ISOLATED_NS;
        let mut out = lock(&self.tx);
        let was_empty = out.is_empty();
        Self::push_dirty(&mut out, handle, target, None);
        out.push_region_write(handle, region, offset, data);
        if !self.batch_writes || urgent || out.len() >= FLUSH_THRESHOLD || (was_empty && isolated) {
            self.write_out(&mut out)?;
        } else if was_empty {
            let _ = self.kick.write(1);
        }
        Ok(())
    }

    /// Sends the device's dirty target pages in `range` now.
    pub(crate) fn sync_for_device(
        &self,
        handle: u32,
        target: &Target,
        range: (u64, u64),
    ) -> Result<(), ClientError> {
        self.check_open()?;
        let mut out = lock(&self.tx);
        Self::push_dirty(&mut out, handle, target, Some(range));
        self.write_out(&mut out)
    }

    /// Sends a request (after all queued posted frames and, with `sync`, the
    /// device's dirty target pages) and waits for its reply.
    pub(crate) fn call(
        &self,
        sync: Option<(u32, &Target)>,
        msg: &Message,
    ) -> Result<Message, ClientError> {
        self.check_open()?;
        let seq = {
            let mut out = lock(&self.tx);
            if let Some((handle, target)) = sync {
                Self::push_dirty(&mut out, handle, target, None);
            }
            let seq = out.next_seq();
            lock(&self.pending).push(seq);
            out.push(msg, 0);
            if let Err(e) = self.write_out(&mut out) {
                lock(&self.pending).retain(|s| *s != seq);
                return Err(e);
            }
            seq
        };
        let reply = self.wait_reply(seq);
        lock(&self.pending).retain(|s| *s != seq);
        match reply? {
            Message::Error { code, message } => Err(ClientError::Server { code, message }),
            other => Ok(other),
        }
    }

    fn wait_reply(&self, seq: u64) -> Result<Message, ClientError> {
        self.readers.fetch_add(1, Ordering::AcqRel);
        let r = self.read_until_reply(seq);
        self.readers.fetch_sub(1, Ordering::AcqRel);
        r
    }

    /// Reads until the reply to `seq` is there. Posted frames sent before
    /// the request that failed are reported instead (they were answered
    /// first, since the backend handles frames in order).
    fn read_until_reply(&self, seq: u64) -> Result<Message, ClientError> {
        let mut rx = lock(&self.rx);
        loop {
            if let Some(i) = rx.replies.iter().position(|(s, _)| *s == seq) {
                let (_, m) = rx.replies.swap_remove(i);
                if let Some(pos) = rx.posted_errors.iter().position(|(s, _, _)| *s < seq) {
                    let (seq, code, message) = rx.posted_errors.remove(pos);
                    return Err(DeviceError::Posted { seq, code, message }.into());
                }
                return Ok(m);
            }
            if let Some(why) = &rx.closed {
                return Err(ClientError::Disconnected(why.clone()));
            }
            let resolve = |h, iova, len| self.resolve(h, iova, len);
            match rx
                .reader
                .recv(&self.conn, Some(self.reply_timeout), &resolve)
            {
                Ok(got) if got.bytes == 0 => {
                    rx.closed = Some("backend closed the connection".into())
                }
                Ok(_) => self.dispatch(&mut rx)?,
                Err(e) if timed_out(&e) => return Err(ClientError::Timeout(self.reply_timeout)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => rx.closed = Some(format!("receiving: {e}")),
            }
        }
    }

    /// Handles every complete frame in the receive buffer.
    fn dispatch(&self, rx: &mut Rx) -> Result<(), ClientError> {
        loop {
            let frame = match rx.reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let why = format!("undecodable frame from the backend: {e}");
                    rx.closed = Some(why.clone());
                    let _ = self.conn.shutdown();
                    return Err(ClientError::Protocol(why));
                }
            };
            match frame.msg {
                Message::Irq {
                    handle,
                    kind,
                    vector,
                } => match self.target(handle) {
                    Some(t) => {
                        t.irq_count.fetch_add(1, Ordering::Relaxed);
                        if let Some(fd) = lock(&t.irqs).get(&(kind, vector)) {
                            let _ = fd.write(1);
                        }
                    }
                    None => debug!(handle, "interrupt for a closed handle"),
                },
                Message::DmaData { handle, iova, data } => {
                    let applied = self.target(handle).map(|t| {
                        let dma = lock(&t.dma);
                        dma.resolve(iova, data.len() as u64)
                            .and_then(|(r, off)| r.apply(off, &data))
                    });
                    match applied {
                        Some(Ok(())) => {}
                        Some(Err(e)) => {
                            warn!(handle, "device-written data at {iova:#x} dropped: {e}")
                        }
                        None => warn!(handle, "device-written data for a closed handle dropped"),
                    }
                }
                Message::Error { code, message } if frame.reply_to == 0 => {
                    warn!("backend: {message}");
                    rx.closed = Some(format!(
                        "backend ended the session: {message} ({})",
                        code.name()
                    ));
                }
                Message::Goodbye => rx.closed = Some("backend said goodbye".into()),
                msg if frame.reply_to != 0 => {
                    if lock(&self.pending).contains(&frame.reply_to) {
                        rx.replies.push((frame.reply_to, msg));
                    } else if let Message::Error { code, message } = msg {
                        warn!("posted frame {} failed: {message}", frame.reply_to);
                        rx.posted_errors.push((frame.reply_to, code, message));
                    } else {
                        debug!("unexpected reply to frame {}", frame.reply_to);
                    }
                }
                other => debug!("ignoring unsolicited message {:#06x}", other.kind()),
            }
        }
    }

    /// Reads whatever is there without blocking (pump side).
    fn pump_read(&self, mut rx: MutexGuard<'_, Rx>) -> bool {
        loop {
            if rx.closed.is_some() {
                return false;
            }
            let resolve = |h, iova, len| self.resolve(h, iova, len);
            match rx.reader.recv(&self.conn, None, &resolve) {
                Ok(got) if got.bytes == 0 => {
                    rx.closed = Some("backend closed the connection".into());
                    return false;
                }
                Ok(_) => {
                    if self.dispatch(&mut rx).is_err() {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    rx.closed = Some(format!("receiving: {e}"));
                    return false;
                }
            }
        }
    }

    /// Sends queued posted writes once the writer has stopped adding to
    /// them for a moment: a burst leaves in few large batches (the writer
    /// itself sends every 64 KiB), its tail shortly after it ends.
    fn flush_when_quiet(&self) {
        loop {
            let before = lock(&self.tx).len();
            if before == 0 {
                return;
            }
            std::thread::sleep(COALESCE);
            let mut out = lock(&self.tx);
            if out.len() == before {
                if let Err(e) = self.write_out(&mut out) {
                    debug!("event pump: {e}");
                }
                return;
            }
        }
    }

    fn pump(self: Arc<Self>) {
        loop {
            // A caller waiting for its reply reads and dispatches everything
            // itself; watching the socket meanwhile would only wake this
            // thread for each reply and make it fight the caller for the lock.
            let watch = self.readers.load(Ordering::Acquire) == 0;
            let polled = if watch {
                sys::poll_readable(&[&self.stop, &self.kick, &self.conn], None)
            } else {
                sys::poll_readable(&[&self.stop, &self.kick], Some(PUMP_RECHECK))
            };
            let ready = match polled {
                Ok(r) => r,
                Err(e) => {
                    warn!("event pump: poll failed: {e}");
                    return;
                }
            };
            if ready[0] {
                return;
            }
            if ready[1] {
                let _ = self.kick.read();
                self.flush_when_quiet();
            }
            if ready.get(2) == Some(&true) {
                if let Ok(rx) = self.rx.try_lock() {
                    if !self.pump_read(rx) {
                        return;
                    }
                }
            }
        }
    }
}

/// Owns the pump; the connection ends when the client and all its devices
/// are dropped.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) inner: Arc<Inner>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let inner = &self.inner;
        {
            let mut out = lock(&inner.tx);
            out.push(&Message::Goodbye, 0);
            let _ = inner.write_out(&mut out);
        }
        inner.stopping.store(true, Ordering::Relaxed);
        let _ = inner.stop.write(1);
        if let Some(t) = lock(&self.pump).take() {
            let _ = t.join();
        }
        let _ = inner.conn.shutdown();
    }
}

/// A connection to a backend.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// True if a blocking socket call gave up because its timeout expired
/// (SO_RCVTIMEO / SO_SNDTIMEO report EAGAIN).
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads the next frame synchronously (handshake and other one-off
/// exchanges); an `Error` frame becomes [`ClientError::Server`].
pub(crate) fn read_frame(
    conn: &Conn,
    dec: &mut FrameDecoder,
) -> Result<cio_core::Frame, ClientError> {
    loop {
        if let Some(f) = dec
            .next_frame()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            if let Message::Error { code, message } = f.msg {
                return Err(ClientError::Server { code, message });
            }
            return Ok(f);
        }
        match conn.recv_into(dec.buffer(), 4096, false) {
            Ok(0) => {
                return Err(ClientError::Disconnected(
                    "backend closed the connection".into(),
                ))
            }
            Ok(_) => {}
            Err(e) if timed_out(&e) => {
                return Err(ClientError::Disconnected(
                    "no reply from the backend in time".into(),
                ))
            }
            Err(e) => return Err(ClientError::Disconnected(format!("receiving: {e}"))),
        }
    }
}

/// A session after a successful handshake.
#[derive(Debug)]
pub(crate) struct Handshake {
    pub(crate) out: OutQueue,
    pub(crate) dec: FrameDecoder,
    pub(crate) session: u64,
    pub(crate) features: u64,
}

/// Runs the handshake (and key proofs) on `conn`.
pub(crate) fn handshake(conn: &Conn, opts: &ClientOptions) -> Result<Handshake, ClientError> {
    let io_err = |e: io::Error| ClientError::Disconnected(format!("configuring the socket: {e}"));
    conn.set_read_timeout(Some(opts.reply_timeout))
        .map_err(io_err)?;
    conn.set_write_timeout(Some(opts.reply_timeout))
        .map_err(io_err)?;
    let mut out = OutQueue::new();
    let mut dec = FrameDecoder::new();
    let client_nonce = auth::nonce()?;
    out.push(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            features: FEATURES,
            session: 0,
            nonce: client_nonce,
            client: opts.name.clone(),
        },
        0,
    );
    let send = |out: &mut OutQueue| {
        out.write_to(conn, Some(opts.reply_timeout))
            .map_err(|e| ClientError::Disconnected(format!("handshake: {e}")))
    };
    send(&mut out)?;
    let (session, features, method, server_nonce) = match read_frame(conn, &mut dec)?.msg {
        Message::Welcome {
            version,
            features,
            session,
            auth,
            nonce,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(ClientError::Protocol(format!(
                    "backend chose protocol {version}"
                )));
            }
            (session, features, auth, nonce)
        }
        m => {
            return Err(ClientError::Protocol(format!(
                "expected Welcome, got {:#06x}",
                m.kind()
            )))
        }
    };
    match (method, &opts.psk) {
        (AuthMethod::None, None) => {}
        (AuthMethod::None, Some(_)) => return Err(ClientError::ServerNotAuthenticated),
        (AuthMethod::PreSharedKey, None) => return Err(ClientError::KeyRequired),
        (AuthMethod::PreSharedKey, Some(psk)) => {
            let mac = psk.proof(Side::Client, &client_nonce, &server_nonce, session);
            out.push(&Message::AuthProof { mac }, 0);
            send(&mut out)?;
            match read_frame(conn, &mut dec)?.msg {
                Message::AuthOk { mac }
                    if psk.verify(Side::Server, &client_nonce, &server_nonce, session, &mac) => {}
                Message::AuthOk { .. } => return Err(ClientError::BadServerProof),
                m => {
                    return Err(ClientError::Protocol(format!(
                        "expected AuthOk, got {:#06x}",
                        m.kind()
                    )))
                }
            }
        }
    }
    Ok(Handshake {
        out,
        dec,
        session,
        features,
    })
}

impl Client {
    /// Connects to a backend and runs the handshake.
    pub fn connect(ep: &Endpoint, opts: ClientOptions) -> Result<Self, ClientError> {
        let conn = Conn::connect(ep, opts.connect_timeout)?;
        Self::with_conn(conn, opts)
    }

    /// Runs the handshake on an already connected stream.
    pub fn with_conn(conn: Conn, opts: ClientOptions) -> Result<Self, ClientError> {
        let Handshake {
            out,
            dec,
            session,
            features,
        } = handshake(&conn, &opts)?;
        let spawn_err =
            |e: io::Error| ClientError::Disconnected(format!("starting the event pump: {e}"));
        let inner = Arc::new(Inner {
            conn,
            session,
            features,
            reply_timeout: opts.reply_timeout,
            batch_writes: opts.batch_writes,
            tx: Mutex::new(out),
            rx: Mutex::new(Rx {
                reader: FrameReader::from_decoder(dec),
                replies: Vec::new(),
                posted_errors: Vec::new(),
                closed: None,
            }),
            pending: Mutex::new(Vec::new()),
            targets: Mutex::new(HashMap::new()),
            kick: EventFd::new(EFD_NONBLOCK).map_err(spawn_err)?,
            stop: EventFd::new(EFD_NONBLOCK).map_err(spawn_err)?,
            stopping: AtomicBool::new(false),
            readers: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_post: AtomicU64::new(0),
        });
        let pump_inner = Arc::clone(&inner);
        let pump = std::thread::Builder::new()
            .name("cio-pump".into())
            .spawn(move || pump_inner.pump())
            .map_err(spawn_err)?;
        Ok(Self {
            shared: Arc::new(Shared {
                inner,
                pump: Mutex::new(Some(pump)),
            }),
        })
    }

    /// Session id the backend assigned.
    pub fn session(&self) -> u64 {
        self.shared.inner.session
    }

    /// Features both sides agreed on (`cio_core::wire::FEATURE_*`).
    pub fn features(&self) -> u64 {
        self.shared.inner.features
    }

    /// The devices the backend serves.
    pub fn list(&self) -> Result<Vec<DeviceSummary>, ClientError> {
        match self.shared.inner.call(None, &Message::ListDevices)? {
            Message::DeviceList { devices } => Ok(devices),
            m => Err(ClientError::Protocol(format!(
                "expected DeviceList, got {:#06x}",
                m.kind()
            ))),
        }
    }

    /// A round trip through the backend's session loop.
    pub fn ping(&self, payload: Bytes) -> Result<Bytes, ClientError> {
        match self.shared.inner.call(None, &Message::Ping { payload })? {
            Message::Pong { payload } => Ok(payload),
            m => Err(ClientError::Protocol(format!(
                "expected Pong, got {:#06x}",
                m.kind()
            ))),
        }
    }

    /// Opens a device for this session.
    pub fn open(&self, name: &str) -> Result<RemoteDevice, ClientError> {
        let (handle, info) = match self
            .shared
            .inner
            .call(None, &Message::Open { name: name.into() })?
        {
            Message::Opened { handle, info } => (handle, info),
            m => {
                return Err(ClientError::Protocol(format!(
                    "expected Opened, got {:#06x}",
                    m.kind()
                )))
            }
        };
        let target = Arc::new(Target::default());
        lock(&self.shared.inner.targets).insert(handle, Arc::clone(&target));
        Ok(RemoteDevice::new(
            Arc::clone(&self.shared),
            handle,
            info,
            target,
        ))
    }
}
