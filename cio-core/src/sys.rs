//! The one `unsafe` step of cio-core: mapping memory another process shares
//! with us through an fd (a VM's RAM, handed over by QEMU's vfio-user
//! client).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
