//! One client connection: handshake and authentication, then requests
//! against the devices it opened, interrupt fan-out and shadow DMA sync.
//!
//! Each session runs on its own thread with its own mio poll over the
//! socket, the interrupt eventfds of its devices and a waker for shutdown.
//! Whatever ends the session (goodbye, error, peer gone, shutdown), every
//! device it opened has its interrupts disabled, its DMA unmapped, its
//! shadow freed and is reset before it goes back to the registry.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cio_core::wire::{
    AuthMethod, ErrorCode, IrqAction, Message, FEATURES, MAX_DMA_CHUNK, MAX_USB_CHUNK, NONCE_LEN,
    PROTOCOL_VERSION,
};
use cio_core::{DeviceError, DmaRegion, DmaSpace, EventFd, Frame, IrqKind};
use cio_transports::{auth, sys, Conn, FrameReader, OutQueue, Psk, Side};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::registry::{Lease, OpenError, Registry};
use crate::usb::{UsbError, UsbExport, UsbProvider};

/// Per-session limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Devices one session may hold open.
    pub max_handles: usize,
    /// DMA mappings per device.
    pub max_mappings: usize,
    /// Bytes of DMA address space per session (shadow memory is committed
    /// only as it is written).
    pub max_mapped_bytes: u64,
    /// Queued outgoing bytes above which the session stops reading
    /// requests until the peer catches up.
    pub max_queued_bytes: usize,
    /// Concurrent sessions per server.
    pub max_sessions: usize,
    /// A session carrying a USB device ends when the client sends nothing
    /// (not even the pings frontends send every few seconds) for this long:
    /// the link is taken as lost and the device is given back.
    pub usb_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_handles: 64,
            max_mappings: 1024,
            max_mapped_bytes: 64 << 30,
            max_queued_bytes: 32 << 20,
            max_sessions: 64,
            usb_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters shared by all sessions of a server.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions running now.
    pub sessions: AtomicUsize,
    /// Sessions ever accepted.
    pub sessions_total: AtomicU64,
    /// Bytes of shadow DMA memory mapped now.
    pub shadow_bytes: AtomicU64,
    /// Interrupt eventfds registered now.
    pub irq_fds: AtomicUsize,
    /// Sessions that ended because of a protocol error.
    pub protocol_errors: AtomicU64,
}

/// State every session of a server shares.
#[derive(Debug)]
pub struct Shared {
    /// The devices.
    pub registry: Arc<Registry>,
    /// The USB devices.
    pub usb: Arc<UsbProvider>,
    /// Key clients must prove, if any.
    pub psk: Option<Psk>,
    /// Limits.
    pub limits: Limits,
    /// Counters.
    pub counters: Counters,
    /// Source of session ids.
    pub next_session: AtomicU64,
    /// Set when the server shuts down.
    pub stopping: AtomicBool,
}

const CONN: Token = Token(0);
/// Token of the shutdown waker of a session's poll.
pub const WAKE: Token = Token(1);
const IRQ_BASE: usize = 2;
const USB: Token = Token(usize::MAX);

enum State {
    Hello,
    Proof {
        client: [u8; NONCE_LEN],
        server: [u8; NONCE_LEN],
    },
    Ready,
}

struct OpenDevice {
    lease: Lease,
    dma: DmaSpace,
}

/// The USB/IP stream of an imported USB device, relayed in `UsbData` frames.
struct UsbLink {
    export: UsbExport,
    /// Bytes from the client the device side has not taken yet.
    pending: BytesMut,
    readable: bool,
    /// Receive buffer for the device side (frames share its bytes).
    rx: BytesMut,
}

struct IrqSlot {
    handle: u32,
    kind: IrqKind,
    vector: u32,
    fd: EventFd,
}

/// Why a session ended.
struct End {
    reason: String,
    protocol_error: bool,
}

impl End {
    fn clean(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            protocol_error: false,
        }
    }
}

/// A request that failed without ending the session.
type ReqError = (ErrorCode, String);

fn dev_err(code: ErrorCode) -> impl Fn(DeviceError) -> ReqError {
    move |e| (code, cio_core::error_chain(&e))
}

