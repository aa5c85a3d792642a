//! RDMA connections (RoCE, InfiniBand, soft-RoCE `rdma_rxe`): reliable
//! connected queue pairs set up by the RDMA connection manager, used as a
//! byte stream so that everything above (framing, sessions, resume,
//! handoff) runs on them unchanged.
//!
//! - Framing: each SEND carries up to [`SLOT`] bytes of the stream from a
//!   registered send buffer into one of the peer's pre-posted receive
//!   buffers; its immediate value returns credits.
//! - Flow control: credits (`credits.rs`); a peer that sends beyond them, or
//!   returns more than it was given, ends its own connection (reads fail
//!   with `InvalidData`; a lost link fails them with `ConnectionReset`).
//! - Link loss: the connection manager's disconnect event or a failed work
//!   request (the NIC's retries ran out) ends the stream; sessions resume on
//!   a new connection as on TCP.
//! - Security: the link is plaintext. TLS would put the CPU copies RDMA
//!   exists to avoid back on the path, and a NIC writing into registered
//!   memory cannot be encrypted by the host anyway; so `ciod` listens on RDMA
//!   only with `--insecure-plaintext` and a pre-shared key (whose proofs
//!   still authenticate both ends), for fabrics the operator trusts.
//!
//! Built with the `rdma` feature (sideway; libibverbs and librdmacm are
//! loaded at run time). Without it, or without an RDMA device, connecting
//! and listening fail with an error that says so.

// Pure logic, tested in every build; used only by the RDMA one.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) mod credits;
#[cfg(feature = "rdma")]
mod raw;
#[cfg(feature = "rdma")]
mod stream;
#[cfg(feature = "rdma")]
mod sys;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Bytes one message carries at most.
pub const SLOT: usize = 32 * 1024;
/// Data messages in flight per direction (each side's data receive buffers).
pub const WINDOW: usize = 16;
/// Receive buffers posted: the data window and as many for credit-only
/// messages.
#[cfg(feature = "rdma")]
const RECV_SLOTS: usize = 2 * WINDOW;
/// Send buffers (data messages not yet completed by the NIC).
#[cfg(feature = "rdma")]
const SEND_SLOTS: usize = WINDOW;

#[cfg(feature = "rdma")]
pub use imp::{RdmaListener, RdmaStream};
#[cfg(not(feature = "rdma"))]
pub use none::{RawVerbs, RdmaListener, RdmaStream};
#[cfg(feature = "rdma")]
pub use raw::RawVerbs;

/// What a build without RDMA says.
#[cfg(not(feature = "rdma"))]
fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this build has no RDMA support (build with `--features rdma`)",
    )
}

/// What a machine without a usable RDMA device says.
#[cfg(feature = "rdma")]
fn no_device(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "no usable RDMA device ({e}): load a driver (for soft-RoCE: `modprobe rdma_rxe` and \
             `rdma link add rxe0 type rxe netdev IFACE`) and check that libibverbs, librdmacm and \
             ibverbs-providers are installed"
        ),
    )
}

#[cfg(not(feature = "rdma"))]
mod none {
    use super::*;
    use std::io::IoSlice;
    use std::os::fd::{AsFd, BorrowedFd};

    #[derive(Debug)]
    enum Never {}

    /// An RDMA connection (this build has none: the type cannot exist).
    #[derive(Debug)]
    pub struct RdmaStream(Never);

    /// An RDMA listener (this build has none: the type cannot exist).
    #[derive(Debug)]
    pub struct RdmaListener(Never);

    /// A raw verbs baseline connection (this build has none).
    #[derive(Debug)]
    pub struct RawVerbs(Never);

    impl RawVerbs {
        /// Fails: this build has no RDMA.
        pub fn connect(_addr: SocketAddr, _spin: Duration, _timeout: Duration) -> io::Result<Self> {
            Err(unsupported())
        }
        /// Never called: the connection cannot exist.
        pub fn ping(&mut self, _len: usize) -> io::Result<()> {
            match self.0 {}
        }
        /// Never called: the connection cannot exist.
        pub fn write(&mut self, _len: u64) -> io::Result<()> {
            match self.0 {}
        }
        /// Never called: the connection cannot exist.
        pub fn serve(self) -> io::Result<()> {
            match self.0 {}
        }
    }

