//! A vfio-user server presenting any [`cio_core::Device`] on a Unix socket.
//!
//! One client at a time: [`Server::serve_next`] accepts a connection and
//! serves it until the client goes away; a second client waits in the
//! listen queue until then. Each request is answered in order on the
//! serving thread; the device's interrupts go straight to the eventfds the
//! client passed with `DEVICE_SET_IRQS`.
//!
//! What is served: VERSION, DEVICE_GET_INFO (a PCI device with VFIO's layout
//! of 9 regions and 5 IRQ indexes), DEVICE_GET_REGION_INFO (no mmap),
//! DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS with eventfds, REGION_READ,
//! REGION_WRITE (posted when the client asks for no reply),
//! REGION_WRITE_MULTI, DEVICE_RESET, and DMA_MAP/DMA_UNMAP.
//!
//! DMA: a DMA_MAP with an fd (guest RAM QEMU shares, e.g. with
//! `memory-backend-memfd,share=on`) is mapped and given to the device. A
//! device in this process uses the memory in place; a device that DMAs from
//! a copy on another host ([`Device::dma_is_copied`], a `RemoteDevice`) gets
//! a mirror, and since the guest writes its RAM without telling anyone, the
//! mirrors the device reads are compared page by page with guest memory
//! before every register access that reaches the device (a doorbell, a
//! read): the changed pages travel ahead of the access. The device's
//! writes are written through to guest memory as they arrive, which is
//! before the interrupt or read reply that follows them. Unmapping a range
//! (with a vIOMMU in the guest, the end of each streaming mapping) brings
//! the device's last writes to it first. So the cost follows what is mapped
//! at a time: small with a vIOMMU (`intel-iommu,caching-mode=on`: rings and
//! in-flight buffers), all of guest RAM without one.
//!
//! A DMA_MAP *without* an fd (guest RAM QEMU does not share) gets a
//! [`DmaRegion::mirror_remote`] copy that the server keeps in step with
//! messages of its own (the `port` module sends them and matches
//! the answers):
//! - Before a posted region write (a doorbell) reaches the device, the
//!   ranges the device reads are fetched with DMA_READ (at most
//!   [`FETCH_DEPTH`] in flight, each at most `max_data_xfer_size`) and
//!   compared page by page with the copy. A range the device only reads is
//!   fetched once after it is mapped: the guest may not change a streaming
//!   mapping it handed to the device (the DMA API's rule). The rings are
//!   fetched again until a pass finds them as the pass before did, so the
//!   device never sees a command the guest was halfway through writing
//!   (the guest writes a command before the index that publishes it).
//! - Between requests the rings (ranges the device reads and writes that
//!   have been mapped for a second) are fetched again after 5 ms, then
//!   twice as long each time nothing changed, up to 1 s (`Watch`): a device that
//!   reads commands from guest memory no register write announced
//!   (nvme's shadow doorbells) gets them in bounded time.
//! - Requests that expect a reply are never held back for a DMA reply:
//!   QEMU answers DMA_READ/DMA_WRITE on its main loop, which waits while a
//!   vCPU holds its big lock for our reply. A DMA_MAP or DMA_UNMAP that
//!   arrives while a fetch is under way (QEMU maps from the vCPU that
//!   rang the doorbell) is answered at once and the posted writes keep
//!   waiting: a mapping does not reach the device. Any other such request
//!   ends the wait: the posted writes before it reach the
//!   device with what was fetched so far, then it is served (a read never
//!   passes a posted write: Linux's nvme driver reads CC back to flush its
//!   write), and the remaining answers are compared in as they come. So a
//!   doorbell followed at once by a read may reach the device before all
//!   of guest memory was compared. For the same reason a fetch needs posted
//!   writes: with QEMU's `x-no-posted-writes` nothing is fetched.
//! - The device's writes to the copy go out as DMA_WRITEs before the next
//!   reply, within a few milliseconds otherwise, and ahead of every
//!   interrupt: once such memory is mapped, the device signals the
//!   `relay` module's eventfds, which sends the writes, waits for
//!   the client to answer them, and only then signals the client's.
//!
//! No live-migration state and no dirty bitmaps (QEMU's client has none);
//! a device adopted from another server's session keeps its state across
//! the new client's realize-time reset ([`Server::keep_device_state`]). No
//! software-triggered interrupts.
//!
//! Malformed input never ends the process: a request whose header is
//! intact gets an error reply (its fds are closed) and the next one is
//! served; a stream that cannot be resynchronised (a header whose size is
//! below 16 bytes, end of stream inside a message) ends the connection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_core::{Device, DeviceError, DmaDir, DmaRegion, EventFd, IrqKind};
use cio_transports::sys::poll_readable;
use nix::errno::Errno;
use tracing::{debug, info, trace, warn};

use super::port::Port;
use super::relay::Relay;
use super::sys;
use super::wire::{self, DEVICE_FLAG_PCI, DEVICE_FLAG_RESET, HEADER_SIZE};
use super::{
    Body, Capabilities, Codec, Command, DmaLayout, DmaMap, DmaUnmap, Header, IrqAction, IrqData,
    Limits, Message, MsgKind, RegionAccess, RegionData, Reply, Request, SetIrqs, Version, WriteOne,
};

/// Number of regions VFIO's PCI layout has (6 BARs, ROM, config, VGA).
pub const NUM_REGIONS: u32 = 9;
/// Number of IRQ indexes VFIO's PCI layout has (INTx, MSI, MSI-X, ERR, REQ).
pub const NUM_IRQS: u32 = 5;
/// The protocol version this server speaks (major).
pub const VERSION_MAJOR: u16 = 0;
/// The protocol version this server speaks (minor).
pub const VERSION_MINOR: u16 = 1;

/// A header whose message is larger than this many times the size limit is
/// not skipped but ends the connection.
const MAX_SKIP_FACTOR: usize = 16;

/// How often one fetch goes over guest memory at most: until a pass finds
/// the rings as the one before (a snapshot the guest did not write into
/// halfway), and once more after mappings served during it.
const FETCH_PASSES: usize = 4;

/// The first look at the rings after activity ([`Watch`]).
const WATCH_MIN: Duration = Duration::from_millis(5);

/// How long a range the device reads and writes is mapped before the
/// [`Watch`] takes it for a ring.
const WATCH_AGE: Duration = Duration::from_secs(1);

/// The longest wait between looks at the rings ([`Watch`]).
const WATCH_MAX: Duration = Duration::from_secs(1);

/// Most DMA_READs of one fetch of guest memory in flight at once.
pub const FETCH_DEPTH: usize = 8;