/// A client session.
pub struct Session {
    id: u64,
    conn: Conn,
    peer: String,
    poll: Poll,
    shared: Arc<Shared>,
    reader: FrameReader,
    out: OutQueue,
    state: State,
    handles: BTreeMap<u32, OpenDevice>,
    next_handle: u32,
    irqs: Vec<Option<IrqSlot>>,
    read_pending: bool,
    peer_closing: bool,
    usb: Option<UsbLink>,
    /// A direct USB import: usbip-host owns the connection.
    direct: Option<UsbExport>,
    last_rx: Instant,
    // Owned here so its fd closes with the session; the server keeps only a
    // weak reference to wake the session on shutdown.
    _waker: Arc<Waker>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("handles", &self.handles.len())
            .finish()
    }
}

impl Session {
    /// Prepares a session for `conn`; returns it with the waker that stops
    /// it (valid while the session lives).
    pub fn new(conn: Conn, shared: Arc<Shared>) -> io::Result<(Self, Weak<Waker>)> {
        conn.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        poll.registry().register(
            &mut SourceFd(&conn.as_raw_fd()),
            CONN,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let peer = conn.peer();
        let weak = Arc::downgrade(&waker);
        Ok((
            Self {
                id,
                conn,
                peer,
                poll,
                shared,
                reader: FrameReader::new(),
                out: OutQueue::new(),
                state: State::Hello,
                handles: BTreeMap::new(),
                next_handle: 1,
                irqs: Vec::new(),
                read_pending: true,
                peer_closing: false,
                usb: None,
                direct: None,
                last_rx: Instant::now(),
                _waker: waker,
            },
            weak,
        ))
    }

    /// Serves the session until it ends, then releases everything it held.
    /// The session counter drops only once every fd of the session is closed.
    pub fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        c.sessions.fetch_add(1, Ordering::Relaxed);
        c.sessions_total.fetch_add(1, Ordering::Relaxed);
        debug!(session = self.id, peer = %self.peer, "session started");
        let end = self.serve();
        if end.protocol_error {
            c.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(session = self.id, peer = %self.peer, "session ended: {}", end.reason);
        } else {
            info!(session = self.id, peer = %self.peer, "session ended: {}", end.reason);
        }
        self.finish();
        drop(self);
        shared.counters.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    fn serve(&mut self) -> End {
        let deadline = Instant::now() + self.shared.limits.handshake_timeout;
        let mut events = Events::with_capacity(64);
        loop {
            let can_read = self.can_read();
            // The device side has bytes we stopped reading while replies
            // piled up: no edge will announce them again.
            let usb_left = self.usb.as_ref().is_some_and(|u| u.readable)
                && self.out.len() < self.shared.limits.max_queued_bytes;
            let timeout = if (self.read_pending && can_read) || usb_left {
                Some(Duration::ZERO)
            } else if self.usb.is_some() {
                let idle = self.shared.limits.usb_idle_timeout;
                Some((self.last_rx + idle).saturating_duration_since(Instant::now()))
            } else if matches!(self.state, State::Ready) {
                None
            } else {
                Some(deadline.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return End::clean(format!("polling failed: {e}"));
            }
            if !matches!(self.state, State::Ready) && Instant::now() >= deadline {
                self.out.push(
                    &Message::Error {
                        code: ErrorCode::STATE,
                        message: "handshake timed out".into(),
                    },
                    0,
                );
                return End {
                    reason: "handshake timed out".into(),
                    protocol_error: true,
                };
            }
            let idle = self.shared.limits.usb_idle_timeout;
            if self.usb.is_some() && events.is_empty() && self.last_rx.elapsed() >= idle {
                return End::clean(format!(
                    "USB client sent nothing for {}s: link lost",
                    idle.as_secs()
                ));
            }
            for ev in events.iter() {
                match ev.token() {
                    CONN => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read_pending = true;
                        }
                        if ev.is_read_closed() || ev.is_error() {
                            self.peer_closing = true;
                        }
                    }
                    WAKE => {
                        self.out.push(
                            &Message::Error {
                                code: ErrorCode::SHUTDOWN,
                                message: "server is shutting down".into(),
                            },
                            0,
                        );
                        return End::clean("server shutting down");
                    }
                    USB => {
                        if let Some(u) = &mut self.usb {
                            u.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        }
                    }
                    Token(t) => self.on_irq(t - IRQ_BASE),
                }
            }
            if let Err(end) = self.usb_io() {
                return end;
            }
            if self.read_pending && self.can_read() {
                if let Err(end) = self.read_and_handle() {
                    return end;
                }
                if let Err(end) = self.usb_io() {
                    return end;
                }
            }
            if let Err(e) = self.out.write_to(&self.conn, None) {
                return End::clean(format!("peer vanished while sending to it: {e}"));
            }
        }
    }

