//! One client session: the thread that serves it, and the limits and
//! counters all sessions share.
//!
//! A session is cut in two so that what it owns can outlive the connection
//! that carries it:
//! - `link`: the connection (socket, partial frame, readiness);
//! - `handshake`: `Hello`/`Welcome` and the key proofs;
//! - `devices`: what the session owns (open devices, interrupt routes,
//!   DMA shadows) and the PCI requests on them, with no socket in sight;
//! - `usb`: the two ways a session carries a USB device.
//!
//! Each session runs on its own thread with its own mio poll over the
//! socket, the interrupt eventfds of its devices and a waker for shutdown.
//! Whatever ends the session (goodbye, error, peer gone, shutdown), every
//! device it opened has its interrupts disabled, its DMA unmapped, its
//! shadow freed and is reset before it goes back to the registry.

mod devices;
mod handshake;
mod link;
mod usb;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cio_core::wire::{ErrorCode, Message};
use cio_core::Frame;
use cio_transports::{Conn, OutQueue, Psk};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::registry::Registry;
use crate::usb::{UsbExport, UsbProvider};
use devices::{Devices, Handled, Outbox, IRQ_BASE};
use handshake::State;
use link::Link;
use usb::{UsbRelay, USB};

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

/// A client session.
pub struct Session {
    id: u64,
    shared: Arc<Shared>,
    poll: Poll,
    link: Link,
    out: OutQueue,
    state: State,
    devices: Devices,
    usb: Option<UsbRelay>,
    /// A direct USB import: usbip-host owns the connection.
    direct: Option<UsbExport>,
    // Owned here so its fd closes with the session; the server keeps only a
    // weak reference to wake the session on shutdown.
    _waker: Arc<Waker>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.link.peer)
            .field("handles", &self.devices.len())
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
        let weak = Arc::downgrade(&waker);
        Ok((
            Self {
                id,
                devices: Devices::new(id, Arc::clone(&shared)),
                shared,
                poll,
                link: Link::new(conn),
                out: OutQueue::new(),
                state: State::Hello,
                usb: None,
                direct: None,
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
        let peer = self.link.peer.clone();
        debug!(session = self.id, peer = %peer, "session started");
        let end = self.serve();
        if end.protocol_error {
            c.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(session = self.id, peer = %peer, "session ended: {}", end.reason);
        } else {
            info!(session = self.id, peer = %peer, "session ended: {}", end.reason);
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
            let timeout = if (self.link.read_pending && can_read) || usb_left {
                Some(Duration::ZERO)
            } else if self.usb.is_some() {
                let idle = self.shared.limits.usb_idle_timeout;
                Some((self.link.last_rx + idle).saturating_duration_since(Instant::now()))
            } else if self.state.is_ready() {
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
            if !self.state.is_ready() && Instant::now() >= deadline {
                let why = "handshake timed out".to_string();
                return self.fatal(ErrorCode::STATE, 0, why);
            }
            let idle = self.shared.limits.usb_idle_timeout;
            if self.usb.is_some() && events.is_empty() && self.link.last_rx.elapsed() >= idle {
                return End::clean(format!(
                    "USB client sent nothing for {}s: link lost",
                    idle.as_secs()
                ));
            }
            for ev in events.iter() {
                match ev.token() {
                    CONN => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.link.read_pending = true;
                        }
                        if ev.is_read_closed() || ev.is_error() {
                            self.link.peer_closing = true;
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
                    Token(t) => self.devices.on_irq(t - IRQ_BASE, &mut self.out),
                }
            }
            if let Err(end) = self.usb_io() {
                return end;
            }
            if self.link.read_pending && self.can_read() {
                if let Err(end) = self.read_and_handle() {
                    return end;
                }
                if let Err(end) = self.usb_io() {
                    return end;
                }
            }
            if let Err(e) = self.out.write_to(&self.link.conn, None) {
                return End::clean(format!("peer vanished while sending to it: {e}"));
            }
        }
    }

    /// True while neither our replies nor bytes for the USB device have
    /// piled up beyond the limit.
    fn can_read(&self) -> bool {
        let max = self.shared.limits.max_queued_bytes;
        self.out.len() < max && self.usb.as_ref().is_none_or(|u| u.pending() < max)
    }

    fn usb_io(&mut self) -> Result<(), End> {
        match &mut self.usb {
            Some(u) => u.io(&mut self.out, self.shared.limits.max_queued_bytes),
            None => Ok(()),
        }
    }

    /// A session carries either PCI devices or one USB device.
    fn usb_state(&self) -> Result<(), ReqError> {
        if self.usb.is_some() || !self.devices.is_empty() {
            return Err((
                ErrorCode::STATE,
                "a USB import needs a session of its own (this one already holds a device)".into(),
            ));
        }
        Ok(())
    }

    /// A direct import: usbip-host gets this very connection; once the
    /// reply is out the session stops reading it and only waits for the
    /// kernel's connection to end (see `finish`).
    fn usb_import_direct(&mut self, seq: u64, busid: &str) -> Result<(), End> {
        if let Err((code, message)) = self.usb_state() {
            self.devices
                .reply(seq, &Message::Error { code, message }, &mut self.out);
            return Ok(());
        }
        if self.link.reader.has_partial() || !self.out.is_empty() {
            let why = "a direct USB import must be the last frame in flight".to_string();
            return Err(self.fatal(ErrorCode::STATE, seq, why));
        }
        let link = &self.link;
        match usb::import_direct(
            &self.shared,
            self.id,
            busid,
            &link.peer,
            &link.conn,
            seq,
            &mut self.out,
        ) {
            Err((code, message)) => {
                self.devices
                    .reply(seq, &Message::Error { code, message }, &mut self.out);
                Ok(())
            }
            Ok((export, sent)) => {
                self.direct = Some(export);
                Err(End::clean(match sent {
                    Ok(()) => format!("USB device {busid} handed to usbip-host on this connection"),
                    Err(e) => format!("sending the direct import reply: {e}"),
                }))
            }
        }
    }

    fn usb_import(&mut self, busid: &str) -> Result<Message, ReqError> {
        self.usb_state()?;
        let (relay, reply) =
            UsbRelay::import(&self.shared, self.id, busid, &self.link.peer, &self.poll)?;
        self.usb = Some(relay);
        Ok(reply)
    }

    /// Reads what the socket has and handles every complete frame.
    fn read_and_handle(&mut self) -> Result<(), End> {
        loop {
            if !self.can_read() {
                return Ok(()); // resume once the peer drains our replies
            }
            // Large pushes of target memory go straight into the shadow.
            let devices = &self.devices;
            let resolve =
                |handle: u32, iova: u64, len: usize| devices.shadow_for(handle, iova, len);
            match self.link.recv(&resolve) {
                Ok(got) if got.bytes == 0 => {
                    return Err(if self.link.reader.has_partial() {
                        End {
                            reason: "peer vanished in the middle of a frame".into(),
                            protocol_error: true,
                        }
                    } else {
                        End::clean("peer closed the connection")
                    })
                }
                Ok(got) => {
                    loop {
                        match self.link.reader.next_frame() {
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
                    if got.drained && !self.link.peer_closing {
                        self.link.read_pending = false;
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.link.read_pending = false;
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
        if !self.state.is_ready() {
            let step = self.state.step(
                seq,
                frame.msg,
                &self.shared,
                self.id,
                &self.link.peer,
                &mut self.out,
            );
            return step.map_err(|(code, why)| self.fatal(code, seq, why));
        }
        let answer: Result<Message, ReqError> = match frame.msg {
            Message::UsbData { data } => {
                if let Some(u) = &mut self.usb {
                    u.take_client_bytes(&data);
                } else {
                    let (code, message) = (ErrorCode::STATE, "no USB device is imported".into());
                    debug!(session = self.id, "posted frame {seq} failed: {message}");
                    self.devices
                        .reply(seq, &Message::Error { code, message }, &mut self.out);
                }
                return Ok(());
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
            msg => match self
                .devices
                .handle(seq, msg, &mut self.out, self.poll.registry())
            {
                Handled::Done => return Ok(()),
                Handled::NotMine(other) => {
                    let why = format!(
                        "message type {:#06x} is not valid from a client",
                        other.kind()
                    );
                    return Err(self.fatal(ErrorCode::UNKNOWN_MESSAGE, seq, why));
                }
            },
        };
        let reply = answer.unwrap_or_else(|(code, message)| {
            debug!(session = self.id, "request {seq} failed: {message}");
            Message::Error { code, message }
        });
        self.devices.reply(seq, &reply, &mut self.out);
        Ok(())
    }

    fn finish(&mut self) {
        if let Some(export) = self.direct.take() {
            // Not a byte more from us on this socket, and no shutdown: the
            // kernel is using it.
            usb::await_direct(
                &self.shared,
                self.id,
                &self.link.conn,
                &mut self.poll,
                export,
            );
            return;
        }
        self.devices.release_all(self.poll.registry());
        // Best effort: let the peer read why we ended.
        let conn = &self.link.conn;
        if !self.out.is_empty() && conn.set_nonblocking(false).is_ok() {
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = self.out.write_to(conn, Some(Duration::from_secs(1)));
        }
        let _ = conn.shutdown();
        // Closes the USB stream and restores the device's driver.
        self.usb = None;
    }
}
