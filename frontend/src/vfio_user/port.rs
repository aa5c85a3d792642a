//! The server's side of the socket for what it sends: replies, and its own
//! requests to the client (DMA_READ/DMA_WRITE into guest memory that was
//! mapped without an fd), with the client's answers matched to them.
//!
//! Only the serving thread reads the socket; it hands every reply it reads
//! to [`Port::deliver`]. The interrupt relay (another thread) sends through
//! the same port and waits for its answers in [`Port::wait`].
//!
//! While the serving thread fetches guest memory (DMA_READs, then
//! [`DmaRegion::refresh_from`]), the relay does not take the device's
//! writes ([`Port::outside_fetch`]): a page read before a write was taken
//! and sent would otherwise bring the older guest bytes back into the copy.
//!
//! Guest memory mapped without an fd is a set of
//! [`DmaRegion::mirror_remote`] copies kept here; [`Port::flush`] sends what
//! the device changed in them as DMA_WRITEs, holding the send lock for the
//! whole batch so that batches reach the client in the order their bytes
//! were taken.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cio_core::DmaRegion;
use tracing::{debug, warn};

use super::{Body, Codec, DmaAccess, DmaData, Message, Reply, Request};

/// DMA_READ/DMA_WRITE counts are whole pages.
const PAGE: usize = cio_core::dma::PAGE_SIZE as usize;

/// What the client answered to one of the server's requests: the reply, or
/// its errno.
pub(super) type Answer = Result<Reply, u32>;

/// One of the server's requests the client has not answered yet.
#[derive(Debug)]
struct Asked {
    /// The guest address it was about (for the log).
    address: u64,
    /// Someone waits for the answer ([`Port::wait`]); otherwise it is only
    /// checked for an error.
    awaited: bool,
    answer: Option<Answer>,
}

/// The send half of a vfio-user connection.
#[derive(Debug)]
pub(super) struct Port {
    stream: Mutex<Sender>,
    asked: Mutex<HashMap<u16, Asked>>,
    answered: Condvar,
    /// Guest memory mapped without an fd, by guest (IO virtual) address.
    remote: Mutex<BTreeMap<u64, Arc<DmaRegion>>>,
    /// True while the serving thread fetches guest memory.
    fetching: Mutex<bool>,
    fetch_done: Condvar,
    /// Largest DMA_READ/DMA_WRITE data count (both ends' limit).
    max_xfer: AtomicUsize,
    /// Interrupts the relay delivered to the client so far.
    interrupts: AtomicU64,
}

#[derive(Debug)]
struct Sender {
    stream: UnixStream,
    codec: Codec,
    next_id: u16,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Port {
    /// A port writing to `stream` (a clone of the socket the serving thread
    /// reads).
    pub(super) fn new(stream: UnixStream, codec: Codec, max_xfer: usize) -> Self {
        Port {
            stream: Mutex::new(Sender {
                stream,
                codec,
                next_id: 0,
            }),
            asked: Mutex::new(HashMap::new()),
            answered: Condvar::new(),
            remote: Mutex::new(BTreeMap::new()),
            fetching: Mutex::new(false),
            fetch_done: Condvar::new(),
            max_xfer: AtomicUsize::new(max_xfer.max(PAGE)),
            interrupts: AtomicU64::new(0),
        }
    }

    /// Counts an interrupt the relay delivered.
    pub(super) fn delivered(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }

    /// Interrupts the relay delivered so far.
    pub(super) fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }

    /// Largest DMA_READ/DMA_WRITE data count.
    pub(super) fn max_xfer(&self) -> usize {
        self.max_xfer.load(Ordering::Relaxed)
    }

    /// Lowers the largest DMA_READ/DMA_WRITE data count to what the client
    /// accepts (whole pages, at least one).
    pub(super) fn limit_xfer(&self, client: u64) {
        let page = PAGE;
        let client = usize::try_from(client).unwrap_or(usize::MAX) / page * page;
        self.max_xfer.fetch_min(client.max(page), Ordering::Relaxed);
    }

    /// Waits until no fetch of guest memory is under way and keeps one
    /// from starting while the guard lives (the relay holds it to take and
    /// send the device's writes).
    pub(super) fn outside_fetch(&self) -> MutexGuard<'_, bool> {
        let mut g = lock(&self.fetching);
        while *g {
            g = self.fetch_done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }

    /// A fetch of guest memory starts (the serving thread's).
    pub(super) fn begin_fetch(&self) {
        *self.outside_fetch() = true;
    }

    /// The fetch ended: every DMA_READ was answered, or the client is gone.
    pub(super) fn end_fetch(&self) {
        *lock(&self.fetching) = false;
        self.fetch_done.notify_all();
    }

