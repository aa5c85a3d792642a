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
//! socket, the interrupt eventfds of its devices and a waker (shutdown, or
//! a new connection taking the session over).
//!
//! A resumable session (protocol 2, a grace period configured) outlives
//! its connection: when the link breaks (end of stream, a reset, or no
//! frame for [`Limits::link_timeout`]) the session is *parked*: its
//! devices keep running, interrupts and device-written DMA data queue up,
//! and a new connection that proves the session's resume key takes it
//! over, after which both sides replay exactly what the other did not
//! receive. Whatever ends the session for good (goodbye, error, shutdown,
//! a grace period that expires), every device it opened has its
//! interrupts disabled, its DMA unmapped, its shadow freed and is reset
//! before it goes back to the registry.

mod admission;
mod devices;
mod handshake;
mod link;
mod usb;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cio_core::wire::{ErrorCode, Message, NONCE_LEN};
use cio_core::Frame;
use cio_transports::{auth, Conn, OutQueue, Psk, ResumeKey, ServerTls, Side};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::{debug, info, warn};

use crate::registry::Registry;
use crate::usb::{UsbExport, UsbProvider};
use admission::Admission;
pub use admission::LogGate;
use devices::{Devices, Handled, Outbox, IRQ_BASE};
use handshake::{State, Step};
use link::{flush_blocking, Link};
use usb::{UsbRelay, USB};

/// Per-session and per-server limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Connections in their handshake at once (separate from the session
    /// slots); when all are taken a new connection evicts the oldest.
    pub max_handshakes: usize,
    /// Connections in their handshake at once from one IP address.
    pub max_handshakes_per_peer: usize,
    /// Devices one session may hold open.
    pub max_handles: usize,
    /// DMA mappings per device.
    pub max_mappings: usize,
    /// Bytes of DMA address space per session. Shadow memory is committed
    /// only as it is written (by the client's pushes or the device's DMA),
    /// never beyond what is mapped, so this bounds what one session can
    /// make the daemon commit.
    pub max_mapped_bytes: u64,
    /// Bytes of DMA address space all sessions together may map: the bound
    /// on the daemon's shadow memory.
    pub max_mapped_total: u64,
    /// Queued outgoing bytes above which the session stops reading
    /// requests until the peer catches up.
    pub max_queued_bytes: usize,
    /// Queued outgoing bytes of all sessions together above which a session
    /// holding more than its fair share (this over `max_sessions`) stops
    /// reading too.
    pub max_queued_total: usize,
    /// Authenticated sessions per server (parked ones included).
    pub max_sessions: usize,
    /// A session carrying a USB device ends when the client sends nothing
    /// (not even the pings frontends send every few seconds) for this long:
    /// the link is taken as lost and the device is given back.
    pub usb_idle_timeout: Duration,
    /// How long a resumable PCI session whose link broke waits, parked, for
    /// its client to resume it before its devices are released. Zero: no
    /// session outlives its connection (the protocol-1 behaviour).
    pub resume_grace: Duration,
    /// A protocol-2 PCI session whose client sent nothing (frontends ping
    /// every few seconds) for this long takes its link as lost: it parks if
    /// resumable, else it ends and its devices are released.
    pub link_timeout: Duration,
    /// Polling mode: after each event a session polls its sockets without
    /// sleeping for this long before it waits in the kernel again, so a
    /// request arriving meanwhile costs no wake-up (a core spins while a
    /// client is busy). Zero (the default) sleeps at once.
    pub poll: Duration,
}

impl Default for Limits {
    /// Defaults; the shadow memory bounds follow this machine's memory (a
    /// quarter of it per session, half in all).
    fn default() -> Self {
        let ram = crate::procfs::physical_memory();
        Self {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 32,
            max_handshakes_per_peer: 8,
            max_handles: 64,
            max_mappings: 1024,
            max_mapped_bytes: (64 << 30).min(ram / 4),
            max_mapped_total: ram / 2,
            max_queued_bytes: 32 << 20,
            max_queued_total: 256 << 20,
            max_sessions: 64,
            usb_idle_timeout: Duration::from_secs(60),
            resume_grace: Duration::from_secs(30),
            link_timeout: Duration::from_secs(20),
            poll: Duration::ZERO,
        }
    }
}

/// Counters shared by all sessions of a server.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions running now (in their handshake or authenticated).
    pub sessions: AtomicUsize,
    /// Authenticated sessions now (parked ones included).
    pub authenticated: AtomicUsize,
    /// Sessions ever accepted.
    pub sessions_total: AtomicU64,
    /// Bytes of shadow DMA memory mapped now.
    pub shadow_bytes: AtomicU64,
    /// Bytes queued to send, all sessions together (as each last said).
    pub queued_bytes: AtomicUsize,
    /// Interrupt eventfds registered now.
    pub irq_fds: AtomicUsize,
    /// Sessions that ended because of a protocol error.
    pub protocol_errors: AtomicU64,
    /// Sessions parked now (link lost, waiting for a resume).
    pub parked: AtomicUsize,
    /// Connections that took a session over.
    pub resumes: AtomicU64,
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
    /// TLS on every connection, if set.
    pub tls: Option<ServerTls>,
    /// Who may use which device (replaced on a config reload).
    pub access: std::sync::RwLock<crate::access::Access>,
    /// Limits.
    pub limits: Limits,
    /// Counters.
    pub counters: Counters,
    /// Set when the server shuts down.
    pub stopping: AtomicBool,
    /// Sessions a new connection may take over, by id.
    resumable: Mutex<HashMap<u64, Resumable>>,
    /// Handshake slots.
    admission: Admission,
    /// Rate limit for logging refused and failed connections.
    pub refusals: LogGate,
}

