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

/// An owned read-write mapping: unmapped on drop. Only ever accessed
/// through raw pointers by the types built on it.
struct Mapped {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and its users only touch
// it through volatile accesses; moving it to another thread moves nothing
// but the pointer.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps `len` bytes of `fd` at `offset` (or anonymous memory with `fd`
    /// = -1 and `MAP_ANONYMOUS`), at an address of the kernel's choosing.
    fn new(len: usize, flags: libc::c_int, fd: RawFd, offset: u64) -> io::Result<Self> {
        // SAFETY: a new mapping at an address the kernel chooses affects no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// A pointer to `n` bytes at `off`, which must lie inside (and be
    /// aligned to `align`).
    fn at(&self, off: usize, n: usize, align: usize) -> *mut u8 {
        assert!(
            off % align == 0 && off.checked_add(n).is_some_and(|e| e <= self.len),
            "mapped memory access out of range or unaligned"
        );
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.ptr.add(off) }
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped").field("len", &self.len).finish()
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; its users hold
        // no references into it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Anonymous memory a device DMAs into and out of. vfio-ioctls'
/// `vfio_dma_map` forbids Rust references to such memory (the device
/// changes it at any time), so it is only ever touched through the volatile
/// copies below.
#[derive(Debug)]
pub struct RawBuf(Mapped);

impl RawBuf {
    /// Maps `len` zeroed bytes.
    pub fn new(len: usize) -> io::Result<Self> {
        Mapped::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0).map(Self)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    fn span(&self, off: usize, n: usize) -> *mut u8 {
        self.0.at(off, n, 1)
    }

    /// Copies bytes at `off` into `buf`.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        let src = self.span(off, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `src + i` lies in the mapping (span checked the range);
            // a volatile read is a permitted access to DMA memory.
            *b = unsafe { src.add(i).read_volatile() };
        }
    }

    /// Copies `data` to `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        let dst = self.span(off, data.len());
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `dst + i` lies in the mapping (span checked the range);
            // a volatile write is a permitted access to DMA memory.
            unsafe { dst.add(i).write_volatile(*b) };
        }
    }

    /// Maps this memory at `iova` in the container's IOMMU domain. The
    /// caller unmaps it before dropping the buffer.
    pub fn dma_map(
        &self,
        container: &vfio_ioctls::VfioContainer,
        iova: u64,
    ) -> Result<(), vfio_ioctls::VfioError> {
        // SAFETY: the memory is only touched through volatile copies (no
        // Rust references exist to it) and stays mapped until the caller's
        // vfio_dma_unmap, which VfioPci does before dropping the buffer.
        unsafe { container.vfio_dma_map(iova, self.0.len, self.0.ptr) }
    }
}

/// A BAR mapped from the device fd: accesses become single loads and
/// stores of exactly the access width, with no system call.
#[derive(Debug)]
pub struct MmioMap(Mapped);

impl MmioMap {
    /// Maps `len` bytes of the device fd at `offset` (a region's offset).
    pub fn new(fd: RawFd, offset: u64, len: usize) -> io::Result<Self> {
        Mapped::new(len, libc::MAP_SHARED, fd, offset).map(Self)
    }

    fn at(&self, off: u64, width: usize) -> *mut u8 {
        self.0.at(off as usize, width, width)
    }

    /// One read of `data.len()` (1, 2 or 4) bytes at `off`.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        let p = self.at(off, data.len());
        match data.len() {
            1 => {
                // SAFETY: `p` is in the mapping (checked by `at`); one
                // volatile byte load is one device access.
                data[0] = unsafe { p.read_volatile() };
            }
            2 => {
                // SAFETY: `p` is in the mapping and 2-byte aligned (checked
                // by `at`); one volatile load of that width.
                let v = unsafe { p.cast::<u16>().read_volatile() };
                data.copy_from_slice(&v.to_le_bytes());
            }
            4 => {
                // SAFETY: `p` is in the mapping and 4-byte aligned (checked
                // by `at`); one volatile load of that width.
                let v = unsafe { p.cast::<u32>().read_volatile() };
                data.copy_from_slice(&v.to_le_bytes());
            }
            n => panic!("unsupported MMIO width {n}"),
        }
    }

    /// One write of `data.len()` (1, 2 or 4) bytes at `off`.
    pub fn write(&self, off: u64, data: &[u8]) {
        let p = self.at(off, data.len());
        match data.len() {
            1 => {
                // SAFETY: `p` is in the mapping (checked by `at`); one
                // volatile byte store is one device access.
                unsafe { p.write_volatile(data[0]) };
            }
            2 => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                // SAFETY: `p` is in the mapping and 2-byte aligned (checked
                // by `at`); one volatile store of that width.
                unsafe { p.cast::<u16>().write_volatile(v) };
            }
            4 => {
                let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                // SAFETY: `p` is in the mapping and 4-byte aligned (checked
                // by `at`); one volatile store of that width.
                unsafe { p.cast::<u32>().write_volatile(v) };
            }
            n => panic!("unsupported MMIO width {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reset_ioctl_number_matches_the_kernel_header() {
        assert_eq!(super::VFIO_DEVICE_RESET, 0x3b6f);
    }
}
