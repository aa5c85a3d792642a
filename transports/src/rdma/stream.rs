//! One RDMA connection used as a byte stream: what `write` takes is copied
//! into registered send buffers and leaves as SEND messages (one per
//! buffer); what arrives waits in the receive buffers until it is read.
//! Each message carries returned credits in its immediate value
//! ([`Credits`]).
//!
//! Pollers see one fd, an epoll set holding the completion channel and
//! the connection manager's events; it is readable whenever something
//! happened (data, credits, a finished send, the peer leaving). A thread
//! that must wait inside the stream either polls that fd itself (one at a
//! time: `polling`) or sleeps on a condition variable the poller and every
//! other thread that makes progress notify, so no wake-up is lost between
//! threads that share the stream.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, PollCompletionQueueError, WorkCompletionStatus,
};
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::rdmacm::communication_manager::{
    EventChannel, EventType, GetEventErrorKind, Identifier,
};

use super::credits::Credits;
use super::sys::{self, Slots};
use super::{SEND_SLOTS, WINDOW};
use crate::mode::Mode;

/// Work request ids: receive slots are their index; sends are tagged.
const SEND_TAG: u64 = 1 << 32;
const CREDIT_TAG: u64 = 2 << 32;

/// Where the connection manager reports the peer leaving.
pub(crate) enum CmEvents {
    /// A connecting side's own event channel.
    Own(Arc<EventChannel>),
    /// An accepted connection: its events arrive on the listener's channel,
    /// which sets this flag and signals the eventfd.
    Notice(Arc<Notice>),
}

/// How a listener tells an accepted connection that its peer left.
#[derive(Debug)]
pub(crate) struct Notice {
    pub(crate) gone: AtomicBool,
    pub(crate) fd: vmm_sys_util::eventfd::EventFd,
}

impl Notice {
    pub(crate) fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            gone: AtomicBool::new(false),
            fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        }))
    }

    /// The peer disconnected (called by the listener).
    pub(crate) fn peer_left(&self) {
        self.gone.store(true, Ordering::Release);
        let _ = self.fd.write(1);
    }
}

/// The verbs resources of one connection. Field order is drop order: the
/// QP goes before its CQ and the buffers it points into.
pub(crate) struct Verbs {
    pub(crate) qp: BasicQueuePair,
    pub(crate) cq: Arc<BasicCompletionQueue>,
    pub(crate) recv: Slots,
    pub(crate) send: Slots,
    pub(crate) chan: Arc<CompletionChannel>,
}

struct State {
    v: Verbs,
    credits: Credits,
    /// Received payloads not yet read: (slot, read up to, length).
    filled: VecDeque<(usize, usize, usize)>,
    free_send: Vec<usize>,
    /// Credit-only messages posted and not yet completed.
    credit_msgs: usize,
    armed: bool,
    /// A thread is waiting in poll(2) on the stream's fd.
    polling: bool,
    /// The peer left (disconnect) or this side shut down: the QP was moved
    /// to the error state, flushing what was posted.
    closed: bool,
    /// Why the connection failed, for every later call: the link
    /// (`ConnectionReset`) or the peer breaking the rules (`InvalidData`).
    failed: Option<(io::ErrorKind, String)>,
}

/// An RDMA connection; see the module documentation.
pub struct RdmaStream {
    state: Mutex<State>,
    changed: Condvar,
    set: crate::sys::Epoll,
    cm: CmEvents,
    id: Arc<Identifier>,
    peer: String,
    mode: Mode,
}

impl std::fmt::Debug for RdmaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaStream")
            .field("peer", &self.peer)
            .finish()
    }
}

fn broken((kind, why): &(io::ErrorKind, String)) -> io::Error {
    io::Error::new(*kind, why.clone())
}

