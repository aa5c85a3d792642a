//! The connection a client's session runs on: requests and their replies
//! (read by the thread that waits for them), posted-write batching, and the
//! pump thread that delivers what arrives unasked (interrupts,
//! device-written DMA data, errors of posted writes) and flushes posted
//! writes.
//!
//! A resumable session (protocol 2) outlives its connection: whoever finds
//! the link broken (a caller, a writer or the pump; or the pump when the
//! backend has sent nothing for four keepalive intervals) reconnects, proves
//! the session's resume key, and both sides replay exactly what the other
//! did not receive. Callers blocked in a read see their reply, not an
//! error; posted writes arrive once.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cio_core::wire::{ErrorCode, Message, MAX_DMA_CHUNK};
use cio_core::{DeviceError, DmaRegion, EventFd};
use cio_transports::{sys, Conn, Endpoint, FrameReader, OutQueue, ResumeKey};
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::target::{lock, Target};
use super::watch::Watch;
use super::{handshake, timed_out, ClientError, ClientOptions, Handshake};

/// Posted writes are sent at once when this many bytes are queued.
const FLUSH_THRESHOLD: usize = 64 * 1024;
/// A posted region write: which frame, and whether it may wait for others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Post {
    /// A register write, batched with the writes that follow it closely.
    Batched,
    /// A write that starts device work (from the hw profile): sent at once.
    Doorbell,
    /// A `RegionWriteBulk`, sent at once.
    Bulk,
}

/// A posted write this long after the previous one is sent at once.
const ISOLATED_NS: u64 = 20_000;
/// The pump sends queued writes once no write was added for this long.
const COALESCE: Duration = Duration::from_micros(20);
/// While a session moves to a new connection, or a connection a caller
/// reads says it is ready (hung up) to the pump as well, the pump looks
/// again this often.
const PUMP_RECHECK: Duration = Duration::from_micros(200);
/// Frames received since our last `Ack` above which the pump sends one.
const ACK_FRAMES: usize = 128;
/// Bytes received since our last `Ack` above which the pump sends one.
const ACK_BYTES: usize = 4 << 20;
/// Otherwise an `Ack` goes out once the backend has been quiet this long.
const ACK_DELAY: Duration = Duration::from_millis(10);
/// First pause between reconnection attempts; it doubles up to a second.
const RETRY_FIRST: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub(crate) struct Rx {
    reader: FrameReader,
    /// Replies read by another thread than the one waiting for them (few:
    /// a short list beats hashing on the request path).
    replies: Vec<(u64, Message)>,
    posted_errors: Vec<(u64, ErrorCode, String)>,
    closed: Option<String>,
}

/// What a resumable session needs to take itself to a new connection.
#[derive(Debug)]
struct Resumer {
    endpoint: Endpoint,
    key: ResumeKey,
    opts: ClientOptions,
    /// One recovery at a time.
    lock: Mutex<()>,
}

/// Connection state shared by the client, its devices and the pump.
#[derive(Debug)]
pub(crate) struct Inner {
    conn: RwLock<Arc<Conn>>,
    /// Bumped each time a new connection takes the session over, so that a
    /// failure seen on an old connection is recovered once.
    generation: AtomicU64,
    pub(crate) session: u64,
    pub(crate) features: u64,
    reply_timeout: Duration,
    /// `ClientOptions::poll`.
    poll: Duration,
    batch_writes: bool,
    keepalive: Duration,
    /// The backend speaks protocol 2: ping it when idle, give up on it when
    /// it is silent.
    watched: bool,
    tx: Mutex<OutQueue>,
    rx: Mutex<Rx>,
    /// Requests sent and not yet answered (usually one).
    pending: Mutex<Vec<u64>>,
    pub(crate) targets: Mutex<HashMap<u32, Arc<Target>>>,
    kick: EventFd,
    stop: EventFd,
    stopping: AtomicBool,
    /// `close` ran.
    closed: AtomicBool,
    /// What the pump sleeps on; counts the callers reading replies from
    /// the socket right now.
    watch: Watch,
    clock: Instant,
    last_post: AtomicU64,
    resume: Option<Resumer>,
    recovering: AtomicBool,
    /// A `Suspend` is on its way: the link's end is expected, not a loss.
    pub(crate) suspending: AtomicBool,
    /// The session went to another frontend: say no Goodbye.
    pub(crate) handed_off: AtomicBool,
    /// Last frame received, and frames and bytes since our last `Ack`.
    received: AtomicU64,
    unacked: AtomicUsize,
    unacked_bytes: AtomicUsize,
    /// Newest `Ack` from the backend, applied to `tx` when it is next locked.
    peer_acked: AtomicU64,
    /// When (ns on `clock`) something last arrived, and was last sent.
    last_rx: AtomicU64,
    last_tx: AtomicU64,
}

