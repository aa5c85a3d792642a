//! The connection a client's session runs on: requests and their replies
//! (read by the thread that waits for them), posted-write batching, and the
//! pump thread that delivers what arrives unasked (interrupts,
//! device-written DMA data, errors of posted writes) and flushes posted
//! writes.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cio_core::wire::{ErrorCode, Message, MAX_DMA_CHUNK};
use cio_core::{DeviceError, DmaRegion, EventFd};
use cio_transports::{sys, Conn, FrameReader, OutQueue};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::target::{lock, Target};
use super::{timed_out, ClientError, ClientOptions, Handshake};

/// Posted writes are sent at once when this many bytes are queued.
const FLUSH_THRESHOLD: usize = 64 * 1024;
/// A posted write this long after the previous one is sent at once.
const ISOLATED_NS: u64 = 20_000;
/// The pump sends queued writes once no write was added for this long.
const COALESCE: Duration = Duration::from_micros(20);
/// While callers read the socket themselves the pump stops watching it and
/// looks again this often.
const PUMP_RECHECK: Duration = Duration::from_micros(200);

#[derive(Debug)]
pub(crate) struct Rx {
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
    pub(crate) session: u64,
    pub(crate) features: u64,
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
    /// The state of a session whose handshake `hs` completed on `conn`.
    pub(crate) fn new(conn: Conn, hs: Handshake, opts: &ClientOptions) -> io::Result<Self> {
        Ok(Self {
            conn,
            session: hs.session,
            features: hs.features,
            reply_timeout: opts.reply_timeout,
            batch_writes: opts.batch_writes,
            tx: Mutex::new(hs.out),
            rx: Mutex::new(Rx {
                reader: FrameReader::from_decoder(hs.dec),
                replies: Vec::new(),
                posted_errors: Vec::new(),
                closed: None,
            }),
            pending: Mutex::new(Vec::new()),
            targets: Mutex::new(HashMap::new()),
            kick: EventFd::new(EFD_NONBLOCK)?,
            stop: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            readers: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_post: AtomicU64::new(0),
        })
    }

    /// Says goodbye, stops the pump (`pump` is its thread) and shuts the
    /// connection down.
    pub(crate) fn close(&self, pump: Option<JoinHandle<()>>) {
        {
            let mut out = lock(&self.tx);
            out.push(&Message::Goodbye, 0);
            let _ = self.write_out(&mut out);
        }
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.write(1);
        if let Some(t) = pump {
            let _ = t.join();
        }
        let _ = self.conn.shutdown();
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

    /// The pump thread's body.
    pub(crate) fn pump(self: Arc<Self>) {
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