/// Limits the server advertises in its VERSION reply and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most fds accepted with one message.
    pub max_msg_fds: u32,
    /// Largest data count of one REGION_READ/WRITE.
    pub max_data_xfer_size: u64,
    /// Most DMA ranges recorded at once.
    pub max_dma_maps: u32,
    /// How long a fetch of guest memory waits for the client's answers to
    /// its DMA_READs; a client that answers none of them in time is taken
    /// to be stuck and the connection is closed.
    pub dma_timeout: Duration,
    /// The DMA_READ/DMA_WRITE layout the client speaks: the spec's (QEMU
    /// 11), or QEMU 10's ([`DmaLayout`]).
    pub dma_layout: DmaLayout,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_msg_fds: 16,
            max_data_xfer_size: wire::DEFAULT_MAX_DATA_XFER_SIZE,
            max_dma_maps: wire::DEFAULT_MAX_DMA_MAPS,
            dma_timeout: Duration::from_secs(30),
            dma_layout: DmaLayout::Spec,
        }
    }
}

impl ServerConfig {
    fn codec(&self) -> Codec {
        Codec::new(
            Limits {
                max_msg_size: usize::try_from(self.max_data_xfer_size)
                    .unwrap_or(usize::MAX)
                    .saturating_add(4096),
                max_data_xfer_size: self.max_data_xfer_size,
            },
            self.dma_layout,
        )
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the listening socket failed.
    #[error("bind vfio-user socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something that is not a stale socket is at the path, or a server
    /// answers on it.
    #[error("{} is in use or is not a socket", path.display())]
    PathInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Accepting a client failed.
    #[error("accept a vfio-user client")]
    Accept(#[source] io::Error),
    /// Receiving from or sending to the client failed; the connection is
    /// closed (the client may connect again).
    #[error("vfio-user connection")]
    Io(#[source] io::Error),
    /// The stream cannot be resynchronised; the connection is closed.
    #[error("vfio-user stream broken")]
    Stream(#[source] wire::Error),
}

/// What one served connection amounted to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests received.
    pub requests: u64,
    /// Requests answered with (or, posted, logged as) an error.
    pub errors: u64,
    /// DEVICE_RESETs answered without reaching the device
    /// ([`Server::keep_device_state`]).
    pub resets_kept: u64,
}

/// A vfio-user server on a Unix stream socket.
///
/// ```no_run
/// use cio_frontend::vfio_user::{Server, ServerConfig};
/// # fn device() -> Box<dyn cio_core::Device> { unimplemented!() }
/// let server = Server::bind("/tmp/edu.sock", ServerConfig::default()).unwrap();
/// let mut dev = device();
/// loop {
///     let served = server.serve_next(dev.as_mut()).unwrap();
///     println!("client gone after {} requests", served.requests);
/// }
/// ```
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: Option<PathBuf>,
    config: ServerConfig,
    /// The next DEVICE_RESET is answered without reaching the device.
    keep_state: AtomicBool,
}

impl Server {
    /// Listens on `path`, removing a stale socket left there by an earlier
    /// server (one nobody answers on). The socket file is removed when the
    /// server is dropped.
    pub fn bind(path: impl AsRef<Path>, config: ServerConfig) -> Result<Server, Error> {
        let path = path.as_ref().to_path_buf();
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() || UnixStream::connect(&path).is_ok() {
                return Err(Error::PathInUse { path });
            }
            fs::remove_file(&path).map_err(|source| Error::Bind {
                path: path.clone(),
                source,
            })?;
        }
        let listener = UnixListener::bind(&path).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Server {
            listener,
            path: Some(path),
            config,
            keep_state: AtomicBool::new(false),
        })
    }

    /// Serves on a listener the caller made (its socket file is left alone).
    pub fn from_listener(listener: UnixListener, config: ServerConfig) -> Server {
        Server {
            listener,
            path: None,
            config,
            keep_state: AtomicBool::new(false),
        }
    }

    /// The device comes from a session adopted live (a handoff ticket, at
    /// a VM's migration): the next DEVICE_RESET, which QEMU sends while it
    /// realizes the device, is answered without reaching the device, so
    /// that what the device holds survives the move. Later resets (the
    /// guest's) reach it.
    pub fn keep_device_state(&self) {
        self.keep_state.store(true, Ordering::Relaxed);
    }

    /// The socket path, when the server bound it.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Accepts the next client and serves it until it disconnects. On
    /// return, interrupts are disabled and DMA ranges forgotten, so the
    /// device is ready for the next client. A connection that closes
    /// without sending a byte (another server's [`bind`](Server::bind)
    /// checking whether this one is alive) does not count: the next one is
    /// accepted.
    pub fn serve_next(&self, device: &mut dyn Device) -> Result<Served, Error> {
        loop {
            let (stream, _) = self.listener.accept().map_err(Error::Accept)?;
            info!(device = %device.info().name, "vfio-user client connected");
            let served = self.serve_stream(stream, device)?;
            if served.requests > 0 {
                return Ok(served);
            }
        }
    }

    /// Serves one connected client until it disconnects.
    pub fn serve_stream(
        &self,
        stream: UnixStream,
        device: &mut dyn Device,
    ) -> Result<Served, Error> {
        let codec = self.config.codec();
        let max_xfer = usize::try_from(self.config.max_data_xfer_size).unwrap_or(usize::MAX);
        let port = stream
            .try_clone()
            .map(|s| Arc::new(Port::new(s, codec, max_xfer)))
            .map_err(Error::Io)?;
        let mut conn = Connection {
            stream,
            port,
            device,
            config: self.config,
            keep_state: &self.keep_state,
            codec,
            negotiated: false,
            dma: BTreeMap::new(),
            served: Served::default(),
            warned_large: false,
            vectors: HashMap::new(),
            queue: VecDeque::new(),
            relay: None,
            fetch: Fetch::default(),
            draining: false,
            watch: Watch::new(),
        };
        let result = conn.run();
        conn.release();
        match &result {
            Ok(s) => info!(
                requests = s.requests,
                errors = s.errors,
                "vfio-user client gone"
            ),
            Err(e) => warn!("vfio-user connection closed: {}", cio_core::error_chain(e)),
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = fs::remove_file(p);
        }
    }
}

/// A mapped DMA range: its end (exclusive), the memory the device was
/// given, for memory reached by messages whether it is to be fetched
/// before the next doorbell, and for guest memory shared by fd whether the
/// device's copy of it is compared with it (a device elsewhere).
#[derive(Debug)]
struct DmaRange {
    end: u64,
    region: Arc<DmaRegion>,
    fetch: bool,
    compared: bool,
    mapped_at: Instant,
}

impl DmaRange {
    /// A ring the [`Watch`] looks at: the device reads and writes it, and
    /// it has been mapped for [`WATCH_AGE`] (a streaming buffer is
    /// unmapped sooner, and reading one the guest is tearing down makes
    /// its vIOMMU log a fault).
    fn watched(&self) -> bool {
        (self.fetch || self.compared)
            && self.region.dir() == DmaDir::Bidirectional
            && self.mapped_at.elapsed() >= WATCH_AGE
    }
}