impl Inner {
    /// The state of a session whose handshake `hs` completed on `conn`.
    /// With `endpoint` and a resume key from the handshake, the session
    /// resumes on a new connection when this one breaks.
    pub(crate) fn new(
        conn: Conn,
        hs: Handshake,
        opts: &ClientOptions,
        endpoint: Option<Endpoint>,
    ) -> io::Result<Self> {
        let resume = match (endpoint, hs.resume) {
            (Some(endpoint), Some(key)) => Some(Resumer {
                endpoint,
                key,
                opts: opts.clone(),
                lock: Mutex::new(()),
            }),
            _ => None,
        };
        let (kick, stop) = (EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?);
        Ok(Self {
            conn: RwLock::new(Arc::new(conn)),
            generation: AtomicU64::new(0),
            session: hs.session,
            features: hs.features,
            reply_timeout: opts.reply_timeout,
            poll: opts.poll,
            batch_writes: opts.batch_writes,
            keepalive: opts.keepalive,
            watched: hs.version >= 2,
            tx: Mutex::new(hs.out),
            rx: Mutex::new(Rx {
                reader: FrameReader::from_decoder(hs.dec),
                replies: Vec::new(),
                posted_errors: Vec::new(),
                closed: None,
            }),
            pending: Mutex::new(Vec::new()),
            targets: Mutex::new(HashMap::new()),
            watch: Watch::new(&stop, &kick)?,
            kick,
            stop,
            stopping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            clock: Instant::now(),
            last_post: AtomicU64::new(0),
            resume,
            recovering: AtomicBool::new(false),
            suspending: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            received: AtomicU64::new(0),
            unacked: AtomicUsize::new(0),
            unacked_bytes: AtomicUsize::new(0),
            peer_acked: AtomicU64::new(0),
            last_rx: AtomicU64::new(0),
            last_tx: AtomicU64::new(0),
        })
    }

    /// True if the session resumes on a new connection when its link breaks.
    pub(crate) fn resumable(&self) -> bool {
        self.resume.is_some()
    }

    /// Where the session reconnects to (resumable sessions).
    pub(crate) fn endpoint(&self) -> Option<&Endpoint> {
        self.resume.as_ref().map(|r| &r.endpoint)
    }

    /// The last frame received from the backend.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Starts the session's numbering of received frames at `seq` (an
    /// adopter, whose first frame is `seq + 1`).
    pub(crate) fn set_received(&self, seq: u64) {
        self.received.store(seq, Ordering::Relaxed);
    }

    /// The current connection and its generation.
    fn conn(&self) -> (Arc<Conn>, u64) {
        let c = self.conn.read().unwrap_or_else(|e| e.into_inner());
        (Arc::clone(&c), self.generation.load(Ordering::Acquire))
    }

    fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn since(&self, stamp: &AtomicU64) -> Duration {
        Duration::from_nanos(self.now_ns().saturating_sub(stamp.load(Ordering::Relaxed)))
    }

