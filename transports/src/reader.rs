//! The receive side: frames from a stream, with large DMA payloads received
//! straight into the DMA memory they are for.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use cio_core::{DmaRegion, Frame, FrameDecoder, WireError};

use crate::Conn;

/// `DmaData` payloads at least this large skip the frame buffer.
pub const DIRECT_MIN: usize = 64 * 1024;

/// Finds where a `DmaData` payload goes: `(handle, iova, len)` to the region
/// and the offset in it, or `None` to let the frame through the normal path
/// (where it will be checked and refused like any other bad frame).
pub type Resolve<'a> = &'a dyn Fn(u32, u64, usize) -> Option<(Arc<DmaRegion>, u64)>;

#[derive(Debug)]
struct Direct {
    region: Arc<DmaRegion>,
    offset: u64,
    left: usize,
}

/// Outcome of one [`FrameReader::recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes received; 0 means the peer closed the stream.
    pub bytes: usize,
    /// Fewer bytes than asked for arrived: the socket is drained for now
    /// (epoll(7)), no need to read again before waiting.
    pub drained: bool,
}

/// A [`FrameDecoder`] that receives large `DmaData` payloads directly into
/// their [`DmaRegion`]: no copy through the frame buffer.
#[derive(Debug, Default)]
pub struct FrameReader {
    decoder: FrameDecoder,
    direct: Option<Direct>,
}

impl FrameReader {
    /// A reader expecting sequence number 1 first.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader whose first frame must carry sequence number `seq` (a
    /// resumed session's new connection).
    pub fn starting_at(seq: u64) -> Self {
        let mut decoder = FrameDecoder::new();
        decoder.set_next_seq(seq);
        Self::from_decoder(decoder)
    }

    /// Continues from a decoder that already read some frames (the handshake).
    pub fn from_decoder(decoder: FrameDecoder) -> Self {
        Self {
            decoder,
            direct: None,
        }
    }

    /// Sequence number of the last frame received whole (0: none).
    pub fn received(&self) -> u64 {
        // A frame received straight into its region is counted by the
        // decoder from its start; it is not received until its end.
        self.decoder.next_seq() - 1 - u64::from(self.direct.is_some())
    }

    /// True if the connection's first bytes are a TLS record (a TLS client
    /// on a plaintext listener).
    pub fn starts_like_tls(&mut self) -> bool {
        let first = self.decoder.next_seq() == 1;
        let b = self.decoder.buffer();
        first && b.len() >= 2 && b[0] == 0x16 && b[1] == 0x03
    }

    /// True while part of a frame has been received.
    pub fn has_partial(&self) -> bool {
        self.direct.is_some() || self.decoder.has_partial()
    }

    /// The next complete frame; see [`FrameDecoder::next_frame`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.direct.is_some() {
            return Ok(None);
        }
        self.decoder.next_frame()
    }

    /// Receives once. `wait` = `None` never blocks (`WouldBlock` when there
    /// is nothing); otherwise it waits up to `wait` for data.
    pub fn recv(
        &mut self,
        conn: &Conn,
        wait: Option<Duration>,
        resolve: Resolve<'_>,
    ) -> io::Result<Received> {
        if self.direct.is_none() {
            if let Some(h) = self.decoder.dma_head(DIRECT_MIN) {
                if let Some((region, offset)) = resolve(h.handle, h.iova, h.len) {
                    let prefix = self.decoder.begin_direct();
                    region.apply(offset, &prefix).map_err(io::Error::other)?;
                    self.direct = Some(Direct {
                        region,
                        offset: offset + prefix.len() as u64,
                        left: h.len - prefix.len(),
                    });
                }
            }
        }
        let Some(d) = &mut self.direct else {
            // Up to 64 KiB into the frame buffer, never more: a large
            // DmaData payload then goes (almost) entirely straight to its
            // region.
            let want = 64 * 1024;
            let n = conn.recv_into(self.decoder.buffer(), want, wait.is_none())?;
            return Ok(Received {
                bytes: n,
                drained: n < want,
            });
        };
        // A non-blocking caller never waits while the region is locked. A
        // blocking one may: the rest of this frame is already on its way
        // and nothing the sender does depends on this region.
        let r = d
            .region
            .with_mut_clean(d.offset, d.left, |s| conn.recv_slice(s, wait.is_none()))
            .map_err(io::Error::other)?;
        let n = match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && wait.is_some() => {
                return Err(io::ErrorKind::TimedOut.into())
            }
            r => r?,
        };
        let asked = d.left;
        d.offset += n as u64;
        d.left -= n;
        // At end of stream the frame stays unfinished (has_partial says so).
        if d.left == 0 {
            self.direct = None;
        }
        Ok(Received {
            bytes: n,
            drained: n < asked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OutQueue;
    use cio_core::{DmaDir, Message, PAGE_SIZE};

    #[test]
    fn one_receive_takes_many_small_frames_at_once() {
        let (a, b) = Conn::pair().unwrap();
        let mut q = OutQueue::new();
        for i in 0..1000 {
            q.push_region_write(1, 0, i * 4, &[0; 4], false);
        }
        let total = q.len();
        assert!(q.write_to(&a, Some(Duration::from_secs(5))).unwrap());
        let mut r = FrameReader::new();
        let got = r
            .recv(&b, Some(Duration::from_secs(5)), &|_, _, _| None)
            .unwrap();
        assert_eq!(
            got.bytes,
            total.min(64 * 1024),
            "one recv, not one per frame"
        );
        let mut n = 0;
        while r.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn large_dma_payloads_land_in_their_region_and_framing_continues() {
        let (a, b) = Conn::pair().unwrap();
        let src = Arc::new(DmaRegion::new(0x10000, 64 * PAGE_SIZE, DmaDir::Bidirectional).unwrap());
        let dst = Arc::new(DmaRegion::new(0x10000, 64 * PAGE_SIZE, DmaDir::Bidirectional).unwrap());
        let data: Vec<u8> = (0..64 * PAGE_SIZE).map(|i| (i * 13 % 251) as u8).collect();
        src.write(0, &data).unwrap();
        let mut q = OutQueue::new();
        q.push(&Message::Ok, 0);
        for (off, len) in src.take_dirty_runs(0, src.len(), 96 * 1024) {
            q.push_dma_region(5, &src, off, len);
        }
        q.push(&Message::Goodbye, 0);
        let writer =
            std::thread::spawn(move || q.write_to(&a, Some(Duration::from_secs(5))).unwrap());

        let mut r = FrameReader::new();
        let dst2 = Arc::clone(&dst);
        let resolve = move |h: u32, iova: u64, len: usize| {
            assert_eq!(h, 5);
            (iova >= dst2.iova() && iova + len as u64 <= dst2.iova() + dst2.len())
                .then(|| (Arc::clone(&dst2), iova - dst2.iova()))
        };
        let mut frames = Vec::new();
        while !frames.contains(&Message::Goodbye) {
            let got = r.recv(&b, Some(Duration::from_secs(5)), &resolve).unwrap();
            assert!(got.bytes > 0, "stream ended early");
            while let Some(f) = r.next_frame().unwrap() {
                frames.push(f.msg);
            }
        }
        assert!(writer.join().unwrap());
        // Every DmaData frame went straight to the region.
        assert_eq!(frames, vec![Message::Ok, Message::Goodbye]);
        let mut back = vec![0u8; data.len()];
        dst.read(0, &mut back).unwrap();
        assert!(back == data);
        assert_eq!(dst.dirty_pages(), 0, "received data is not a local change");
    }
}
