//! A connection to a `ciod` as a library user sees it: [`Client`] (list,
//! open, ping), its options and errors.
//!
//! - `handshake`: `Hello`/`Welcome` and the key proofs;
//! - `link`: the connection (requests, replies, posted-write batching,
//!   the pump thread);
//! - `target`: what the frontend keeps per open device (target DMA
//!   memory, interrupt routes), independent of the connection;
//! - `handoff`: the ticket that hands a live session to another frontend.

mod handoff;
mod handshake;
mod link;
mod target;
mod watch;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cio_core::wire::{DeviceSummary, ErrorCode, Message};
use cio_core::DeviceError;
use cio_transports::{ClientTls, Conn, Endpoint, Pin, Psk};

use crate::remote::RemoteDevice;
pub use handoff::{Ticket, TicketDevice};
pub(crate) use handshake::{handshake, read_frame, Handshake};
pub(crate) use link::{Inner, Post};
pub(crate) use target::{lock, Target};

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
    /// USB relays and protocol-2 PCI sessions ping an idle backend this
    /// often (a backend takes a silent client as gone), and give the link
    /// up after four intervals without a frame from it.
    pub keepalive: Duration,
    /// Ask for a session that survives its connection (protocol 2): when
    /// the link breaks, reconnect and resume it, replaying what was lost
    /// on the way. Needs [`Client::connect`] (an endpoint to reconnect to).
    pub resume: bool,
    /// How long to keep trying to reconnect after the link broke before
    /// the session is given up (keep it below the backend's grace period).
    pub resume_timeout: Duration,
    /// TLS with this identity and backend key. Without it a connection is
    /// plaintext, which is allowed only to loopback addresses and Unix
    /// sockets unless [`insecure_plaintext`](Self::insecure_plaintext).
    pub tls: Option<ClientTls>,
    /// Allow plaintext to an address beyond this machine.
    pub insecure_plaintext: bool,
    /// Polling mode: a caller waiting for a reply polls the socket without
    /// sleeping for up to this long before it waits in the kernel (lower
    /// latency for a core spinning meanwhile; zero, the default, sleeps at
    /// once). Pair it with `ciod --poll-us`.
    pub poll: Duration,
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
            resume: true,
            resume_timeout: Duration::from_secs(20),
            tls: None,
            insecure_plaintext: false,
            poll: Duration::ZERO,
        }
    }
}

