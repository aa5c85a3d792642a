//! Raw verbs with nothing of cio on top: the baselines `cio bench
//! --transport rdma` measures the transport against, so that a ratio says
//! what cio adds to the NIC rather than to its own stream: a SEND/RECV
//! ping-pong of the same size (P1) and RDMA WRITE bandwidth (P3).
//!
//! One connection, [`BUF`]-sized registered buffers on both sides. The
//! client speaks first (a hello, so that the server never sends into a
//! queue pair that is not ready yet); the server answers with where the
//! client may write (its receive buffers' address and key), then answers
//! every message of `n` bytes with `n` bytes of its own until a
//! zero-length message ends it. Completions are waited for as the stream
//! waits for them: polled for the spin time asked for, then on the
//! completion channel.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::{PollCompletionQueueError, WorkCompletionStatus};
use sideway::rdmacm::communication_manager::{EventChannel, Identifier};

use super::imp::{connect, Shape};
use super::stream::{Notice, Verbs};
use super::sys;
use super::RdmaListener;

/// Bytes a message or one write carries at most.
const BUF: usize = 1 << 20;
/// Bytes one RDMA WRITE carries. One write of a whole MiB (a thousand
/// packets at once) stalled soft-RoCE under TCG for more than 10 s; the
/// stream's window is of this order too (16 messages of 32 KiB).
const WRITE_CHUNK: usize = 64 << 10;
/// Writes in flight.
const DEPTH: usize = 8;
/// Receive buffers each side keeps posted.
const RECV: usize = 4;
/// The longest wait for one completion.
const TIMEOUT: Duration = Duration::from_secs(10);
const HELLO: &[u8; 8] = b"cioraw01";
const SEND_ID: u64 = 1 << 32;

const SHAPE: Shape = Shape {
    recv: RECV,
    send: 1,
    size: BUF,
    send_wr: 2 * DEPTH,
    remote_write: true,
};

/// One raw verbs connection: a baseline client, or the server side of one.
pub struct RawVerbs {
    v: Verbs,
    id: Arc<Identifier>,
    /// A client's connection events (a server's arrive on the listener):
    /// kept alive, and what tells a client from a server.
    cm: Option<Arc<EventChannel>>,
    _notice: Option<Arc<Notice>>,
    /// Completions taken from the queue and not yet handled:
    /// (work request id, bytes received).
    done: VecDeque<(u64, usize)>,
    armed: bool,
    /// How long a wait polls before it sleeps.
    spin: Duration,
    /// Where a client writes: the server's receive buffers.
    target: (u64, u32),
}

impl std::fmt::Debug for RawVerbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawVerbs")
            .field("spin", &self.spin)
            .finish()
    }
}

impl RawVerbs {
    fn new(
        v: Verbs,
        id: Arc<Identifier>,
        cm: Option<Arc<EventChannel>>,
        notice: Option<Arc<Notice>>,
    ) -> io::Result<Self> {
        v.chan.set_nonblocking(true)?;
        sys::arm(&v.cq)?;
        Ok(Self {
            v,
            id,
            cm,
            _notice: notice,
            done: VecDeque::new(),
            armed: true,
            spin: Duration::ZERO,
            target: (0, 0),
        })
    }