impl RdmaStream {
    /// A connected stream over `v`, whose receive buffers are all posted
    /// and whose QP is ready to send.
    pub(crate) fn new(
        v: Verbs,
        id: Arc<Identifier>,
        cm: CmEvents,
        peer: String,
    ) -> io::Result<Self> {
        v.chan.set_nonblocking(true)?;
        let set = crate::sys::Epoll::new()?;
        set.add(v.chan.as_raw_fd(), 0, true)?;
        match &cm {
            CmEvents::Own(ch) => {
                ch.set_nonblocking(true)?;
                set.add(ch.as_raw_fd(), 0, true)?;
            }
            CmEvents::Notice(n) => set.add(n.fd.as_raw_fd(), 0, true)?,
        }
        sys::arm(&v.cq)?;
        Ok(Self {
            state: Mutex::new(State {
                v,
                credits: Credits::new(WINDOW as u32),
                filled: VecDeque::new(),
                free_send: (0..SEND_SLOTS).rev().collect(),
                credit_msgs: 0,
                armed: true,
                polling: false,
                closed: false,
                failed: None,
            }),
            changed: Condvar::new(),
            set,
            cm,
            id,
            peer,
            mode: Mode::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer, for logs (`rdma:ADDR`).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Its blocking mode and timeouts.
    pub(crate) fn mode(&self) -> &Mode {
        &self.mode
    }

    /// True if received bytes wait to be read (pollers read before they
    /// poll).
    pub(crate) fn buffered(&self) -> bool {
        !self.lock().filled.is_empty()
    }

    /// Takes what the completion channel and the connection manager
    /// report, and every completion. Events are taken only by the thread
    /// that polled for them, or when no thread polls (see the module
    /// documentation). True if anything changed.
    fn progress(&self, st: &mut State, take_events: bool) -> bool {
        let mut changed = false;
        if take_events {
            let took = match sys::take_cq_event(&st.v.chan) {
                Ok(took) => took,
                Err(e) => {
                    self.fail(st, format!("completion channel: {e}"));
                    false
                }
            };
            if took {
                st.armed = false;
            }
            // The manager's channel is read only when the wake-up was not
            // the completion channel's: if it was both, the next wait
            // returns at once and reads it then.
            if self.peer_left(!took) && !st.closed {
                self.close_qp(st);
                changed = true;
            }
        }
        if !st.armed && st.failed.is_none() {
            match sys::arm(&st.v.cq) {
                Ok(()) => st.armed = true,
                Err(e) => self.fail(st, format!("arming the completion queue: {e}")),
            }
        }
        loop {
            let mut done = Vec::new();
            match st.v.cq.start_poll() {
                Ok(poller) => {
                    for wc in poller {
                        done.push((wc.wr_id(), wc.status(), wc.byte_len(), wc.imm_data()));
                    }
                }
                Err(PollCompletionQueueError::CompletionQueueEmpty) => break,
                Err(e) => {
                    self.fail(st, format!("polling the completion queue: {e}"));
                    break;
                }
            }
            for (wr_id, status, len, imm) in done {
                changed = true;
                self.complete(st, wr_id, status, len as usize, u32::from_be(imm));
            }
        }
        self.return_credits(st);
        changed
    }

    /// [`progress`](Self::progress) for a thread that is not the poller,
    /// telling waiters when something changed. `full` also takes the
    /// channels' events (if no thread polls): a call that can be answered
    /// from the completions alone makes no system call, and one that would
    /// wait or come back short does it first (so that a caller that sleeps
    /// on the fd after a short read is woken by the next completion).
    fn advance(&self, st: &mut State, full: bool) {
        let take = full && !st.polling;
        if self.progress(st, take) {
            self.changed.notify_all();
        }
    }

    /// Whether the connection manager says the peer left; on a connecting
    /// side, with `read_channel`, reads its events first.
    fn peer_left(&self, read_channel: bool) -> bool {
        match &self.cm {
            CmEvents::Notice(n) => {
                // The listener sets the flag before it signals the eventfd,
                // which is read only to make it quiet again.
                let gone = n.gone.load(Ordering::Acquire);
                if gone {
                    let _ = n.fd.read();
                }
                gone
            }
            CmEvents::Own(_) if !read_channel => false,
            CmEvents::Own(ch) => {
                let mut gone = false;
                loop {
                    match ch.get_cm_event() {
                        Ok(ev) => {
                            gone |= matches!(
                                ev.event_type(),
                                EventType::Disconnected | EventType::DeviceRemoval
                            );
                            let _ = ev.ack();
                        }
                        Err(e) if matches!(e.0, GetEventErrorKind::NoEvent) => break,
                        Err(_) => {
                            gone = true;
                            break;
                        }
                    }
                }
                gone
            }
        }
    }

    fn complete(&self, st: &mut State, wr_id: u64, status: u32, len: usize, imm: u32) {
        let ok = status == WorkCompletionStatus::Success as u32;
        if !ok {
            if !st.closed {
                let what = if wr_id >= SEND_TAG { "send" } else { "receive" };
                // Decoded only for the message: an unknown status panics
                // in sideway's conversion.
                let why = if status <= WorkCompletionStatus::GeneralError as u32 {
                    format!("{:?}", WorkCompletionStatus::from(status))
                } else {
                    format!("status {status}")
                };
                self.fail(
                    st,
                    format!(
                        "an RDMA {what} failed ({why}): the link to {} is lost",
                        self.peer
                    ),
                );
            }
            return;
        }
        match wr_id & !(SEND_TAG - 1) {
            CREDIT_TAG => st.credit_msgs -= 1,
            SEND_TAG => st.free_send.push((wr_id & (SEND_TAG - 1)) as usize),
            _ => {
                let slot = wr_id as usize;
                if let Err(v) = st.credits.received(imm, len > 0) {
                    let why = format!("{v}: ending the connection with {}", self.peer);
                    self.fail_with(st, io::ErrorKind::InvalidData, why);
                    return;
                }
                if len == 0 {
                    // A credit-only message: its buffer goes straight back.
                    self.repost(st, slot);
                } else {
                    st.filled.push_back((slot, 0, len.min(st.v.recv.size())));
                }
            }
        }
    }

    fn repost(&self, st: &mut State, slot: usize) {
        if st.closed || st.failed.is_some() {
            return;
        }
        if let Err(e) = sys::post_recv(&mut st.v.qp, &st.v.recv, slot, slot as u64) {
            self.fail(st, e.to_string());
        }
    }

    /// Sends returned credits in a message of their own when they are due.
    fn return_credits(&self, st: &mut State) {
        if !st.credits.update_due() || st.closed || st.failed.is_some() {
            return;
        }
        if st.credit_msgs >= SEND_SLOTS {
            return; // the next completion retries
        }
        let n = st.credits.take_unreturned();
        match sys::post_send(&mut st.v.qp, CREDIT_TAG, n, None) {
            Ok(()) => st.credit_msgs += 1,
            Err(e) => self.fail(st, e.to_string()),
        }
    }

    fn fail(&self, st: &mut State, why: String) {
        self.fail_with(st, io::ErrorKind::ConnectionReset, why);
    }

    fn fail_with(&self, st: &mut State, kind: io::ErrorKind, why: String) {
        if st.failed.is_none() {
            st.failed = Some((kind, why));
            if !st.closed {
                self.close_qp(st);
            }
        }
    }

    /// Moves the QP to the error state: every posted request completes
    /// (flushed), nothing more is sent or received.
    fn close_qp(&self, st: &mut State) {
        st.closed = true;
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Error);
        let _ = st.v.qp.modify(&a);
    }

    /// Waits until something may have changed: polls the fd if no other
    /// thread does, else sleeps until one that made progress says so.
    /// `WouldBlock` once `deadline` passes, as a socket timeout does.
    fn wait<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> io::Result<MutexGuard<'a, State>> {
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(l) if !l.is_zero() => Some(l),
                _ => return Err(io::ErrorKind::WouldBlock.into()),
            },
            None => None,
        };
        if st.polling {
            let t = left.unwrap_or(Duration::from_secs(3600));
            let (g, _) = self
                .changed
                .wait_timeout(st, t)
                .unwrap_or_else(|e| e.into_inner());
            return Ok(g);
        }
        st.polling = true;
        drop(st);
        let polled = crate::sys::poll_readable(&[&self.set.as_fd()], left);
        let mut st = self.lock();
        st.polling = false;
        // Another thread may take the poller's place.
        self.changed.notify_all();
        polled?;
        if self.progress(&mut st, true) {
            self.changed.notify_all();
        }
        Ok(st)
    }

    /// Receives into `buf`; with `nonblocking` (or in non-blocking mode),
    /// `WouldBlock` instead of waiting. `Ok(0)` is end of stream.
    pub(crate) fn recv_slice(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        self.recv_with(buf.len(), nonblocking, &mut |src, at| {
            buf[at..at + src.len()].copy_from_slice(src)
        })
    }

    /// Receives up to `want` bytes appended to `buf`.
    pub(crate) fn recv_into(
        &self,
        buf: &mut bytes::BytesMut,
        want: usize,
        nonblocking: bool,
    ) -> io::Result<usize> {
        self.recv_with(want.max(1), nonblocking, &mut |src, _| {
            buf.extend_from_slice(src)
        })
    }

    fn recv_with(
        &self,
        max: usize,
        nonblocking: bool,
        put: &mut dyn FnMut(&[u8], usize),
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let nonblocking = self.mode.nonblocking(nonblocking);
        let deadline = self.mode.deadline(false);
        let mut st = self.lock();
        // `woke`: a wait just made progress, events included.
        let (mut n, mut full, mut woke) = (0, false, false);
        loop {
            if !std::mem::take(&mut woke) {
                self.advance(&mut st, full);
            }
            n = self.copy_out(&mut st, n, max, put);
            if n == max || (n > 0 && full) {
                return Ok(n);
            }
            if !full {
                full = true;
                continue;
            }
            if let Some(why) = &st.failed {
                return Err(broken(why));
            }
            if st.closed {
                return Ok(0);
            }
            if nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            st = self.wait(st, deadline)?;
            woke = true;
        }
    }

    /// Copies received bytes out after the `from` already delivered, up to
    /// `max` in all, and returns how many are delivered now; every buffer
    /// emptied is posted again and its credit counted for return.
    fn copy_out(
        &self,
        st: &mut State,
        from: usize,
        max: usize,
        put: &mut dyn FnMut(&[u8], usize),
    ) -> usize {
        let mut n = from;
        while n < max {
            let Some(&(slot, from, len)) = st.filled.front() else {
                break;
            };
            let take = (len - from).min(max - n);
            put(&st.v.recv.slot(slot)[from..from + take], n);
            n += take;
            if from + take == len {
                st.filled.pop_front();
                self.repost(st, slot);
                st.credits.freed();
            } else {
                st.filled.front_mut().expect("front exists").1 += take;
            }
        }
        self.return_credits(st);
        n
    }

    /// Sends from `bufs` what send buffers and credits allow; with
    /// `nonblocking` (or in non-blocking mode) `WouldBlock` if nothing fits.
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>], nonblocking: bool) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let nonblocking = self.mode.nonblocking(nonblocking);
        let deadline = self.mode.deadline(true);
        let mut st = self.lock();
        let (mut full, mut woke) = (false, false);
        loop {
            if !std::mem::take(&mut woke) {
                self.advance(&mut st, full);
            }
            if let Some(why) = &st.failed {
                return Err(broken(why));
            }
            if st.closed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the RDMA connection is closed",
                ));
            }
            if st.credits.can_send() && !st.free_send.is_empty() {
                return self.post_data(&mut st, bufs);
            }
            if !full {
                full = true;
                continue;
            }
            if nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            st = self.wait(st, deadline)?;
            woke = true;
        }
    }

    /// Waits up to `t` for room to send (a credit and a free buffer);
    /// true if there is, or if the connection failed (the next send says
    /// why).
    pub(crate) fn wait_writable(&self, t: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + t;
        let mut st = self.lock();
        loop {
            self.advance(&mut st, true);
            if st.failed.is_some()
                || st.closed
                || (st.credits.can_send() && !st.free_send.is_empty())
            {
                return Ok(true);
            }
            st = match self.wait(st, Some(deadline)) {
                Ok(st) => st,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
        }
    }

    /// Fills send buffers from `bufs` while credits and buffers last.
    fn post_data(&self, st: &mut State, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut parts = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut part: &[u8] = parts.next().unwrap_or(&[]);
        let mut sent = 0;
        while !part.is_empty() && st.credits.can_send() {
            let Some(slot) = st.free_send.pop() else {
                break;
            };
            let dst = st.v.send.slot_mut(slot);
            let mut len = 0;
            while len < dst.len() && !part.is_empty() {
                let k = part.len().min(dst.len() - len);
                dst[len..len + k].copy_from_slice(&part[..k]);
                len += k;
                part = &part[k..];
                if part.is_empty() {
                    part = parts.next().unwrap_or(&[]);
                }
            }
            let imm = st.credits.send_data();
            let payload = Some((&st.v.send, slot, len));
            if let Err(e) = sys::post_send(&mut st.v.qp, SEND_TAG | slot as u64, imm, payload) {
                self.fail(st, e.to_string());
                break;
            }
            sent += len;
        }
        match (&st.failed, sent) {
            (Some(why), 0) => Err(broken(why)),
            _ => Ok(sent),
        }
    }

    /// Test support, for tests of the other end: behaves as a broken peer
    /// that ignores its credits, posting `messages` one-byte data messages
    /// as fast as its send buffers come back, each claiming to return
    /// `claim` credits. Returns how many the NIC completed before the
    /// connection ended (the peer, seeing the violation, ends it), or
    /// `messages` if it never did.
    #[doc(hidden)]
    pub fn send_ignoring_credits(
        &self,
        messages: usize,
        claim: u32,
        timeout: Duration,
    ) -> io::Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let mut posted = 0;
        while posted < messages {
            self.advance(&mut st, true);
            let s = &mut *st;
            if s.failed.is_some() || s.closed {
                return Ok(posted.saturating_sub(SEND_SLOTS - s.free_send.len()));
            }
            match s.free_send.pop() {
                Some(slot) => {
                    s.v.send.slot_mut(slot)[0] = 0;
                    let payload = Some((&s.v.send, slot, 1));
                    sys::post_send(&mut s.v.qp, SEND_TAG | slot as u64, claim, payload)?;
                    posted += 1;
                }
                None => {
                    st = match self.wait(st, Some(deadline)) {
                        Ok(st) => st,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(posted),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(posted)
    }

    /// Ends the connection: the peer sees end of stream, this side's reads
    /// end too once what arrived is read.
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        let mut st = self.lock();
        if !st.closed {
            let _ = self.id.disconnect();
            self.close_qp(&mut st);
        }
        self.changed.notify_all();
        Ok(())
    }
}

impl Drop for RdmaStream {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if !st.closed {
            let _ = self.id.disconnect();
        }
    }
}

impl AsFd for RdmaStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.set.as_fd()
    }
}
