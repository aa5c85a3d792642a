//! DMA memory: regions of anonymous memory at an IOVA, with page-level dirty
//! tracking, and the address space a device DMAs through.
//!
//! Both ends use the same type. On the frontend a [`DmaRegion`] is the
//! target's memory (what the driver reads and writes); on the backend it is
//! the shadow the device DMAs into. Each side marks the pages it changes
//! locally; at the ordering points the dirty pages travel to the other side
//! and are applied there with [`DmaRegion::apply`], which does not mark them
//! dirty again. Cost therefore follows dirty bytes, not mapped bytes.
//!
//! Memory can also come from someone else, through an fd (a VM's RAM that
//! QEMU's vfio-user client shares): [`DmaRegion::map_fd`] uses it in place,
//! for a device in the same process; [`DmaRegion::mirror_fd`] keeps a copy of
//! it for a device that DMAs from its own copy on another host. The owner
//! writes its memory without telling anyone, so a mirror finds the owner's
//! changes by comparing page by page ([`DmaRegion::refresh`]) at the points
//! where the device may look, and writes the other side's data through to
//! the owner's memory as it arrives.
//!
//! An owner whose memory cannot be mapped at all (a VM whose RAM QEMU does
//! not share: the vfio-user server reaches it only with DMA_READ/DMA_WRITE
//! messages) gets a [`DmaRegion::mirror_remote`]: the owner's bytes are
//! compared in with [`DmaRegion::refresh_from`] once they were fetched, and
//! the other side's changes wait in the region as *pending* byte ranges
//! until [`DmaRegion::take_pending`] hands them to whoever sends them on.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::MmapMut;

/// Granularity of dirty tracking and of IOVA/size alignment.
pub const PAGE_SIZE: u64 = 4096;

/// Largest single DMA region (1 TiB of address space; memory is only
/// committed when touched).
pub const MAX_REGION_SIZE: u64 = 1 << 40;

/// Who may access a mapping, from the device's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DmaDir {
    /// The device only reads (target → device data).
    ToDevice = 1,
    /// The device only writes (device → target data).
    FromDevice = 2,
    /// The device reads and writes.
    Bidirectional = 3,
}

impl DmaDir {
    /// Decodes the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::ToDevice),
            2 => Some(Self::FromDevice),
            3 => Some(Self::Bidirectional),
            _ => None,
        }
    }

    /// The device may read this mapping (so target changes are pushed).
    pub fn device_reads(self) -> bool {
        self as u8 & 1 != 0
    }

    /// The device may write this mapping (so device changes are pulled).
    pub fn device_writes(self) -> bool {
        self as u8 & 2 != 0
    }
}

/// DMA errors.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// IOVA or size is zero, unaligned or too large.
    #[error("invalid dma range {iova:#x}+{len:#x}: iova and size must be non-zero multiples of {PAGE_SIZE} below {MAX_REGION_SIZE:#x}")]
    BadRange {
        /// Requested IOVA.
        iova: u64,
        /// Requested size.
        len: u64,
    },
    /// The anonymous mapping could not be created.
    #[error("allocating {len:#x} bytes of dma memory")]
    Alloc {
        /// Requested size.
        len: u64,
        /// What mmap said.
        #[source]
        source: std::io::Error,
    },
    /// Memory shared through an fd could not be mapped.
    #[error("mapping {len:#x} bytes at offset {offset:#x} of a shared memory fd")]
    MapFd {
        /// Requested size.
        len: u64,
        /// Offset in the fd.
        offset: u64,
        /// What mmap said.
        #[source]
        source: std::io::Error,
    },
    /// The new mapping overlaps an existing one.
    #[error(
        "dma range {iova:#x}+{len:#x} overlaps the mapping at {existing:#x}+{existing_len:#x}"
    )]
    Overlap {
        /// Requested IOVA.
        iova: u64,
        /// Requested size.
        len: u64,
        /// IOVA of the mapping it overlaps.
        existing: u64,
        /// Size of that mapping.
        existing_len: u64,
    },
    /// No mapping starts at this IOVA.
    #[error("no dma mapping starts at {0:#x}")]
    NotMapped(u64),
    /// The range is not inside a single mapping.
    #[error("dma access {iova:#x}+{len:#x} is not inside a mapping")]
    Unmapped {
        /// Accessed IOVA.
        iova: u64,
        /// Access length.
        len: u64,
    },
    /// The mapping's direction forbids this access.
    #[error("dma {} at {iova:#x} is not allowed by the mapping's direction", if *write { "write" } else { "read" })]
    Permission {
        /// Accessed IOVA.
        iova: u64,
        /// Whether the device tried to write.
        write: bool,
    },
    /// An offset/length pair does not fit inside the region.
    #[error("range {offset:#x}+{len:#x} is outside the {size:#x}-byte region")]
    OutOfRegion {
        /// Offset inside the region.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: u64,
    },
}

/// A run of changed bytes inside a region, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRun {
    /// Offset inside the region.
    pub offset: u64,
    /// The bytes now at that offset.
    pub data: Vec<u8>,
}

/// A page bitmap with a count of set pages.
#[derive(Debug)]
struct Pages {
    bits: Vec<u64>,
    count: usize,
}

