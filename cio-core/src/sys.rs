//! The `unsafe` steps of cio-core: mapping memory another process shares
//! with us through an fd (a VM's RAM, handed over by QEMU's vfio-user
//! client), and waiting for fds (an interrupt's eventfd).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};

/// Maps `len` bytes of `fd` at `offset`, shared and writable. The mapping
/// outlives the fd. The range must lie inside the file as it is now (a page
/// past its end would be SIGBUS when touched, not an error).
pub(crate) fn map_shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<MmapMut> {
    let size = std::fs::File::from(fd.try_clone_to_owned()?)
        .metadata()?
        .len();
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the range ends past the end of the fd ({size:#x} bytes)"),
        ));
    }
    // SAFETY: memmap2 asks the caller to make sure nobody truncates the file
    // or changes it while slices of the mapping are alive. Neither can be
    // promised for memory another process owns: it writes the memory at will
    // (that is what sharing it is for), and a memfd truncated after this
    // check would turn an access into SIGBUS. The guest RAM QEMU shares is
    // never truncated while mapped for DMA (QEMU seals its memfds against
    // shrinking by default), and cio only ever copies bytes into and out of the
    // mapping (it never reads a value twice expecting it unchanged), so a
    // concurrent change shows up as newer bytes, which is what DMA of memory
    // in use by its owner means anyway.
    unsafe {
        MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_mut(fd.as_raw_fd())
    }
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passes
/// (to the nanosecond: ppoll(2), so that a wait shorter than a millisecond
/// sleeps instead of returning at once as poll(2)'s would). Returns, for
/// each fd, whether it is ready.
pub fn poll_readable(fds: &[&dyn AsRawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs that
        // ppoll may write `revents` into; `ts_ptr` is null or points to a
        // timespec that lives across the call; no signal mask is passed. The
        // fds are borrowed for the call (and ppoll only reports POLLNVAL for
        // an fd that is not open).
        let n = unsafe {
            libc::ppoll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                ts_ptr,
                std::ptr::null(),
            )
        };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