    /// Says goodbye, stops the pump (`pump` is its thread) and shuts the
    /// connection down; only the first call does anything.
    pub(crate) fn close(&self, pump: Option<JoinHandle<()>>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // First, so that the backend closing the link after our Goodbye is
        // not taken for a lost link.
        self.stopping.store(true, Ordering::Relaxed);
        if !self.handed_off.load(Ordering::Relaxed) {
            let mut out = lock(&self.tx);
            out.push(&Message::Goodbye, 0);
            let _ = self.write_out(&mut out);
        }
        let _ = self.stop.write(1);
        if let Some(t) = pump {
            let _ = t.join();
        }
        let _ = self.conn().0.shutdown();
    }

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
        if self.handed_off.load(Ordering::Relaxed) {
            return Err(ClientError::Disconnected(
                "the session was handed off to another frontend".into(),
            ));
        }
        if self.stopping.load(Ordering::Relaxed) {
            return Err(ClientError::Disconnected("client is closing".into()));
        }
        Ok(())
    }

    /// After a `Suspended` reply: this client lets the session go.
    pub(crate) fn hand_off(&self) {
        self.handed_off.store(true, Ordering::Relaxed);
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.write(1);
        let _ = self.conn().0.shutdown();
    }

    /// Sends the queue on the current connection (first forgetting what
    /// the backend acknowledged); the error says why the link failed.
    fn write_out(&self, out: &mut OutQueue) -> Result<(), String> {
        let acked = self.peer_acked.load(Ordering::Relaxed);
        if acked > 0 {
            if let Err(e) = out.ack(acked) {
                warn!("ignoring the backend's acknowledgement: {e}");
            }
        }
        let (conn, _) = self.conn();
        self.last_tx.store(self.now_ns(), Ordering::Relaxed);
        out.write_to(&conn, Some(self.reply_timeout))
            .map(|_| ())
            .map_err(|e| format!("sending: {e}"))
    }

    /// The link of `generation` failed: a resumable session moves to a new
    /// connection (or is already on one); any other is lost.
    fn link_failed(&self, generation: u64, why: String) -> Result<(), ClientError> {
        if self.resume.is_none()
            || self.stopping.load(Ordering::Relaxed)
            || self.suspending.load(Ordering::Relaxed)
        {
            lock(&self.rx).closed.get_or_insert_with(|| why.clone());
            return Err(ClientError::Disconnected(why));
        }
        self.recover(generation, why)
    }

    /// Takes the session to a new connection: reconnects with backoff for
    /// up to `resume_timeout`, resumes, and replays what the backend did
    /// not receive. Nothing else reads or writes meanwhile.
    fn recover(&self, generation: u64, why: String) -> Result<(), ClientError> {
        let r = self
            .resume
            .as_ref()
            .expect("only resumable sessions recover");
        let _one = lock(&r.lock);
        if self.generation.load(Ordering::Acquire) != generation {
            return Ok(()); // another thread did it
        }
        self.recovering.store(true, Ordering::Release);
        // Wake whoever is blocked on the old connection.
        let _ = self.conn().0.shutdown();
        let mut tx = lock(&self.tx);
        let mut rx = lock(&self.rx);
        let result = self.reconnect(r, &mut tx, &mut rx, &why);
        if let Err(e) = &result {
            rx.closed = Some(e.to_string());
        }
        drop(rx);
        if result.is_ok() {
            if let Err(e) = self.write_out(&mut tx) {
                debug!("replay after resume: {e}"); // the next operation recovers again
            }
        }
        drop(tx);
        self.recovering.store(false, Ordering::Release);
        let _ = self.kick.write(1);
        result
    }

    fn reconnect(
        &self,
        r: &Resumer,
        tx: &mut OutQueue,
        rx: &mut Rx,
        why: &str,
    ) -> Result<(), ClientError> {
        if let Some(closed) = &rx.closed {
            return Err(ClientError::Disconnected(closed.clone()));
        }
        let session = self.session;
        let received = rx.reader.received();
        warn!(
            session = format_args!("{session:#x}"),
            "link lost ({why}); resuming"
        );
        let start = Instant::now();
        let mut delay = RETRY_FIRST;
        let mut attempts = 0;
        let (conn, dec, theirs) = loop {
            attempts += 1;
            let attempt = super::dial(&r.endpoint, &r.opts).and_then(|c| {
                handshake::resume(&c, &r.opts, session, &r.key, received)
                    .map(|(dec, theirs)| (c, dec, theirs))
            });
            match attempt {
                Ok(done) => break done,
                Err(e)
                    if !e.should_reconnect() || start.elapsed() + delay > r.opts.resume_timeout =>
                {
                    return Err(ClientError::Disconnected(format!(
                        "link lost ({why}); resuming session {session:#x} failed after {attempts} attempt(s) in {:?}: {e}",
                        start.elapsed()
                    )));
                }
                Err(e) => {
                    debug!("resume attempt {attempts}: {e}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        };
        tx.rewind(theirs)
            .map_err(|e| ClientError::Protocol(format!("resume point: {e}")))?;
        rx.reader = FrameReader::from_decoder(dec);
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(conn);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.last_rx.store(self.now_ns(), Ordering::Relaxed);
        self.unacked.store(0, Ordering::Relaxed);
        self.unacked_bytes.store(0, Ordering::Relaxed);
        info!(
            session = format_args!("{session:#x}"),
            attempts,
            took = ?start.elapsed(),
            replay_bytes = tx.len(),
            "session resumed on a new connection"
        );
        Ok(())
    }

    /// Queues a posted region write (after the device's dirty target
    /// pages). It leaves at once when a doorbell or a bulk write, when it follows
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
        kind: Post,
    ) -> Result<(), ClientError> {
        self.check_open()?;
        let now = self.now_ns();
        let isolated =
            now.saturating_sub(self.last_post.swap(now, Ordering::Relaxed)) > ISOLATED_NS;
        let generation = self.generation.load(Ordering::Acquire);
        let sent = {
            let mut out = lock(&self.tx);
            let was_empty = out.is_empty();
            Self::push_dirty(&mut out, handle, target, None);
            out.push_region_write(handle, region, offset, data, kind == Post::Bulk);
            let now = !self.batch_writes
                || kind != Post::Batched
                || out.len() >= FLUSH_THRESHOLD
                || (was_empty && isolated);
            if !now && was_empty {
                let _ = self.kick.write(1);
            }
            if now {
                self.write_out(&mut out)
            } else {
                Ok(())
            }
        };
        // Queued either way: a resumed session replays it.
        sent.or_else(|why| self.link_failed(generation, why))
    }

    /// Sends a posted frame now (after the posted frames queued before it):
    /// no answer unless it fails, then reported by a later call.
    pub(crate) fn post(&self, msg: &Message) -> Result<(), ClientError> {
        self.check_open()?;
        // Queued either way: a resumed session replays it.
        self.send_now(|out| {
            out.push(msg, 0);
        })
    }

    /// Queues what `queue` adds after the frames already queued and sends
    /// the queue now; a link that fails meanwhile is recovered (or the
    /// session is lost) as for any send.
    fn send_now(&self, queue: impl FnOnce(&mut OutQueue)) -> Result<(), ClientError> {
        let generation = self.generation.load(Ordering::Acquire);
        let sent = {
            let mut out = lock(&self.tx);
            queue(&mut out);
            self.write_out(&mut out)
        };
        sent.or_else(|why| self.link_failed(generation, why))
    }

    /// Sends the device's dirty target pages in `range` now.
    pub(crate) fn sync_for_device(
        &self,
        handle: u32,
        target: &Target,
        range: (u64, u64),
    ) -> Result<(), ClientError> {
        self.check_open()?;
        self.send_now(|out| Self::push_dirty(out, handle, target, Some(range)))
    }

    /// Sends a request (after all queued posted frames and, with `sync`, the
    /// device's dirty target pages) and waits for its reply.
    pub(crate) fn call(
        &self,
        sync: Option<(u32, &Target)>,
        msg: &Message,
    ) -> Result<Message, ClientError> {
        let mut replies = self.call_all(sync, std::slice::from_ref(msg))?;
        Ok(replies.pop().expect("one reply per request"))
    }

    /// Sends requests back to back, as [`call`](Self::call) sends one, and
    /// waits for their replies (the backend answers in order): the
    /// requests' round trips overlap. The first error ends the wait.
    pub(crate) fn call_all(
        &self,
        sync: Option<(u32, &Target)>,
        msgs: &[Message],
    ) -> Result<Vec<Message>, ClientError> {
        self.check_open()?;
        // Muted before the request leaves, so that even a quick reply
        // wakes only this thread.
        let _reading = self.watch.reading();
        let generation = self.generation.load(Ordering::Acquire);
        let (seqs, sent) = {
            let mut out = lock(&self.tx);
            if let Some((handle, target)) = sync {
                Self::push_dirty(&mut out, handle, target, None);
            }
            let mut seqs = Vec::with_capacity(msgs.len());
            for msg in msgs {
                let seq = out.next_seq();
                lock(&self.pending).push(seq);
                out.push(msg, 0);
                seqs.push(seq);
            }
            (seqs, self.write_out(&mut out))
        };
        let forget = || lock(&self.pending).retain(|s| !seqs.contains(s));
        if let Err(why) = sent {
            if let Err(e) = self.link_failed(generation, why) {
                forget();
                return Err(e);
            }
        }
        let mut replies = Vec::with_capacity(seqs.len());
        for &seq in &seqs {
            let reply = self.read_until_reply(seq);
            lock(&self.pending).retain(|s| *s != seq);
            match reply {
                Ok(Message::Error { code, message }) => {
                    forget();
                    return Err(ClientError::Server { code, message });
                }
                Ok(other) => replies.push(other),
                Err(e) => {
                    forget();
                    return Err(e);
                }
            }
        }
        Ok(replies)
    }

    /// Reads until the reply to `seq` is there. Posted frames sent before
    /// the request that failed are reported instead (they were answered
    /// first, since the backend handles frames in order).
    fn read_until_reply(&self, seq: u64) -> Result<Message, ClientError> {
        let spin_until = Instant::now() + self.poll;
        loop {
            let mut rx = lock(&self.rx);
            let (broken, generation) = loop {
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
                let (conn, generation) = self.conn();
                let resolve = |h, iova, len| self.resolve(h, iova, len);
                // Polling mode: receive without waiting until it is over.
                let spinning = !self.poll.is_zero() && Instant::now() < spin_until;
                let wait = (!spinning).then_some(self.reply_timeout);
                match rx.reader.recv(&conn, wait, &resolve) {
                    Err(e) if spinning && e.kind() == io::ErrorKind::WouldBlock => {
                        std::hint::spin_loop()
                    }
                    Ok(got) if got.bytes == 0 => {
                        break ("backend closed the connection".to_string(), generation)
                    }
                    Ok(got) => {
                        self.note_rx(got.bytes);
                        self.dispatch(&mut rx)?
                    }
                    Err(e) if timed_out(&e) => {
                        return Err(ClientError::Timeout(self.reply_timeout))
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break (format!("receiving: {e}"), generation),
                }
            };
            drop(rx);
            self.link_failed(generation, broken)?;
        }
    }

    /// Waits for `fd` to count an interrupt, for at most `timeout`, and
    /// takes its count (0: the time ran out); see `Device::wait_irq`. This
    /// thread reads the connection meanwhile, the pump muted as for a
    /// caller waiting for its reply, so an interrupt's frame wakes only
    /// this thread. While a caller reads for its reply, that caller
    /// dispatches what arrives (this interrupt too, which `fd` then shows).
    pub(crate) fn wait_irq(&self, fd: &EventFd, timeout: Duration) -> Result<u64, ClientError> {
        self.check_open()?;
        let _reading = self.watch.reading();
        let deadline = Instant::now() + timeout;
        // Queued posted writes leave now: the device may be waiting for
        // them to raise the interrupt.
        if !lock(&self.tx).is_empty() {
            self.send_now(|_| {})?;
        }
        // Polling mode: look without sleeping until it is over.
        let spin_until = Instant::now() + self.poll;
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            let (conn, generation) = self.conn();
            let spinning = !self.poll.is_zero() && now < spin_until;
            let ready = if conn.buffered() {
                // Decrypted bytes inside a TLS connection: the socket may
                // have nothing more to say about them.
                vec![false, true]
            } else {
                let wait = if spinning { Duration::ZERO } else { left };
                sys::poll_readable(&[fd, &*conn], Some(wait))
                    .map_err(|e| DeviceError::Failed(format!("waiting for an interrupt: {e}")))?
            };
            if ready[0] {
                match fd.read() {
                    Ok(n) => return Ok(n),
                    // Another reader took the count first.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return Err(DeviceError::Failed(format!("reading an eventfd: {e}")).into())
                    }
                }
            } else if ready[1] {
                let rx = lock(&self.rx);
                match self.pump_read(rx, &conn) {
                    Ok(true) => {}
                    Ok(false) => {
                        let why = lock(&self.rx).closed.clone();
                        return Err(ClientError::Disconnected(
                            why.unwrap_or_else(|| "the session ended".into()),
                        ));
                    }
                    Err(why) => self.link_failed(generation, why)?,
                }
            } else if left.is_zero() {
                return Ok(0);
            } else if spinning {
                std::hint::spin_loop();
            }
        }
    }

    fn note_rx(&self, bytes: usize) {
        self.last_rx.store(self.now_ns(), Ordering::Relaxed);
        if self.resume.is_some() {
            let n = self.unacked_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
            if n >= ACK_BYTES {
                let _ = self.kick.write(1);
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
                    let _ = self.conn().0.shutdown();
                    return Err(ClientError::Protocol(why));
                }
            };
            self.received.store(frame.seq, Ordering::Relaxed);
            if !matches!(frame.msg, Message::Ack { .. }) && self.resume.is_some() {
                let n = self.unacked.fetch_add(1, Ordering::Relaxed) + 1;
                if n == ACK_FRAMES {
                    let _ = self.kick.write(1);
                }
            }
            match frame.msg {
                Message::Ack { received } => {
                    self.peer_acked.fetch_max(received, Ordering::Relaxed);
                }
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

    /// Reads whatever is there without blocking (pump side). `Ok(false)`:
    /// the session is over; `Err`: the link failed.
    fn pump_read(&self, mut rx: MutexGuard<'_, Rx>, conn: &Conn) -> Result<bool, String> {
        loop {
            if rx.closed.is_some() {
                return Ok(false);
            }
            let resolve = |h, iova, len| self.resolve(h, iova, len);
            match rx.reader.recv(conn, None, &resolve) {
                Ok(got) if got.bytes == 0 => return Err("backend closed the connection".into()),
                Ok(got) => {
                    self.note_rx(got.bytes);
                    if self.dispatch(&mut rx).is_err() {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("receiving: {e}")),
            }
        }
    }

    /// Sends queued posted writes once the writer has stopped adding to
    /// them for a moment: a burst leaves in few large batches (the writer
    /// itself sends every 64 KiB), its tail shortly after it ends.
    fn flush_when_quiet(&self) -> Result<(), ClientError> {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let before = lock(&self.tx).len();
            if before == 0 {
                return Ok(());
            }
            std::thread::sleep(COALESCE);
            let sent = {
                let mut out = lock(&self.tx);
                if out.len() != before {
                    continue;
                }
                self.write_out(&mut out)
            };
            return sent.or_else(|why| self.link_failed(generation, why));
        }
    }

    /// What a protocol-2 session's pump does when it wakes: acknowledge
    /// what arrived (resumable sessions), ping an idle link, and give up on
    /// a silent one.
    fn tend_link(&self) -> Result<(), ClientError> {
        if !self.watched || self.recovering.load(Ordering::Acquire) {
            return Ok(());
        }
        let generation = self.generation.load(Ordering::Acquire);
        let silent = self.since(&self.last_rx);
        if silent >= 4 * self.keepalive {
            let why = format!("no frame from the backend for {silent:?}");
            return self.link_failed(generation, why);
        }
        let unacked = self.unacked.load(Ordering::Relaxed);
        let ack = self.resume.is_some()
            && (unacked >= ACK_FRAMES
                || self.unacked_bytes.load(Ordering::Relaxed) >= ACK_BYTES
                || (unacked > 0 && silent >= ACK_DELAY));
        let ping = self.since(&self.last_tx) >= self.keepalive;
        if !ack && !ping {
            return Ok(());
        }
        let sent = {
            let mut out = lock(&self.tx);
            if ack {
                self.unacked.store(0, Ordering::Relaxed);
                self.unacked_bytes.store(0, Ordering::Relaxed);
                let received = self.received.load(Ordering::Relaxed);
                out.push(&Message::Ack { received }, 0);
            }
            if ping {
                // Answered with a Pong nobody waits for: it only shows the
                // link is alive, both ways.
                out.push(
                    &Message::Ping {
                        payload: Bytes::new(),
                    },
                    0,
                );
            }
            self.write_out(&mut out)
        };
        sent.or_else(|why| self.link_failed(generation, why))
    }

    /// How long the pump may sleep before `tend_link` has work.
    fn pump_timeout(&self) -> Option<Duration> {
        if !self.watched {
            return None;
        }
        let mut t = self.keepalive.saturating_sub(self.since(&self.last_tx));
        t = t.min((4 * self.keepalive).saturating_sub(self.since(&self.last_rx)));
        if self.unacked.load(Ordering::Relaxed) > 0 {
            t = t.min(ACK_DELAY.saturating_sub(self.since(&self.last_rx)));
        }
        Some(t + Duration::from_millis(1))
    }

    /// The pump thread's body.
    pub(crate) fn pump(self: Arc<Self>) {
        self.last_rx.store(self.now_ns(), Ordering::Relaxed);
        loop {
            // A caller waiting for its reply reads and dispatches everything
            // itself; watching the socket meanwhile would only wake this
            // thread for each reply and make it fight the caller for the
            // lock. Nor while the session moves to a new connection.
            // (The caller mutes the connection in `watch`.)
            let recovering = self.recovering.load(Ordering::Acquire);
            let timeout = self.pump_timeout();
            let (conn, generation) = self.conn();
            let recheck = timeout.map_or(PUMP_RECHECK, |t| t.min(PUMP_RECHECK));
            let polled = if recovering {
                sys::poll_readable(&[&self.stop, &self.kick], Some(recheck))
            } else if self.watch.readers() == 0 && conn.buffered() {
                // Decrypted bytes wait inside a TLS connection: the socket
                // may have nothing more to say about them.
                Ok(vec![false, false, true])
            } else {
                self.watch
                    .wait(&conn, generation, timeout)
                    .map(|r| r.to_vec())
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
                if let Err(e) = self.flush_when_quiet() {
                    debug!("event pump: {e}");
                    return;
                }
            }
            if ready.get(2) == Some(&true) {
                if self.watch.readers() > 0 {
                    // A hang-up the caller reading it will see: not ours
                    // to read, and still ready at the next wait.
                    let _ = sys::poll_readable(&[&self.stop, &self.kick], Some(recheck));
                } else if let Ok(rx) = self.rx.try_lock() {
                    match self.pump_read(rx, &conn) {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(why) => {
                            if let Err(e) = self.link_failed(generation, why) {
                                debug!("event pump: {e}");
                                return;
                            }
                        }
                    }
                }
            }
            if let Err(e) = self.tend_link() {
                debug!("event pump: {e}");
                return;
            }
        }
    }
}