impl Pages {
    fn new(pages: u64) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            count: 0,
        }
    }

    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + len - 1) / PAGE_SIZE;
        for page in first..=last {
            let (w, b) = ((page / 64) as usize, page % 64);
            if self.bits[w] & (1 << b) == 0 {
                self.bits[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    /// Clears the set pages among `first..last` and returns them as runs of
    /// at most `max_pages` contiguous pages.
    fn take_runs(&mut self, first: u64, last: u64, max_pages: u64) -> Vec<(u64, usize)> {
        self.runs(first, last, max_pages, true)
    }

    /// The set pages among `first..last` as runs of at most `max_pages`
    /// contiguous pages, cleared with `clear`.
    fn runs(&mut self, first: u64, last: u64, max_pages: u64, clear: bool) -> Vec<(u64, usize)> {
        let mut runs = Vec::new();
        let mut left = self.count;
        let mut page = first;
        while page < last && left > 0 {
            let w = (page / 64) as usize;
            // Skip clean words quickly: this keeps the scan cheap for huge,
            // mostly clean regions.
            if page % 64 == 0 && self.bits[w] == 0 {
                page += 64;
                continue;
            }
            if self.bits[w] & (1 << (page % 64)) == 0 {
                page += 1;
                continue;
            }
            let start = page;
            while page < last && page - start < max_pages {
                let (w, b) = ((page / 64) as usize, page % 64);
                if self.bits[w] & (1 << b) == 0 {
                    break;
                }
                if clear {
                    self.bits[w] &= !(1 << b);
                    self.count -= 1;
                }
                left -= 1;
                page += 1;
            }
            runs.push((start * PAGE_SIZE, ((page - start) * PAGE_SIZE) as usize));
        }
        runs
    }
}

/// Byte ranges of a remote mirror changed by the other side and not yet
/// sent to the owner: start → end, disjoint, merged when they touch or lie
/// closer than [`PENDING_GAP`].
type Ranges = std::collections::BTreeMap<u64, u64>;

/// Two pending ranges this close are sent as one: the bytes between them
/// are the copy's, which equal the owner's unless the owner wrote those
/// very bytes since the last refresh. Without this, a device write of
/// random data over older random data would be one message per 256 bytes
/// (where a byte happens to keep its value).
const PENDING_GAP: u64 = 32;

/// Whose memory a region's bytes are, or copy.
#[derive(Debug)]
enum Owner {
    /// The bytes are the region's own (or the owner's, mapped in place).
    Itself,
    /// A mirror of memory mapped from an fd: changes are written through.
    Mapped(MmapMut),
    /// A mirror of memory reached only by messages: changes wait here.
    Remote(Ranges),
}

#[derive(Debug)]
struct Inner {
    /// The region's bytes: what was last exchanged with the other side.
    mem: MmapMut,
    /// Whose memory `mem` is, or copies.
    owner: Owner,
    /// Pages changed locally since the last sync (to send).
    dirty: Pages,
    /// Pages received from the other side since a device last took them
    /// (for devices that DMA from their own copy).
    applied: Pages,
    /// Pages ever written, by either side (never cleared).
    written: Pages,
}

/// Anonymous memory at an IOVA range with page-level dirty tracking.
#[derive(Debug)]
pub struct DmaRegion {
    iova: u64,
    len: u64,
    dir: DmaDir,
    inner: Mutex<Inner>,
}

impl DmaRegion {
    /// Allocates zeroed memory for `iova..iova+len`. Both must be multiples of
    /// [`PAGE_SIZE`]; memory is committed lazily, as it is touched.
    pub fn new(iova: u64, len: u64, dir: DmaDir) -> Result<Self, DmaError> {
        check_range(iova, len)?;
        Ok(Self::with_memory(iova, len, dir, anon(len)?, Owner::Itself))
    }

    /// Uses `len` bytes of the shared memory `fd` at `offset` in place (for a
    /// device in this process, which then reads and writes the owner's memory
    /// directly). The fd may be closed afterwards.
    pub fn map_fd(
        iova: u64,
        len: u64,
        dir: DmaDir,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<Self, DmaError> {
        check_range(iova, len)?;
        Ok(Self::with_memory(
            iova,
            len,
            dir,
            map_fd(fd, offset, len)?,
            Owner::Itself,
        ))
    }

    /// A copy of `len` bytes of the shared memory `fd` at `offset`, for a
    /// device that DMAs from its own copy elsewhere. The copy starts zeroed,
    /// as the other side's does: [`refresh`](Self::refresh) finds what the
    /// owner wrote. Whatever the other side sends is written to the copy, and
    /// the bytes it changes there through to the owner's memory (so a page
    /// the device wrote part of keeps what the owner wrote in the rest). The
    /// fd may be closed afterwards.
    pub fn mirror_fd(
        iova: u64,
        len: u64,
        dir: DmaDir,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<Self, DmaError> {
        check_range(iova, len)?;
        let owner = Owner::Mapped(map_fd(fd, offset, len)?);
        Ok(Self::with_memory(iova, len, dir, anon(len)?, owner))
    }

    /// A copy of `len` bytes of memory this process cannot map, for a
    /// device that DMAs from its own copy (elsewhere, or here). The copy
    /// starts zeroed; whoever can fetch the owner's bytes compares them in
    /// with [`refresh_from`](Self::refresh_from). The bytes the other side
    /// (or a device here) changes in the copy are kept as pending ranges,
    /// to be sent to the owner: [`take_pending`](Self::take_pending).
    pub fn mirror_remote(iova: u64, len: u64, dir: DmaDir) -> Result<Self, DmaError> {
        check_range(iova, len)?;
        let owner = Owner::Remote(Ranges::new());
        Ok(Self::with_memory(iova, len, dir, anon(len)?, owner))
    }

    fn with_memory(iova: u64, len: u64, dir: DmaDir, mem: MmapMut, owner: Owner) -> Self {
        let pages = len / PAGE_SIZE;
        Self {
            iova,
            len,
            dir,
            inner: Mutex::new(Inner {
                mem,
                owner,
                dirty: Pages::new(pages),
                applied: Pages::new(pages),
                written: Pages::new(pages),
            }),
        }
    }

    /// True for a [`mirror_fd`](Self::mirror_fd) or
    /// [`mirror_remote`](Self::mirror_remote) region.
    pub fn is_mirror(&self) -> bool {
        !matches!(self.lock().owner, Owner::Itself)
    }

    /// True for a [`mirror_remote`](Self::mirror_remote) region.
    pub fn is_remote_mirror(&self) -> bool {
        matches!(self.lock().owner, Owner::Remote(_))
    }

    /// For a remote mirror: compares `theirs`, the owner's bytes at
    /// `offset` (page aligned; a whole number of pages or up to the end),
    /// page by page with the copy; a page that differs takes the owner's
    /// bytes, except those the other side changed and that are still
    /// pending (newer than what the owner had when `theirs` was fetched),
    /// and is marked dirty (to send); a page that differs only in pending
    /// bytes is left alone. Returns how many pages differed; 0 for
    /// other regions or a range outside this one.
    pub fn refresh_from(&self, offset: u64, theirs: &[u8]) -> usize {
        if offset % PAGE_SIZE != 0 || self.check(offset, theirs.len()).is_err() {
            return 0;
        }
        let mut g = self.lock();
        let Inner {
            mem,
            owner,
            dirty,
            written,
            ..
        } = &mut *g;
        let Owner::Remote(pending) = owner else {
            return 0;
        };
        let p = PAGE_SIZE as usize;
        let o = offset as usize;
        let mut changed = 0;
        let copies = mem[o..o + theirs.len()].chunks_mut(p);
        for (i, (copy, theirs)) in copies.zip(theirs.chunks(p)).enumerate() {
            if copy == theirs {
                continue;
            }
            let at = offset + (i * p) as u64;
            let end = at + copy.len() as u64;
            // The pending ranges inside this page keep the copy's bytes; a
            // page that differs only there is not the owner's change (and
            // sending it would race with the other side's next writes).
            let mut from = at;
            let mut differs = false;
            let keep = pending
                .range(..end)
                .filter(|(_, &e)| e > at)
                .map(|(&s, &e)| (s.max(at), e.min(end)));
            for (s, e) in keep.chain([(end, end)]) {
                if s > from {
                    let (a, b) = ((from - at) as usize, (s - at) as usize);
                    if copy[a..b] != theirs[a..b] {
                        copy[a..b].copy_from_slice(&theirs[a..b]);
                        differs = true;
                    }
                }
                from = from.max(e);
            }
            if !differs {
                continue;
            }
            dirty.mark(at, copy.len() as u64);
            written.mark(at, copy.len() as u64);
            changed += 1;
        }
        changed
    }

    /// For a remote mirror: takes the byte ranges changed in the copy since
    /// the last call, with their bytes as they are now, in runs of at most
    /// `max_run` bytes (offsets in the region). Empty for other regions.
    pub fn take_pending(&self, max_run: usize) -> Vec<DirtyRun> {
        let mut g = self.lock();
        let Inner { mem, owner, .. } = &mut *g;
        let Owner::Remote(pending) = owner else {
            return Vec::new();
        };
        let max_run = max_run.max(1) as u64;
        let mut runs = Vec::new();
        for (s, e) in std::mem::take(pending) {
            let mut at = s;
            while at < e {
                let n = (e - at).min(max_run);
                runs.push(DirtyRun {
                    offset: at,
                    data: mem[at as usize..(at + n) as usize].to_vec(),
                });
                at += n;
            }
        }
        runs
    }

    /// For a remote mirror: true if changes wait to be sent to the owner.
    pub fn has_pending(&self) -> bool {
        matches!(&self.lock().owner, Owner::Remote(p) if !p.is_empty())
    }

    /// For a mirror the device reads from: copies the pages in which the
    /// owner's memory differs from the copy into the copy and marks them
    /// dirty (to send), returning how many there were. 0 for other regions.
    /// The cost is one comparison of the whole region.
    pub fn refresh(&self) -> usize {
        if !self.dir.device_reads() {
            return 0;
        }
        let mut g = self.lock();
        let Inner {
            mem,
            owner,
            dirty,
            written,
            ..
        } = &mut *g;
        let Owner::Mapped(owner) = owner else {
            return 0;
        };
        let p = PAGE_SIZE as usize;
        let mut changed = 0;
        for (i, (copy, theirs)) in mem.chunks_mut(p).zip(owner.chunks(p)).enumerate() {
            if copy != theirs {
                copy.copy_from_slice(theirs);
                let off = i as u64 * PAGE_SIZE;
                dirty.mark(off, PAGE_SIZE);
                written.mark(off, PAGE_SIZE);
                changed += 1;
            }
        }
        changed
    }

    /// First IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: regions are never empty. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Direction.
    pub fn dir(&self) -> DmaDir {
        self.dir
    }

    /// True if `iova..iova+len` overlaps this region.
    pub fn overlaps(&self, iova: u64, len: u64) -> bool {
        iova < self.iova + self.len && self.iova < iova.saturating_add(len)
    }

    /// The part of `iova..iova+len` inside this region, as `(offset, len)`
    /// in the region; `None` if they do not overlap.
    pub fn clip(&self, iova: u64, len: u64) -> Option<(u64, u64)> {
        if !self.overlaps(iova, len) {
            return None;
        }
        let start = iova.max(self.iova);
        let end = iova.saturating_add(len).min(self.iova + self.len);
        Some((start - self.iova, end - start))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-copy; the
        // bytes are still memory, so keep serving them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), DmaError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DmaError::OutOfRegion {
                offset,
                len: len as u64,
                size: self.len,
            }),
        }
    }

    /// Copies bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.with_slice(offset, buf.len(), |s| buf.copy_from_slice(s))
    }

    /// Writes `data` at `offset` and marks the pages dirty (a local change
    /// the other side has not seen).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.with_mut(offset, data.len(), |s| s.copy_from_slice(data))
    }

    /// Writes `data` at `offset` received from the other side; not marked
    /// dirty, since both sides now agree.
    pub fn apply(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.with_mut_clean(offset, data.len(), |s| s.copy_from_slice(data))
    }

    fn access<R>(
        &self,
        offset: u64,
        len: usize,
        mark: bool,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DmaError> {
        self.check(offset, len)?;
        let mut g = self.lock();
        let g = &mut *g;
        let o = offset as usize;
        let r = match &mut g.owner {
            Owner::Itself => f(&mut g.mem[o..o + len]),
            Owner::Remote(pending) => {
                let before = g.mem[o..o + len].to_vec();
                let r = f(&mut g.mem[o..o + len]);
                for (s, e) in changes(&before, &g.mem[o..o + len]) {
                    add_range(pending, offset + s as u64, offset + e as u64);
                }
                r
            }
            Owner::Mapped(owner) => {
                // Only the bytes `f` changed go through to the owner: the
                // rest of the copy may be older than the owner's memory
                // (the owner writes at will between refreshes, and a page
                // the device wrote a few bytes of may hold the owner's own
                // data too), and `f` may fill only part of the range (a
                // receive that got fewer bytes).
                let before = g.mem[o..o + len].to_vec();
                let r = f(&mut g.mem[o..o + len]);
                write_changes(&mut owner[o..o + len], &before, &g.mem[o..o + len]);
                r
            }
        };
        g.written.mark(offset, len as u64);
        if mark {
            g.dirty.mark(offset, len as u64);
        } else {
            g.applied.mark(offset, len as u64);
        }
        Ok(r)
    }

    /// Runs `f` on the bytes at `offset..offset+len` mutably and marks them
    /// dirty: for drivers that build descriptors in place.
    pub fn with_mut<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DmaError> {
        self.access(offset, len, true, f)
    }

    /// Runs `f` on the bytes at `offset..offset+len` without marking them
    /// dirty: for applying data received from the other side in place.
    pub fn with_mut_clean<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DmaError> {
        self.access(offset, len, false, f)
    }

    /// Number of dirty pages.
    pub fn dirty_pages(&self) -> usize {
        self.lock().dirty.count
    }

    /// Runs `f` on the bytes at `offset..offset+len`: for sending them
    /// without a copy. Other users of the region wait meanwhile, so `f`
    /// must not block.
    pub fn with_slice<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, DmaError> {
        self.check(offset, len)?;
        let g = self.lock();
        let o = offset as usize;
        Ok(f(&g.mem[o..o + len]))
    }

    /// Takes the dirty pages inside `offset..offset+len` (whole pages that
    /// touch the range), clears their dirty bits and returns them as
    /// `(offset, length)` runs of contiguous pages no longer than `max_run`
    /// bytes. The caller sends the bytes of each run.
    pub fn take_dirty_runs(&self, offset: u64, len: u64, max_run: usize) -> Vec<(u64, usize)> {
        let mut g = self.lock();
        if g.dirty.count == 0 || len == 0 || offset >= self.len {
            return Vec::new();
        }
        let end = offset.saturating_add(len).min(self.len);
        let max_pages = (max_run as u64 / PAGE_SIZE).max(1);
        g.dirty
            .take_runs(offset / PAGE_SIZE, end.div_ceil(PAGE_SIZE), max_pages)
    }

    /// Runs of contiguous pages ever written (by either side), no longer
    /// than `max_run` bytes each: the whole content of the region that a
    /// fresh, zeroed copy of it lacks (a frontend adopting a session). The
    /// scan skips untouched stretches 64 pages at a time.
    pub fn written_runs(&self, max_run: usize) -> Vec<(u64, usize)> {
        let mut g = self.lock();
        let max_pages = (max_run as u64 / PAGE_SIZE).max(1);
        g.written.runs(0, self.len / PAGE_SIZE, max_pages, false)
    }

    /// Takes the pages data from the other side was applied to since the
    /// last call (runs of at most `max_run` bytes): for a device that DMAs
    /// from its own copy of the memory and must bring it up to date.
    pub fn take_applied_runs(&self, max_run: usize) -> Vec<(u64, usize)> {
        let mut g = self.lock();
        if g.applied.count == 0 {
            return Vec::new();
        }
        let max_pages = (max_run as u64 / PAGE_SIZE).max(1);
        g.applied.take_runs(0, self.len / PAGE_SIZE, max_pages)
    }

    /// Like [`take_dirty_runs`](Self::take_dirty_runs), with a copy of the
    /// bytes of each run.
    pub fn take_dirty(&self, offset: u64, len: u64, max_run: usize) -> Vec<DirtyRun> {
        self.take_dirty_runs(offset, len, max_run)
            .into_iter()
            .map(|(offset, len)| DirtyRun {
                offset,
                data: self
                    .with_slice(offset, len, <[u8]>::to_vec)
                    .expect("runs lie inside the region"),
            })
            .collect()
    }

    /// Takes every dirty page; see [`take_dirty`](Self::take_dirty).
    pub fn take_all_dirty(&self, max_run: usize) -> Vec<DirtyRun> {
        self.take_dirty(0, self.len, max_run)
    }
}

