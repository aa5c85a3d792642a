//! The only `unsafe` of the VFIO provider: positioned reads and writes on
//! the device fd (checked, unlike vfio-ioctls' `region_read`), and the
//! reset ioctl (whose failure vfio-ioctls' `reset` hides).

use std::io;
use std::os::fd::RawFd;

/// `VFIO_DEVICE_RESET`: `_IO(VFIO_TYPE ';', VFIO_BASE 100 + 11)`.
const VFIO_DEVICE_RESET: libc::c_ulong = (0x3b << 8) | (100 + 11);

fn check(n: isize, want: usize, what: &str) -> io::Result<()> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != want {
        return Err(io::Error::other(format!(
            "short {what}: {n} of {want} bytes"
        )));
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset` of the device fd.
pub fn pread(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    // SAFETY: `buf` is a valid writable slice for the call; the fd is the
    // open VFIO device of the caller, alive for the call.
    let n = unsafe {
        libc::pread(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    check(n, buf.len(), "read")
}

/// Writes exactly `data` at `offset` of the device fd.
pub fn pwrite(fd: RawFd, data: &[u8], offset: u64) -> io::Result<()> {
    // SAFETY: `data` is a valid readable slice for the call; the fd is the
    // open VFIO device of the caller, alive for the call.
    let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), offset as libc::off_t) };
    check(n, data.len(), "write")
}

/// Resets the function (FLR, PM or bus reset, as the kernel can).
pub fn reset(fd: RawFd) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is the open VFIO
    // device of the caller.
    let r = unsafe { libc::ioctl(fd, VFIO_DEVICE_RESET) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reset_ioctl_number_matches_the_kernel_header() {
        assert_eq!(super::VFIO_DEVICE_RESET, 0x3b6f);
    }
}