    /// Sends encoded bytes as they are.
    pub(super) fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        lock(&self.stream).stream.write_all(bytes)
    }

    /// Sends one request of the server's own; its answer goes to
    /// [`deliver`](Self::deliver). Returns its id.
    /// Sends one request of the server's own and returns its id. With
    /// `record` (the guest address it is about), its answer is kept for
    /// [`wait`](Self::wait); otherwise the caller matches it itself.
    fn ask_locked(&self, s: &mut Sender, req: Request, record: Option<u64>) -> io::Result<u16> {
        let id = s.next_id;
        s.next_id = s.next_id.wrapping_add(1);
        let msg = Message {
            id,
            no_reply: false,
            body: Body::Request(req),
        };
        let bytes = s.codec.encode(&msg).map_err(io::Error::other)?;
        if let Some(address) = record {
            let asked = Asked {
                address,
                awaited: true,
                answer: None,
            };
            lock(&self.asked).insert(id, asked);
        }
        if let Err(e) = s.stream.write_all(&bytes) {
            lock(&self.asked).remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Asks for `count` bytes of guest memory at `address`; the serving
    /// thread matches the answer to the returned id itself.
    pub(super) fn ask_read(&self, address: u64, count: usize) -> io::Result<u16> {
        let req = Request::DmaRead(DmaAccess {
            address,
            count: count as u64,
        });
        self.ask_locked(&mut lock(&self.stream), req, None)
    }

    /// Takes an answer the serving thread read. `Some` hands it back when
    /// it answers no request of this port (the caller's own, or none).
    pub(super) fn deliver(&self, id: u16, answer: Answer) -> Option<Answer> {
        let mut asked = lock(&self.asked);
        let Some(a) = asked.get_mut(&id) else {
            return Some(answer);
        };
        if a.awaited {
            a.answer = Some(answer);
            self.answered.notify_all();
        } else {
            let a = asked.remove(&id).expect("present");
            if let Err(errno) = answer {
                warn!(
                    address = a.address,
                    errno, "vfio-user: the client refused a DMA_WRITE of device data"
                );
            }
        }
        None
    }

    /// Waits until every request in `ids` is answered or `timeout` passes;
    /// the answers are taken. Errors say which failed.
    pub(super) fn wait(&self, ids: &[u16], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut asked = lock(&self.asked);
        loop {
            let done = ids
                .iter()
                .all(|id| asked.get(id).is_none_or(|a| a.answer.is_some()));
            let now = Instant::now();
            if done || now >= deadline {
                let mut failed = Vec::new();
                for id in ids {
                    match asked.remove(id) {
                        Some(Asked {
                            answer: Some(Err(errno)),
                            address,
                            ..
                        }) => failed.push(format!("{address:#x}: errno {errno}")),
                        Some(Asked {
                            answer: None,
                            address,
                            ..
                        }) => failed.push(format!("{address:#x}: no answer in {timeout:?}")),
                        _ => {}
                    }
                }
                return if failed.is_empty() {
                    Ok(())
                } else {
                    Err(failed.join(", "))
                };
            }
            asked = self
                .answered
                .wait_timeout(asked, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Adds guest memory mapped without an fd.
    pub(super) fn add_remote(&self, region: Arc<DmaRegion>) {
        lock(&self.remote).insert(region.iova(), region);
    }

    /// Removes the memory at `iova`, sending what the device wrote to it
    /// first (without waiting for the answers).
    pub(super) fn remove_remote(&self, iova: u64) {
        let Some(region) = lock(&self.remote).remove(&iova) else {
            return;
        };
        let ids = self.send_pending(&[region]);
        self.unawait(ids);
    }

    /// Forgets all guest memory mapped without an fd, sending nothing (the
    /// client is gone).
    pub(super) fn clear_remote(&self) {
        lock(&self.remote).clear();
    }

    /// The guest memory mapped without an fd, by address.
    pub(super) fn remote(&self) -> Vec<Arc<DmaRegion>> {
        lock(&self.remote).values().cloned().collect()
    }

    /// Sends what the device changed in guest memory mapped without an fd
    /// as DMA_WRITEs; returns their ids (for [`wait`](Self::wait)). A send
    /// that fails is logged: the connection is then broken, which the
    /// serving thread sees.
    pub(super) fn flush(&self) -> Vec<u16> {
        self.send_pending(&self.remote())
    }

    fn send_pending(&self, regions: &[Arc<DmaRegion>]) -> Vec<u16> {
        if !regions.iter().any(|r| r.has_pending()) {
            return Vec::new();
        }
        let mut s = lock(&self.stream);
        let mut ids = Vec::new();
        for r in regions {
            for run in r.take_pending(self.max_xfer()) {
                let address = r.iova() + run.offset;
                let req = Request::DmaWrite(DmaData {
                    address,
                    data: run.data,
                });
                match self.ask_locked(&mut s, req, Some(address)) {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        warn!("vfio-user: sending device data to {address:#x}: {e}");
                        return ids;
                    }
                }
            }
        }
        debug!(
            writes = ids.len(),
            "vfio-user: device data sent to guest memory"
        );
        ids
    }

    /// Sends what the device changed without waiting for the client's
    /// answers (they are checked for errors as they come).
    pub(super) fn flush_posted(&self) {
        let ids = self.flush();
        self.unawait(ids);
    }

    /// Nobody waits for the answers to `ids`: errors are logged as they
    /// come (or now, for those that came).
    fn unawait(&self, ids: Vec<u16>) {
        let mut asked = lock(&self.asked);
        for id in ids {
            match asked.get_mut(&id) {
                Some(a) if a.answer.is_some() => {
                    if let Some(Asked {
                        answer: Some(Err(errno)),
                        address,
                        ..
                    }) = asked.remove(&id)
                    {
                        warn!(
                            address,
                            errno, "vfio-user: the client refused a DMA_WRITE of device data"
                        );
                    }
                }
                Some(a) => a.awaited = false,
                None => {}
            }
        }
    }
}