/// The runs of bytes (`start..end`) in which `new` differs from `old`.
fn changes<'a>(old: &'a [u8], new: &'a [u8]) -> impl Iterator<Item = (usize, usize)> + 'a {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < new.len() && new[i] == old[i] {
            i += 1;
        }
        if i == new.len() {
            return None;
        }
        let start = i;
        while i < new.len() && new[i] != old[i] {
            i += 1;
        }
        Some((start, i))
    })
}

/// Copies into `dst` the runs of bytes in which `new` differs from `old`.
fn write_changes(dst: &mut [u8], old: &[u8], new: &[u8]) {
    for (s, e) in changes(old, new) {
        dst[s..e].copy_from_slice(&new[s..e]);
    }
}

/// Adds `start..end` to `ranges`, merging it with ranges it overlaps or
/// lies within [`PENDING_GAP`] of.
fn add_range(ranges: &mut Ranges, mut start: u64, mut end: u64) {
    let near: Vec<(u64, u64)> = ranges
        .range(..end + PENDING_GAP)
        .rev()
        .take_while(|(_, &e)| e + PENDING_GAP >= start)
        .map(|(&s, &e)| (s, e))
        .collect();
    for (s, e) in near {
        ranges.remove(&s);
        start = start.min(s);
        end = end.max(e);
    }
    ranges.insert(start, end);
}

