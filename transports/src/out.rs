//! The send side: frames queue up and leave in batches, one vectored write
//! for many frames, DMA payloads straight from DMA memory without a copy.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use cio_core::{DmaRegion, Message};

use crate::Conn;

/// Queued bytes: encoded frames, or a span of DMA memory sent as it is
/// when its turn comes.
#[derive(Debug)]
enum Chunk {
    Bytes(Bytes),
    Region {
        region: Arc<DmaRegion>,
        offset: u64,
        len: usize,
    },
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Self::Bytes(b) => b.len(),
            Self::Region { len, .. } => *len,
        }
    }

    /// Splits off the first `n` bytes (`n` < `len()`).
    fn split_to(&mut self, n: usize) -> Self {
        match self {
            Self::Bytes(b) => Self::Bytes(b.split_to(n)),
            Self::Region {
                region,
                offset,
                len,
            } => {
                let first = Self::Region {
                    region: Arc::clone(region),
                    offset: *offset,
                    len: n,
                };
                *offset += n as u64;
                *len -= n;
                first
            }
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Self::Bytes(b) => b.advance(n),
            Self::Region { offset, len, .. } => {
                *offset += n as u64;
                *len -= n;
            }
        }
    }
}

/// Frames waiting to be sent, and the sender's sequence counter.
///
/// With [`retain`](Self::retain) on (resumable sessions), frames that were
/// sent stay here until the peer acknowledges them ([`ack`](Self::ack)), so
/// that after a new connection takes over, [`rewind`](Self::rewind) queues
/// again exactly the frames the peer did not receive.
#[derive(Debug)]
pub struct OutQueue {
    head: BytesMut,
    chunks: VecDeque<Chunk>,
    queued: usize,
    next_seq: u64,
    retain: bool,
    /// Sent and not yet acknowledged, oldest first; starts at a frame.
    sent: VecDeque<Chunk>,
    sent_len: usize,
    /// The part of `sent_len` held as copies (`Chunk::Bytes`); the rest
    /// refers to DMA regions, which exist anyway.
    sent_copies: usize,
    /// Stream offset (bytes ever written) of the end of `sent`.
    written: u64,
    /// Where each retained or queued frame starts: (stream offset, seq).
    starts: VecDeque<(u64, u64)>,
}

/// An acknowledgement or resume point that cannot be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer acknowledged frame {received}, but only frames before {next} were sent")]
pub struct BadAck {
    /// What the peer claimed.
    pub received: u64,
    /// The next sequence number this side would use.
    pub next: u64,
}

impl Default for OutQueue {
    fn default() -> Self {
        Self::new()
    }
}

/// Most slices handed to one `writev`.
const MAX_IOV: usize = 64;

impl OutQueue {
    /// An empty queue whose first frame gets sequence number 1.
    pub fn new() -> Self {
        Self {
            head: BytesMut::with_capacity(64 * 1024),
            chunks: VecDeque::new(),
            queued: 0,
            next_seq: 1,
            retain: false,
            sent: VecDeque::new(),
            sent_len: 0,
            sent_copies: 0,
            written: 0,
            starts: VecDeque::new(),
        }
    }

    /// An empty queue whose first frame gets sequence number `seq` (a
    /// frame of a resume handshake, numbered in that connection's own
    /// sequence).
    pub fn starting_at(seq: u64) -> Self {
        let mut q = Self::new();
        q.next_seq = seq;
        q
    }

    /// Keeps sent frames until acknowledged (from the next frame on).
    pub fn retain(&mut self) {
        self.retain = true;
    }

    /// Starts a frame: its sequence number, and where it begins when
    /// frames are retained.
    fn begin(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.retain {
            self.starts
                .push_back((self.written + self.queued as u64, seq));
        }
        seq
    }

