//! The `Device` trait every device in cio implements, and the descriptions
//! (ids, regions, interrupts) that travel with it.
//!
//! A VFIO function on the backend, an emulated model and a `RemoteDevice` on
//! the frontend all implement [`Device`], so the backend can serve any device
//! and a driver can run unchanged against any of them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use vmm_sys_util::eventfd::EventFd;

use crate::dma::{DmaError, DmaRegion};

/// Region index of PCI configuration space, as in VFIO
/// (`VFIO_PCI_CONFIG_REGION_INDEX`). BARs 0–5 use indices 0–5.
pub const CONFIG_REGION: u32 = 7;

/// What kind of address space a region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RegionKind {
    /// PCI configuration space.
    Config = 0,
    /// A memory BAR.
    Mmio = 1,
    /// An I/O-port BAR.
    Pio = 2,
}

impl RegionKind {
    /// Decodes the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Config),
            1 => Some(Self::Mmio),
            2 => Some(Self::Pio),
            _ => None,
        }
    }
}

/// Access-width bit for 1-byte accesses in [`RegionInfo::widths`].
pub const WIDTH_1: u8 = 1 << 0;
/// Access-width bit for 2-byte accesses.
pub const WIDTH_2: u8 = 1 << 1;
/// Access-width bit for 4-byte accesses.
pub const WIDTH_4: u8 = 1 << 2;
/// Access-width bit for 8-byte accesses.
pub const WIDTH_8: u8 = 1 << 3;

/// Region flag: readable.
pub const REGION_READ: u8 = 1 << 0;
/// Region flag: writable.
pub const REGION_WRITE: u8 = 1 << 1;
/// Region flag: the BAR is prefetchable.
pub const REGION_PREFETCH: u8 = 1 << 2;
/// Region flag: the BAR is 64-bit.
pub const REGION_64BIT: u8 = 1 << 3;

/// One region of a device: config space or a BAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// VFIO-style index: 0–5 for BARs, [`CONFIG_REGION`] for config space.
    pub index: u32,
    /// Address-space kind.
    pub kind: RegionKind,
    /// Size in bytes.
    pub size: u64,
    /// `REGION_*` flags.
    pub flags: u8,
    /// `WIDTH_*` bits: the access sizes the device accepts in this region.
    pub widths: u8,
}

impl RegionInfo {
    /// True if `len` is one of this region's access widths.
    pub fn accepts_width(&self, len: usize) -> bool {
        matches!(len, 1 | 2 | 4 | 8) && self.widths & (len as u8) != 0
    }

    /// The access a bulk transfer makes at `at` with `left` bytes to go:
    /// 4 bytes where the region takes them (the width PCI registers are
    /// made for: QEMU's edu, for one, answers 8-byte reads of most of its
    /// registers with all-ones), else the widest of 8, 2, 1 that is
    /// aligned there and fits.
    pub fn bulk_width(&self, at: u64, left: usize) -> Option<usize> {
        [4, 8, 2, 1]
            .into_iter()
            .find(|&w| self.accepts_width(w) && at % w as u64 == 0 && w <= left)
    }
}

/// Interrupt kinds, numbered as VFIO's irq indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IrqKind {
    /// Legacy level-triggered INTx (automasked after each delivery).
    Intx = 0,
    /// MSI.
    Msi = 1,
    /// MSI-X.
    Msix = 2,
}

impl IrqKind {
    /// Decodes the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Intx),
            1 => Some(Self::Msi),
            2 => Some(Self::Msix),
            _ => None,
        }
    }
}

impl fmt::Display for IrqKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Intx => "INTx",
            Self::Msi => "MSI",
            Self::Msix => "MSI-X",
        })
    }
}