fn anon(len: u64) -> Result<MmapMut, DmaError> {
    MmapMut::map_anon(len as usize).map_err(|source| DmaError::Alloc { len, source })
}

fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<MmapMut, DmaError> {
    crate::sys::map_shared(fd, offset, len as usize).map_err(|source| DmaError::MapFd {
        len,
        offset,
        source,
    })
}

fn check_range(iova: u64, len: u64) -> Result<(), DmaError> {
    let ok = len > 0
        && len <= MAX_REGION_SIZE
        && iova % PAGE_SIZE == 0
        && len % PAGE_SIZE == 0
        && iova.checked_add(len).is_some();
    if ok {
        Ok(())
    } else {
        Err(DmaError::BadRange { iova, len })
    }
}

/// The set of DMA mappings a device can reach, by IOVA.
#[derive(Debug, Default)]
pub struct DmaSpace {
    regions: Vec<Arc<DmaRegion>>,
}

impl DmaSpace {
    /// An empty address space.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a mapping; fails if it overlaps an existing one.
    pub fn insert(&mut self, region: Arc<DmaRegion>) -> Result<(), DmaError> {
        self.check_free(region.iova(), region.len())?;
        let pos = self.regions.partition_point(|r| r.iova() < region.iova());
        self.regions.insert(pos, region);
        Ok(())
    }