    /// The peer has every frame up to `received`: forget them.
    pub fn ack(&mut self, received: u64) -> Result<(), BadAck> {
        if received >= self.next_seq {
            return Err(BadAck {
                received,
                next: self.next_seq,
            });
        }
        let sent_start = self.written - self.sent_len as u64;
        while self.starts.front().is_some_and(|&(_, seq)| seq <= received) {
            self.starts.pop_front();
        }
        // Everything before the first unacknowledged frame goes.
        let keep_from = self
            .starts
            .front()
            .map_or(self.written, |&(off, _)| off.min(self.written));
        let mut drop = keep_from.saturating_sub(sent_start) as usize;
        self.sent_len -= drop;
        while drop > 0 {
            let front = self.sent.front_mut().expect("retained bytes are queued");
            let n = front.len().min(drop);
            if matches!(front, Chunk::Bytes(_)) {
                self.sent_copies -= n;
            }
            if n == front.len() {
                self.sent.pop_front();
            } else {
                front.advance(n);
            }
            drop -= n;
        }
        Ok(())
    }

    /// A new connection carries on after the peer received frames up to
    /// `received`: everything after them is queued again, in order, ahead
    /// of what was never sent.
    pub fn rewind(&mut self, received: u64) -> Result<(), BadAck> {
        self.ack(received)?;
        if !self.head.is_empty() {
            self.chunks
                .push_back(Chunk::Bytes(self.head.split().freeze()));
        }
        while let Some(c) = self.sent.pop_back() {
            self.chunks.push_front(c);
        }
        self.queued += self.sent_len;
        self.written -= self.sent_len as u64;
        self.sent_len = 0;
        self.sent_copies = 0;
        Ok(())
    }

    /// Bytes sent and kept until the peer acknowledges them.
    pub fn retained(&self) -> usize {
        self.sent_len
    }

    /// The part of [`retained`](Self::retained) this queue holds copies of
    /// (frames); the rest is DMA memory sent from its region, which costs
    /// nothing to keep.
    pub fn retained_copies(&self) -> usize {
        self.sent_copies
    }

    /// Queues `msg` answering `reply_to` (0 for none); returns its sequence
    /// number.
    pub fn push(&mut self, msg: &Message, reply_to: u64) -> u64 {
        let seq = self.begin();
        let before = self.head.len();
        if let Some(payload) = msg.encode_vectored(seq, reply_to, &mut self.head) {
            self.queued += self.head.len() - before + payload.len();
            self.chunks
                .push_back(Chunk::Bytes(self.head.split().freeze()));
            self.chunks.push_back(Chunk::Bytes(payload));
        } else {
            self.queued += self.head.len() - before;
        }
        seq
    }

    /// Queues a posted region write (with `bulk`, a bulk one) straight from
    /// `data`; returns its sequence number.
    pub fn push_region_write(
        &mut self,
        handle: u32,
        region: u32,
        offset: u64,
        data: &[u8],
        bulk: bool,
    ) -> u64 {
        let seq = self.begin();
        let before = self.head.len();
        cio_core::wire::encode_region_write(
            seq,
            handle,
            region,
            offset,
            data,
            bulk,
            &mut self.head,
        );
        self.queued += self.head.len() - before;
        seq
    }

    /// Queues a `DmaData` frame carrying `len` bytes of `region` from
    /// `offset`, read from the region when the frame is sent (so the newest
    /// bytes go, and none are copied); returns its sequence number.
    pub fn push_dma_region(
        &mut self,
        handle: u32,
        region: &Arc<DmaRegion>,
        offset: u64,
        len: usize,
    ) -> u64 {
        let seq = self.begin();
        let before = self.head.len();
        cio_core::wire::encode_dma_data_head(
            seq,
            0,
            handle,
            region.iova() + offset,
            len,
            &mut self.head,
        );
        self.queued += self.head.len() - before + len;
        self.chunks
            .push_back(Chunk::Bytes(self.head.split().freeze()));
        self.chunks.push_back(Chunk::Region {
            region: Arc::clone(region),
            offset,
            len,
        });
        seq
    }

