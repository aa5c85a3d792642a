//! The only `unsafe` in this crate: thin wrappers over the syscalls std does
//! not expose (receiving into spare buffer capacity, and poll(2)).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use bytes::{BufMut, BytesMut};

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
    loop {
        // SAFETY: `spare` is writable, uninitialised capacity owned by `buf`
        // of at least `len` bytes; recv writes at most `len` bytes into it and
        // the fd is valid for the duration of the borrow.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                len,
                flags,
            )
        };
        if n >= 0 {
            // SAFETY: recv initialised exactly `n` bytes of the spare capacity.
            unsafe { buf.advance_mut(n as usize) };
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passes.
/// Returns, for each fd, whether it is ready.
pub fn poll_readable(fds: &[&dyn AsRawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs that
        // poll may write `revents` into; the fds are borrowed for the call
        // (and poll only reports POLLNVAL for an fd that is not open).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