    /// Fails with [`DmaError::Overlap`] (or `BadRange`) if `iova..iova+len`
    /// cannot be mapped.
    pub fn check_free(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        check_range(iova, len)?;
        match self.regions.iter().find(|r| r.overlaps(iova, len)) {
            Some(r) => Err(DmaError::Overlap {
                iova,
                len,
                existing: r.iova(),
                existing_len: r.len(),
            }),
            None => Ok(()),
        }
    }

    /// Removes the mapping starting at `iova`.
    pub fn remove(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DmaError> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.iova() == iova)
            .ok_or(DmaError::NotMapped(iova))?;
        Ok(self.regions.remove(pos))
    }

    /// Removes every mapping.
    pub fn clear(&mut self) -> Vec<Arc<DmaRegion>> {
        std::mem::take(&mut self.regions)
    }

    /// The mapping starting at `iova`.
    pub fn get(&self, iova: u64) -> Option<&Arc<DmaRegion>> {
        self.regions.iter().find(|r| r.iova() == iova)
    }

    /// All mappings, by IOVA.
    pub fn regions(&self) -> &[Arc<DmaRegion>] {
        &self.regions
    }

    /// Total bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len()).sum()
    }

    /// The mapping holding all of `iova..iova+len`, and the offset in it.
    pub fn resolve(&self, iova: u64, len: u64) -> Result<(&Arc<DmaRegion>, u64), DmaError> {
        let end = iova
            .checked_add(len)
            .ok_or(DmaError::Unmapped { iova, len })?;
        self.regions
            .iter()
            .find(|r| r.iova() <= iova && end <= r.iova() + r.len())
            .map(|r| (r, iova - r.iova()))
            .ok_or(DmaError::Unmapped { iova, len })
    }

    /// A device read of `buf.len()` bytes at `iova`.
    pub fn device_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (r, off) = self.resolve(iova, buf.len() as u64)?;
        if !r.dir().device_reads() {
            return Err(DmaError::Permission { iova, write: false });
        }
        r.read(off, buf)
    }

    /// A device write of `data` at `iova`; the pages become dirty.
    pub fn device_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let (r, off) = self.resolve(iova, data.len() as u64)?;
        if !r.dir().device_writes() {
            return Err(DmaError::Permission { iova, write: true });
        }
        r.write(off, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    /// A file standing in for a VM's shared RAM, removed when dropped.
    struct SharedFile(std::fs::File, std::path::PathBuf);

    impl SharedFile {
        fn new(len: u64) -> Self {
            let path = std::env::temp_dir().join(format!(
                "cio-dma-test-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.set_len(len).unwrap();
            SharedFile(f, path)
        }
    }

    impl Drop for SharedFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.1);
        }
    }

    #[test]
    fn map_fd_uses_the_owners_memory_in_place() {
        let f = SharedFile::new(4 * PAGE_SIZE);
        f.0.write_all_at(b"guest", PAGE_SIZE + 8).unwrap();
        let r = DmaRegion::map_fd(
            0x10000,
            2 * PAGE_SIZE,
            DmaDir::Bidirectional,
            f.0.as_fd(),
            PAGE_SIZE,
        )
        .unwrap();
        assert!(!r.is_mirror());
        let mut buf = [0u8; 5];
        r.read(8, &mut buf).unwrap();
        assert_eq!(&buf, b"guest");
        r.write(PAGE_SIZE, b"device").unwrap();
        let mut back = [0u8; 6];
        f.0.read_exact_at(&mut back, 2 * PAGE_SIZE).unwrap();
        assert_eq!(&back, b"device");
        assert_eq!(r.refresh(), 0, "in place: nothing to compare");
    }

    #[test]
    fn mirror_finds_owner_changes_by_page_and_writes_the_other_side_through() {
        let f = SharedFile::new(8 * PAGE_SIZE);
        f.0.write_all_at(&[7; 10], 3 * PAGE_SIZE - 5).unwrap(); // pages 2 and 3
        let r =
            DmaRegion::mirror_fd(0, 8 * PAGE_SIZE, DmaDir::Bidirectional, f.0.as_fd(), 0).unwrap();
        assert!(r.is_mirror());
        // The copy starts zeroed, like the other side's.
        let mut b = [1u8; 1];
        r.read(3 * PAGE_SIZE - 5, &mut b).unwrap();
        assert_eq!(b, [0]);
        assert_eq!(r.refresh(), 2);
        let p = PAGE_SIZE as usize;
        assert_eq!(
            r.take_dirty_runs(0, r.len(), 1 << 20),
            [(2 * PAGE_SIZE, 2 * p)]
        );
        r.read(3 * PAGE_SIZE - 5, &mut b).unwrap();
        assert_eq!(b, [7]);
        assert_eq!(r.refresh(), 0, "nothing changed since");
        // Data from the other side reaches the owner and is not sent back.
        r.apply(6 * PAGE_SIZE, b"done").unwrap();
        let mut back = [0u8; 4];
        f.0.read_exact_at(&mut back, 6 * PAGE_SIZE).unwrap();
        assert_eq!(&back, b"done");
        assert_eq!(r.refresh(), 0);
        assert_eq!(r.dirty_pages(), 0);
        // A device write of part of a page leaves the owner's newer bytes
        // in the rest of it, even when the other side sends the whole page.
        f.0.write_all_at(b"guest's", 5 * PAGE_SIZE + 100).unwrap();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        page[..4].copy_from_slice(b"dev!");
        r.apply(5 * PAGE_SIZE, &page).unwrap();
        let mut back = [0u8; 7];
        f.0.read_exact_at(&mut back[..4], 5 * PAGE_SIZE).unwrap();
        assert_eq!(&back[..4], b"dev!");
        f.0.read_exact_at(&mut back, 5 * PAGE_SIZE + 100).unwrap();
        assert_eq!(&back, b"guest's");
        // A receive that fills only part of its range writes only that.
        f.0.write_all_at(b"keep", 5 * PAGE_SIZE + 200).unwrap();
        r.with_mut_clean(5 * PAGE_SIZE + 190, 100, |s| s[..2].copy_from_slice(b"ok"))
            .unwrap();
        let mut four = [0u8; 4];
        f.0.read_exact_at(&mut four, 5 * PAGE_SIZE + 200).unwrap();
        assert_eq!(&four, b"keep");
        f.0.read_exact_at(&mut four[..2], 5 * PAGE_SIZE + 190)
            .unwrap();
        assert_eq!(&four[..2], b"ok");
        assert_eq!(r.refresh(), 1, "the owner's bytes differ from the copy");
        let _ = r.take_dirty_runs(0, r.len(), 1 << 20);
        // The owner changing one byte of a page sends that page.
        f.0.write_all_at(&[9], 6 * PAGE_SIZE + 1).unwrap();
        assert_eq!(r.refresh(), 1);
        assert_eq!(r.take_dirty_runs(0, r.len(), 1 << 20), [(6 * PAGE_SIZE, p)]);
    }

    #[test]
    fn remote_mirror_compares_fetched_bytes_and_keeps_changes_pending() {
        let p = PAGE_SIZE as usize;
        let r = DmaRegion::mirror_remote(0, 4 * PAGE_SIZE, DmaDir::Bidirectional).unwrap();
        assert!(r.is_mirror() && r.is_remote_mirror());
        // The owner's bytes, fetched: pages 1 and 2 differ from the copy.
        let mut theirs = vec![0u8; 4 * p];
        theirs[p + 7] = 1;
        theirs[2 * p..3 * p].fill(2);
        assert_eq!(r.refresh_from(0, &theirs), 2);
        assert_eq!(r.take_dirty_runs(0, r.len(), 1 << 20), [(PAGE_SIZE, 2 * p)]);
        assert_eq!(r.refresh_from(0, &theirs), 0, "nothing changed since");
        assert!(!r.has_pending());
        // The other side's data waits as the changed bytes only: a whole
        // page applied over the owner's page 2 changes 3 bytes of it.
        let mut page = vec![2u8; p];
        page[10..13].copy_from_slice(b"dev");
        r.apply(2 * PAGE_SIZE, &page).unwrap();
        // Close changes are one run, far ones two.
        r.apply(2 * PAGE_SIZE + 40, b"x").unwrap();
        r.apply(3 * PAGE_SIZE + 100, b"far").unwrap();
        assert!(r.has_pending());
        // A fetch made before the owner saw them leaves them in the copy;
        // a page that differs only there is no change of the owner's.
        let mut newer = theirs[2 * p..].to_vec();
        newer[p] = 5;
        assert_eq!(r.refresh_from(2 * PAGE_SIZE, &newer), 1);
        assert_eq!(r.take_dirty_runs(0, r.len(), 1 << 20), [(3 * PAGE_SIZE, p)]);
        let mut b = [0u8; 3];
        r.read(2 * PAGE_SIZE + 10, &mut b).unwrap();
        assert_eq!(&b, b"dev");
        let runs = r.take_pending(1 << 20);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(runs[0].offset, 2 * PAGE_SIZE + 10);
        assert_eq!(&runs[0].data[..3], b"dev");
        assert_eq!(runs[0].data.len(), 31);
        assert_eq!(runs[1].offset, 3 * PAGE_SIZE + 100);
        assert_eq!(runs[1].data, b"far");
        assert!(!r.has_pending() && r.take_pending(1 << 20).is_empty());
        // Runs are capped; a fetch outside the region or unaligned is ignored.
        r.write(0, &[9; 100]).unwrap();
        assert_eq!(r.take_pending(64).len(), 2);
        assert_eq!(r.refresh_from(4 * PAGE_SIZE, &theirs[..p]), 0);
        assert_eq!(r.refresh_from(1, &theirs[..p]), 0);
        // Other regions have nothing pending and compare nothing.
        let plain = DmaRegion::new(0, PAGE_SIZE, DmaDir::Bidirectional).unwrap();
        plain.write(0, &[1]).unwrap();
        assert!(!plain.has_pending() && plain.take_pending(64).is_empty());
        assert_eq!(plain.refresh_from(0, &theirs[..p]), 0);
    }

    #[test]
    fn a_mirror_the_device_only_writes_is_never_compared() {
        let f = SharedFile::new(PAGE_SIZE);
        f.0.write_all_at(&[1], 0).unwrap();
        let r = DmaRegion::mirror_fd(0, PAGE_SIZE, DmaDir::FromDevice, f.0.as_fd(), 0).unwrap();
        assert_eq!(r.refresh(), 0);
    }

    #[test]
    fn map_fd_past_the_end_of_the_fd_fails_cleanly() {
        let f = SharedFile::new(PAGE_SIZE);
        // mmap itself accepts a range past the end of a file (touching it
        // would be SIGBUS), so the check is ours.
        for offset in [1, PAGE_SIZE, u64::MAX - 10] {
            let e =
                DmaRegion::map_fd(0, PAGE_SIZE, DmaDir::ToDevice, f.0.as_fd(), offset).unwrap_err();
            assert!(matches!(e, DmaError::MapFd { .. }), "{e}");
        }
        let e =
            DmaRegion::mirror_fd(0, 2 * PAGE_SIZE, DmaDir::ToDevice, f.0.as_fd(), 0).unwrap_err();
        assert!(matches!(e, DmaError::MapFd { .. }), "{e}");
    }

    #[test]
    fn written_runs_cover_pages_either_side_wrote_and_survive_syncs() {
        let r = DmaRegion::new(0, 16 * PAGE_SIZE, DmaDir::Bidirectional).unwrap();
        assert!(r.written_runs(1 << 20).is_empty());
        r.write(PAGE_SIZE + 5, &[1]).unwrap();
        r.apply(2 * PAGE_SIZE, &[2]).unwrap();
        r.write(9 * PAGE_SIZE - 1, &[3]).unwrap();
        let _ = r.take_dirty_runs(0, r.len(), 1 << 20);
        let p = PAGE_SIZE as usize;
        assert_eq!(
            r.written_runs(1 << 20),
            [(PAGE_SIZE, 2 * p), (8 * PAGE_SIZE, p)]
        );
        // Runs are capped.
        assert_eq!(
            r.written_runs(p),
            [(PAGE_SIZE, p), (2 * PAGE_SIZE, p), (8 * PAGE_SIZE, p)]
        );
    }

    #[test]
    fn new_rejects_bad_ranges() {
        for (iova, len) in [(0, 0), (1, 4096), (0, 100), (!4095, 8192)] {
            assert!(
                matches!(
                    DmaRegion::new(iova, len, DmaDir::ToDevice),
                    Err(DmaError::BadRange { .. })
                ),
                "{iova:#x}+{len:#x}"
            );
        }
    }

    #[test]
    fn write_marks_pages_and_take_dirty_coalesces_runs() {
        let r = DmaRegion::new(0x10000, 16 * PAGE_SIZE, DmaDir::Bidirectional).unwrap();
        r.write(100, &[1; 10]).unwrap(); // page 0
        r.write(PAGE_SIZE - 1, &[2, 2]).unwrap(); // pages 0 and 1
        r.write(5 * PAGE_SIZE, &[3]).unwrap(); // page 5
        assert_eq!(r.dirty_pages(), 3);

        let runs = r.take_all_dirty(1 << 20);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].offset, 0);
        assert_eq!(runs[0].data.len(), 2 * PAGE_SIZE as usize);
        assert_eq!(&runs[0].data[100..110], &[1; 10]);
        assert_eq!(runs[1].offset, 5 * PAGE_SIZE);
        assert_eq!(runs[1].data[0], 3);
        assert_eq!(r.dirty_pages(), 0);
        assert!(r.take_all_dirty(1 << 20).is_empty());
    }

    #[test]
    fn take_dirty_splits_long_runs_and_respects_range() {
        let r = DmaRegion::new(0, 8 * PAGE_SIZE, DmaDir::Bidirectional).unwrap();
        r.write(0, &vec![7; 8 * PAGE_SIZE as usize]).unwrap();
        let part = r.take_dirty(2 * PAGE_SIZE, 2 * PAGE_SIZE, 1 << 20);
        assert_eq!(part.len(), 1);
        assert_eq!(part[0].offset, 2 * PAGE_SIZE);
        assert_eq!(r.dirty_pages(), 6);
        let rest = r.take_all_dirty(3 * PAGE_SIZE as usize);
        let sizes: Vec<usize> = rest.iter().map(|x| x.data.len() / 4096).collect();
        assert_eq!(sizes, vec![2, 3, 1]);
    }

    #[test]
    fn apply_does_not_mark_dirty() {
        let r = DmaRegion::new(0, PAGE_SIZE, DmaDir::FromDevice).unwrap();
        r.apply(8, &[9; 8]).unwrap();
        assert_eq!(r.dirty_pages(), 0);
        let mut b = [0; 8];
        r.read(8, &mut b).unwrap();
        assert_eq!(b, [9; 8]);
    }

    #[test]
    fn applied_pages_are_tracked_apart_from_dirty_ones() {
        let r = DmaRegion::new(0, 4 * PAGE_SIZE, DmaDir::Bidirectional).unwrap();
        r.apply(PAGE_SIZE + 5, &[1; 10]).unwrap();
        r.write(3 * PAGE_SIZE, &[2]).unwrap();
        assert_eq!(
            r.take_applied_runs(1 << 20),
            vec![(PAGE_SIZE, PAGE_SIZE as usize)]
        );
        assert!(r.take_applied_runs(1 << 20).is_empty());
        assert_eq!(
            r.take_dirty_runs(0, r.len(), 1 << 20),
            vec![(3 * PAGE_SIZE, 4096)]
        );
    }

    #[test]
    fn clip_keeps_the_overlapping_part() {
        let r = DmaRegion::new(0x10000, 4 * PAGE_SIZE, DmaDir::ToDevice).unwrap();
        assert_eq!(r.clip(0, 0x11000), Some((0, 0x1000)));
        assert_eq!(r.clip(0x12000, u64::MAX), Some((0x2000, 0x2000)));
        assert_eq!(r.clip(0x11000, 0x100), Some((0x1000, 0x100)));
        assert_eq!(r.clip(0x14000, 0x1000), None);
        assert_eq!(r.clip(0, 0x10000), None);
    }

    #[test]
    fn accesses_past_region_end_fail() {
        let r = DmaRegion::new(0, PAGE_SIZE, DmaDir::FromDevice).unwrap();
        assert!(r.write(PAGE_SIZE - 1, &[0, 0]).is_err());
        assert!(r.read(u64::MAX, &mut [0]).is_err());
    }

    #[test]
    fn space_rejects_overlap_and_checks_direction() {
        let mut s = DmaSpace::new();
        s.insert(Arc::new(
            DmaRegion::new(0x1000, 0x2000, DmaDir::ToDevice).unwrap(),
        ))
        .unwrap();
        let e = s
            .insert(Arc::new(
                DmaRegion::new(0x2000, 0x1000, DmaDir::FromDevice).unwrap(),
            ))
            .unwrap_err();
        assert!(matches!(
            e,
            DmaError::Overlap {
                existing: 0x1000,
                ..
            }
        ));
        s.insert(Arc::new(
            DmaRegion::new(0x3000, 0x1000, DmaDir::FromDevice).unwrap(),
        ))
        .unwrap();

        assert!(matches!(
            s.device_write(0x1000, &[1]),
            Err(DmaError::Permission { write: true, .. })
        ));
        assert!(matches!(
            s.device_read(0x3000, &mut [0]),
            Err(DmaError::Permission { write: false, .. })
        ));
        // Straddling two mappings is not inside one.
        assert!(matches!(
            s.device_read(0x2ff0, &mut [0; 32]),
            Err(DmaError::Unmapped { .. })
        ));
        s.device_write(0x3010, &[5]).unwrap();
        assert_eq!(s.get(0x3000).unwrap().dirty_pages(), 1);
        assert_eq!(s.mapped_bytes(), 0x3000);
        s.remove(0x1000).unwrap();
        assert!(matches!(s.remove(0x1000), Err(DmaError::NotMapped(0x1000))));
    }
}