/// Connects to `ep` as `opts` say: TLS when configured, else plaintext
/// where that is allowed.
pub(crate) fn dial(ep: &Endpoint, opts: &ClientOptions) -> Result<Conn, ClientError> {
    match &opts.tls {
        Some(tls) if tls.pin == Pin::AnyWithPsk && opts.psk.is_none() => {
            Err(ClientError::Transport(cio_transports::Error::Tls {
                endpoint: ep.to_string(),
                why: "accepting any backend key needs a pre-shared key, whose proof then authenticates the backend: pin the backend's key (known_backends) or give --psk-file".into(),
                transient: false,
            }))
        }
        Some(tls) => Ok(Conn::connect_tls(ep, opts.connect_timeout, tls)?),
        None => {
            if !opts.insecure_plaintext && !ep.is_local_only()? {
                return Err(ClientError::TlsRequired(ep.to_string()));
            }
            Ok(Conn::connect(ep, opts.connect_timeout)?)
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
    /// Plaintext to an address beyond this machine was not allowed.
    #[error("refusing to connect to {0} in plaintext: it is not a loopback address, and device registers and DMA would cross the network in the clear (use TLS: --tls with an identity from `cio keygen`; or --insecure-plaintext on a network you trust)")]
    TlsRequired(String),
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
    /// A handoff ticket is unusable, or the session cannot be handed off.
    #[error("handoff: {0}")]
    Ticket(String),
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

/// Owns the pump; the connection ends when the client and all its devices
/// are dropped.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) inner: Arc<Inner>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.inner.close(lock(&self.pump).take());
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

impl Client {
    /// Connects to a backend and runs the handshake.
    ///
    /// A backend too busy to keep the connection through its handshake
    /// says so (`RETRY`: a flood of connections took its handshake slots);
    /// connecting is then tried again, for up to `connect_timeout`.
    pub fn connect(ep: &Endpoint, opts: ClientOptions) -> Result<Self, ClientError> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let conn = dial(ep, &opts)?;
            match Self::start(conn, opts.clone(), Some(ep.clone())) {
                Err(ClientError::Server { code, .. })
                    if code == ErrorCode::RETRY
                        && start.elapsed() + pause < opts.connect_timeout =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// Runs the handshake on an already connected stream. Such a session
    /// cannot resume (there is nowhere to reconnect to).
    pub fn with_conn(conn: Conn, opts: ClientOptions) -> Result<Self, ClientError> {
        Self::start(conn, opts, None)
    }

    fn start(conn: Conn, opts: ClientOptions, ep: Option<Endpoint>) -> Result<Self, ClientError> {
        let resumable = opts.resume && ep.is_some();
        let hs = handshake(&conn, &opts, resumable)?;
        let spawn_err =
            |e: io::Error| ClientError::Disconnected(format!("starting the event pump: {e}"));
        let inner = Arc::new(Inner::new(conn, hs, &opts, ep).map_err(spawn_err)?);
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

    /// True if the session resumes on a new connection when its link
    /// breaks (both sides speak protocol 2 and the backend keeps sessions).
    pub fn resumable(&self) -> bool {
        self.shared.inner.resumable()
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
        let target = Arc::new(Target::new(info));
        lock(&self.shared.inner.targets).insert(handle, Arc::clone(&target));
        Ok(RemoteDevice::new(Arc::clone(&self.shared), handle, target))
    }

    /// Ends the session now, as dropping the client and all its devices
    /// would: says Goodbye (the backend releases the devices at once
    /// rather than keeping the session for a resume), stops the event
    /// pump and closes the connection. Every later call on this client or
    /// its devices fails. For a process that is asked to stop while its
    /// devices are still in use (a signal).
    pub fn close(&self) {
        self.shared.inner.close(lock(&self.shared.pump).take());
    }

    /// Hands the session on: the backend keeps it (devices untouched,
    /// interrupts and device-written data queued) for one adopter, and this
    /// client lets go of it (every later call on it, or on its devices,
    /// fails). Give the ticket to the adopter ([`Client::adopt`], in this or
    /// another process, on this or another host) before it expires.
    pub fn suspend(&self) -> Result<Ticket, ClientError> {
        let inner = &self.shared.inner;
        let Some(endpoint) = inner.endpoint().cloned() else {
            return Err(ClientError::Ticket(
                "the session is not resumable (the backend speaks protocol 1, keeps no sessions, or the client was made without an endpoint)".into(),
            ));
        };
        inner.suspending.store(true, Ordering::Relaxed);
        let reply = inner.call(None, &Message::Suspend);
        let (secret, ttl_ms) = match reply {
            Ok(Message::Suspended { secret, ttl_ms }) => (secret, ttl_ms),
            other => {
                inner.suspending.store(false, Ordering::Relaxed);
                return Err(match other {
                    Ok(m) => {
                        ClientError::Protocol(format!("expected Suspended, got {:#06x}", m.kind()))
                    }
                    Err(e) => e,
                });
            }
        };
        let server_next = inner.received() + 1;
        inner.hand_off();
        let devices = lock(&inner.targets)
            .iter()
            .map(|(&handle, t)| handoff::TicketDevice {
                handle,
                info: t.info.clone(),
                mappings: lock(&t.dma)
                    .regions()
                    .iter()
                    .map(|r| (r.iova(), r.len(), r.dir()))
                    .collect(),
                irqs: lock(&t.irqs).keys().copied().collect(),
            })
            .collect();
        Ok(Ticket {
            endpoint,
            session: inner.session,
            expires: SystemTime::now() + Duration::from_millis(ttl_ms),
            secret,
            server_next,
            devices,
        })
    }

    /// Adopts a session another frontend suspended: the same open devices,
    /// DMA mappings and interrupt routes, without any reset. This client
    /// supplies fresh target memory for every mapping, which the backend
    /// fills from its shadow before this returns (so the adopter sees what
    /// the device and the previous frontend left there), and a fresh
    /// eventfd for every interrupt route ([`RemoteDevice::irq_eventfd`]).
    pub fn adopt(
        ticket: &Ticket,
        opts: ClientOptions,
    ) -> Result<(Self, Vec<RemoteDevice>), ClientError> {
        if ticket.expired() {
            let ago = ticket.expires.elapsed().unwrap_or_default();
            return Err(ClientError::Ticket(format!(
                "the ticket of session {:#x} expired {:.1}s ago",
                ticket.session,
                ago.as_secs_f64()
            )));
        }
        let conn = dial(&ticket.endpoint, &opts)?;
        let (mut dec, theirs, key) =
            handshake::adopt(&conn, &opts, ticket.session, &ticket.secret)?;
        dec.set_next_seq(ticket.server_next);
        let mut out = cio_transports::OutQueue::starting_at(theirs + 1);
        out.retain();
        let hs = Handshake {
            out,
            dec,
            session: ticket.session,
            features: cio_core::wire::FEATURES,
            resume: Some(key),
            version: cio_core::wire::PROTOCOL_VERSION,
        };
        let fail = |e: io::Error| ClientError::Ticket(format!("setting the session up: {e}"));
        let inner = Inner::new(conn, hs, &opts, Some(ticket.endpoint.clone())).map_err(fail)?;
        inner.set_received(ticket.server_next - 1);
        for d in &ticket.devices {
            let t = Target::new(d.info.clone());
            for &(iova, len, dir) in &d.mappings {
                let region = cio_core::DmaRegion::new(iova, len, dir)
                    .map_err(|e| ClientError::Ticket(format!("mapping {iova:#x}: {e}")))?;
                lock(&t.dma)
                    .insert(Arc::new(region))
                    .map_err(|e| ClientError::Ticket(format!("mapping {iova:#x}: {e}")))?;
            }
            for &(kind, vector) in &d.irqs {
                let fd =
                    cio_core::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(fail)?;
                lock(&t.irqs).insert((kind, vector), fd);
            }
            lock(&inner.targets).insert(d.handle, Arc::new(t));
        }
        let inner = Arc::new(inner);
        let pump_inner = Arc::clone(&inner);
        let pump = std::thread::Builder::new()
            .name("cio-pump".into())
            .spawn(move || pump_inner.pump())
            .map_err(fail)?;
        let client = Self {
            shared: Arc::new(Shared {
                inner,
                pump: Mutex::new(Some(pump)),
            }),
        };
        // The backend sends the mappings' content before it answers this.
        client.ping(Bytes::new())?;
        let devices = ticket
            .devices
            .iter()
            .map(|d| {
                let target = client
                    .shared
                    .inner
                    .target(d.handle)
                    .expect("inserted above");
                RemoteDevice::new(Arc::clone(&client.shared), d.handle, target)
            })
            .collect();
        Ok((client, devices))
    }
}