/// How a device resets, and so what its next user inherits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetMethod {
    /// Not said (a protocol-1 backend).
    Unknown = 0,
    /// No reset at all: the next user gets the device as the last one
    /// left it (QEMU's edu and ivshmem).
    None = 1,
    /// A reset that returns the function to its power-on state: FLR, a
    /// bus or slot reset, an emulated model's reset.
    Full = 2,
    /// A power-management reset (D3hot to D0), which may leave registers
    /// as they were (QEMU's e1000e).
    PowerState = 3,
}

impl ResetMethod {
    /// Decodes the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Unknown),
            1 => Some(Self::None),
            2 => Some(Self::Full),
            3 => Some(Self::PowerState),
            _ => None,
        }
    }

    /// True if a reset leaves nothing of the previous user's state.
    pub fn clears_state(self) -> bool {
        self == Self::Full
    }

    /// From the kernel's `reset_method` sysfs attribute: the methods it
    /// will try, in order (`flr bus`, `pm`, ...). The kernel hides the
    /// attribute of a function with no method, so empty means none.
    pub fn from_sysfs(methods: &str) -> Self {
        match methods.split_whitespace().next() {
            Some("pm") => Self::PowerState,
            Some(_) => Self::Full,
            None => Self::None,
        }
    }
}

impl fmt::Display for ResetMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::None => "none",
            Self::Full => "full",
            Self::PowerState => "power-state (may keep registers)",
        })
    }
}

/// The interrupts of one kind a device offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt kind.
    pub kind: IrqKind,
    /// Number of vectors (1 for INTx).
    pub count: u32,
}

/// Everything a frontend needs to know about a device before driving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name the backend serves it under (unique per backend).
    pub name: String,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// PCI subsystem vendor id.
    pub subsystem_vendor: u16,
    /// PCI subsystem id.
    pub subsystem_device: u16,
    /// 24-bit class code (base class, subclass, programming interface).
    pub class: u32,
    /// Revision id.
    pub revision: u8,
    /// Regions, config space included.
    pub regions: Vec<RegionInfo>,
    /// Interrupts.
    pub irqs: Vec<IrqInfo>,
    /// How the device resets when a session releases it.
    pub reset: ResetMethod,
}