/// How a new connection reaches a resumable session.
#[derive(Debug)]
struct Resumable {
    /// `None` while the session is suspended for a handoff: only its
    /// ticket takes it over then.
    key: Option<ResumeKey>,
    ticket: Option<Ticket>,
    handover: Sender<Handover>,
    waker: Weak<Waker>,
}

/// The single-use ticket of a suspended session.
#[derive(Debug)]
struct Ticket {
    secret: [u8; NONCE_LEN],
    expires: Instant,
    used: bool,
}

/// A new connection that proved it may take a session over.
#[derive(Debug)]
struct Handover {
    conn: Conn,
    peer: String,
    client: [u8; NONCE_LEN],
    server: [u8; NONCE_LEN],
    /// Last frame the client received from the session.
    received: u64,
    /// The ticket secret, when this is an adopter.
    adopt: Option<[u8; NONCE_LEN]>,
}

impl Shared {
    /// What the sessions of a server serving `registry` and `usb` share.
    pub fn new(
        registry: Arc<Registry>,
        usb: Arc<UsbProvider>,
        psk: Option<Psk>,
        limits: Limits,
    ) -> Self {
        Self {
            registry,
            usb,
            psk,
            tls: None,
            access: Default::default(),
            limits,
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
            resumable: Mutex::new(HashMap::new()),
            admission: Admission::default(),
            refusals: LogGate::default(),
        }
    }

    /// Replaces the access rules.
    pub(crate) fn set_access(&self, access: crate::access::Access) {
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = access;
    }

    /// May `client` use `device`?
    fn allows(&self, client: Option<&str>, device: &str) -> bool {
        self.access
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .allows(client, device)
    }

    /// Connections in their handshake now.
    pub fn handshaking(&self) -> usize {
        self.admission.len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Resumable>> {
        self.resumable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if session `id` may be resumed here.
    fn resumable(&self, id: u64) -> bool {
        self.table().contains_key(&id)
    }

    /// The key resumes of session `id` must prove.
    fn resume_key(&self, id: u64) -> Result<ResumeKey, String> {
        match self.table().get(&id) {
            None => Err(format!("no session {id:#x} to resume here")),
            Some(Resumable { key: Some(k), .. }) => Ok(k.clone()),
            Some(_) => Err(format!(
                "session {id:#x} was suspended for a handoff: only its ticket can take it over"
            )),
        }
    }

    /// Checks an `Adopt` proof against session `id`'s ticket and uses the
    /// ticket up; returns its secret.
    fn claim_ticket(
        &self,
        id: u64,
        client: &[u8; NONCE_LEN],
        server: &[u8; NONCE_LEN],
        mac: &[u8; NONCE_LEN],
    ) -> Result<[u8; NONCE_LEN], String> {
        let mut table = self.table();
        let t = match table.get_mut(&id).map(|r| r.ticket.as_mut()) {
            None => return Err(format!("no session {id:#x} to adopt here")),
            Some(None) => {
                return Err(format!(
                    "session {id:#x} has no handoff ticket (it was not suspended)"
                ))
            }
            Some(Some(t)) => t,
        };
        if !auth::verify_adopt(&t.secret, client, server, id, mac) {
            return Err(format!(
                "ticket proof for session {id:#x} did not verify (not this session's ticket)"
            ));
        }
        if t.used {
            return Err(format!(
                "the ticket of session {id:#x} was used already (tickets are single-use)"
            ));
        }
        if Instant::now() >= t.expires {
            return Err(format!("the ticket of session {id:#x} expired"));
        }
        t.used = true;
        Ok(t.secret)
    }

    /// Session `id` resumes with `key` from now on.
    fn set_key(&self, id: u64, key: ResumeKey) {
        if let Some(r) = self.table().get_mut(&id) {
            r.key = Some(key);
        }
    }

    /// Updates session `id`'s entry: its resume key and ticket.
    fn set_resume(&self, id: u64, key: Option<ResumeKey>, ticket: Option<Ticket>) {
        if let Some(r) = self.table().get_mut(&id) {
            r.key = key;
            r.ticket = ticket;
        }
    }

    /// Gives `h` to session `id` and wakes it; false if it is gone.
    fn hand_over(&self, id: u64, h: Handover) -> bool {
        let table = self.table();
        let Some(r) = table.get(&id) else {
            return false;
        };
        let Some(waker) = r.waker.upgrade() else {
            return false;
        };
        r.handover.send(h).is_ok() && waker.wake().is_ok()
    }
}

const CONN: Token = Token(0);
/// Token of the shutdown waker of a session's poll.
pub const WAKE: Token = Token(1);

/// Why a session (or its link) ended.
struct End {
    reason: String,
    protocol_error: bool,
    /// Only the connection failed: a resumable session parks instead.
    link_lost: bool,
}

impl End {
    fn clean(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            protocol_error: false,
            link_lost: false,
        }
    }

    fn lost(reason: impl Into<String>) -> Self {
        Self {
            link_lost: true,
            ..Self::clean(reason)
        }
    }
}

/// Frames received since the last `Ack` above which one is sent at once.
const ACK_FRAMES: usize = 128;
/// Bytes received since the last `Ack` above which one is sent at once.
const ACK_BYTES: usize = 4 << 20;
/// Otherwise an `Ack` goes out once the client has been quiet this long.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// What a resumable session keeps for its resumes.
struct Resume {
    key: ResumeKey,
    handovers: Receiver<Handover>,
    /// Since when, and why, the session has had no link.
    parked: Option<(Instant, String)>,
    /// Frames and bytes received since the last `Ack`.
    unacked: (usize, usize),
    /// Interrupts queued while parked.
    parked_irqs: u64,
    /// Set by `Suspend`: the last frame the suspending client received
    /// (the `Suspended` reply), where an adopter takes over.
    suspended: Option<u64>,
}

/// A request that failed without ending the session.
type ReqError = (ErrorCode, String);

/// A device the access rules keep from this client: refused as one that
/// does not exist, so its existence is not revealed either.
fn not_yours(name: &str) -> ReqError {
    (
        ErrorCode::NO_DEVICE,
        format!("no device {name:?} that this client may use"),
    )
}

/// Which slot a session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not admitted yet.
    None,
    /// A handshake slot.
    Handshake,
    /// A session slot (authenticated).
    Session,
}