    /// Connects to a raw verbs server at `addr` (see
    /// [`RdmaListener::accept_raw`]); both sides poll each wait for `spin`
    /// before they sleep.
    pub fn connect(addr: SocketAddr, spin: Duration, timeout: Duration) -> io::Result<Self> {
        let (v, id, ch) = connect(addr, timeout, SHAPE)?;
        let mut raw = Self::new(v, id, Some(ch), None)?;
        raw.spin = spin;
        let spin_us = u32::try_from(spin.as_micros()).unwrap_or(u32::MAX);
        let hello = raw.v.send.slot_mut(0);
        hello[..8].copy_from_slice(HELLO);
        hello[8..12].copy_from_slice(&spin_us.to_le_bytes());
        let (slot, len) = raw.exchange(12)?;
        let answer = &raw.v.recv.slot(slot)[..len];
        if len != 12 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the raw verbs server answered {len} bytes, not 12"),
            ));
        }
        let addr = u64::from_le_bytes(answer[..8].try_into().expect("8 bytes"));
        let rkey = u32::from_le_bytes(answer[8..12].try_into().expect("4 bytes"));
        raw.target = (addr, rkey);
        raw.repost(slot)?;
        Ok(raw)
    }

    /// Sends `len` bytes (1 to 1 MiB) and waits for the server's
    /// `len` bytes back: one round trip.
    pub fn ping(&mut self, len: usize) -> io::Result<()> {
        let len = len.clamp(1, BUF);
        let (slot, got) = self.exchange(len)?;
        self.repost(slot)?;
        if got != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sent {len} bytes, the echo had {got}"),
            ));
        }
        Ok(())
    }

    /// Writes `len` bytes into the server's memory with RDMA WRITEs of up
    /// to 64 KiB, 8 in flight, and waits until the NIC says all of them are
    /// placed.
    pub fn write(&mut self, len: u64) -> io::Result<()> {
        let (addr, rkey) = self.target;
        let (mut posted, mut completed, mut in_flight) = (0u64, 0u64, 0usize);
        while completed < len {
            while posted < len && in_flight < DEPTH {
                let k = (len - posted).min(WRITE_CHUNK as u64) as usize;
                // The writes go round the server's buffers.
                let at = addr + posted % (RECV * BUF) as u64;
                sys::post_write(
                    &mut self.v.qp,
                    SEND_ID | k as u64,
                    (&self.v.send, 0, k),
                    rkey,
                    at,
                )?;
                posted += k as u64;
                in_flight += 1;
            }
            let (id, _) = self.next().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{e} (an RDMA WRITE of {len} bytes: {completed} placed, {in_flight} in flight)"),
                )
            })?;
            if id & SEND_ID == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the raw verbs server sent a message during writes",
                ));
            }
            completed += id & (SEND_ID - 1);
            in_flight -= 1;
        }
        Ok(())
    }

    /// Serves one client until it says it is done (or the link fails, or it
    /// is silent for longer than a wait may last).
    pub fn serve(mut self) -> io::Result<()> {
        let (slot, len) = self.next_recv()?;
        let hello = self.v.recv.slot(slot);
        if len != 12 || &hello[..8] != HELLO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a raw verbs client (bad hello)",
            ));
        }
        self.spin = Duration::from_micros(u64::from(u32::from_le_bytes(
            hello[8..12].try_into().expect("4 bytes"),
        )));
        let (addr, rkey) = self.v.recv.remote();
        let answer = self.v.send.slot_mut(0);
        answer[..8].copy_from_slice(&addr.to_le_bytes());
        answer[8..12].copy_from_slice(&rkey.to_le_bytes());
        self.repost(slot)?;
        self.send_and_wait(12)?;
        loop {
            let (slot, len) = self.next_recv()?;
            self.repost(slot)?;
            if len == 0 {
                return Ok(());
            }
            self.send_and_wait(len)?;
        }
    }

    /// Sends `len` bytes of the send buffer and waits for the answer:
    /// (its receive slot, its length).
    fn exchange(&mut self, len: usize) -> io::Result<(usize, usize)> {
        self.send_and_wait(len)?;
        self.next_recv()
    }

    /// Sends `len` bytes of the send buffer and waits until the NIC is done
    /// with it; a message that arrives meanwhile stays queued, in order.
    fn send_and_wait(&mut self, len: usize) -> io::Result<()> {
        sys::post_send(&mut self.v.qp, SEND_ID, 0, Some((&self.v.send, 0, len)))?;
        let mut held = Vec::new();
        let sent = loop {
            match self.next() {
                Ok((SEND_ID, _)) => break Ok(()),
                Ok(other) => held.push(other),
                Err(e) => break Err(e),
            }
        };
        for c in held.into_iter().rev() {
            self.done.push_front(c);
        }
        sent
    }

    fn next_recv(&mut self) -> io::Result<(usize, usize)> {
        loop {
            match self.next()? {
                (SEND_ID, _) => {}
                (slot, n) => return Ok((slot as usize, n)),
            }
        }
    }

    fn repost(&mut self, slot: usize) -> io::Result<()> {
        sys::post_recv(&mut self.v.qp, &self.v.recv, slot, slot as u64)
    }

    /// The next completion: polled for the spin time, then waited for on
    /// the completion channel. A failed work request fails the call.
    fn next(&mut self) -> io::Result<(u64, usize)> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.done.pop_front() {
                return Ok(c);
            }
            self.poll()?;
            if !self.done.is_empty() {
                continue;
            }
            if start.elapsed() < self.spin {
                std::hint::spin_loop();
                continue;
            }
            if !self.armed {
                // Armed, then polled once more: nothing slips in between.
                sys::arm(&self.v.cq)?;
                self.armed = true;
                continue;
            }
            let left = TIMEOUT.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no RDMA completion within 10 s",
                ));
            }
            crate::sys::poll_readable(&[&self.v.chan.as_raw_fd()], Some(left))?;
            if sys::take_cq_event(&self.v.chan)? {
                self.armed = false;
            }
        }
    }

    fn poll(&mut self) -> io::Result<()> {
        let poller = match self.v.cq.start_poll() {
            Ok(p) => p,
            Err(PollCompletionQueueError::CompletionQueueEmpty) => return Ok(()),
            Err(e) => {
                return Err(io::Error::other(format!(
                    "polling the completion queue: {e}"
                )))
            }
        };
        for wc in poller {
            if wc.status() != WorkCompletionStatus::Success as u32 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("an RDMA work request failed (status {})", wc.status()),
                ));
            }
            self.done.push_back((wc.wr_id(), wc.byte_len() as usize));
        }
        Ok(())
    }
}

impl Drop for RawVerbs {
    fn drop(&mut self) {
        if self.cm.is_some() {
            // A client tells the server it is done; best effort.
            let _ = sys::post_send(&mut self.v.qp, SEND_ID, 0, None);
            let _ = self.next();
        }
        let _ = self.id.disconnect();
    }
}

impl RdmaListener {
    /// Accepts a pending raw verbs client ([`RawVerbs::connect`]); then
    /// [`RawVerbs::serve`] it. `WouldBlock` when none is pending.
    pub fn accept_raw(&self) -> io::Result<RawVerbs> {
        let (v, id, notice) = self.accept_shaped(SHAPE)?;
        RawVerbs::new(v, id, None, Some(notice))
    }
}