impl DeviceInfo {
    /// The region with VFIO index `index`.
    pub fn region(&self, index: u32) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.index == index)
    }

    /// Number of vectors of `kind` (0 if the device has none).
    pub fn irq_count(&self, kind: IrqKind) -> u32 {
        self.irqs
            .iter()
            .find(|i| i.kind == kind)
            .map_or(0, |i| i.count)
    }

    /// Checks a bulk transfer of `len` bytes at `offset` of region `index`:
    /// the region exists, allows the direction, holds the range, and the
    /// range can be made of its accesses ([`RegionInfo::bulk_width`]).
    pub fn check_bulk(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<&RegionInfo, DeviceError> {
        let region = self.directed(index, write)?;
        ends_inside(region, offset, len)?;
        plan(region, offset, len, &mut |_, _, _, _| Ok(()))?;
        Ok(region)
    }

    /// Region `index`, if it allows the direction.
    fn directed(&self, index: u32, write: bool) -> Result<&RegionInfo, DeviceError> {
        let region = self.region(index).ok_or(DeviceError::NoRegion(index))?;
        let needed = if write { REGION_WRITE } else { REGION_READ };
        if region.flags & needed == 0 {
            return Err(DeviceError::Denied {
                region: index,
                write,
            });
        }
        Ok(region)
    }

    /// Checks an access of `len` bytes at `offset` of region `index` before
    /// it reaches a device: the region exists, allows the direction, accepts
    /// the width, the offset is aligned to it and the access ends inside.
    pub fn check_access(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<&RegionInfo, DeviceError> {
        let region = self.directed(index, write)?;
        if !region.accepts_width(len) {
            return Err(DeviceError::BadWidth {
                region: index,
                len,
                widths: region.widths,
            });
        }
        if offset % len as u64 != 0 {
            return Err(DeviceError::Unaligned {
                region: index,
                offset,
                len,
            });
        }
        ends_inside(region, offset, len)?;
        Ok(region)
    }
}

/// Errors a [`Device`] reports. Each names what went wrong with enough
/// detail to act on; none of them means the device itself is gone unless it
/// says so.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device has no region with this index.
    #[error("device has no region {0}")]
    NoRegion(u32),
    /// The region does not allow this direction.
    #[error("region {region} is not {}", if *write { "writable" } else { "readable" })]
    Denied {
        /// Region index.
        region: u32,
        /// Whether the access was a write.
        write: bool,
    },
    /// The access width is not one the region accepts.
    #[error("region {region} does not accept {len}-byte accesses (accepted widths: {})", widths_string(*widths))]
    BadWidth {
        /// Region index.
        region: u32,
        /// Requested access length.
        len: usize,
        /// Accepted `WIDTH_*` bits.
        widths: u8,
    },
    /// The offset is not aligned to the access width.
    #[error("offset {offset:#x} in region {region} is not aligned to {len} bytes")]
    Unaligned {
        /// Region index.
        region: u32,
        /// Requested offset.
        offset: u64,
        /// Requested access length.
        len: usize,
    },
    /// The access ends past the end of the region.
    #[error(
        "access of {len} bytes at {offset:#x} is past the end of region {region} ({size:#x} bytes)"
    )]
    OutOfRange {
        /// Region index.
        region: u32,
        /// Requested offset.
        offset: u64,
        /// Requested access length.
        len: usize,
        /// Region size.
        size: u64,
    },
    /// The device has no interrupts of this kind, or fewer vectors.
    #[error("device has no {kind} vectors {start}..{end}")]
    NoIrq {
        /// Interrupt kind.
        kind: IrqKind,
        /// First vector asked for.
        start: u32,
        /// One past the last vector asked for.
        end: u32,
    },
    /// A DMA mapping operation failed.
    #[error("dma mapping")]
    Dma(#[from] DmaError),
    /// The device does not support this operation.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// The device (or the link to it) failed; the message says how.
    #[error("{0}")]
    Failed(String),
    /// The remote backend refused the request.
    #[error("backend refused: {message} ({})", code.name())]
    Remote {
        /// Protocol error code.
        code: crate::wire::ErrorCode,
        /// The backend's explanation.
        message: String,
    },
    /// An earlier posted write failed on the backend.
    #[error("posted write (frame {seq}) failed on the backend: {message} ({})", code.name())]
    Posted {
        /// Sequence number of the failed frame.
        seq: u64,
        /// Protocol error code.
        code: crate::wire::ErrorCode,
        /// The backend's explanation.
        message: String,
    },
    /// The connection to the backend is gone; reconnecting may help.
    #[error("connection to the backend lost: {0}")]
    Disconnected(String),
}

