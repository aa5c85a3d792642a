//! The send side: frames queue up and leave in batches, one vectored write
//! for many frames, DMA payloads straight from DMA memory without a copy.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use cio_core::{DmaRegion, Message};

use crate::{sys, Conn};

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
#[derive(Debug)]
pub struct OutQueue {
    head: BytesMut,
    chunks: VecDeque<Chunk>,
    queued: usize,
    next_seq: u64,
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
        }
    }

    /// Queues `msg` answering `reply_to` (0 for none); returns its sequence
    /// number.
    pub fn push(&mut self, msg: &Message, reply_to: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
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

    /// Queues a posted region write straight from `data`; returns its
    /// sequence number.
    pub fn push_region_write(&mut self, handle: u32, region: u32, offset: u64, data: &[u8]) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let before = self.head.len();
        cio_core::wire::encode_region_write(seq, handle, region, offset, data, &mut self.head);
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
        let seq = self.next_seq;
        self.next_seq += 1;
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
                    .with_slice(*offset, *len, |s| sys::send_nonblocking(conn.as_fd(), s))
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
                        if !sys::poll_writable(conn.as_fd(), t)? {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("peer took no data for {t:?}"),
                            ));
                        }
                        continue;
                    }
                },
                Err(e) => return Err(e),
            };
            self.queued -= n;
            let mut left = n;
            while left > 0 {
                let front = self.chunks.front_mut().expect("written bytes were queued");
                if front.len() <= left {
                    left -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
        Ok(true)
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
}