    impl RdmaStream {
        /// Fails: this build has no RDMA.
        pub fn connect(_addr: SocketAddr, _timeout: Duration) -> io::Result<Self> {
            Err(unsupported())
        }
        /// The peer, for logs.
        pub fn peer(&self) -> &str {
            match self.0 {}
        }
        pub(crate) fn mode(&self) -> &crate::mode::Mode {
            match self.0 {}
        }
        pub(crate) fn buffered(&self) -> bool {
            match self.0 {}
        }
        pub(crate) fn recv_slice(&self, _buf: &mut [u8], _nb: bool) -> io::Result<usize> {
            match self.0 {}
        }
        pub(crate) fn recv_into(
            &self,
            _buf: &mut bytes::BytesMut,
            _want: usize,
            _nb: bool,
        ) -> io::Result<usize> {
            match self.0 {}
        }
        pub(crate) fn send(&self, _bufs: &[IoSlice<'_>], _nb: bool) -> io::Result<usize> {
            match self.0 {}
        }
        pub(crate) fn shutdown(&self) -> io::Result<()> {
            match self.0 {}
        }
        pub(crate) fn wait_writable(&self, _t: Duration) -> io::Result<bool> {
            match self.0 {}
        }
    }

    impl AsFd for RdmaStream {
        fn as_fd(&self) -> BorrowedFd<'_> {
            match self.0 {}
        }
    }

    impl RdmaListener {
        /// Fails: this build has no RDMA.
        pub fn bind(_addr: SocketAddr) -> io::Result<Self> {
            Err(unsupported())
        }
        /// The address listened on.
        pub fn local_addr(&self) -> SocketAddr {
            match self.0 {}
        }
        /// Never called: the listener cannot exist.
        pub fn accept(&self) -> io::Result<RdmaStream> {
            match self.0 {}
        }
        /// Never called: the listener cannot exist.
        pub fn accept_raw(&self) -> io::Result<RawVerbs> {
            match self.0 {}
        }
    }

    impl AsFd for RdmaListener {
        fn as_fd(&self) -> BorrowedFd<'_> {
            match self.0 {}
        }
    }
}

#[cfg(feature = "rdma")]
mod imp {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    use std::sync::Arc;
    use std::time::Instant;

    use sideway::ibverbs::completion::GenericCompletionQueue;
    use sideway::ibverbs::queue_pair::{QueuePair, QueuePairState};
    use sideway::ibverbs::AccessFlags;
    use sideway::rdmacm::communication_manager::{
        ConnectionParameter, Event, EventChannel, EventType, GetEventErrorKind, Identifier,
        PortSpace,
    };

    pub use super::stream::RdmaStream;
    use super::stream::{CmEvents, Notice, Verbs};
    use super::sys::{self, Slots};

    fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("{what}: {e}"))
    }

    /// The buffers and queue depths of a connection.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Shape {
        /// Receive buffers, all posted while the connection is up.
        pub(crate) recv: usize,
        /// Send buffers.
        pub(crate) send: usize,
        /// Bytes in each buffer.
        pub(crate) size: usize,
        /// Send work requests in flight at most.
        pub(crate) send_wr: usize,
        /// The peer may RDMA WRITE into the receive buffers.
        pub(crate) remote_write: bool,
    }

    /// A stream's connection ([`RdmaStream`]).
    const STREAM: Shape = Shape {
        recv: RECV_SLOTS,
        send: SEND_SLOTS,
        size: SLOT,
        send_wr: 2 * SEND_SLOTS,
        remote_write: false,
    };

    /// Creates the connection's PD, completion channel and queue, QP and
    /// buffers on the device `id` is bound to.
    fn verbs(id: &Identifier, shape: Shape) -> io::Result<Verbs> {
        let ctx = id
            .get_device_context()
            .ok_or_else(|| other("RDMA", "the address is on no RDMA device"))?;
        let pd = ctx
            .alloc_pd()
            .map_err(|e| other("allocating a protection domain", e))?;
        let chan = ctx
            .create_comp_channel()
            .map_err(|e| other("creating a completion channel", e))?;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe((shape.recv + shape.send_wr) as u32)
            .setup_comp_channel(&chan, 0)
            .build()
            .map_err(|e| other("creating a completion queue", e))?;
        let qp = pd
            .create_qp_builder()
            .setup_max_send_wr(shape.send_wr as u32)
            .setup_max_recv_wr(shape.recv as u32)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&cq)))
            .build()
            .map_err(|e| other("creating a queue pair", e))?;
        let recv_access = if shape.remote_write {
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite
        } else {
            AccessFlags::LocalWrite
        };
        Ok(Verbs {
            qp,
            cq,
            recv: Slots::new(&pd, shape.recv, shape.size, recv_access)?,
            send: Slots::new(&pd, shape.send, shape.size, AccessFlags::LocalWrite)?,
            chan,
        })
    }

    /// INIT, every receive buffer posted, RTR, RTS, with the connection
    /// manager's attributes but for the retries: 7 of 268 ms each
    /// ([`ACK_TIMEOUT`]), so a lost link fails the next send within about
    /// 2 s; receiver-not-ready retries go on forever (credits keep them
    /// rare).
    fn ready(id: &Identifier, v: &mut Verbs) -> io::Result<()> {
        let step = |what: &str, e: &dyn std::fmt::Display| {
            other(&format!("moving the queue pair to {what}"), e)
        };
        let mut a = id
            .get_qp_attr(QueuePairState::Init)
            .map_err(|e| step("INIT", &e))?;
        a.setup_access_flags(
            AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
        );
        v.qp.modify(&a).map_err(|e| step("INIT", &e))?;
        for slot in 0..v.recv.count() {
            sys::post_recv(&mut v.qp, &v.recv, slot, slot as u64)?;
        }
        let mut a = id
            .get_qp_attr(QueuePairState::ReadyToReceive)
            .map_err(|e| step("RTR", &e))?;
        // 0.64 ms before a sender retries into a full receive queue (the
        // manager's 0 means 655 ms).
        a.setup_min_rnr_timer(12);
        v.qp.modify(&a).map_err(|e| step("RTR", &e))?;
        let mut a = id
            .get_qp_attr(QueuePairState::ReadyToSend)
            .map_err(|e| step("RTS", &e))?;
        a.setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_timeout(ACK_TIMEOUT);
        v.qp.modify(&a).map_err(|e| step("RTS", &e))
    }

    /// The local ACK timeout: 4.096 µs × 2^16 = 268 ms per try.
    const ACK_TIMEOUT: u8 = 16;

    fn param(v: &Verbs) -> ConnectionParameter {
        let mut p = ConnectionParameter::default();
        p.setup_qp_number(v.qp.qp_number());
        p
    }

    /// Waits for the next event on `ch` until `deadline`.
    fn next_event(ch: &Arc<EventChannel>, deadline: Instant, what: &str) -> io::Result<Event> {
        loop {
            match ch.get_cm_event() {
                Ok(ev) => return Ok(ev),
                Err(e) if matches!(e.0, GetEventErrorKind::NoEvent) => {}
                Err(e) => return Err(other("reading RDMA connection events", e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} timed out"),
                ));
            }
            crate::sys::poll_readable(&[&ch.as_raw_fd()], Some(left))?;
        }
    }

    /// Waits for `want`; any other event fails, saying what it means.
    fn expect(
        ch: &Arc<EventChannel>,
        want: EventType,
        deadline: Instant,
        addr: SocketAddr,
    ) -> io::Result<()> {
        let what = format!("{want:?} from rdma:{addr}");
        let ev = next_event(ch, deadline, &what)?;
        let got = ev.event_type();
        let status = ev.status();
        let _ = ev.ack();
        if got == want {
            return Ok(());
        }
        Err(match got {
            EventType::Rejected => io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("rdma:{addr} refused the connection (nothing listens there?)"),
            ),
            EventType::AddressError | EventType::RouteError => io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("no RDMA route to {addr} (status {status}): is an RDMA device up on the way there?"),
            ),
            EventType::Unreachable | EventType::ConnectError => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("rdma:{addr} is unreachable (status {status})"),
            ),
            other => io::Error::other(format!("unexpected {other:?} while waiting for {want:?}")),
        })
    }

    /// Connects to `addr` within `timeout` with buffers of `shape`: the
    /// ready verbs, their connection id and its event channel.
    pub(crate) fn connect(
        addr: SocketAddr,
        timeout: Duration,
        shape: Shape,
    ) -> io::Result<(Verbs, Arc<Identifier>, Arc<EventChannel>)> {
        let deadline = Instant::now() + timeout;
        let ms = timeout
            .min(Duration::from_secs(60))
            .max(Duration::from_millis(100));
        let ch = EventChannel::new().map_err(no_device)?;
        ch.set_nonblocking(true)?;
        let id = ch
            .create_id(PortSpace::Tcp)
            .map_err(|e| other("creating an RDMA connection id", e))?;
        id.resolve_addr(None, addr, ms)
            .map_err(|e| other(&format!("resolving rdma:{addr}"), e))?;
        expect(&ch, EventType::AddressResolved, deadline, addr)?;
        id.resolve_route(ms)
            .map_err(|e| other(&format!("resolving a route to rdma:{addr}"), e))?;
        expect(&ch, EventType::RouteResolved, deadline, addr)?;
        let mut v = verbs(&id, shape)?;
        id.connect(param(&v))
            .map_err(|e| other(&format!("connecting to rdma:{addr}"), e))?;
        expect(&ch, EventType::ConnectResponse, deadline, addr)?;
        ready(&id, &mut v)?;
        id.establish()
            .map_err(|e| other(&format!("establishing the connection to rdma:{addr}"), e))?;
        Ok((v, id, ch))
    }

    impl RdmaStream {
        /// Connects to `addr` within `timeout`.
        pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
            let (v, id, ch) = connect(addr, timeout, STREAM)?;
            Self::new(v, id, CmEvents::Own(ch), format!("rdma:{addr}"))
        }
    }

    /// A listening connection manager id.
    pub struct RdmaListener {
        /// An epoll set holding the event channel: the fd pollers see.
        set: crate::sys::Epoll,
        ch: Arc<EventChannel>,
        _id: Arc<Identifier>,
        addr: SocketAddr,
    }

    impl std::fmt::Debug for RdmaListener {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RdmaListener")
                .field("addr", &self.addr)
                .finish()
        }
    }

    impl RdmaListener {
        /// Listens on `addr` (an address of an RDMA device's interface, or
        /// the unspecified address for all of them). Non-blocking.
        pub fn bind(addr: SocketAddr) -> io::Result<Self> {
            let ch = EventChannel::new().map_err(no_device)?;
            ch.set_nonblocking(true)?;
            let id = ch
                .create_id(PortSpace::Tcp)
                .map_err(|e| other("creating an RDMA connection id", e))?;
            id.bind_addr(addr).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!(
                        "binding rdma:{addr}: {e} (is the address on an RDMA device's interface?)"
                    ),
                )
            })?;
            id.listen(1024)
                .map_err(|e| other(&format!("listening on rdma:{addr}"), e))?;
            let set = crate::sys::Epoll::new()?;
            set.add(ch.as_raw_fd(), 0, true)?;
            Ok(Self {
                set,
                ch,
                _id: id,
                addr,
            })
        }

        /// The address listened on.
        pub fn local_addr(&self) -> SocketAddr {
            self.addr
        }

        /// Handles the connection manager's events; returns the next
        /// accepted connection, or `WouldBlock` when none is pending. The
        /// events of accepted connections (their peer leaving) arrive here
        /// too and are passed on to them. A request that cannot be accepted
        /// (its peer gave up meanwhile, or resources ran out) is refused and
        /// reported as `ConnectionAborted`: call again for the next.
        pub fn accept(&self) -> io::Result<RdmaStream> {
            let (v, id, notice) = self.accept_shaped(STREAM)?;
            let peer = format!("rdma:(a client of {})", self.addr);
            RdmaStream::new(v, id, CmEvents::Notice(notice), peer)
        }

        /// [`accept`](Self::accept) with buffers of `shape`: the ready
        /// verbs, their connection id, and what tells them the peer left.
        pub(crate) fn accept_shaped(
            &self,
            shape: Shape,
        ) -> io::Result<(Verbs, Arc<Identifier>, Arc<Notice>)> {
            loop {
                let ev = match self.ch.get_cm_event() {
                    Ok(ev) => ev,
                    Err(e) if matches!(e.0, GetEventErrorKind::NoEvent) => {
                        return Err(io::ErrorKind::WouldBlock.into())
                    }
                    Err(e) => return Err(other("reading RDMA connection events", e)),
                };
                match ev.event_type() {
                    EventType::ConnectRequest => {
                        let Some(id) = ev.cm_id() else { continue };
                        let _ = ev.ack();
                        // Dropping the id of a failed one refuses its peer.
                        return accept_one(id, shape).map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                format!("refused an RDMA connection request: {e}"),
                            )
                        });
                    }
                    EventType::Disconnected | EventType::DeviceRemoval => {
                        if let Some(n) = ev.cm_id().and_then(|id| id.get_context::<Arc<Notice>>()) {
                            n.peer_left();
                        }
                        let _ = ev.ack();
                    }
                    _ => {
                        let _ = ev.ack();
                    }
                }
            }
        }
    }

    fn accept_one(
        id: Arc<Identifier>,
        shape: Shape,
    ) -> io::Result<(Verbs, Arc<Identifier>, Arc<Notice>)> {
        let mut v = verbs(&id, shape)?;
        ready(&id, &mut v)?;
        let notice = Notice::new()?;
        id.setup_context(Arc::clone(&notice));
        id.accept(param(&v)).map_err(|e| other("accepting", e))?;
        Ok((v, id, notice))
    }

    impl AsFd for RdmaListener {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.set.as_fd()
        }
    }
}