/// One message as read from the socket.
struct Frame {
    header: Header,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// A mirror larger than this is worth a warning: it is compared at every
/// access (the guest has no vIOMMU, so all its RAM is one mapping).
const LARGE_MIRROR: u64 = 256 << 20;

/// Largest DMA mapping taken from the device posted (not waiting for it):
/// a guest's IOMMU unmaps buffers of a few pages each, a round trip apiece.
/// A larger one (all of guest RAM, before the guest's IOMMU is on) waits,
/// and the device's last writes to it come first.
const POSTED_UNMAP_MAX: u64 = 2 << 20;

struct Connection<'a> {
    /// Read only here; everything sent goes through `port`.
    stream: UnixStream,
    port: Arc<Port>,
    device: &'a mut dyn Device,
    config: ServerConfig,
    /// [`Server::keep_device_state`]'s flag.
    keep_state: &'a AtomicBool,
    codec: Codec,
    negotiated: bool,
    dma: BTreeMap<u64, DmaRange>,
    served: Served,
    /// Each interrupt kind's vectors as the client set them, from vector 0;
    /// an enabled but unassigned vector holds an eventfd of the server's
    /// that nobody reads.
    vectors: HashMap<IrqKind, Vec<EventFd>>,
    /// A large mirror was warned about (once per connection: QEMU maps
    /// all of RAM several times while the guest boots).
    warned_large: bool,
    /// Posted requests that arrived while guest memory was fetched, to be
    /// served next, in order.
    queue: VecDeque<Frame>,
    /// Delivers interrupts once memory without an fd is mapped.
    relay: Option<Relay>,
    /// The fetch of guest memory under way, if any (replies then go out
    /// without the device's pending writes ahead of them).
    fetch: Fetch,
    /// A request that expects a reply ended a fetch and waits in `queue`
    /// behind the posted writes before it, which go to the device without
    /// fetching.
    draining: bool,
    /// When to look at the rings between requests.
    watch: Watch,
}

/// The DMA_READs of a fetch of guest memory the client has not answered.
#[derive(Debug)]
struct Fetch {
    /// By request id: the region, the offset in it, the count.
    reads: HashMap<u16, (Arc<DmaRegion>, u64, usize)>,
    /// When the client must have answered them all; `None`: no fetch.
    deadline: Option<Instant>,
    started: Instant,
    chunks: usize,
    pages: usize,
    /// The serving thread waits for the answers (otherwise they are
    /// compared in as they come and the last one ends the fetch).
    waiting: bool,
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch {
            reads: HashMap::new(),
            deadline: None,
            started: Instant::now(),
            chunks: 0,
            pages: 0,
            waiting: false,
        }
    }
}

/// Between requests the rings are fetched again (in guest memory shared by
/// fd, for a device elsewhere: compared again) after a while: a device may
/// read commands from guest memory that no register write announced (nvme's
/// shadow doorbells), so what the guest wrote reaches it in bounded time.
/// First [`WATCH_MIN`] after the last request or interrupt, then twice as
/// long each time nothing changed, up to [`WATCH_MAX`].
#[derive(Debug)]
struct Watch {
    due: Option<Instant>,
    every: Duration,
    /// The relay's interrupt count at the last look.
    interrupts: u64,
}

impl Watch {
    fn new() -> Self {
        Watch {
            due: None,
            every: WATCH_MIN,
            interrupts: 0,
        }
    }

    /// Activity: look soon.
    fn kick(&mut self) {
        self.every = WATCH_MIN;
        self.due = Some(Instant::now() + WATCH_MIN);
    }

    /// A look found nothing (`changed` false) or something.
    fn looked(&mut self, changed: bool) {
        self.every = if changed {
            WATCH_MIN
        } else {
            (self.every * 2).min(WATCH_MAX)
        };
        self.due = Some(Instant::now() + self.every);
    }
}

/// An errno for an error reply.
type Errno32 = u32;

fn errno(e: Errno) -> Errno32 {
    e as i32 as u32
}

fn device_errno(e: &DeviceError) -> Errno32 {
    errno(match e {
        DeviceError::NoRegion(_)
        | DeviceError::Denied { .. }
        | DeviceError::BadWidth { .. }
        | DeviceError::Unaligned { .. }
        | DeviceError::OutOfRange { .. }
        | DeviceError::NoIrq { .. }
        | DeviceError::Dma(_) => Errno::EINVAL,
        DeviceError::Unsupported(_) => Errno::ENOTSUP,
        _ => Errno::EIO,
    })
}

/// The result of one request: a reply, or an errno and what went wrong.
type Handled = Result<Reply, (Errno32, String)>;

fn fail<T>(e: Errno, why: impl Into<String>) -> Result<T, (Errno32, String)> {
    Err((errno(e), why.into()))
}

fn dev_fail<T>(what: &str, e: DeviceError) -> Result<T, (Errno32, String)> {
    Err((
        device_errno(&e),
        format!("{what}: {}", cio_core::error_chain(&e)),
    ))
}