fn widths_string(widths: u8) -> String {
    let list: Vec<String> = [1u8, 2, 4, 8]
        .iter()
        .filter(|w| widths & **w != 0)
        .map(|w| w.to_string())
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// A PCI function as cio sees it: regions, interrupts, DMA and reset.
///
/// Accesses take the VFIO region index ([`CONFIG_REGION`] for config space)
/// and an offset inside the region. Implementations must check every access
/// with [`DeviceInfo::check_access`] (or stricter) before touching anything.
///
/// Writes may be *posted*: a remote device queues them and sends them in
/// batches; any non-posted operation (a read, a map, a reset, [`flush`])
/// orders after all earlier writes. Errors of posted writes are reported by
/// the next non-posted operation.
///
/// [`flush`]: Device::flush
pub trait Device: Send {
    /// The device's description.
    fn info(&self) -> &DeviceInfo;

    /// Reads `data.len()` bytes at `offset` of region `region`.
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `data` at `offset` of region `region`. May be posted.
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// Routes vectors `start..start + fds.len()` of `kind` to `fds`: the
    /// device signals a vector's eventfd each time it raises it. An empty
    /// `fds` disables every vector of `kind`. INTx is automasked after each
    /// delivery until [`unmask_intx`](Device::unmask_intx).
    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError>;

    /// Unmasks INTx after the driver handled it; if the line is still
    /// asserted it fires again.
    fn unmask_intx(&mut self) -> Result<(), DeviceError>;

    /// Lets the device DMA to and from `region` at its IOVA range.
    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError>;

    /// Removes the mapping that starts at `iova` and returns it.
    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError>;

    /// [`dma_map`](Self::dma_map) without waiting for a device elsewhere to
    /// confirm it: the mapping is usable at once (requests after it reach
    /// the device after it), and a failure there is reported by a later
    /// call, as for posted writes. For a caller that maps per buffer and
    /// cannot wait a round trip each time, driving a device that learns of
    /// new work from register writes: the wait also brings the device's
    /// latest writes along, which a driver reading device-written memory
    /// right after the map (nvme's shadow doorbells) needs, so the
    /// vfio-user server does not post its maps. By default the same as
    /// `dma_map`.
    fn dma_map_posted(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        self.dma_map(region)
    }

    /// [`dma_unmap`](Self::dma_unmap) without waiting; a device elsewhere
    /// drops what it wrote to the mapping and had not sent yet, so call it
    /// only for memory whose device writes were announced (by the interrupt
    /// or reply of the completion they belong to, which they precede). By
    /// default the same as `dma_unmap`.
    fn dma_unmap_posted(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        self.dma_unmap(iova)
    }

    /// Makes CPU writes to `iova..iova+len` visible to the device. A no-op for
    /// devices that share memory with the caller.
    fn sync_for_device(&mut self, _iova: u64, _len: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Makes device writes to `iova..iova+len` visible to the CPU. A no-op
    /// for devices that share memory with the caller.
    fn sync_for_cpu(&mut self, _iova: u64, _len: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    /// True when the device DMAs from a copy of the mapped memory kept
    /// elsewhere (a device on another host), false when it reads and writes
    /// the mapped memory itself. A server handing the device memory whose
    /// owner writes it without telling (a VM's RAM) gives a copying device a
    /// [`DmaRegion::mirror_fd`] and the others [`DmaRegion::map_fd`].
    fn dma_is_copied(&self) -> bool {
        false
    }

    /// Called by a server before an access that may start device work: a
    /// device that DMAs from its own copy of the mapped memory brings that
    /// copy up to date with what was applied to the mappings.
    fn prepare_dma(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Called by a server before it sends device-written data: a device that
    /// DMAs into its own copy writes the pages it changed into the mappings
    /// (which marks them dirty).
    fn collect_dma(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Waits until every posted write has reached the device and reports the
    /// first error any of them got.
    fn flush(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Waits until `fd`, an eventfd this device's interrupts are routed to
    /// ([`set_irqs`](Device::set_irqs)), counts one, for at most `timeout`,
    /// and takes its count (0: the time ran out). The default waits on the
    /// eventfd. A remote device reads its connection in the calling thread
    /// meanwhile, so that the interrupt wakes only this thread (not the
    /// client's receive thread, which would then wake this one). `fd`
    /// should be non-blocking (`EFD_NONBLOCK`, as for `set_irqs`): another
    /// thread that takes the count between the wake-up and the read would
    /// otherwise leave this one blocked in the read until the next
    /// interrupt.
    fn wait_irq(&mut self, fd: &EventFd, timeout: Duration) -> Result<u64, DeviceError> {
        wait_eventfd(fd, timeout)
    }

    /// Resets the device to its power-on state. DMA mappings and interrupt
    /// routing stay in place.
    fn reset(&mut self) -> Result<(), DeviceError>;

    /// Reads `data.len()` bytes at `offset` of region `region` as the
    /// accesses the region accepts ([`RegionInfo::bulk_width`]; a BAR dump,
    /// a framebuffer copy). A remote device asks its
    /// backend once per [`MAX_BULK`](crate::wire::MAX_BULK) bytes instead of
    /// once per access.
    fn read_bulk(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        read_split(self, region, offset, data)
    }

    /// [`read_bulk`](Device::read_bulk) of `len` bytes appended to `out`
    /// (a backend's reply to a bulk read). The default zero-fills the space
    /// and reads into it ([`read_bulk_zeroed`]); a region that is plain
    /// memory can copy straight in, touching each byte once. On error `out`
    /// is as it was.
    fn read_bulk_into(
        &mut self,
        region: u32,
        offset: u64,
        len: usize,
        out: &mut BytesMut,
    ) -> Result<(), DeviceError> {
        read_bulk_zeroed(self, region, offset, len, out)
    }

    /// Writes `data` at `offset` of region `region` as
    /// [`read_bulk`](Device::read_bulk) reads. May be posted.
    fn write_bulk(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        write_split(self, region, offset, data)
    }

    /// Reads a 32-bit little-endian value.
    fn read32(&mut self, region: u32, offset: u64) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.read(region, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a 64-bit little-endian value.
    fn read64(&mut self, region: u32, offset: u64) -> Result<u64, DeviceError> {
        let mut b = [0u8; 8];
        self.read(region, offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a 32-bit little-endian value.
    fn write32(&mut self, region: u32, offset: u64, value: u32) -> Result<(), DeviceError> {
        self.write(region, offset, &value.to_le_bytes())
    }

    /// Writes a 64-bit little-endian value.
    fn write64(&mut self, region: u32, offset: u64, value: u64) -> Result<(), DeviceError> {
        self.write(region, offset, &value.to_le_bytes())
    }

    /// Reads a byte.
    fn read8(&mut self, region: u32, offset: u64) -> Result<u8, DeviceError> {
        let mut b = [0u8; 1];
        self.read(region, offset, &mut b)?;
        Ok(b[0])
    }

    /// Reads a 16-bit little-endian value.
    fn read16(&mut self, region: u32, offset: u64) -> Result<u16, DeviceError> {
        let mut b = [0u8; 2];
        self.read(region, offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a byte.
    fn write8(&mut self, region: u32, offset: u64, value: u8) -> Result<(), DeviceError> {
        self.write(region, offset, &[value])
    }

    /// Writes a 16-bit little-endian value.
    fn write16(&mut self, region: u32, offset: u64, value: u16) -> Result<(), DeviceError> {
        self.write(region, offset, &value.to_le_bytes())
    }
}

/// Waits until `fd` counts, for at most `timeout`, and takes its count (0:
/// the time ran out; another reader taking the count first makes this wait
/// on). [`Device::wait_irq`]'s default.
pub fn wait_eventfd(fd: &EventFd, timeout: Duration) -> Result<u64, DeviceError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ready = crate::poll_readable(&[fd], Some(left))
            .map_err(|e| DeviceError::Failed(format!("waiting on an eventfd: {e}")))?;
        if ready[0] {
            match fd.read() {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(DeviceError::Failed(format!("reading an eventfd: {e}"))),
            }
        } else if left.is_zero() {
            return Ok(0);
        }
    }
}

/// `len` bytes at `offset` end inside `region`.
fn ends_inside(region: &RegionInfo, offset: u64, len: usize) -> Result<(), DeviceError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= region.size => Ok(()),
        _ => Err(DeviceError::OutOfRange {
            region: region.index,
            offset,
            len,
            size: region.size,
        }),
    }
}

/// Makes a bulk transfer of `len` bytes at `offset` of region `r` (checked
/// whole with [`DeviceInfo::check_bulk`] already) as its accesses, handing
/// each to `access(offset, range of the transfer)`.
fn split(
    r: &RegionInfo,
    offset: u64,
    len: usize,
    mut access: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    plan(r, offset, len, &mut |pos, at, w, n| {
        for i in 0..n {
            access(pos + (i * w) as u64, at + i * w..at + (i + 1) * w)?;
        }
        Ok(())
    })
}

/// Walks the accesses of a bulk transfer in `r` as runs: `access(pos, at,
/// width, count)` for `count` accesses of `width` bytes from `pos` (`at`
/// bytes into the transfer). A run of dwords (or of 8-byte accesses in a
/// region without dwords) covers all it can at once: once aligned, the
/// choice stays the same until the tail.
fn plan(
    r: &RegionInfo,
    offset: u64,
    len: usize,
    access: &mut dyn FnMut(u64, usize, usize, usize) -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    let mut at = 0;
    while at < len {
        let pos = offset + at as u64;
        let left = len - at;
        let w = r.bulk_width(pos, left).ok_or_else(|| {
            // The narrowest width the region takes: the bytes left are
            // fewer, or its position is not aligned to it.
            let narrowest = [1, 2, 4, 8].into_iter().find(|&w| r.accepts_width(w));
            match narrowest {
                Some(n) if n <= left => DeviceError::Unaligned {
                    region: r.index,
                    offset: pos,
                    len: n,
                },
                _ => DeviceError::BadWidth {
                    region: r.index,
                    len: left,
                    widths: r.widths,
                },
            }
        })?;
        let n = if w >= 4 { left / w } else { 1 };
        access(pos, at, w, n)?;
        at += n * w;
    }
    Ok(())
}

/// [`Device::read_bulk_into`] by zero-filling `len` bytes of `out` and
/// reading into them with [`Device::read_bulk`] (what the default does).
pub fn read_bulk_zeroed<D: Device + ?Sized>(
    dev: &mut D,
    region: u32,
    offset: u64,
    len: usize,
    out: &mut BytesMut,
) -> Result<(), DeviceError> {
    let start = out.len();
    out.resize(start + len, 0);
    let r = dev.read_bulk(region, offset, &mut out[start..]);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// [`Device::read_bulk`] made of single accesses (what the default does;
/// for implementations that override it and sometimes fall back).
pub fn read_split<D: Device + ?Sized>(
    dev: &mut D,
    region: u32,
    offset: u64,
    data: &mut [u8],
) -> Result<(), DeviceError> {
    // The whole plan is checked first, so that a transfer refused part way
    // touches nothing.
    let r = dev
        .info()
        .check_bulk(region, offset, data.len(), false)?
        .clone();
    split(&r, offset, data.len(), |pos, at| {
        dev.read(region, pos, &mut data[at])
    })
}

/// [`Device::write_bulk`] made of single accesses.
pub fn write_split<D: Device + ?Sized>(
    dev: &mut D,
    region: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), DeviceError> {
    let r = dev
        .info()
        .check_bulk(region, offset, data.len(), true)?
        .clone();
    split(&r, offset, data.len(), |pos, at| {
        dev.write(region, pos, &data[at])
    })
}

impl fmt::Debug for dyn Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.info().name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            name: "t".into(),
            vendor: 1,
            device: 2,
            subsystem_vendor: 0,
            subsystem_device: 0,
            class: 0,
            revision: 0,
            regions: vec![RegionInfo {
                index: 0,
                kind: RegionKind::Mmio,
                size: 0x100,
                flags: REGION_READ,
                widths: WIDTH_4 | WIDTH_8,
            }],
            irqs: vec![],
            reset: ResetMethod::Full,
        }
    }

    /// Records each access; region 0 of `info()` (4 and 8 bytes, 0x100).
    struct Log(DeviceInfo, Vec<(u64, usize)>);

    impl Device for Log {
        fn info(&self) -> &DeviceInfo {
            &self.0
        }
        fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            self.0.check_access(region, offset, data.len(), false)?;
            self.1.push((offset, data.len()));
            data.fill(offset as u8);
            Ok(())
        }
        fn write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn set_irqs(&mut self, _: IrqKind, _: u32, _: &[EventFd]) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn unmask_intx(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn dma_map(&mut self, _: Arc<DmaRegion>) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn dma_unmap(&mut self, _: u64) -> Result<Arc<DmaRegion>, DeviceError> {
            unreachable!()
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
    }

    #[test]
    fn bulk_reads_are_dwords_where_the_region_takes_them() {
        let mut d = Log(info(), Vec::new());
        let mut buf = [0u8; 20];
        d.read_bulk(0, 4, &mut buf).unwrap();
        // Dwords where the region takes them.
        assert_eq!(d.1, [(4, 4), (8, 4), (12, 4), (16, 4), (20, 4)]);
        assert_eq!(buf[0], 4);
        assert_eq!(buf[4], 8);
        // 8-byte accesses where it takes no dwords.
        d.0.regions[0].widths = WIDTH_8 | WIDTH_1;
        d.1.clear();
        d.read_bulk(0, 7, &mut [0u8; 10]).unwrap();
        assert_eq!(d.1, [(7, 1), (8, 8), (16, 1)]);
        d.0.regions[0].widths = WIDTH_4 | WIDTH_8;
        d.1.clear();
        assert!(matches!(
            d.read_bulk(0, 2, &mut [0u8; 8]),
            Err(DeviceError::Unaligned {
                offset: 2,
                len: 4,
                ..
            })
        ));
        assert!(matches!(
            d.read_bulk(0, 0, &mut [0u8; 6]),
            Err(DeviceError::BadWidth { len: 2, .. })
        ));
        assert!(matches!(
            d.read_bulk(0, 0xf8, &mut [0u8; 16]),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_bulk(0, 0, &[0u8; 8]),
            Err(DeviceError::Denied { write: true, .. })
        ));
        assert!(matches!(
            d.read_bulk(3, 0, &mut [0u8; 8]),
            Err(DeviceError::NoRegion(3))
        ));
        // A refused transfer touched nothing, not even the accesses that
        // could have been made before the one that cannot.
        assert_eq!(d.1, []);
    }

    #[test]
    fn check_access_accepts_aligned_in_range() {
        assert!(info().check_access(0, 0xf8, 8, false).is_ok());
    }

    #[test]
    fn check_access_rejects_each_bad_case() {
        let i = info();
        assert!(matches!(
            i.check_access(3, 0, 4, false),
            Err(DeviceError::NoRegion(3))
        ));
        assert!(matches!(
            i.check_access(0, 0, 4, true),
            Err(DeviceError::Denied { write: true, .. })
        ));
        assert!(matches!(
            i.check_access(0, 0, 2, false),
            Err(DeviceError::BadWidth { len: 2, .. })
        ));
        assert!(matches!(
            i.check_access(0, 0, 3, false),
            Err(DeviceError::BadWidth { len: 3, .. })
        ));
        assert!(matches!(
            i.check_access(0, 4, 8, false),
            Err(DeviceError::Unaligned { .. })
        ));
        assert!(matches!(
            i.check_access(0, 0x100, 4, false),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            i.check_access(0, u64::MAX - 3, 4, false),
            Err(DeviceError::OutOfRange { .. })
        ));
    }

    #[test]
    fn reset_methods_from_sysfs() {
        assert_eq!(ResetMethod::from_sysfs("flr bus\n"), ResetMethod::Full);
        assert_eq!(ResetMethod::from_sysfs("bus"), ResetMethod::Full);
        assert_eq!(ResetMethod::from_sysfs("pm\n"), ResetMethod::PowerState);
        assert_eq!(ResetMethod::from_sysfs(""), ResetMethod::None);
        assert!(ResetMethod::Full.clears_state() && !ResetMethod::PowerState.clears_state());
    }

    #[test]
    fn width_error_lists_accepted_widths() {
        let e = info().check_access(0, 0, 1, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "region 0 does not accept 1-byte accesses (accepted widths: 4, 8)"
        );
    }
}