    /// Sequence number the next frame will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Writes the queue. With `wait` = `None` it writes what the socket
    /// takes without blocking and returns whether the queue is empty; with
    /// a timeout it writes everything (on a blocking socket), waiting at
    /// most that long each time the socket is full.
    ///
    /// DMA memory is sent without blocking while its region is locked, and
    /// waited for with the lock released, so a full socket never keeps the
    /// region from the thread that receives into it.
    pub fn write_to(&mut self, conn: &Conn, wait: Option<Duration>) -> io::Result<bool> {
        if !self.head.is_empty() {
            self.chunks
                .push_back(Chunk::Bytes(self.head.split().freeze()));
        }
        while let Some(front) = self.chunks.front() {
            let sent = match front {
                Chunk::Region {
                    region,
                    offset,
                    len,
                } => region
                    .with_slice(*offset, *len, |s| conn.send_nonblocking(s))
                    .map_err(io::Error::other)?,
                Chunk::Bytes(_) => {
                    let mut iov = [IoSlice::new(&[]); MAX_IOV];
                    let mut n = 0;
                    for c in self.chunks.iter().take(MAX_IOV) {
                        let Chunk::Bytes(b) = c else { break };
                        iov[n] = IoSlice::new(b);
                        n += 1;
                    }
                    (&*conn).write_vectored(&iov[..n])
                }
            };
            let n = match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match wait {
                    None => return Ok(false),
                    Some(t) => {
                        wait_writable(conn, t)?;
                        continue;
                    }
                },
                Err(e) => return Err(e),
            };
            self.queued -= n;
            self.written += n as u64;
            let mut left = n;
            while left > 0 {
                let front = self.chunks.front_mut().expect("written bytes were queued");
                if !self.retain {
                    if front.len() <= left {
                        left -= front.len();
                        self.chunks.pop_front();
                    } else {
                        front.advance(left);
                        left = 0;
                    }
                    continue;
                }
                let done = if front.len() <= left {
                    self.chunks.pop_front().expect("front exists")
                } else {
                    front.split_to(left)
                };
                left -= done.len();
                self.sent_len += done.len();
                if matches!(done, Chunk::Bytes(_)) {
                    self.sent_copies += done.len();
                }
                self.sent.push_back(done);
            }
        }
        // A TLS stream may still hold encrypted bytes of what it took.
        loop {
            if conn.flush_pending()? {
                return Ok(true);
            }
            match wait {
                None => return Ok(false),
                Some(t) => wait_writable(conn, t)?,
            }
        }
    }
}