impl Connection<'_> {
    fn run(&mut self) -> Result<Served, Error> {
        loop {
            let frame = match self.queue.pop_front() {
                Some(f) => f,
                None if self.watch_due()? => {
                    self.watch_rings()?;
                    continue;
                }
                None => match self.next_frame()? {
                    Some(f) => f,
                    None => return Ok(self.served),
                },
            };
            if frame.header.kind() == Some(MsgKind::Reply) {
                self.answer(frame);
                continue;
            }
            self.watch.kick();
            if !frame.header.no_reply() {
                self.draining = false;
            } else if !self.draining && self.doorbell(&frame.header) {
                let _ = self.fetch_guest(false)?;
            }
            self.serve(frame)?;
        }
    }

    /// Answers one request.
    fn serve(&mut self, f: Frame) -> Result<(), Error> {
        self.served.requests += 1;
        trace!(
            id = f.header.id,
            command = f.header.command,
            posted = f.header.no_reply(),
            size = f.header.size,
            "vfio-user: request"
        );
        match self.handle(&f.header, &f.bytes, f.fds) {
            Some(reply) => self.send(&reply),
            None => Ok(()),
        }
    }

    /// True if the time to look at the rings again came before the next
    /// message (only between fetches, with rings reached by messages).
    fn watch_due(&mut self) -> Result<bool, Error> {
        let Some(due) = self.watch.due else {
            return Ok(false);
        };
        if self.fetch.deadline.is_some() {
            return Ok(false);
        }
        let left = due.saturating_duration_since(Instant::now());
        let readable = poll_readable(&[&self.stream], Some(left)).map_err(Error::Io)?;
        Ok(!readable[0])
    }

    /// Fetches the rings reached by messages (or compares those in shared
    /// memory) and hands what changed to the device ([`Watch`]).
    fn watch_rings(&mut self) -> Result<(), Error> {
        let rings: Vec<Arc<DmaRegion>> = self
            .dma
            .values()
            .filter(|r| r.watched())
            .map(|r| Arc::clone(&r.region))
            .collect();
        if rings.is_empty() {
            self.watch.due = None;
            return Ok(());
        }
        let mut changed = false;
        let shared: usize = rings
            .iter()
            .filter(|r| !r.is_remote_mirror())
            .map(|r| r.refresh())
            .sum();
        let fetched = match rings.iter().any(|r| r.is_remote_mirror()) {
            true => self.fetch_guest(true)?,
            false => Some(0),
        };
        if let Some(pages) = fetched.map(|p| p + shared) {
            // Complete: the changed pages go to the device now (otherwise
            // with the request that ended the wait).
            changed = pages > 0;
            if changed && self.device.dma_is_copied() {
                for r in rings.iter().filter(|r| r.dirty_pages() > 0) {
                    if let Err(e) = self.device.sync_for_device(r.iova(), r.len()) {
                        warn!("vfio-user: guest memory not handed to the device: {e}");
                    }
                }
            }
        }
        let interrupts = self.port.interrupts();
        changed |= interrupts != self.watch.interrupts;
        self.watch.interrupts = interrupts;
        self.watch.looked(changed);
        Ok(())
    }

    /// The next message from the socket; `None` at the end of the stream.
    /// While DMA_READs are unanswered, waits only until their deadline.
    fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        if let Some(deadline) = self.fetch.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let readable = poll_readable(&[&self.stream], Some(left)).map_err(Error::Io)?;
            if !readable[0] {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client answered {} DMA_READs of guest memory not in {:?}",
                        self.fetch.reads.len(),
                        self.config.dma_timeout
                    ),
                )));
            }
        }
        self.read_frame()
    }

    /// Reads the next message; `None` at the end of the stream. Headers
    /// that fail validation are answered here and skipped.
    fn read_frame(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let mut fds = Vec::new();
            let mut hdr = [0u8; HEADER_SIZE];
            match self.read_exact(&mut hdr, &mut fds)? {
                0 => return Ok(None),
                HEADER_SIZE => {}
                n => {
                    return Err(Error::Stream(wire::Error::TruncatedHeader { have: n }));
                }
            }
            let max = self.codec.limits.max_msg_size;
            let header = match Header::parse(&hdr, max) {
                Ok(h) => h,
                Err(e) => {
                    self.served.requests += 1;
                    self.bad_header(&hdr, e, fds)?;
                    continue;
                }
            };
            let mut bytes = vec![0u8; header.size as usize];
            bytes[..HEADER_SIZE].copy_from_slice(&hdr);
            let want = bytes.len() - HEADER_SIZE;
            if self.read_exact(&mut bytes[HEADER_SIZE..], &mut fds)? != want {
                return Err(Error::Stream(wire::Error::FrameLength {
                    size: header.size,
                    have: HEADER_SIZE,
                }));
            }
            return Ok(Some(Frame { header, bytes, fds }));
        }
    }

    /// A reply from the client (its fds are closed): to a DMA_READ of a
    /// fetch, to another request of the port's, or to none.
    fn answer(&mut self, f: Frame) {
        let answer = match self.codec.decode(&f.bytes) {
            Ok(Message {
                body: Body::Reply(r),
                ..
            }) => Ok(r),
            Ok(Message {
                body: Body::ErrorReply { errno, .. },
                ..
            }) => Err(errno),
            Ok(_) => Err(errno(Errno::EINVAL)),
            Err(e) => Err(e.errno()),
        };
        let id = f.header.id;
        let Some((region, offset, count)) = self.fetch.reads.remove(&id) else {
            if self.port.deliver(id, answer).is_some() {
                warn!(
                    id,
                    command = f.header.command,
                    "vfio-user: a reply from the client to no request of ours"
                );
                self.served.errors += 1;
            }
            return;
        };
        let address = region.iova() + offset;
        match answer {
            Ok(Reply::DmaRead(d)) if d.address == address && d.data.len() == count => {
                self.fetch.pages += region.refresh_from(offset, &d.data);
            }
            Ok(r) => {
                warn!(
                    address,
                    count,
                    "vfio-user: the client answered a DMA_READ with {:?}",
                    r.command()
                );
                self.served.errors += 1;
            }
            // A range the guest unmapped meanwhile (EFAULT).
            Err(errno) => debug!(address, count, errno, "vfio-user: guest memory not read"),
        }
        if self.fetch.reads.is_empty() && !self.fetch.waiting {
            self.end_fetch();
        }
    }

    /// True if `header` is a register write while memory the device reads
    /// is reached only by messages: that memory is fetched first.
    fn doorbell(&self, header: &Header) -> bool {
        let write = header.command == Command::RegionWrite as u16
            || header.command == Command::RegionWriteMulti as u16;
        write && self.dma.values().any(|r| r.fetch)
    }

    /// Fetches the guest memory the device reads that is reached only by
    /// messages (DMA_READ) and compares it into the device's copies, ahead
    /// of a posted write. The device's writes are sent first, so what comes
    /// back includes them.
    ///
    /// A DMA_MAP or DMA_UNMAP is served meanwhile. Another request that
    /// expects a reply ends the wait: the client may hold the lock its DMA
    /// answers need until that is answered. What was
    /// fetched goes to the device with the posted writes before it, then it
    /// is served; the remaining answers are compared in as they come.
    ///
    /// Passes over the rings repeat until one finds them as the pass
    /// before did (at most [`FETCH_PASSES`]). Returns how many pages
    /// changed once every answer came; `None` if a request ended the wait.
    fn fetch_guest(&mut self, watch: bool) -> Result<Option<usize>, Error> {
        if self.fetch.deadline.is_none() {
            self.port.flush_posted();
            self.port.begin_fetch();
            self.fetch.deadline = Some(Instant::now() + self.config.dma_timeout);
            self.fetch.started = Instant::now();
        }
        self.fetch.waiting = true;
        let mut todo = self.fetch_chunks(watch);
        let mut passes = 1;
        let mut pass_pages = self.fetch.pages;
        // Rings fetched before a mapping served meanwhile may lack the
        // commands that use it.
        let mut mapped = false;
        loop {
            if self.fetch.reads.is_empty() && todo.is_empty() {
                let changed = self.fetch.pages > pass_pages;
                if !(changed || mapped) || passes == FETCH_PASSES {
                    let pages = self.fetch.pages;
                    self.fetch.waiting = false;
                    self.end_fetch();
                    return Ok(Some(pages));
                }
                todo = self.fetch_chunks(watch);
                passes += 1;
                pass_pages = self.fetch.pages;
                mapped = false;
            }
            while self.fetch.reads.len() < FETCH_DEPTH {
                let Some((region, offset, count)) = todo.pop_front() else {
                    break;
                };
                if !self.is_mapped(&region) {
                    continue;
                }
                let id = self
                    .port
                    .ask_read(region.iova() + offset, count)
                    .map_err(Error::Io)?;
                self.fetch.reads.insert(id, (region, offset, count));
                self.fetch.chunks += 1;
            }
            if self.fetch.reads.is_empty() {
                continue;
            }
            let Some(f) = self.next_frame()? else {
                return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
            };
            match f.header.kind() {
                Some(MsgKind::Reply) => self.answer(f),
                _ if f.header.no_reply() => self.queue.push_back(f),
                // Mappings do not reach the device: the posted writes wait.
                // What is mapped now may be used by commands the guest
                // writes into its rings next (a device that reads a shadow
                // doorbell in guest memory, as nvme's can, sees them
                // without another register write): it comes with this
                // fetch, and the rings once more after it.
                _ if f.header.command == Command::DmaMap as u16 => {
                    let at = match self.codec.decode(&f.bytes) {
                        Ok(Message {
                            body: Body::Request(Request::DmaMap(m)),
                            ..
                        }) => Some(m.address),
                        _ => None,
                    };
                    self.serve(f)?;
                    if let Some(r) = at.and_then(|a| self.dma.get_mut(&a)).filter(|r| r.fetch) {
                        let max = self.port.max_xfer() as u64;
                        for c in Self::chunks_of(r, max).into_iter().rev() {
                            todo.push_front(c);
                        }
                        mapped = true;
                    }
                }
                _ if f.header.command == Command::DmaUnmap as u16 => self.serve(f)?,
                _ => {
                    for (region, ..) in todo {
                        if let Some(r) = self.dma.get_mut(&region.iova()) {
                            r.fetch = true;
                        }
                    }
                    debug!(
                        unanswered = self.fetch.reads.len(),
                        command = f.header.command,
                        "vfio-user: a request ends the wait for guest memory"
                    );
                    self.fetch.waiting = false;
                    if self.fetch.reads.is_empty() {
                        self.end_fetch();
                    }
                    self.queue.push_back(f);
                    self.draining = true;
                    return Ok(None);
                }
            }
        }
    }

    /// True while `region` is still mapped (a DMA_UNMAP served during a
    /// fetch may have removed it).
    fn is_mapped(&self, region: &Arc<DmaRegion>) -> bool {
        self.dma
            .get(&region.iova())
            .is_some_and(|r| Arc::ptr_eq(&r.region, region))
    }

    /// The DMA_READs that bring the copies the device reads up to date.
    /// Buffers first, rings last.
    /// With `watch`, only the rings the [`Watch`] looks at.
    fn fetch_chunks(&mut self, watch: bool) -> VecDeque<(Arc<DmaRegion>, u64, usize)> {
        let max = self.port.max_xfer() as u64;
        let (mut buffers, mut rings) = (VecDeque::new(), VecDeque::new());
        let wanted = |r: &DmaRange| r.fetch && (!watch || r.watched());
        for r in self.dma.values_mut().filter(|r| wanted(r)) {
            let ring = r.region.dir() == DmaDir::Bidirectional;
            let chunks = Self::chunks_of(r, max);
            if ring { &mut rings } else { &mut buffers }.extend(chunks);
        }
        buffers.extend(rings);
        buffers
    }

    /// The DMA_READs (at most `max` bytes each) that fetch one range; a
    /// range the device only reads is fetched this once.
    fn chunks_of(r: &mut DmaRange, max: u64) -> Vec<(Arc<DmaRegion>, u64, usize)> {
        // Memory the device only reads is the guest's to change only
        // before it maps it; ranges the device writes too are rings.
        r.fetch = r.region.dir() == DmaDir::Bidirectional;
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < r.region.len() {
            let n = (r.region.len() - at).min(max);
            chunks.push((Arc::clone(&r.region), at, n as usize));
            at += n;
        }
        chunks
    }

    /// Every DMA_READ of a fetch was answered.
    fn end_fetch(&mut self) {
        debug!(
            chunks = self.fetch.chunks,
            pages = self.fetch.pages,
            took = ?self.fetch.started.elapsed(),
            "vfio-user: guest memory fetched"
        );
        self.fetch = Fetch::default();
        self.port.end_fetch();
    }

    /// A header that failed validation: skip its body if its size can be
    /// trusted that far and answer with an error; otherwise give up.
    fn bad_header(&mut self, hdr: &[u8], e: wire::Error, fds: Vec<OwnedFd>) -> Result<(), Error> {
        drop(fds);
        let raw = |a: usize| u32::from_le_bytes([hdr[a], hdr[a + 1], hdr[a + 2], hdr[a + 3]]);
        let size = raw(4) as usize;
        let flags = raw(8);
        let max = self.codec.limits.max_msg_size;
        if size < HEADER_SIZE || size > max.saturating_mul(MAX_SKIP_FACTOR) {
            return Err(Error::Stream(e));
        }
        warn!("vfio-user: bad header: {e}");
        self.served.errors += 1;
        let mut left = size - HEADER_SIZE;
        let mut chunk = vec![0u8; left.min(64 * 1024)];
        while left > 0 {
            let n = left.min(chunk.len());
            let mut fds = Vec::new();
            if self.read_exact(&mut chunk[..n], &mut fds)? != n {
                return Err(Error::Stream(e));
            }
            left -= n;
        }
        if flags & wire::FLAG_NO_REPLY == 0 {
            let h = Header {
                id: u16::from_le_bytes([hdr[0], hdr[1]]),
                command: u16::from_le_bytes([hdr[2], hdr[3]]),
                size: HEADER_SIZE as u32,
                flags: wire::FLAG_TYPE_REPLY | wire::FLAG_ERROR,
                error: e.errno(),
            };
            self.port.send_bytes(&h.to_bytes()).map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Fills `buf` unless the stream ends; returns the bytes read.
    fn read_exact(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, Error> {
        let mut have = 0;
        while have < buf.len() {
            match sys::recv_with_fds(&self.stream, &mut buf[have..], fds) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Ok(have)
    }

    fn send(&mut self, msg: &Message) -> Result<(), Error> {
        let bytes = match self.codec.encode(msg) {
            Ok(b) => b,
            Err(e) => {
                warn!("vfio-user: cannot encode reply: {e}");
                let Body::Reply(r) = &msg.body else {
                    return Ok(());
                };
                let err = Message {
                    id: msg.id,
                    no_reply: false,
                    body: Body::ErrorReply {
                        command: r.command() as u16,
                        errno: e.errno(),
                    },
                };
                self.codec.encode(&err).map_err(Error::Stream)?
            }
        };
        if self.relay.is_some() && self.fetch.deadline.is_none() {
            // The device's writes ahead of the reply (not waited for).
            self.port.flush_posted();
        }
        self.port.send_bytes(&bytes).map_err(Error::Io)
    }

    /// Answers one frame; `None` when no reply is due. `fds` are closed
    /// before this returns unless a device took them.
    fn handle(&mut self, header: &Header, frame: &[u8], fds: Vec<OwnedFd>) -> Option<Message> {
        let no_reply = header.no_reply();
        let result = match self.codec.decode(frame) {
            Ok(Message {
                body: Body::Request(req),
                ..
            }) => self.request(req, fds),
            Ok(_) => Err((
                errno(Errno::EINVAL),
                "a reply where a request was due".into(),
            )),
            Err(e) => Err((e.errno(), e.to_string())),
        };
        let body = match result {
            Ok(reply) => Body::Reply(reply),
            Err((errno, why)) => {
                self.served.errors += 1;
                if no_reply {
                    warn!("vfio-user: posted command {} failed: {why}", header.command);
                } else {
                    info!("vfio-user: command {} failed: {why}", header.command);
                }
                Body::ErrorReply {
                    command: header.command,
                    errno,
                }
            }
        };
        (!no_reply).then_some(Message {
            id: header.id,
            no_reply: false,
            body,
        })
    }

    fn request(&mut self, req: Request, fds: Vec<OwnedFd>) -> Handled {
        let command = req.command();
        if fds.len() > self.config.max_msg_fds as usize {
            return fail(
                Errno::EINVAL,
                format!(
                    "{} fds with {command}, more than max_msg_fds {}",
                    fds.len(),
                    self.config.max_msg_fds
                ),
            );
        }
        let fds_allowed = match &req {
            Request::DeviceSetIrqs(s) => s.expected_fds(),
            Request::DmaMap(_) => 1,
            _ => 0,
        };
        if fds.len() > fds_allowed {
            return fail(
                Errno::EINVAL,
                format!(
                    "{} fds with {command}, which takes {fds_allowed}",
                    fds.len()
                ),
            );
        }
        if !self.negotiated && command != Command::Version {
            return fail(Errno::EINVAL, format!("{command} before VERSION"));
        }
        match req {
            Request::Version(v) => self.version(v),
            Request::DeviceGetInfo { .. } => Ok(Reply::DeviceGetInfo(wire::DeviceInfo {
                argsz: 16,
                flags: DEVICE_FLAG_PCI | DEVICE_FLAG_RESET,
                num_regions: NUM_REGIONS,
                num_irqs: NUM_IRQS,
            })),
            Request::DeviceGetRegionInfo { index, .. } => self.region_info(index),
            Request::DeviceGetIrqInfo { index, .. } => self.irq_info(index),
            Request::DeviceSetIrqs(s) => self.set_irqs(s, fds),
            Request::RegionRead(a) => {
                self.refresh_dma();
                self.region_read(a)
            }
            Request::RegionWrite(d) => {
                self.refresh_dma();
                self.region_write(d.region, d.offset, &d.data)?;
                Ok(Reply::RegionWrite(RegionAccess {
                    offset: d.offset,
                    region: d.region,
                    count: d.data.len() as u32,
                }))
            }
            Request::RegionWriteMulti(wrs) => {
                self.refresh_dma();
                self.write_multi(&wrs)
            }
            Request::DeviceReset if self.keep_state.swap(false, Ordering::Relaxed) => {
                info!("vfio-user: the device was adopted live: this reset does not reach it");
                self.served.resets_kept += 1;
                Ok(Reply::DeviceReset)
            }
            Request::DeviceReset => match self.device.reset() {
                Ok(()) => Ok(Reply::DeviceReset),
                Err(e) => dev_fail("reset", e),
            },
            Request::DmaMap(m) => self.dma_map(m, fds.into_iter().next()),
            Request::DmaUnmap(u) => self.dma_unmap(u),
            Request::DmaRead(_) | Request::DmaWrite(_) => {
                fail(Errno::EINVAL, format!("{command} is server-to-client"))
            }
        }
    }

    fn version(&mut self, v: Version) -> Handled {
        if self.negotiated {
            return fail(Errno::EINVAL, "VERSION sent twice");
        }
        if v.major != VERSION_MAJOR {
            return fail(
                Errno::ENOTSUP,
                format!("protocol {}.{} (we speak 0.1)", v.major, v.minor),
            );
        }
        let client = v.capabilities.unwrap_or_default();
        if client.pgsizes() & wire::DEFAULT_PGSIZES == 0 {
            return fail(Errno::EINVAL, "client does not support 4 KiB pages");
        }
        self.negotiated = true;
        self.port.limit_xfer(client.max_data_xfer_size());
        info!(
            minor = v.minor,
            client_max_msg_fds = client.max_msg_fds(),
            client_max_data_xfer_size = client.max_data_xfer_size(),
            "vfio-user version negotiated"
        );
        Ok(Reply::Version(Version {
            major: VERSION_MAJOR,
            minor: v.minor.min(VERSION_MINOR),
            capabilities: Some(Capabilities {
                max_msg_fds: Some(self.config.max_msg_fds),
                max_data_xfer_size: Some(self.config.max_data_xfer_size),
                pgsizes: Some(wire::DEFAULT_PGSIZES),
                max_dma_maps: Some(self.config.max_dma_maps),
                migration: None,
                write_multiple: Some(true),
                twin_socket: None,
            }),
        }))
    }

    fn region_info(&mut self, index: u32) -> Handled {
        if index >= NUM_REGIONS {
            return fail(Errno::EINVAL, format!("no region index {index}"));
        }
        let (size, flags) = match self.device.info().region(index) {
            Some(r) => {
                let mut flags = 0;
                if r.flags & cio_core::device::REGION_READ != 0 {
                    flags |= wire::REGION_FLAG_READ;
                }
                if r.flags & cio_core::device::REGION_WRITE != 0 {
                    flags |= wire::REGION_FLAG_WRITE;
                }
                (r.size, flags)
            }
            None => (0, 0),
        };
        Ok(Reply::DeviceGetRegionInfo(wire::RegionInfo {
            argsz: 32,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
            caps: Vec::new(),
        }))
    }

    fn irq_info(&mut self, index: u32) -> Handled {
        let (count, flags) = match irq_kind(index) {
            Some(IrqKind::Intx) => (
                self.device.info().irq_count(IrqKind::Intx),
                wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_MASKABLE | wire::IRQ_INFO_AUTOMASKED,
            ),
            Some(k) => (
                self.device.info().irq_count(k),
                wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_NORESIZE,
            ),
            None if index < NUM_IRQS => (0, wire::IRQ_INFO_EVENTFD),
            None => return fail(Errno::EINVAL, format!("no IRQ index {index}")),
        };
        Ok(Reply::DeviceGetIrqInfo(wire::IrqInfo {
            argsz: 16,
            flags,
            index,
            count,
        }))
    }

    fn set_irqs(&mut self, s: SetIrqs, fds: Vec<OwnedFd>) -> Handled {
        let Some(kind) = irq_kind(s.index) else {
            if s.index < NUM_IRQS && s.count == 0 {
                return Ok(Reply::DeviceSetIrqs);
            }
            return fail(
                Errno::EINVAL,
                format!("IRQ index {} has no vectors", s.index),
            );
        };
        let r = match (s.action, &s.data) {
            (IrqAction::Trigger, IrqData::Eventfd | IrqData::None) if s.count == 0 => {
                self.route(kind, None)
            }
            (IrqAction::Trigger, IrqData::Eventfd) => {
                // Without fds, the vectors are enabled but unassigned: QEMU
                // enables MSI-X this way when the guest does (an fd of -1
                // in VFIO terms), and a device may depend on it (QEMU's
                // nvme only signals vectors enabled when a queue was made).
                if !fds.is_empty() && fds.len() != s.count as usize {
                    return fail(
                        Errno::EINVAL,
                        format!("{} eventfds for {} vectors", fds.len(), s.count),
                    );
                }
                let mut fds = fds.into_iter().map(sys::eventfd);
                let set = (0..s.count).map(|_| fds.next()).collect();
                self.route(kind, Some((s.start, set)))
            }
            (IrqAction::Unmask, IrqData::None) if kind == IrqKind::Intx => {
                self.device.unmask_intx()
            }
            (IrqAction::Unmask, IrqData::Bool(b)) if kind == IrqKind::Intx => {
                if b.first().copied().unwrap_or(false) {
                    self.device.unmask_intx()
                } else {
                    Ok(())
                }
            }
            (action, data) => {
                return fail(
                    Errno::ENOTSUP,
                    format!("SET_IRQS {action:?} with {data:?} on {kind} is not supported"),
                )
            }
        };
        match r {
            Ok(()) => Ok(Reply::DeviceSetIrqs),
            Err(e) => dev_fail("set irqs", e),
        }
    }

    /// Updates the vector table of `kind` (`None`: disables every vector;
    /// `Some((start, fds))`: sets vectors `start..` to `fds`, `None` for an
    /// unassigned one) and gives the device the whole table from vector 0.
    /// A device is only ever asked for a range from 0, which every `Device`
    /// supports, while a client may update any part of it.
    fn route(
        &mut self,
        kind: IrqKind,
        set: Option<(u32, Vec<Option<EventFd>>)>,
    ) -> Result<(), DeviceError> {
        let Some((start, fds)) = set else {
            debug!(%kind, "vfio-user: disabling interrupts");
            self.vectors.remove(&kind);
            return self.give_device(kind);
        };
        let available = self.device.info().irq_count(kind);
        let end = start.saturating_add(fds.len() as u32);
        if end > available {
            return Err(DeviceError::NoIrq { kind, start, end });
        }
        let unassigned = || {
            EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .map_err(|e| DeviceError::Failed(format!("creating eventfd: {e}")))
        };
        let table = self.vectors.entry(kind).or_default();
        while table.len() < end as usize {
            table.push(unassigned()?);
        }
        for (slot, fd) in table[start as usize..].iter_mut().zip(fds) {
            *slot = match fd {
                Some(fd) => fd,
                None => unassigned()?,
            };
        }
        debug!(
            %kind,
            start,
            end,
            vectors = table.len(),
            "vfio-user: routing interrupts"
        );
        self.give_device(kind)
    }

    /// Gives the device the vector table of `kind`: the client's eventfds,
    /// or the relay's standing in for them.
    fn give_device(&mut self, kind: IrqKind) -> Result<(), DeviceError> {
        let table = self.vectors.get(&kind).map_or(&[][..], |t| &t[..]);
        let Some(relay) = &self.relay else {
            return self.device.set_irqs(kind, 0, table);
        };
        let relayed = relay
            .route(kind, table)
            .map_err(|e| DeviceError::Failed(format!("relaying interrupts: {e}")))?;
        self.device.set_irqs(kind, 0, &relayed)
    }

    /// Starts relaying interrupts (memory without an fd was mapped).
    fn start_relay(&mut self) -> Result<(), (Errno32, String)> {
        if self.relay.is_some() {
            return Ok(());
        }
        let relay = Relay::start(Arc::clone(&self.port)).map_err(|e| {
            (
                errno(Errno::ENOMEM),
                format!("starting the interrupt relay: {e}"),
            )
        })?;
        self.relay = Some(relay);
        info!("vfio-user: guest memory without an fd: DMA by messages, interrupts relayed");
        let kinds: Vec<IrqKind> = self.vectors.keys().copied().collect();
        for kind in kinds {
            if let Err(e) = self.give_device(kind) {
                return dev_fail("relaying interrupts", e);
            }
        }
        Ok(())
    }

    /// One access of `len` bytes at `offset` (a register), or a bulk
    /// transfer the device splits into the accesses it accepts.
    fn single(&self, region: u32, offset: u64, len: usize) -> bool {
        self.device
            .info()
            .region(region)
            .is_some_and(|r| r.accepts_width(len) && offset % len as u64 == 0)
    }

    fn region_read(&mut self, a: RegionAccess) -> Handled {
        let mut data = vec![0u8; a.count as usize];
        let r = if self.single(a.region, a.offset, data.len()) {
            self.device.read(a.region, a.offset, &mut data)
        } else {
            self.device.read_bulk(a.region, a.offset, &mut data)
        };
        if let Err(e) = r {
            return dev_fail("region read", e);
        }
        Ok(Reply::RegionRead(RegionData {
            offset: a.offset,
            region: a.region,
            data,
        }))
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), (u32, String)> {
        // A single write keeps its doorbell handling (sent at once).
        let r = if self.single(region, offset, data.len()) {
            self.device.write(region, offset, data)
        } else {
            self.device.write_bulk(region, offset, data)
        };
        r.or_else(|e| dev_fail("region write", e))
    }

    fn write_multi(&mut self, wrs: &[WriteOne]) -> Handled {
        for w in wrs {
            self.region_write(w.region, w.offset, &w.data)?;
        }
        Ok(Reply::RegionWriteMulti {
            wr_cnt: wrs.len() as u64,
        })
    }

    /// Brings the mirrors the device reads up to date with guest memory
    /// (the changed pages go to the device ahead of the next access).
    fn refresh_dma(&mut self) {
        let mut pages = 0;
        for r in self.dma.values() {
            pages += r.region.refresh();
        }
        if pages > 0 {
            debug!(
                pages,
                "vfio-user: guest pages changed since the last access"
            );
        }
    }

    fn dma_map(&mut self, m: DmaMap, fd: Option<OwnedFd>) -> Handled {
        let page = wire::DEFAULT_PGSIZES;
        let Some(end) = m.address.checked_add(m.size).filter(|_| m.size > 0) else {
            return fail(Errno::EINVAL, "DMA range is empty or wraps");
        };
        if m.address % page != 0 || m.size % page != 0 {
            return fail(Errno::EINVAL, "DMA range is not 4 KiB aligned");
        }
        if self.dma.len() >= self.config.max_dma_maps as usize {
            return fail(Errno::ENOSPC, "max_dma_maps ranges already mapped");
        }
        if let Some((&start, r)) = self.dma.range(..end).next_back() {
            if r.end > m.address {
                return fail(
                    Errno::EEXIST,
                    format!(
                        "DMA range {:#x}..{end:#x} overlaps {start:#x}..{:#x}",
                        m.address, r.end
                    ),
                );
            }
        }
        let dir = match (
            m.flags & wire::DMA_MAP_FLAG_READ != 0,
            m.flags & wire::DMA_MAP_FLAG_WRITE != 0,
        ) {
            (true, true) => DmaDir::Bidirectional,
            (true, false) => DmaDir::ToDevice,
            (false, true) => DmaDir::FromDevice,
            (false, false) => return fail(Errno::EINVAL, "DMA_MAP allows neither read nor write"),
        };
        let remote = fd.is_none();
        // Only what the device may write needs its writes sent ahead of
        // its interrupts (a ROM QEMU maps read-only does not).
        if remote && dir.device_writes() {
            self.start_relay()?;
        }
        let region = self.map(&m, dir, fd.as_ref())?;
        if remote {
            self.port.add_remote(Arc::clone(&region));
        }
        self.dma.insert(
            m.address,
            DmaRange {
                end,
                region,
                // What the device only writes is not the guest's to read.
                fetch: remote && dir != DmaDir::FromDevice,
                compared: !remote && self.device.dma_is_copied(),
                mapped_at: Instant::now(),
            },
        );
        Ok(Reply::DmaMap)
    }

    /// Makes the memory of a DMA_MAP (in place or a mirror for one with an
    /// fd, a mirror kept by messages for one without) and gives it to the
    /// device.
    fn map(
        &mut self,
        m: &DmaMap,
        dir: DmaDir,
        fd: Option<&OwnedFd>,
    ) -> Result<Arc<DmaRegion>, (u32, String)> {
        let copied = fd.is_none() || self.device.dma_is_copied();
        let made = match fd {
            None => DmaRegion::mirror_remote(m.address, m.size, dir),
            Some(fd) if copied => {
                DmaRegion::mirror_fd(m.address, m.size, dir, fd.as_fd(), m.offset)
            }
            Some(fd) => DmaRegion::map_fd(m.address, m.size, dir, fd.as_fd(), m.offset),
        };
        let region = match made {
            Ok(r) => Arc::new(r),
            Err(e) => {
                return fail(
                    Errno::EINVAL,
                    format!("DMA_MAP: {}", cio_core::error_chain(&e)),
                )
            }
        };
        // Not posted, although QEMU's vIOMMU maps every buffer: the round
        // trip brings the device's latest writes to rings along (a reply
        // comes after them), and a driver may read them right after the
        // map to decide whether to ring a doorbell. nvme's shadow doorbells
        // do: a stale event index there makes it skip the doorbell of a
        // command the device, having seen the previous one, never looks
        // for (an I/O timeout).
        if let Err(e) = self.device.dma_map(Arc::clone(&region)) {
            return dev_fail("DMA_MAP", e);
        }
        if copied && dir.device_reads() && m.size >= LARGE_MIRROR && !self.warned_large {
            self.warned_large = true;
            warn!(
                size = m.size,
                "vfio-user: a large DMA mapping (all of guest RAM?) is compared with guest \
                 memory at every device access; with a vIOMMU in the guest \
                 (intel-iommu,caching-mode=on) that lasts only until its kernel enables it, \
                 without one it stays so"
            );
        }
        debug!(
            address = m.address,
            size = m.size,
            ?dir,
            mirror = copied,
            by_messages = fd.is_none(),
            "vfio-user: guest memory mapped for DMA"
        );
        Ok(region)
    }

    /// Takes the range at `start` away from the device and forgets it.
    fn unmap_range(&mut self, start: u64) -> Result<(), (u32, String)> {
        let Some(range) = self.dma.remove(&start) else {
            return Ok(());
        };
        // Posted when small: the device's writes to it came ahead of the
        // interrupt (or reply) that told the guest it may unmap it.
        let r = match range.end - start <= POSTED_UNMAP_MAX {
            true => self.device.dma_unmap_posted(start),
            false => self.device.dma_unmap(start),
        };
        self.port.remove_remote(start);
        r.map(drop).or_else(|e| dev_fail("DMA_UNMAP", e))
    }

    fn dma_unmap(&mut self, u: DmaUnmap) -> Handled {
        if u.flags & wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return fail(Errno::ENOTSUP, "dirty bitmaps are not supported");
        }
        if u.flags & wire::DMA_UNMAP_FLAG_ALL != 0 {
            let all: Vec<u64> = self.dma.keys().copied().collect();
            for s in all {
                self.unmap_range(s)?;
            }
        } else {
            let end = u.address.saturating_add(u.size);
            let inside: Vec<u64> = self
                .dma
                .range(..end)
                .filter(|(_, r)| r.end > u.address)
                .map(|(&s, _)| s)
                .collect();
            for s in &inside {
                if *s < u.address || self.dma[s].end > end {
                    return fail(Errno::EINVAL, "DMA_UNMAP splits a mapped range");
                }
            }
            for s in inside {
                self.unmap_range(s)?;
            }
        }
        Ok(Reply::DmaUnmap(DmaUnmap { bitmap: None, ..u }))
    }

    /// Leaves the device as the next client should find it.
    fn release(&mut self) {
        // The client is gone: nothing more is sent to it.
        if self.fetch.deadline.is_some() {
            self.end_fetch();
        }
        self.relay = None;
        self.port.clear_remote();
        self.vectors.clear();
        for kind in [IrqKind::Intx, IrqKind::Msi, IrqKind::Msix] {
            if self.device.info().irq_count(kind) > 0 {
                if let Err(e) = self.device.set_irqs(kind, 0, &[]) {
                    warn!("vfio-user: disabling {kind}: {}", cio_core::error_chain(&e));
                }
            }
        }
        if let Err(e) = self.device.flush() {
            warn!("vfio-user: posted writes: {}", cio_core::error_chain(&e));
        }
        let all: Vec<u64> = self.dma.keys().copied().collect();
        for s in all {
            if let Err((_, why)) = self.unmap_range(s) {
                warn!("vfio-user: {why}");
            }
        }
    }
}

fn irq_kind(index: u32) -> Option<IrqKind> {
    u8::try_from(index).ok().and_then(IrqKind::from_u8)
}