/// A client session.
pub struct Session {
    id: u64,
    slot: Slot,
    /// Set when a newer connection took this one's handshake slot.
    evicted: Arc<AtomicBool>,
    shared: Arc<Shared>,
    poll: Poll,
    /// The connection; `None` while parked (or after handing it over).
    link: Option<Link>,
    /// Peer of the current (or last) link, for logs.
    peer: String,
    /// The client's name from authorized_clients (TLS), for access rules.
    client: Option<String>,
    out: OutQueue,
    state: State,
    /// Last frame received and handled, in the session's numbering.
    received: u64,
    resume: Option<Resume>,
    devices: Devices,
    /// Interrupt slots that fired while too much was queued.
    deferred_irqs: BTreeSet<usize>,
    /// What this session last added to `Counters::queued_bytes`.
    queued_reported: usize,
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
            .field("peer", &self.peer)
            .field("handles", &self.devices.len())
            .finish()
    }
}

impl Session {
    /// Prepares a session for `conn`; returns it with the waker that stops
    /// it (valid while the session lives).
    pub fn new(conn: Conn, shared: Arc<Shared>) -> io::Result<(Self, Weak<Waker>)> {
        let conn = match &shared.tls {
            Some(tls) => conn.into_tls_server(tls)?,
            None => conn,
        };
        conn.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        poll.registry().register(
            &mut SourceFd(&conn.as_raw_fd()),
            CONN,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let id = auth::session_id().map_err(io::Error::other)?;
        let weak = Arc::downgrade(&waker);
        let link = Link::new(conn);
        Ok((
            Self {
                id,
                slot: Slot::None,
                evicted: Arc::new(AtomicBool::new(false)),
                devices: Devices::new(id, Arc::clone(&shared)),
                shared,
                poll,
                peer: link.peer.clone(),
                client: None,
                link: Some(link),
                out: OutQueue::new(),
                state: State::Hello,
                received: 0,
                resume: None,
                deferred_irqs: BTreeSet::new(),
                queued_reported: 0,
                usb: None,
                direct: None,
                _waker: waker,
            },
            weak,
        ))
    }

    /// Takes a handshake slot for the session (see `admission`); the error
    /// says which limit refused it.
    pub fn admit(&mut self) -> Result<(), String> {
        let peer: Option<IpAddr> = self.link.as_ref().and_then(|l| l.conn.peer_ip());
        let limits = &self.shared.limits;
        self.shared.admission.enter(
            self.id,
            peer,
            Arc::downgrade(&self._waker),
            Arc::clone(&self.evicted),
            limits.max_handshakes,
            limits.max_handshakes_per_peer,
        )?;
        self.slot = Slot::Handshake;
        Ok(())
    }

    /// Tells a connection that was not admitted why, and closes it.
    pub fn refuse(mut self, why: String) {
        let msg = Message::Error {
            code: ErrorCode::LIMIT,
            message: why,
        };
        self.out.push(&msg, 0);
        if let Some(link) = &self.link {
            let _ = flush_blocking(&mut self.out, &link.conn, Duration::from_millis(200));
            let _ = link.conn.shutdown();
        }
    }

    /// The session authenticated: from a handshake slot to a session slot,
    /// if one is free.
    fn authenticated(&mut self) -> Result<(), End> {
        self.shared.admission.leave(self.id);
        self.slot = Slot::Session;
        let max = self.shared.limits.max_sessions;
        if self
            .shared
            .counters
            .authenticated
            .fetch_add(1, Ordering::AcqRel)
            >= max
        {
            let why = format!("server already serves its maximum of {max} sessions");
            return Err(self.fatal(ErrorCode::LIMIT, 0, why));
        }
        let key = self.link.as_ref().and_then(|l| l.conn.peer_key());
        self.client = match (&self.shared.tls, key) {
            (Some(tls), Some(fp)) => tls.client_name(&fp),
            _ => None,
        };
        let shown = match (&self.client, key) {
            (Some(name), _) => name.clone(),
            (None, Some(fp)) => fp.to_string(),
            (None, None) => "-".into(),
        };
        info!(session = %self.hex(), peer = %self.peer, client_key = %shown, resumable = self.resume.is_some(), "authenticated");
        Ok(())
    }

    /// Gives back whatever slot the session holds.
    fn leave_slot(&mut self) {
        match std::mem::replace(&mut self.slot, Slot::None) {
            Slot::None => {}
            Slot::Handshake => self.shared.admission.leave(self.id),
            Slot::Session => {
                self.shared
                    .counters
                    .authenticated
                    .fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Serves the session until it ends, then releases everything it held.
    /// The session counter drops only once every fd of the session is closed.
    pub fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let c = &shared.counters;
        c.sessions.fetch_add(1, Ordering::Relaxed);
        c.sessions_total.fetch_add(1, Ordering::Relaxed);
        debug!(session = %self.hex(), peer = %self.peer, "session started");
        let end = self.serve();
        if end.protocol_error {
            c.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        let (id, peer, why) = (self.hex(), &self.peer, &end.reason);
        match (self.slot == Slot::Session, end.protocol_error) {
            (true, true) => warn!(session = %id, peer = %peer, "session ended: {why}"),
            (true, false) => info!(session = %id, peer = %peer, "session ended: {why}"),
            // Unauthenticated connections are cheap to make: log their
            // failures at most once a second.
            (false, true) => match shared.refusals.pass() {
                Some(n) => {
                    warn!(session = %id, peer = %peer, "connection ended: {why}{}", LogGate::held(n))
                }
                None => debug!(session = %id, peer = %peer, "connection ended: {why}"),
            },
            (false, false) => debug!(session = %id, peer = %peer, "connection ended: {why}"),
        }
        self.leave_slot();
        self.finish();
        self.out = OutQueue::new();
        self.report_queue();
        drop(self);
        shared.counters.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// The session id as logs show it.
    fn hex(&self) -> String {
        format!("{:#x}", self.id)
    }

    /// The link; only called where one exists.
    fn link(&mut self) -> &mut Link {
        self.link.as_mut().expect("a linked session")
    }

    fn serve(&mut self) -> End {
        let deadline = Instant::now() + self.shared.limits.handshake_timeout;
        let mut events = Events::with_capacity(64);
        let spin = self.shared.limits.poll;
        let mut spin_until = Instant::now();
        loop {
            let timeout = if !spin.is_zero() && Instant::now() < spin_until {
                Some(Duration::ZERO)
            } else {
                self.poll_timeout(deadline)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return End::clean(format!("polling failed: {e}"));
            }
            if !spin.is_zero() && !events.is_empty() {
                spin_until = Instant::now() + spin;
            }
            if !self.state.is_ready() && Instant::now() >= deadline {
                let why = "handshake timed out".to_string();
                return self.fatal(ErrorCode::STATE, 0, why);
            }
            let idle = self.shared.limits.usb_idle_timeout;
            let last_rx = self.link.as_ref().map(|l| l.last_rx);
            if self.usb.is_some()
                && events.is_empty()
                && last_rx.is_some_and(|t| t.elapsed() >= idle)
            {
                return End::clean(format!(
                    "USB client sent nothing for {}s: link lost",
                    idle.as_secs()
                ));
            }
            if let Err(end) = self.check_link_timers() {
                return end;
            }
            for ev in events.iter() {
                match ev.token() {
                    CONN => {
                        let Some(link) = &mut self.link else { continue };
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            link.read_pending = true;
                        }
                        if ev.is_read_closed() || ev.is_error() {
                            link.peer_closing = true;
                        }
                    }
                    WAKE if self.shared.stopping.load(Ordering::Relaxed) => {
                        self.out.push(
                            &Message::Error {
                                code: ErrorCode::SHUTDOWN,
                                message: "server is shutting down".into(),
                            },
                            0,
                        );
                        return End::clean("server shutting down");
                    }
                    WAKE if self.slot == Slot::Handshake
                        && self.evicted.load(Ordering::Acquire) =>
                    {
                        self.slot = Slot::None; // the slot went to the newer one
                        let why = "every handshake slot was taken and this was the oldest connection still in its handshake".to_string();
                        self.out.push(
                            &Message::Error {
                                code: ErrorCode::RETRY,
                                message: why.clone(),
                            },
                            0,
                        );
                        return End::clean(why);
                    }
                    WAKE => {
                        if let Err(end) = self.take_handovers() {
                            return end;
                        }
                    }
                    USB => {
                        if let Some(u) = &mut self.usb {
                            u.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        }
                    }
                    Token(t) => {
                        self.deferred_irqs.insert(t - IRQ_BASE);
                    }
                }
            }
            self.deliver_irqs();
            if let Err(end) = self.usb_io() {
                return end;
            }
            let readable = self.link.as_ref().is_some_and(|l| l.read_pending);
            if readable && self.can_read() {
                if let Err(end) = self.read_and_handle().and_then(|()| self.usb_io()) {
                    if let Err(end) = self.park_or_end(end) {
                        return end;
                    }
                }
            }
            self.maybe_ack();
            // Kept frames are copies; DMA data is sent from (and kept as a
            // reference to) its shadow region, which exists anyway.
            let max_retained = 2 * self.shared.limits.max_queued_bytes;
            if self.out.retained_copies() > max_retained {
                let why = format!(
                    "the client acknowledged none of the last {} MiB of frames sent",
                    max_retained >> 20
                );
                return self.fatal(ErrorCode::LIMIT, 0, why);
            }
            if let Some(link) = &self.link {
                if let Err(e) = self.out.write_to(&link.conn, None) {
                    let end = End::lost(format!("peer vanished while sending to it: {e}"));
                    if let Err(end) = self.park_or_end(end) {
                        return end;
                    }
                }
            }
            self.report_queue();
        }
    }

    /// How long the next poll may sleep.
    fn poll_timeout(&self, handshake_deadline: Instant) -> Option<Duration> {
        let now = Instant::now();
        let until = |t: Instant| Some(t.saturating_duration_since(now));
        let Some(link) = &self.link else {
            // Parked: until the grace period ends.
            let (since, _) = self.resume.as_ref()?.parked.as_ref()?;
            return until(*since + self.shared.limits.resume_grace);
        };
        // The device side has bytes we stopped reading while replies
        // piled up: no edge will announce them again.
        let usb_left = self.usb.as_ref().is_some_and(|u| u.readable)
            && self.out.len() < self.shared.limits.max_queued_bytes;
        if (link.read_pending && self.can_read()) || usb_left {
            return Some(Duration::ZERO);
        }
        if !self.deferred_irqs.is_empty() && self.below_queue_limit() {
            return Some(Duration::ZERO);
        }
        if self.usb.is_some() {
            return until(link.last_rx + self.shared.limits.usb_idle_timeout);
        }
        if !self.state.is_ready() {
            return until(handshake_deadline);
        }
        if !self.watched() {
            return None;
        }
        let silence = link.last_rx + self.shared.limits.link_timeout;
        if self.resume.as_ref().is_some_and(|r| r.unacked.0 > 0) {
            return until(silence.min(link.last_rx + ACK_DELAY));
        }
        until(silence)
    }

    /// True if the client pings an idle link (protocol 2 PCI sessions), so
    /// that its silence means the link or the client is gone.
    fn watched(&self) -> bool {
        self.devices.version() >= 2 && self.usb.is_none() && self.direct.is_none()
    }

    /// Parks (or, not resumable, ends) a session whose client went silent;
    /// ends one whose grace
    /// period is over.
    fn check_link_timers(&mut self) -> Result<(), End> {
        let limits = &self.shared.limits;
        let silent = self.state.is_ready()
            && self.watched()
            && self
                .link
                .as_ref()
                .is_some_and(|l| l.last_rx.elapsed() >= limits.link_timeout);
        let Some(r) = &self.resume else {
            if silent {
                return Err(End::clean(format!(
                    "the client sent nothing for {:?} (it pings an idle link): taken as gone",
                    limits.link_timeout
                )));
            }
            return Ok(());
        };
        if let Some((since, why)) = &r.parked {
            if since.elapsed() >= limits.resume_grace {
                return Err(End::clean(format!(
                    "not resumed within the {:?} grace period after the link was lost ({why})",
                    limits.resume_grace
                )));
            }
            return Ok(());
        }
        if silent {
            let why = format!("no frame from the client for {:?}", limits.link_timeout);
            self.park(why);
        }
        Ok(())
    }

    /// A link that ended parks a resumable session; anything else ends it.
    fn park_or_end(&mut self, end: End) -> Result<(), End> {
        if end.link_lost && self.resume.is_some() && self.usb.is_none() {
            self.park(end.reason);
            return Ok(());
        }
        Err(end)
    }

    /// Drops the link and keeps everything else until a resume or the end
    /// of the grace period.
    fn park(&mut self, why: String) {
        let Some(link) = self.link.take() else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&link.conn.as_raw_fd()));
        let _ = link.conn.shutdown();
        let grace = self.shared.limits.resume_grace;
        let r = self.resume.as_mut().expect("only resumable sessions park");
        r.parked = Some((Instant::now(), why.clone()));
        r.parked_irqs = 0;
        self.shared.counters.parked.fetch_add(1, Ordering::Relaxed);
        info!(
            session = %self.hex(), peer = %self.peer, queued = self.out.len(), unacknowledged = self.out.retained(),
            "link lost ({why}); session parked for up to {grace:?}, devices kept as they are"
        );
    }

    /// New connections that proved they may take this session over: the
    /// newest wins.
    fn take_handovers(&mut self) -> Result<(), End> {
        loop {
            let Some(r) = &self.resume else {
                return Ok(());
            };
            let h = match r.handovers.try_recv() {
                Ok(h) => h,
                Err(_) => return Ok(()),
            };
            self.take_over(h)?;
        }
    }

    fn take_over(&mut self, h: Handover) -> Result<(), End> {
        if self.link.is_some() {
            // The client saw a broken link before we did.
            self.park(format!("a new connection from {} took over", h.peer));
        }
        let r = self
            .resume
            .as_mut()
            .expect("handovers come to resumable sessions");
        let (since, why) = r.parked.take().expect("parked above");
        let parked_irqs = r.parked_irqs;
        self.shared.counters.parked.fetch_sub(1, Ordering::Relaxed);
        // An adopter starts where the suspending client stopped, and has a
        // key of its own from now on.
        let received = match h.adopt {
            Some(secret) => {
                r.key = ResumeKey::adopted(&secret, &h.client, &h.server, self.id);
                // The spent ticket stays, so that a second adopter learns why.
                self.shared.set_key(self.id, r.key.clone());
                r.suspended
                    .take()
                    .expect("only suspended sessions have tickets")
            }
            None => h.received,
        };
        if let Err(e) = self.out.rewind(received) {
            return Err(End {
                protocol_error: true,
                ..End::clean(format!("resume point refused: {e}"))
            });
        }
        let mac = r
            .key
            .proof(Side::Server, &h.client, &h.server, self.id, self.received);
        // `Resumed` closes the new connection's handshake (its frame 2,
        // after `Welcome`); the session's own numbering continues after it.
        let mut hs = OutQueue::starting_at(2);
        let resumed = Message::Resumed {
            received: self.received,
            mac,
        };
        hs.push(&resumed, 0);
        // Counted before the client can see `Resumed`.
        self.shared.counters.resumes.fetch_add(1, Ordering::Relaxed);
        let registered = flush_blocking(&mut hs, &h.conn, Duration::from_secs(5))
            .and_then(|()| h.conn.set_nonblocking(true))
            .and_then(|()| {
                self.poll.registry().register(
                    &mut SourceFd(&h.conn.as_raw_fd()),
                    CONN,
                    Interest::READABLE | Interest::WRITABLE,
                )
            });
        let r = self.resume.as_mut().expect("still resumable");
        r.unacked = (0, 0);
        if let Err(e) = registered {
            // That connection failed already: stay parked for the next.
            r.parked = Some((
                since,
                format!("{why}; a resume from {} failed: {e}", h.peer),
            ));
            self.shared.counters.parked.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        info!(
            session = %self.hex(), peer = %h.peer, parked_for = ?since.elapsed(), replay_bytes = self.out.len(),
            interrupts_queued = parked_irqs, client_received = received, received = self.received,
            adopted = h.adopt.is_some(),
            "resumed on a new connection"
        );
        self.peer = h.peer;
        self.link = Some(Link::resumed(h.conn, self.received + 1));
        if h.adopt.is_some() {
            // The adopter's target memory is fresh: bring it up to date.
            self.devices.send_all(&mut self.out);
        }
        Ok(())
    }

    /// Sends an `Ack` when enough arrived, or the client has gone quiet.
    fn maybe_ack(&mut self) {
        let (Some(r), Some(link)) = (&mut self.resume, &self.link) else {
            return;
        };
        let (frames, bytes) = r.unacked;
        let quiet = link.last_rx.elapsed() >= ACK_DELAY;
        if frames >= ACK_FRAMES || bytes >= ACK_BYTES || (frames > 0 && quiet) {
            r.unacked = (0, 0);
            let received = self.received;
            self.out.push(&Message::Ack { received }, 0);
        }
    }

    /// True while fewer than the limit of bytes wait to be sent.
    fn below_queue_limit(&self) -> bool {
        self.out.len() < self.shared.limits.max_queued_bytes
    }

    /// Turns fired interrupt slots into `Irq` frames while the queue has
    /// room; the rest wait (their eventfds keep counting, so nothing is
    /// lost while a parked session's queue is full).
    fn deliver_irqs(&mut self) {
        while self.below_queue_limit() {
            let Some(idx) = self.deferred_irqs.pop_first() else {
                return;
            };
            let before = self.out.len();
            self.devices.on_irq(idx, &mut self.out);
            if let Some(r) = &mut self.resume {
                if r.parked.is_some() && self.out.len() > before {
                    r.parked_irqs += 1;
                }
            }
        }
    }

    /// True while neither our replies nor bytes for the USB device have
    /// piled up beyond the limit, and, when all sessions together have
    /// queued more than the total, ours hold no more than a fair share.
    fn can_read(&self) -> bool {
        let l = &self.shared.limits;
        let max = l.max_queued_bytes;
        // The others as they last said, and ours as it is now.
        let total = (self.shared.counters.queued_bytes.load(Ordering::Relaxed) + self.out.len())
            .saturating_sub(self.queued_reported);
        let fair = l.max_queued_total / l.max_sessions.max(1);
        self.out.len() < max
            && self.usb.as_ref().is_none_or(|u| u.pending() < max)
            && (total < l.max_queued_total || self.out.len() <= fair)
    }

    /// Tells the other sessions how much this one has queued.
    fn report_queue(&mut self) {
        let now = self.out.len();
        let q = &self.shared.counters.queued_bytes;
        if now > self.queued_reported {
            q.fetch_add(now - self.queued_reported, Ordering::Relaxed);
        } else {
            q.fetch_sub(self.queued_reported - now, Ordering::Relaxed);
        }
        self.queued_reported = now;
    }

    fn usb_io(&mut self) -> Result<(), End> {
        match &mut self.usb {
            Some(u) => u.io(&mut self.out, self.shared.limits.max_queued_bytes),
            None => Ok(()),
        }
    }

    /// A session carries either PCI devices or one USB device.
    fn usb_state(&self) -> Result<(), ReqError> {
        if self.resume.is_some() {
            return Err((
                ErrorCode::STATE,
                "USB imports are not carried by resumable sessions: connect without resume".into(),
            ));
        }
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
        if !self.link().conn.is_plain_socket() {
            let message = if self.link().conn.is_tls() {
                "a direct USB import hands the connection to the kernel, which cannot encrypt it: on a TLS link use the relayed import"
            } else {
                "a direct USB import hands the connection to the kernel, which speaks USB/IP on TCP only: on an RDMA link use the relayed import"
            }
            .to_string();
            self.devices.reply(
                seq,
                &Message::Error {
                    code: ErrorCode::USB,
                    message,
                },
                &mut self.out,
            );
            return Ok(());
        }
        if self.link().reader.has_partial() || !self.out.is_empty() {
            let why = "a direct USB import must be the last frame in flight".to_string();
            return Err(self.fatal(ErrorCode::STATE, seq, why));
        }
        let link = self.link.as_ref().expect("a linked session");
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
            UsbRelay::import(&self.shared, self.id, busid, &self.peer, &self.poll)?;
        self.usb = Some(relay);
        Ok(reply)
    }

    /// Reads what the socket has and handles every complete frame.
    fn read_and_handle(&mut self) -> Result<(), End> {
        loop {
            self.report_queue();
            if !self.can_read() {
                return Ok(()); // resume once the peer drains our replies
            }
            let Some(link) = &mut self.link else {
                return Ok(()); // handed over while handling a frame
            };
            // Large pushes of target memory go straight into the shadow.
            let devices = &self.devices;
            let resolve =
                |handle: u32, iova: u64, len: usize| devices.shadow_for(handle, iova, len);
            match link.recv(&resolve) {
                Ok(got) if got.bytes == 0 => {
                    return Err(if link.reader.has_partial() {
                        End {
                            protocol_error: self.resume.is_none(),
                            ..End::lost("peer vanished in the middle of a frame")
                        }
                    } else {
                        End::lost("peer closed the connection")
                    })
                }
                Ok(got) => {
                    if let Some(r) = &mut self.resume {
                        r.unacked.1 += got.bytes;
                    }
                    if !link.conn.is_tls() && link.reader.starts_like_tls() {
                        let why = "a TLS client connected to this plaintext listener: this backend does not use TLS".to_string();
                        return Err(self.fatal(ErrorCode::MALFORMED, 0, why));
                    }
                    loop {
                        let Some(link) = &mut self.link else {
                            return Ok(());
                        };
                        match link.reader.next_frame() {
                            Ok(Some(frame)) => {
                                self.received = frame.seq;
                                self.handle(frame)?;
                            }
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
                    let link = self.link();
                    if got.drained && !link.peer_closing {
                        link.read_pending = false;
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    link.read_pending = false;
                    return Ok(());
                }
                // The transport caught the peer breaking its rules (RDMA
                // credits): a protocol error, not a lost link.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(End {
                        protocol_error: true,
                        ..End::clean(format!("receive failed: {e}"))
                    })
                }
                Err(e) => return Err(End::lost(format!("receive failed: {e}"))),
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
            protocol_error: true,
            ..End::clean(format!("{}: {reason}", code.name()))
        }
    }

    fn handle(&mut self, frame: Frame) -> Result<(), End> {
        let seq = frame.seq;
        if !self.state.is_ready() {
            let binding = self.link.as_ref().and_then(|l| l.conn.binding());
            let step = self.state.step(
                seq,
                frame.msg,
                &self.shared,
                self.id,
                &self.peer,
                binding.as_ref().map_or(&[][..], |b| &b[..]),
                &mut self.out,
            );
            return match step {
                Ok(Step::Continue) => Ok(()),
                Ok(Step::Ready { version, resume }) => {
                    self.devices.set_version(version);
                    if let Some(key) = resume {
                        self.make_resumable(key);
                    }
                    self.authenticated()
                }
                Ok(Step::Resume {
                    target,
                    client,
                    server,
                    received,
                    adopt,
                }) => Err(self.hand_over(target, client, server, received, adopt)),
                Err((code, why)) => Err(self.fatal(code, seq, why)),
            };
        }
        let answer: Result<Message, ReqError> = match frame.msg {
            Message::Ack { received } => {
                if self.resume.is_none() {
                    let why = "Ack in a session that is not resumable".to_string();
                    return Err(self.fatal(ErrorCode::STATE, seq, why));
                }
                if let Err(e) = self.out.ack(received) {
                    return Err(self.fatal(ErrorCode::STATE, seq, e.to_string()));
                }
                return Ok(());
            }
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
                devices: self
                    .shared
                    .usb
                    .list()
                    .into_iter()
                    .filter(|d| self.shared.allows(self.client.as_deref(), &d.busid))
                    .collect(),
            }),
            Message::UsbImport { busid, .. }
                if !self.shared.allows(self.client.as_deref(), &busid) =>
            {
                Err(not_yours(&busid))
            }
            Message::UsbImport {
                busid,
                direct: false,
            } => self.usb_import(&busid),
            Message::UsbImport {
                busid,
                direct: true,
            } => return self.usb_import_direct(seq, &busid),
            Message::Open { name } if !self.shared.allows(self.client.as_deref(), &name) => {
                Err(not_yours(&name))
            }
            Message::Open { .. } if self.usb.is_some() => Err((
                ErrorCode::STATE,
                "this session carries a USB device; open PCI devices in another session".into(),
            )),
            Message::Goodbye => return Err(End::clean("client said goodbye")),
            Message::Suspend => return self.suspend(seq),
            Message::Ping { payload } => Ok(Message::Pong { payload }),
            Message::ListDevices => Ok(Message::DeviceList {
                devices: self
                    .shared
                    .registry
                    .list()
                    .into_iter()
                    .filter(|d| self.shared.allows(self.client.as_deref(), &d.name))
                    .collect(),
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

    /// Registers the session for resumes and starts keeping what it sends
    /// until the client acknowledges it.
    fn make_resumable(&mut self, key: ResumeKey) {
        let (handover, handovers) = mpsc::channel();
        self.shared.table().insert(
            self.id,
            Resumable {
                key: Some(key.clone()),
                ticket: None,
                handover,
                waker: Arc::downgrade(&self._waker),
            },
        );
        self.out.retain();
        self.resume = Some(Resume {
            key,
            handovers,
            parked: None,
            unacked: (0, 0),
            parked_irqs: 0,
            suspended: None,
        });
    }

    /// `Suspend`: answers with a single-use ticket, then drops this
    /// connection and keeps the session parked for its adopter.
    fn suspend(&mut self, seq: u64) -> Result<(), End> {
        let Some(r) = &mut self.resume else {
            let why =
                "only a resumable session (protocol 2, a server grace period) can be handed off";
            let msg = Message::Error {
                code: ErrorCode::STATE,
                message: why.into(),
            };
            self.devices.reply(seq, &msg, &mut self.out);
            return Ok(());
        };
        let secret = auth::nonce().map_err(|e| End::clean(format!("no ticket secret: {e}")))?;
        let ttl = self.shared.limits.resume_grace;
        self.shared.set_resume(
            self.id,
            None,
            Some(Ticket {
                secret,
                expires: Instant::now() + ttl,
                used: false,
            }),
        );
        let reply = Message::Suspended {
            secret,
            ttl_ms: ttl.as_millis() as u64,
        };
        self.devices.reply(seq, &reply, &mut self.out);
        r.suspended = Some(self.out.next_seq() - 1);
        // The client reads the ticket before the link goes.
        if let Some(link) = &self.link {
            let _ = flush_blocking(&mut self.out, &link.conn, Duration::from_secs(2));
        }
        info!(session = %self.hex(), ttl = ?ttl, "suspended for a handoff");
        self.park("suspended for a handoff".into());
        Ok(())
    }

    /// This connection proved it may take session `target` over: it goes
    /// there, and this (empty) session ends.
    fn hand_over(
        &mut self,
        target: u64,
        client: [u8; NONCE_LEN],
        server: [u8; NONCE_LEN],
        received: u64,
        adopt: Option<[u8; NONCE_LEN]>,
    ) -> End {
        let mut link = self.link.take().expect("a linked session");
        if link.reader.has_partial() {
            self.link = Some(link);
            let why = "frames after Resume, before Resumed".to_string();
            return self.fatal(ErrorCode::STATE, 0, why);
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&link.conn.as_raw_fd()));
        // `Welcome` must be out before the session writes `Resumed`.
        let flushed = flush_blocking(&mut self.out, &link.conn, Duration::from_secs(1));
        if let Err(e) = flushed {
            return End::clean(format!("resuming session {target:#x}: {e}"));
        }
        link.read_pending = false;
        let h = Handover {
            conn: link.conn,
            peer: link.peer,
            client,
            server,
            received,
            adopt,
        };
        if self.shared.hand_over(target, h) {
            End::clean(format!("connection handed to session {target:#x}"))
        } else {
            End::clean(format!(
                "session {target:#x} ended before it could be resumed"
            ))
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.resume.take() {
            self.shared.table().remove(&self.id);
            if r.parked.is_some() {
                self.shared.counters.parked.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(export) = self.direct.take() {
            // Not a byte more from us on this socket, and no shutdown: the
            // kernel is using it.
            let conn = &self.link.as_ref().expect("a direct import's link").conn;
            usb::await_direct(&self.shared, self.id, conn, &mut self.poll, export);
            return;
        }
        self.devices.release_all(self.poll.registry());
        // Best effort: let the peer read why we ended.
        if let Some(link) = &self.link {
            let conn = &link.conn;
            if !self.out.is_empty() {
                let _ = flush_blocking(&mut self.out, conn, Duration::from_secs(1));
            }
            let _ = conn.shutdown();
        }
        // Closes the USB stream and restores the device's driver.
        self.usb = None;
    }
}