    /// True while neither our replies nor bytes for the USB device have
    /// piled up beyond the limit.
    fn can_read(&self) -> bool {
        let max = self.shared.limits.max_queued_bytes;
        self.out.len() < max && self.usb.as_ref().is_none_or(|u| u.pending.len() < max)
    }

    /// Moves USB/IP stream bytes: client bytes to the device side, device
    /// bytes into `UsbData` frames.
    fn usb_io(&mut self) -> Result<(), End> {
        let max = self.shared.limits.max_queued_bytes;
        let Some(u) = &mut self.usb else {
            return Ok(());
        };
        let Some(mut stream) = u.export.stream() else {
            return Ok(());
        };
        while !u.pending.is_empty() {
            match stream.write(&u.pending) {
                Ok(n) => {
                    let _ = u.pending.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(End::clean(format!("USB device stream failed: {e}"))),
            }
        }
        while u.readable && self.out.len() < max {
            match sys::recv_into(stream.as_fd(), &mut u.rx, MAX_USB_CHUNK, true) {
                Ok(0) => return Err(End::clean("the USB device side closed the stream")),
                Ok(_) => {
                    let data = u.rx.split().freeze();
                    self.out.push(&Message::UsbData { data }, 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => u.readable = false,
                Err(e) => return Err(End::clean(format!("USB device stream failed: {e}"))),
            }
        }
        Ok(())
    }

    fn usb_state(&self) -> Result<(), ReqError> {
        if self.usb.is_some() || !self.handles.is_empty() {
            return Err((
                ErrorCode::STATE,
                "a USB import needs a session of its own (this one already holds a device)".into(),
            ));
        }
        Ok(())
    }

    fn usb_error(e: UsbError) -> ReqError {
        let code = match e {
            UsbError::NoDevice(_) => ErrorCode::NO_DEVICE,
            UsbError::Busy(_) => ErrorCode::BUSY,
            _ => ErrorCode::USB,
        };
        (code, cio_core::error_chain(&e))
    }

    /// A direct import: usbip-host gets this very connection; once the
    /// reply is out the session stops reading it and only waits for the
    /// kernel's connection to end (see `finish`).
    fn usb_import_direct(&mut self, seq: u64, busid: &str) -> Result<(), End> {
        if let Err((code, message)) = self.usb_state() {
            self.reply(seq, &Message::Error { code, message });
            return Ok(());
        }
        if self.reader.has_partial() || !self.out.is_empty() {
            let why = "a direct USB import must be the last frame in flight".to_string();
            return Err(self.fatal(ErrorCode::STATE, seq, why));
        }
        // The kernel notices a vanished peer only through TCP keepalive.
        if let Err(e) = self
            .conn
            .set_keepalive(Duration::from_secs(10), Duration::from_secs(5), 3)
        {
            warn!(session = self.id, "TCP keepalive: {e}");
        }
        let export = match self.shared.usb.import_direct(busid, &self.peer, &self.conn) {
            Ok(e) => e,
            Err(e) => {
                let (code, message) = Self::usb_error(e);
                self.reply(seq, &Message::Error { code, message });
                return Ok(());
            }
        };
        self.out.push(
            &Message::UsbImported {
                device: export.device.clone(),
            },
            seq,
        );
        let sent = self
            .conn
            .set_nonblocking(false)
            .and_then(|()| self.conn.set_write_timeout(Some(Duration::from_secs(5))))
            .and_then(|()| self.out.write_to(&self.conn, Some(Duration::from_secs(5))));
        self.direct = Some(export);
        match sent {
            Ok(_) => Err(End::clean(format!(
                "USB device {busid} handed to usbip-host on this connection"
            ))),
            Err(e) => {
                // The client never learns of the import: end it now.
                if let Some(x) = &self.direct {
                    x.hang_up();
                }
                Err(End::clean(format!("sending the direct import reply: {e}")))
            }
        }
    }

    /// Waits until usbip-host's connection of a direct import ends (peer
    /// detached, link lost, or server shutdown), then restores the device.
    fn await_direct(&mut self, export: UsbExport) {
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&self.conn.as_raw_fd()));
        let mut events = Events::with_capacity(4);
        info!(session = self.id, busid = %export.device.busid, "serving directly through usbip-host");
        while export.kernel_connected() {
            let _ = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(250)));
            if self.shared.stopping.load(Ordering::Relaxed) {
                export.hang_up();
            }
        }
        info!(session = self.id, busid = %export.device.busid, "usbip-host's connection ended");
    }

    fn usb_import(&mut self, busid: &str) -> Result<Message, ReqError> {
        self.usb_state()?;
        let export = self
            .shared
            .usb
            .import(busid, &self.peer)
            .map_err(Self::usb_error)?;
        let stream = export.stream().expect("a relayed export has a stream");
        let fd = stream.as_raw_fd();
        let registered = stream.set_nonblocking(true).and_then(|()| {
            self.poll.registry().register(
                &mut SourceFd(&fd),
                USB,
                Interest::READABLE | Interest::WRITABLE,
            )
        });
        if let Err(e) = registered {
            return Err((ErrorCode::USB, format!("relaying the USB stream: {e}")));
        }
        let device = export.device.clone();
        info!(session = self.id, busid, "USB device imported");
        self.usb = Some(UsbLink {
            export,
            pending: BytesMut::new(),
            readable: true,
            rx: BytesMut::new(),
        });
        Ok(Message::UsbImported { device })
    }

    /// Reads what the socket has and handles every complete frame.
    fn read_and_handle(&mut self) -> Result<(), End> {
        loop {
            if !self.can_read() {
                return Ok(()); // resume once the peer drains our replies
            }
            // Large pushes of target memory go straight into the shadow.
            let handles = &self.handles;
            let resolve = |handle: u32, iova: u64, len: usize| {
                let d = handles.get(&handle)?;
                let (region, off) = d.dma.resolve(iova, len as u64).ok()?;
                region
                    .dir()
                    .device_reads()
                    .then(|| (Arc::clone(region), off))
            };
            match self.reader.recv(&self.conn, None, &resolve) {
                Ok(got) if got.bytes == 0 => {
                    return Err(if self.reader.has_partial() {
                        End {
                            reason: "peer vanished in the middle of a frame".into(),
                            protocol_error: true,
                        }
                    } else {
                        End::clean("peer closed the connection")
                    })
                }
                Ok(got) => {
                    self.last_rx = Instant::now();
                    loop {
                        match self.reader.next_frame() {
                            Ok(Some(frame)) => self.handle(frame)?,
                            Ok(None) => break,
                            Err(e) => {
                                return Err(self.fatal(ErrorCode::MALFORMED, 0, e.to_string()));
                            }
                        }
                    }
                    // A short read drained the socket (epoll(7)): answer now
                    // instead of paying for a recv that returns EAGAIN. Not
                    // when the peer's FIN came with this event: it raises no
                    // later edge, so read on until end of stream.
                    if got.drained && !self.peer_closing {
                        self.read_pending = false;
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_pending = false;
                    return Ok(());
                }
                Err(e) => return Err(End::clean(format!("receive failed: {e}"))),
            }
        }
    }

    /// Queues an error frame and returns the session's end.
    fn fatal(&mut self, code: ErrorCode, reply_to: u64, reason: String) -> End {
        self.out.push(
            &Message::Error {
                code,
                message: reason.clone(),
            },
            reply_to,
        );
        End {
            reason: format!("{}: {reason}", code.name()),
            protocol_error: true,
        }
    }

    fn handle(&mut self, frame: Frame) -> Result<(), End> {
        let seq = frame.seq;
        match (&self.state, frame.msg) {
            (
                State::Hello,
                Message::Hello {
                    version,
                    features,
                    session,
                    nonce,
                    client,
                },
            ) => {
                if version < PROTOCOL_VERSION {
                    let why = format!(
                        "client speaks protocol {version}; this server needs {PROTOCOL_VERSION}"
                    );
                    return Err(self.fatal(ErrorCode::VERSION, seq, why));
                }
                if session != 0 {
                    let why = format!("resuming session {session} is not supported by this server");
                    return Err(self.fatal(ErrorCode::STATE, seq, why));
                }
                let server = auth::nonce().map_err(|e| End::clean(e.to_string()))?;
                let method = if self.shared.psk.is_some() {
                    AuthMethod::PreSharedKey
                } else {
                    AuthMethod::None
                };
                self.out.push(
                    &Message::Welcome {
                        version: PROTOCOL_VERSION,
                        features: features & FEATURES,
                        session: self.id,
                        auth: method,
                        nonce: server,
                    },
                    seq,
                );
                info!(session = self.id, peer = %self.peer, client = %client, auth = ?method, "hello");
                self.state = match method {
                    AuthMethod::PreSharedKey => State::Proof {
                        client: nonce,
                        server,
                    },
                    AuthMethod::None => State::Ready,
                };
                Ok(())
            }
            (State::Proof { client, server }, Message::AuthProof { mac }) => {
                let (client, server) = (*client, *server);
                let psk = self.shared.psk.as_ref().expect("proof state implies a key");
                if !psk.verify(Side::Client, &client, &server, self.id, &mac) {
                    let why = "pre-shared key proof did not verify (wrong key?)".to_string();
                    return Err(self.fatal(ErrorCode::AUTH_FAILED, seq, why));
                }
                let mac = psk.proof(Side::Server, &client, &server, self.id);
                self.out.push(&Message::AuthOk { mac }, seq);
                self.state = State::Ready;
                Ok(())
            }
            (State::Hello, m) => {
                let why = format!("expected Hello, got message type {:#06x}", m.kind());
                Err(self.fatal(ErrorCode::STATE, seq, why))
            }
            (State::Proof { .. }, m) => {
                let why = format!("expected AuthProof, got message type {:#06x}", m.kind());
                Err(self.fatal(ErrorCode::AUTH_REQUIRED, seq, why))
            }
            (State::Ready, m) => self.handle_ready(seq, m),
        }
    }

    fn handle_ready(&mut self, seq: u64, msg: Message) -> Result<(), End> {
        let answer: Result<Message, ReqError> = match msg {
            // Posted: only failures are answered.
            Message::RegionWrite {
                handle,
                region,
                offset,
                data,
            } => {
                let r = self.open_dev(handle).and_then(|d| {
                    let dev = d.lease.device();
                    dev.prepare_dma().map_err(dev_err(ErrorCode::DMA))?;
                    dev.write(region, offset, &data)
                        .map_err(dev_err(ErrorCode::ACCESS))
                });
                return self.posted(seq, r);
            }
            Message::DmaData { handle, iova, data } => {
                let r = self.apply_dma(handle, iova, &data);
                return self.posted(seq, r);
            }
            Message::UsbData { data } => {
                let r = match &mut self.usb {
                    Some(u) => {
                        u.pending.extend_from_slice(&data);
                        Ok(())
                    }
                    None => Err((ErrorCode::STATE, "no USB device is imported".to_string())),
                };
                return self.posted(seq, r);
            }
            Message::UsbList => Ok(Message::UsbDeviceList {
                devices: self.shared.usb.list(),
            }),
            Message::UsbImport {
                busid,
                direct: false,
            } => self.usb_import(&busid),
            Message::UsbImport {
                busid,
                direct: true,
            } => return self.usb_import_direct(seq, &busid),
            Message::Open { .. } if self.usb.is_some() => Err((
                ErrorCode::STATE,
                "this session carries a USB device; open PCI devices in another session".into(),
            )),
            Message::Goodbye => return Err(End::clean("client said goodbye")),
            Message::Ping { payload } => Ok(Message::Pong { payload }),
            Message::ListDevices => Ok(Message::DeviceList {
                devices: self.shared.registry.list(),
            }),
            Message::Open { name } => self.open(&name),
            Message::Close { handle } => self.close(handle).map(|()| Message::Ok),
            Message::RegionRead {
                handle,
                region,
                offset,
                len,
            } => self.open_dev(handle).and_then(|d| {
                let mut buf = vec![0u8; len as usize];
                let dev = d.lease.device();
                dev.prepare_dma().map_err(dev_err(ErrorCode::DMA))?;
                dev.read(region, offset, &mut buf)
                    .map(|()| Message::ReadData {
                        data: Bytes::from(buf),
                    })
                    .map_err(dev_err(ErrorCode::ACCESS))
            }),
            Message::SetIrqs {
                handle,
                kind,
                start,
                count,
                action,
            } => self
                .set_irqs(handle, kind, start, count, action)
                .map(|()| Message::Ok),
            Message::DmaMap {
                handle,
                iova,
                len,
                dir,
            } => self.dma_map(handle, iova, len, dir).map(|()| Message::Ok),
            Message::DmaUnmap { handle, iova } => {
                self.dma_unmap(handle, iova).map(|()| Message::Ok)
            }
            Message::SyncForCpu { handle, iova, len } => match self.open_dev(handle) {
                Ok(_) => {
                    self.pull_dirty(Some((handle, iova, len)));
                    Ok(Message::Ok)
                }
                Err(e) => Err(e),
            },
            Message::Reset { handle } => self.open_dev(handle).and_then(|d| {
                d.lease
                    .device()
                    .reset()
                    .map(|()| Message::Ok)
                    .map_err(dev_err(ErrorCode::DEVICE))
            }),
            other => {
                let why = format!(
                    "message type {:#06x} is not valid from a client",
                    other.kind()
                );
                return Err(self.fatal(ErrorCode::UNKNOWN_MESSAGE, seq, why));
            }
        };
        let reply = answer.unwrap_or_else(|(code, message)| {
            debug!(session = self.id, "request {seq} failed: {message}");
            Message::Error { code, message }
        });
        self.reply(seq, &reply);
        Ok(())
    }

    /// Reports a failed posted frame asynchronously; the session goes on.
    fn posted(&mut self, seq: u64, r: Result<(), ReqError>) -> Result<(), End> {
        if let Err((code, message)) = r {
            debug!(session = self.id, "posted frame {seq} failed: {message}");
            self.reply(seq, &Message::Error { code, message });
        }
        Ok(())
    }

    /// Queues a completion, after the device-written DMA data it orders behind.
    fn reply(&mut self, seq: u64, msg: &Message) {
        self.pull_dirty(None);
        self.out.push(msg, seq);
    }

    fn open_dev(&mut self, handle: u32) -> Result<&mut OpenDevice, ReqError> {
        self.handles.get_mut(&handle).ok_or((
            ErrorCode::BAD_HANDLE,
            format!("handle {handle} is not open in this session"),
        ))
    }

    fn open(&mut self, name: &str) -> Result<Message, ReqError> {
        if self.handles.len() >= self.shared.limits.max_handles {
            return Err((
                ErrorCode::LIMIT,
                format!(
                    "a session may hold at most {} devices open",
                    self.shared.limits.max_handles
                ),
            ));
        }
        let mut lease = self.shared.registry.open(name, self.id).map_err(|e| {
            let code = match e {
                OpenError::NotFound(_) => ErrorCode::NO_DEVICE,
                OpenError::Busy { .. } => ErrorCode::BUSY,
            };
            (code, e.to_string())
        })?;
        let handle = self.next_handle;
        self.next_handle += 1;
        let info = lease.device().info().clone();
        info!(session = self.id, device = name, handle, "opened");
        self.handles.insert(
            handle,
            OpenDevice {
                lease,
                dma: DmaSpace::new(),
            },
        );
        Ok(Message::Opened { handle, info })
    }

    fn close(&mut self, handle: u32) -> Result<(), ReqError> {
        self.open_dev(handle)?;
        self.release(handle);
        Ok(())
    }

    /// Disables interrupts, unmaps DMA and resets the device, then returns
    /// it to the registry.
    fn release(&mut self, handle: u32) {
        for kind in [IrqKind::Intx, IrqKind::Msi, IrqKind::Msix] {
            self.drop_irqs(handle, kind);
        }
        let Some(mut d) = self.handles.remove(&handle) else {
            return;
        };
        let name = d.lease.device().info().name.clone();
        for region in d.dma.clear() {
            if let Err(e) = d.lease.device().dma_unmap(region.iova()) {
                warn!(session = self.id, device = %name, "unmapping {:#x}: {e}", region.iova());
            }
            self.shared
                .counters
                .shadow_bytes
                .fetch_sub(region.len(), Ordering::Relaxed);
        }
        if let Err(e) = d.lease.device().reset() {
            warn!(session = self.id, device = %name, "reset on release failed: {e}");
        }
        info!(session = self.id, device = %name, handle, "released");
    }

    fn finish(&mut self) {
        if let Some(export) = self.direct.take() {
            // Not a byte more from us on this socket, and no shutdown: the
            // kernel is using it.
            self.await_direct(export);
            return;
        }
        let handles: Vec<u32> = self.handles.keys().copied().collect();
        for h in handles {
            self.release(h);
        }
        // Best effort: let the peer read why we ended.
        if !self.out.is_empty() && self.conn.set_nonblocking(false).is_ok() {
            let _ = self.conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = self.out.write_to(&self.conn, Some(Duration::from_secs(1)));
        }
        let _ = self.conn.shutdown();
        // Closes the USB stream and restores the device's driver.
        self.usb = None;
    }

    fn drop_irqs(&mut self, handle: u32, kind: IrqKind) {
        let mut any = false;
        for slot in self.irqs.iter_mut() {
            if slot
                .as_ref()
                .is_some_and(|s| s.handle == handle && s.kind == kind)
            {
                let s = slot.take().expect("checked");
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&s.fd.as_raw_fd()));
                self.shared.counters.irq_fds.fetch_sub(1, Ordering::Relaxed);
                any = true;
            }
        }
        if any {
            if let Some(d) = self.handles.get_mut(&handle) {
                if let Err(e) = d.lease.device().set_irqs(kind, 0, &[]) {
                    warn!(session = self.id, "disabling {kind}: {e}");
                }
            }
        }
    }

    fn set_irqs(
        &mut self,
        handle: u32,
        kind: IrqKind,
        start: u32,
        count: u32,
        action: IrqAction,
    ) -> Result<(), ReqError> {
        let available = self.open_dev(handle)?.lease.device().info().irq_count(kind);
        match action {
            IrqAction::Disable => {
                self.drop_irqs(handle, kind);
                Ok(())
            }
            IrqAction::Unmask => {
                if kind != IrqKind::Intx {
                    return Err((
                        ErrorCode::IRQ,
                        format!("only INTx can be unmasked, not {kind}"),
                    ));
                }
                self.open_dev(handle)?
                    .lease
                    .device()
                    .unmask_intx()
                    .map_err(dev_err(ErrorCode::IRQ))
            }
            IrqAction::Enable => {
                let end = start
                    .checked_add(count)
                    .filter(|e| count > 0 && *e <= available);
                if end.is_none() {
                    return Err((
                        ErrorCode::IRQ,
                        format!(
                            "device has {available} {kind} vectors; cannot enable {count} from {start}"
                        ),
                    ));
                }
                self.drop_irqs(handle, kind);
                let fds = (0..count)
                    .map(|_| EventFd::new(EFD_NONBLOCK))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|e| (ErrorCode::IRQ, format!("creating eventfds: {e}")))?;
                self.open_dev(handle)?
                    .lease
                    .device()
                    .set_irqs(kind, start, &fds)
                    .map_err(dev_err(ErrorCode::IRQ))?;
                for (i, fd) in fds.into_iter().enumerate() {
                    let idx = match self.irqs.iter().position(Option::is_none) {
                        Some(i) => i,
                        None => {
                            self.irqs.push(None);
                            self.irqs.len() - 1
                        }
                    };
                    if let Err(e) = self.poll.registry().register(
                        &mut SourceFd(&fd.as_raw_fd()),
                        Token(IRQ_BASE + idx),
                        Interest::READABLE,
                    ) {
                        self.drop_irqs(handle, kind);
                        return Err((ErrorCode::IRQ, format!("polling eventfd: {e}")));
                    }
                    self.shared.counters.irq_fds.fetch_add(1, Ordering::Relaxed);
                    self.irqs[idx] = Some(IrqSlot {
                        handle,
                        kind,
                        vector: start + i as u32,
                        fd,
                    });
                }
                Ok(())
            }
        }
    }

    fn on_irq(&mut self, idx: usize) {
        let Some(Some(slot)) = self.irqs.get(idx) else {
            return;
        };
        // Non-blocking read: resets the counter; several raises since the
        // last read coalesce into one event, as with MSI.
        if slot.fd.read().is_err() {
            return;
        }
        let msg = Message::Irq {
            handle: slot.handle,
            kind: slot.kind,
            vector: slot.vector,
        };
        self.pull_dirty(None);
        self.out.push(&msg, 0);
    }

    fn dma_map(
        &mut self,
        handle: u32,
        iova: u64,
        len: u64,
        dir: cio_core::DmaDir,
    ) -> Result<(), ReqError> {
        let limits = self.shared.limits.clone();
        let session_bytes: u64 = self.handles.values().map(|d| d.dma.mapped_bytes()).sum();
        let d = self.open_dev(handle)?;
        let dma_err = |e: cio_core::DmaError| (ErrorCode::DMA, e.to_string());
        if d.dma.regions().len() >= limits.max_mappings {
            return Err((
                ErrorCode::LIMIT,
                format!("at most {} dma mappings per device", limits.max_mappings),
            ));
        }
        if session_bytes.saturating_add(len) > limits.max_mapped_bytes {
            return Err((
                ErrorCode::LIMIT,
                format!(
                    "mapping {len:#x} bytes would exceed the session's {:#x}-byte dma limit",
                    limits.max_mapped_bytes
                ),
            ));
        }
        d.dma.check_free(iova, len).map_err(dma_err)?;
        let region = Arc::new(DmaRegion::new(iova, len, dir).map_err(dma_err)?);
        d.lease
            .device()
            .dma_map(Arc::clone(&region))
            .map_err(dev_err(ErrorCode::DMA))?;
        d.dma.insert(region).map_err(dma_err)?;
        self.shared
            .counters
            .shadow_bytes
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn dma_unmap(&mut self, handle: u32, iova: u64) -> Result<(), ReqError> {
        let d = self.open_dev(handle)?;
        let len = d.dma.get(iova).map(|r| r.len()).ok_or((
            ErrorCode::DMA,
            format!("no dma mapping starts at {iova:#x}"),
        ))?;
        // The device's last writes reach the target before the mapping goes.
        self.pull_dirty(Some((handle, iova, len)));
        let d = self.open_dev(handle)?;
        d.lease
            .device()
            .dma_unmap(iova)
            .map_err(dev_err(ErrorCode::DMA))?;
        d.dma
            .remove(iova)
            .map_err(|e| (ErrorCode::DMA, e.to_string()))?;
        self.shared
            .counters
            .shadow_bytes
            .fetch_sub(len, Ordering::Relaxed);
        Ok(())
    }

    /// Target memory pushed by the client: copy it into the shadow.
    fn apply_dma(&mut self, handle: u32, iova: u64, data: &[u8]) -> Result<(), ReqError> {
        let d = self.open_dev(handle)?;
        let (region, off) = d
            .dma
            .resolve(iova, data.len() as u64)
            .map_err(|e| (ErrorCode::DMA, e.to_string()))?;
        if !region.dir().device_reads() {
            return Err((
                ErrorCode::DMA,
                format!(
                    "mapping at {:#x} is device-write-only; target data cannot be pushed into it",
                    region.iova()
                ),
            ));
        }
        region
            .apply(off, data)
            .map_err(|e| (ErrorCode::DMA, e.to_string()))
    }

    /// Queues `DmaData` for every shadow page the device wrote since the last
    /// pull, in device-writable mappings (of one range, or everywhere).
    fn pull_dirty(&mut self, only: Option<(u32, u64, u64)>) {
        for (&handle, d) in self.handles.iter_mut() {
            if only.is_some_and(|(h, _, _)| h != handle) || d.dma.regions().is_empty() {
                continue;
            }
            if let Err(e) = d.lease.device().collect_dma() {
                warn!(
                    session = self.id,
                    handle, "collecting device-written DMA data: {e}"
                );
            }
        }
        for (&handle, d) in &self.handles {
            if only.is_some_and(|(h, _, _)| h != handle) {
                continue;
            }
            for region in d.dma.regions() {
                if !region.dir().device_writes() || region.dirty_pages() == 0 {
                    continue;
                }
                let Some((off, len)) = only.map_or(Some((0, region.len())), |(_, iova, len)| {
                    region.clip(iova, len)
                }) else {
                    continue;
                };
                for (run, n) in region.take_dirty_runs(off, len, MAX_DMA_CHUNK) {
                    self.out.push_dma_region(handle, region, run, n);
                }
            }
        }
    }
}
