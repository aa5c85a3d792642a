//! The only `unsafe` in this crate: thin wrappers over the syscalls std does
//! not expose (receiving into spare buffer capacity, poll(2) and epoll(7)).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::{BufMut, BytesMut};

/// Runs a syscall returning a byte count or -1, retrying on EINTR.
fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives up to `want` bytes from `fd` into the spare capacity of `buf`,
/// without zero-filling it first. With `nonblocking`, returns `WouldBlock`
/// instead of waiting, whatever the socket's own mode. `Ok(0)` is end of
/// stream.
pub fn recv_into(
    fd: BorrowedFd<'_>,
    buf: &mut BytesMut,
    want: usize,
    nonblocking: bool,
) -> io::Result<usize> {
    buf.reserve(want);
    let spare = buf.chunk_mut();
    let len = spare.len().min(want.max(1));
    let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: `spare` is writable, uninitialised capacity owned by `buf` of
    // at least `len` bytes; recv writes at most `len` bytes into it and the
    // fd is valid for the duration of the borrow.
    let n = retry(|| unsafe {
        libc::recv(
            fd.as_raw_fd(),
            spare.as_mut_ptr().cast::<libc::c_void>(),
            len,
            flags,
        )
    })?;
    // SAFETY: recv initialised exactly `n` bytes of the spare capacity.
    unsafe { buf.advance_mut(n) };
    Ok(n)
}

pub use cio_core::poll_readable;

/// Sends from `data` without waiting (`MSG_DONTWAIT`, and no SIGPIPE),
/// whatever the socket's own mode.
pub fn send_nonblocking(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable slice of `data.len()` bytes for the
    // duration of the call; send only reads from it.
    retry(|| unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast::<libc::c_void>(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Sends from `bufs` in one `sendmsg`, never raising SIGPIPE (a peer
/// that went away is `BrokenPipe`, also in a program that did not ignore
/// the signal, such as one embedding the library); with `nonblocking`,
/// without waiting, otherwise as the socket's mode says.
pub fn send_vectored(
    fd: BorrowedFd<'_>,
    bufs: &[std::io::IoSlice<'_>],
    nonblocking: bool,
) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix; sendmsg only
    // reads the buffers.
    msg.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
    msg.msg_iovlen = bufs.len().min(1024);
    // SAFETY: `msg` points at `msg_iovlen` valid iovecs borrowed for the
    // call, with no name and no control data; the fd is valid.
    retry(|| unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) })
}

/// Receives into `buf`; with `nonblocking`, without waiting
/// (`MSG_DONTWAIT`), otherwise as the socket's mode says. `Ok(0)` is end of
/// stream.
pub fn recv_slice(fd: BorrowedFd<'_>, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
    let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: `buf` is a valid writable slice of `buf.len()` bytes for the
    // duration of the call; recv writes at most that many bytes.
    retry(|| unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
            flags,
        )
    })
}

/// Waits until `fd` can take more data (or has failed), or `timeout`
/// passes; returns whether it is ready.
pub fn poll_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `pfd` is one valid pollfd that poll may write `revents`
        // into; the fd is borrowed for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sets a socket's send buffer to `bytes`, beyond `net.core.wmem_max` when
/// the process may (SO_SNDBUFFORCE needs CAP_NET_ADMIN), else as far as
/// SO_SNDBUF allows.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: `val` is a live c_int and the length passed is its size;
        // the fd is valid for the duration of the borrow.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    Err(io::Error::last_os_error())
}

/// An epoll set (level-triggered), for a thread that waits on fds which
/// other threads add, take out or mute while it sleeps.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// A new, empty set (close-on-exec).
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is
        // a new fd this process owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, readable: bool) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: if readable { libc::EPOLLIN as u32 } else { 0 },
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the call (ignored by
        // EPOLL_CTL_DEL); the kernel checks that both fds are open.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Adds `fd`, reported as `token`; watched for reading if `readable`,
    /// else held muted (reported only on error or hang-up).
    pub fn add(&self, fd: RawFd, token: u64, readable: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, readable)
    }

    /// Watches `fd` (already added) for reading again, or mutes it.
    pub fn modify(&self, fd: RawFd, token: u64, readable: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, readable)
    }

    /// Takes `fd` out of the set.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, false)
    }

    /// Waits until an fd in the set is ready or `timeout` passes (rounded
    /// up to the millisecond: never a busy wait); calls `ready` with the
    /// token of each that is.
    pub fn wait(&self, timeout: Option<Duration>, mut ready: impl FnMut(u64)) -> io::Result<()> {
        let ms = timeout.map_or(-1, |t| {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(i32::MAX as u128) as i32
        });
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        loop {
            // SAFETY: `evs` is a writable array of `evs.len()` events for
            // the kernel to fill; the set's fd is open (owned).
            let n = unsafe {
                libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, ms)
            };
            if n >= 0 {
                for ev in &evs[..n as usize] {
                    ready(ev.u64);
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
