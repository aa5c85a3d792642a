//! The syscall layer of the vfio-user server: `recvmsg` with `SCM_RIGHTS`
//! through `nix`, and the one `unsafe` step of taking ownership of the fds
//! the kernel installed.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use vmm_sys_util::eventfd::EventFd;

/// Most fds Linux passes in one `SCM_RIGHTS` message (`SCM_MAX_FD`). A
/// control buffer this large cannot be truncated by one message's fds, and a
/// stream `recvmsg` never returns the fds of two messages at once.
const SCM_MAX_FD: usize = 253;

/// Reads up to `buf.len()` bytes from `sock`, appending any fds that came
/// with them to `fds` (owned, close-on-exec). Returns 0 at end of stream.
pub(crate) fn recv_with_fds(
    sock: &impl AsRawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        };
        let n = msg.bytes;
        let cmsgs = msg.cmsgs().map_err(|e| {
            // MSG_CTRUNC: cannot happen with a buffer for SCM_MAX_FD fds.
            io::Error::other(format!("control message truncated: {e}"))
        })?;
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(raw.into_iter().map(owned));
            }
        }
        return Ok(n);
    }
}

/// Takes ownership of an fd `recvmsg` just installed in this process.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from an SCM_RIGHTS message the kernel delivered to
    // this process by the `recvmsg` above: it is open, and nothing else in
    // the process knows its number, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Wraps a received fd as an [`EventFd`]. An fd that is not an eventfd stays
/// harmless: signalling it fails with an I/O error, nothing worse.
pub(crate) fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: `into_raw_fd` gives up the `OwnedFd`'s ownership of an open fd,
    // which the `EventFd` takes over (and closes on drop); no other owner
    // remains.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}