/// Waits up to `t` for `conn` to take more data; `TimedOut` if it does not.
fn wait_writable(conn: &Conn, t: Duration) -> io::Result<()> {
    if conn.wait_writable(t)? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("peer took no data for {t:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cio_core::FrameDecoder;

    #[test]
    fn batched_frames_arrive_in_order_with_sequence_numbers() {
        let (a, b) = Conn::pair().unwrap();
        let mut q = OutQueue::new();
        for i in 0..100u64 {
            q.push(&Message::Reset { handle: i as u32 }, 0);
        }
        q.push(
            &Message::DmaData {
                handle: 1,
                iova: 0,
                data: Bytes::from(vec![9; 100_000]),
            },
            0,
        );
        q.push(&Message::Ok, 7);
        let total = q.len();
        let writer = std::thread::spawn(move || {
            assert!(q
                .write_to(&a, Some(std::time::Duration::from_secs(5)))
                .unwrap());
            assert!(q.is_empty());
        });
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        let mut bytes = 0;
        while got.len() < 102 {
            let n = b.recv_into(d.buffer(), 1 << 16, false).unwrap();
            assert!(n > 0, "stream ended early");
            bytes += n;
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        writer.join().unwrap();
        assert_eq!(bytes, total);
        for (i, f) in got.iter().take(100).enumerate() {
            assert_eq!(f.seq, i as u64 + 1);
            assert_eq!(f.msg, Message::Reset { handle: i as u32 });
        }
        assert!(matches!(&got[100].msg, Message::DmaData { data, .. } if data.len() == 100_000));
        assert_eq!((got[101].seq, got[101].reply_to), (102, 7));
    }

    /// Receives frames from `b` until `n` arrived or nothing more comes.
    fn recv_frames(b: &Conn, d: &mut FrameDecoder, n: usize) -> Vec<cio_core::Frame> {
        let mut got = Vec::new();
        b.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        while got.len() < n {
            match b.recv_into(d.buffer(), 1 << 16, false) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        got
    }

    #[test]
    fn rewind_replays_exactly_what_was_not_acknowledged() {
        let region =
            Arc::new(DmaRegion::new(0x1000, 64 * 1024, cio_core::DmaDir::Bidirectional).unwrap());
        region.write(0, &[7; 64 * 1024]).unwrap();
        let mut q = OutQueue::new();
        q.push(&Message::Ok, 0); // before retaining (a handshake frame)
        q.retain();
        for i in 0..10u32 {
            q.push(&Message::Reset { handle: i }, 0);
        }
        q.push_dma_region(1, &region, 0, 64 * 1024);
        q.push_region_write(2, 0, 8, &[1, 2, 3, 4], false);
        let (a, b) = Conn::pair().unwrap();
        assert!(q
            .write_to(&a, Some(std::time::Duration::from_secs(5)))
            .unwrap());
        let mut d = FrameDecoder::new();
        assert_eq!(recv_frames(&b, &mut d, 13).len(), 13);
        assert!(q.retained() > 64 * 1024);
        assert!(
            q.retained_copies() < 1024,
            "DMA memory is referenced, not copied"
        );
        // The peer handled frames up to 5 (the Ok and four Resets).
        q.ack(5).unwrap();
        let left = q.retained();
        // A new connection: the peer says it got up to 7.
        q.rewind(7).unwrap();
        assert_eq!((q.retained(), q.retained_copies()), (0, 0));
        assert!(q.len() < left);
        let (a, b) = Conn::pair().unwrap();
        assert!(q
            .write_to(&a, Some(std::time::Duration::from_secs(5)))
            .unwrap());
        let mut d = FrameDecoder::new();
        d.set_next_seq(8);
        let got = recv_frames(&b, &mut d, 6);
        let seqs: Vec<u64> = got.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [8, 9, 10, 11, 12, 13]);
        assert_eq!(got[0].msg, Message::Reset { handle: 6 });
        assert!(
            matches!(&got[4].msg, Message::DmaData { data, .. } if data.iter().all(|&b| b == 7))
        );
        assert!(matches!(got[5].msg, Message::RegionWrite { handle: 2, .. }));
        assert!(q.ack(13).is_ok() && q.retained() == 0);
        assert_eq!(
            q.ack(14),
            Err(BadAck {
                received: 14,
                next: 14
            })
        );
    }

    #[test]
    fn a_frame_cut_in_the_middle_is_replayed_whole() {
        let mut q = OutQueue::new();
        q.retain();
        let data = Bytes::from(vec![1; 1 << 20]);
        q.push(
            &Message::DmaData {
                handle: 1,
                iova: 0,
                data,
            },
            0,
        );
        q.push(&Message::Ok, 0);
        let (a, b) = Conn::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // Only part of the first frame gets out before the link dies.
        assert!(!q.write_to(&a, None).unwrap());
        assert!(q.retained() > 0);
        drop(b);
        q.rewind(0).unwrap();
        let (a, b) = Conn::pair().unwrap();
        let writer = std::thread::spawn(move || {
            q.write_to(&a, Some(std::time::Duration::from_secs(5)))
                .unwrap()
        });
        let got = recv_frames(&b, &mut FrameDecoder::new(), 2);
        assert!(writer.join().unwrap());
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0].msg, Message::DmaData { data, .. } if data.len() == 1 << 20));
        assert_eq!((got[1].seq, &got[1].msg), (2, &Message::Ok));
    }
}
