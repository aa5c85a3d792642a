//! The vfio-user wire codec: headers, typed messages, validation and a frame
//! splitter. No I/O; file descriptors (SCM_RIGHTS) are not part of a frame.
//!
//! Layouts follow QEMU's `docs/interop/vfio-user.rst`. All integers are
//! little-endian (the spec says "host endianness"; every host cio runs on is
//! little-endian, and the codec fixes it so it is testable anywhere).
//!
//! Decoding validates in a fixed order: header flags (type and known bits),
//! minimum size (the 16-byte header), maximum size ([`Limits::max_msg_size`]),
//! then the payload of the command: fixed-size payloads must match exactly,
//! variable ones must agree with their own `count` fields, and every count is
//! capped. Nothing here panics on any input.

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

/// Size of the header that starts every message.
pub const HEADER_SIZE: usize = 16;
/// Header flags: the type field (bits 0–3).
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Header type value of a request (command).
pub const FLAG_TYPE_REQUEST: u32 = 0x0;
/// Header type value of a reply.
pub const FLAG_TYPE_REPLY: u32 = 0x1;
/// Header flag: the sender wants no reply to this request.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flag: this reply reports an error; the header's error field holds the errno.
pub const FLAG_ERROR: u32 = 1 << 5;
const FLAGS_KNOWN: u32 = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;

/// Default `max_data_xfer_size` when a peer does not state one (spec: 1 MiB).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u64 = 1 << 20;
/// Default `max_msg_fds` when a peer does not state one (spec: 1).
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `pgsizes` when a peer does not state one (spec: 4 KiB only).
pub const DEFAULT_PGSIZES: u64 = 4096;
/// Default `max_dma_maps` when a peer does not state one (spec: 65535).
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;

/// `DMA_MAP` flag: the region may be read.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `DMA_MAP` flag: the region may be written.
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `DMA_UNMAP` flag: return the dirty bitmap of the unmapped range.
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// `DMA_UNMAP` flag: unmap every region (address and size are then zero).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// `DEVICE_GET_INFO` flag: the device supports `DEVICE_RESET`.
pub const DEVICE_FLAG_RESET: u32 = 1 << 0;
/// `DEVICE_GET_INFO` flag: the device is a PCI device.
pub const DEVICE_FLAG_PCI: u32 = 1 << 1;

/// Region flag: the client may read the region.
pub const REGION_FLAG_READ: u32 = 1 << 0;
/// Region flag: the client may write the region.
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
/// Region flag: the client may mmap the region (an fd travels with the reply).
pub const REGION_FLAG_MMAP: u32 = 1 << 2;
/// Region flag: a capability chain follows the region info.
pub const REGION_FLAG_CAPS: u32 = 1 << 3;

/// Region capability id: sparse mmap areas.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Region capability id: device-specific region type.
pub const REGION_CAP_TYPE: u16 = 2;
/// Region capability id: the MSI-X table may be mmapped.
pub const REGION_CAP_MSIX_MAPPABLE: u16 = 3;

/// IRQ info flag: the IRQ can signal an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// IRQ info flag: the IRQ supports MASK/UNMASK.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// IRQ info flag: the IRQ masks itself when it fires.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// IRQ info flag: sub-indexes cannot be enabled one by one.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

const IRQ_SET_DATA_NONE: u32 = 1 << 0;
const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// Most interrupts one `SET_IRQS` may name (MSI-X allows 2048 vectors).
pub const MAX_IRQ_COUNT: u32 = 2048;
/// Most writes one `REGION_WRITE_MULTI` may carry (QEMU's `VFIO_USER_MULTI_MAX`).
pub const MAX_WRITE_MULTI: usize = 200;
/// Most data bytes in one `REGION_WRITE_MULTI` entry.
pub const WRITE_MULTI_DATA: usize = 8;
/// Most capabilities decoded from one region info chain.
pub const MAX_REGION_CAPS: usize = 16;

// Payload sizes from the spec's tables, each asserted against its fields.
const DMA_MAP_SIZE: usize = 4 + 4 + 8 + 8 + 8;
const DMA_UNMAP_SIZE: usize = 4 + 4 + 8 + 8;
const BITMAP_SIZE: usize = 8 + 8;
const DEVICE_INFO_SIZE: usize = 4 + 4 + 4 + 4;
const REGION_INFO_SIZE: usize = 4 + 4 + 4 + 4 + 8 + 8;
const CAP_HEADER_SIZE: usize = 2 + 2 + 4;
const SPARSE_AREA_SIZE: usize = 8 + 8;
const IRQ_INFO_SIZE: usize = 4 + 4 + 4 + 4;
const IRQ_SET_FIXED: usize = 4 + 4 + 4 + 4 + 4;
const REGION_ACCESS_SIZE: usize = 8 + 4 + 4;
const DMA_ACCESS_SPEC: usize = 8 + 8;
const DMA_ACCESS_QEMU: usize = 8 + 4;
const WRITE_ONE_SIZE: usize = 8 + 4 + 4 + WRITE_MULTI_DATA;
const _: () = assert!(HEADER_SIZE == 2 + 2 + 4 + 4 + 4);
const _: () = assert!(DMA_MAP_SIZE == 32);
const _: () = assert!(DMA_UNMAP_SIZE == 24);
const _: () = assert!(DEVICE_INFO_SIZE == 16 && IRQ_INFO_SIZE == 16);
const _: () = assert!(REGION_INFO_SIZE == 32);
const _: () = assert!(IRQ_SET_FIXED == 20);
const _: () = assert!(REGION_ACCESS_SIZE == 16 && DMA_ACCESS_SPEC == 16);
const _: () = assert!(WRITE_ONE_SIZE == 24);

const EINVAL: u32 = 22;
const E2BIG: u32 = 7;
const ENOTSUP: u32 = 95;

/// A vfio-user command number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation (client → server).
    Version = 1,
    /// Make client memory available for DMA.
    DmaMap = 2,
    /// Withdraw client memory.
    DmaUnmap = 3,
    /// Device flags and region/IRQ counts.
    DeviceGetInfo = 4,
    /// One region's flags, size and capabilities.
    DeviceGetRegionInfo = 5,
    /// Per-region ioeventfd/ioregionfd info (not used by QEMU; not decoded).
    DeviceGetRegionIoFds = 6,
    /// One IRQ index's flags and count.
    DeviceGetIrqInfo = 7,
    /// Configure interrupt actions (eventfds by SCM_RIGHTS).
    DeviceSetIrqs = 8,
    /// Read from a device region.
    RegionRead = 9,
    /// Write to a device region.
    RegionWrite = 10,
    /// Read client memory (server → client).
    DmaRead = 11,
    /// Write client memory (server → client).
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// Old dirty-page tracking (withdrawn from the spec; not decoded).
    DirtyPages = 14,
    /// Several small region writes in one message.
    RegionWriteMulti = 15,
    /// Device features, used for migration (not decoded).
    DeviceFeature = 16,
    /// Migration data out (not decoded).
    MigDataRead = 17,
    /// Migration data in (not decoded).
    MigDataWrite = 18,
}

impl Command {
    /// The command with this number, if the spec defines one.
    pub fn from_u16(v: u16) -> Option<Self> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }

    /// Whether the server sends this request (DMA_READ/WRITE) rather than the client.
    pub fn server_to_client(self) -> bool {
        matches!(self, Command::DmaRead | Command::DmaWrite)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Command::Version => "VERSION",
            Command::DmaMap => "DMA_MAP",
            Command::DmaUnmap => "DMA_UNMAP",
            Command::DeviceGetInfo => "DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "DEVICE_SET_IRQS",
            Command::RegionRead => "REGION_READ",
            Command::RegionWrite => "REGION_WRITE",
            Command::DmaRead => "DMA_READ",
            Command::DmaWrite => "DMA_WRITE",
            Command::DeviceReset => "DEVICE_RESET",
            Command::DirtyPages => "DIRTY_PAGES",
            Command::RegionWriteMulti => "REGION_WRITE_MULTI",
            Command::DeviceFeature => "DEVICE_FEATURE",
            Command::MigDataRead => "MIG_DATA_READ",
            Command::MigDataWrite => "MIG_DATA_WRITE",
        };
        f.write_str(name)
    }
}

/// Whether a message is a request or a reply (the header's type field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    /// A command.
    Request,
    /// The answer to a command with the same id.
    Reply,
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MsgKind::Request => "request",
            MsgKind::Reply => "reply",
        })
    }
}

/// A decode or encode failure. Each names what was wrong; [`Error::errno`]
/// gives the errno a server answers a bad request with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than a header.
    #[error("truncated header: {have} of {HEADER_SIZE} bytes")]
    TruncatedHeader {
        /// Bytes available.
        have: usize,
    },
    /// The header's type or flag bits are not ones the spec defines.
    #[error("bad header flags {flags:#x} for command {command}")]
    BadFlags {
        /// Raw command number.
        command: u16,
        /// Raw flags.
        flags: u32,
    },
    /// The header's message size is smaller than the header itself.
    #[error("message size {size} is smaller than the header")]
    SizeBelowHeader {
        /// Size the header claims.
        size: u32,
    },
    /// The header's message size exceeds the configured limit.
    #[error("message size {size} exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size the header claims (or an encoding would need).
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The bytes given do not match the size the header claims.
    #[error("frame is {have} bytes but its header says {size}")]
    FrameLength {
        /// Size the header claims.
        size: u32,
        /// Bytes given.
        have: usize,
    },
    /// An error reply with a payload (the spec allows only the header).
    #[error("error reply to command {command} has a payload ({size} bytes in all)")]
    ErrorReplyPayload {
        /// Raw command number.
        command: u16,
        /// Size the header claims.
        size: u32,
    },
    /// A command number the spec does not define.
    #[error("unknown command {command}")]
    UnknownCommand {
        /// Raw command number.
        command: u16,
    },
    /// A command the spec defines but this codec does not carry.
    #[error("{command} is not supported")]
    Unsupported {
        /// The command.
        command: Command,
    },
    /// A command sent in the wrong direction (e.g. a client sending DMA_READ).
    #[error("{command} is not expected as a {kind}")]
    WrongDirection {
        /// The command.
        command: Command,
        /// The type the header gave.
        kind: MsgKind,
    },
    /// A payload too short to hold a field.
    #[error("{command} {kind}: payload ends before field {field}")]
    Truncated {
        /// The command.
        command: Command,
        /// Request or reply.
        kind: MsgKind,
        /// The field that did not fit.
        field: &'static str,
    },
    /// A payload whose length is not the one its command (or its counts) implies.
    #[error("{command} {kind}: payload is {have} bytes, expected {expected}")]
    PayloadSize {
        /// The command.
        command: Command,
        /// Request or reply.
        kind: MsgKind,
        /// Bytes present.
        have: usize,
        /// Bytes the layout implies.
        expected: usize,
    },
    /// A field whose value the spec (or a limit) does not allow.
    #[error("{command} {kind}: field {field} is invalid: {reason}")]
    BadField {
        /// The command.
        command: Command,
        /// Request or reply.
        kind: MsgKind,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A transfer count above `max_data_xfer_size`.
    #[error("{command}: count {count} exceeds max_data_xfer_size {max}")]
    TransferTooLarge {
        /// The command.
        command: Command,
        /// The count asked for.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// VERSION data that is not a JSON object with a `capabilities` object.
    #[error("VERSION {kind}: capabilities are not valid: {reason}")]
    BadJson {
        /// Request or reply.
        kind: MsgKind,
        /// What is wrong.
        reason: &'static str,
    },
    /// A capability whose JSON type or value is wrong.
    #[error("VERSION {kind}: capability {field} is invalid: {reason}")]
    BadCapability {
        /// Request or reply.
        kind: MsgKind,
        /// The capability (`migration.pgsize` for a nested one).
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// VERSION data that is not JSON (or, encoding, cannot be written as JSON).
    #[error("VERSION {kind}: capabilities JSON")]
    Json {
        /// Request or reply.
        kind: MsgKind,
        /// The parser's complaint (it names the field).
        #[source]
        source: serde_json::Error,
    },
    /// The frame splitter failed earlier; the stream is out of sync.
    #[error("stream is out of sync after an earlier framing error")]
    StreamBroken,
}

impl Error {
    /// The errno a server puts in the error reply to a request that failed
    /// to decode this way (`EINVAL` unless a more precise one applies).
    pub fn errno(&self) -> u32 {
        match self {
            Error::TooLarge { .. } | Error::TransferTooLarge { .. } => E2BIG,
            Error::Unsupported { .. } => ENOTSUP,
            _ => EINVAL,
        }
    }
}

/// Result of a codec operation.
pub type Result<T> = std::result::Result<T, Error>;

/// The 16-byte header that starts every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message id, echoed in the reply.
    pub id: u16,
    /// Raw command number (see [`Command`]).
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Raw flags: type, [`FLAG_NO_REPLY`], [`FLAG_ERROR`].
    pub flags: u32,
    /// Errno of an error reply; reserved (zero) otherwise.
    pub error: u32,
}

impl Header {
    /// Parses the first 16 bytes of `bytes` and validates, in order, the flags
    /// (type and known bits), the minimum size and the maximum size.
    pub fn parse(bytes: &[u8], max_msg_size: usize) -> Result<Header> {
        let Some(b) = bytes.get(..HEADER_SIZE) else {
            return Err(Error::TruncatedHeader { have: bytes.len() });
        };
        let h = Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
        h.validate(max_msg_size)?;
        Ok(h)
    }

    fn validate(&self, max_msg_size: usize) -> Result<()> {
        let bad_flags = Error::BadFlags {
            command: self.command,
            flags: self.flags,
        };
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(bad_flags);
        }
        match self.kind() {
            // A request may ask for no reply but cannot carry an error.
            Some(MsgKind::Request) if self.flags & FLAG_ERROR == 0 => {}
            // A reply may carry an error but "no reply" means nothing there.
            Some(MsgKind::Reply) if self.flags & FLAG_NO_REPLY == 0 => {}
            _ => return Err(bad_flags),
        }
        if (self.size as usize) < HEADER_SIZE {
            return Err(Error::SizeBelowHeader { size: self.size });
        }
        if self.size as usize > max_msg_size {
            return Err(Error::TooLarge {
                size: u64::from(self.size),
                max: max_msg_size,
            });
        }
        Ok(())
    }

    /// The message type, if the type field holds one the spec defines.
    pub fn kind(&self) -> Option<MsgKind> {
        match self.flags & FLAG_TYPE_MASK {
            FLAG_TYPE_REQUEST => Some(MsgKind::Request),
            FLAG_TYPE_REPLY => Some(MsgKind::Reply),
            _ => None,
        }
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// The header as it goes on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }
}

/// How DMA_READ/DMA_WRITE payloads are laid out.
///
/// The spec (and libvfio-user) put a 64-bit `count` after the address and the
/// data at payload offset 16; so does the QEMU 11 of the rig (Debian sid's
/// `qemu-system-x86` 11): it answered a DMA_WRITE with a 32-bit count with
/// E2BIG, having read the count's upper half from the data. The QEMU 10
/// sources (`VFIOUserDMARW` in `hw/vfio-user/protocol.h`) have a 32-bit
/// `count` and read and write the data at payload offset 12, require the
/// message to be at least 32 bytes and leave 4 spare bytes after the data
/// ([`DmaLayout::Qemu`]). Both answer a DMA_WRITE with a bare header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaLayout {
    /// As `docs/interop/vfio-user.rst` and libvfio-user define it.
    #[default]
    Spec,
    /// As QEMU 10's `vfio-user-pci` client parses and builds it.
    Qemu,
}

/// Limits the codec enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole message (header included) accepted or produced.
    pub max_msg_size: usize,
    /// Largest data count in a REGION_READ/WRITE or DMA_READ/WRITE.
    pub max_data_xfer_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // The largest data transfer plus room for any fixed part.
            max_msg_size: DEFAULT_MAX_DATA_XFER_SIZE as usize + 4096,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
        }
    }
}

/// The `migration` member of the capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrationCaps {
    /// Dirty-page granularity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsize: Option<u64>,
    /// Largest dirty bitmap in one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The `twin_socket` member of the capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TwinSocket {
    /// Whether the sender supports (or, in a reply, enabled) twin-socket mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported: Option<bool>,
    /// In a reply: index of the server-to-client socket among the passed fds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// The `capabilities` object of a VERSION message. Absent members take the
/// spec's defaults through the accessor methods; unknown members are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Largest data count the sender accepts in one transfer message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u64>,
    /// Page sizes supported in DMA maps, OR-ed together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Most DMA maps valid at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// Migration parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCaps>,
    /// Whether REGION_WRITE_MULTI is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
    /// Twin-socket parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocket>,
}

impl Capabilities {
    /// `max_msg_fds`, or the spec's default of 1.
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }
    /// `max_data_xfer_size`, or the spec's default of 1 MiB.
    pub fn max_data_xfer_size(&self) -> u64 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }
    /// `pgsizes`, or the spec's default of 4 KiB.
    pub fn pgsizes(&self) -> u64 {
        self.pgsizes.unwrap_or(DEFAULT_PGSIZES)
    }
    /// `max_dma_maps`, or the spec's default of 65535.
    pub fn max_dma_maps(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }
    /// `write_multiple`, false when absent.
    pub fn write_multiple(&self) -> bool {
        self.write_multiple.unwrap_or(false)
    }
}

#[derive(Serialize)]
struct VersionJson<'a> {
    capabilities: &'a Capabilities,
}

/// VERSION request and reply (same layout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Version {
    /// Major version (QEMU proposes 0).
    pub major: u16,
    /// Minor version (QEMU proposes 0).
    pub minor: u16,
    /// Capabilities, `None` when the message carries no JSON.
    pub capabilities: Option<Capabilities>,
}

/// DMA_MAP request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaMap {
    /// Size of the structure (32).
    pub argsz: u32,
    /// [`DMA_MAP_FLAG_READ`], [`DMA_MAP_FLAG_WRITE`].
    pub flags: u32,
    /// Offset into the fd passed with the message (0 when none is).
    pub offset: u64,
    /// Base DMA address.
    pub address: u64,
    /// Size of the region.
    pub size: u64,
}

/// Dirty bitmap part of a DMA_UNMAP with [`DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Page size one bit stands for.
    pub pgsize: u64,
    /// Size of the bitmap in bytes.
    pub size: u64,
    /// The bitmap (empty in a request; `size` bytes in a reply).
    pub data: Vec<u8>,
}

/// DMA_UNMAP request and reply (the reply echoes the request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Maximum (request) or needed (reply) reply payload size.
    pub argsz: u32,
    /// [`DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`], [`DMA_UNMAP_FLAG_ALL`].
    pub flags: u32,
    /// Base DMA address of the mapping.
    pub address: u64,
    /// Size of the mapping.
    pub size: u64,
    /// Present exactly when `flags` has [`DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`].
    pub bitmap: Option<DirtyBitmap>,
}

/// DEVICE_GET_INFO reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of the full reply payload (16).
    pub argsz: u32,
    /// [`DEVICE_FLAG_RESET`], [`DEVICE_FLAG_PCI`].
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

/// One sparse-mmap area, relative to the region's mmap offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SparseArea {
    /// Start of the area.
    pub offset: u64,
    /// Length of the area.
    pub size: u64,
}

/// One region capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionCap {
    /// Only these parts of the region may be mmapped (version 1).
    SparseMmap(Vec<SparseArea>),
    /// A device-specific region type (version 1).
    Type {
        /// Region type.
        ty: u32,
        /// Region subtype.
        subtype: u32,
    },
    /// The MSI-X table in this region may be mmapped (version 1, no body).
    MsixMappable,
    /// A capability this codec does not interpret.
    Other {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
        /// Body after the 8-byte capability header.
        data: Vec<u8>,
    },
}

/// DEVICE_GET_REGION_INFO reply.
///
/// When `caps` is not empty the encoder places the chain right after the
/// 32-byte structure, sets `cap_offset` to 32 and sets [`REGION_FLAG_CAPS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size needed for the full reply (structure plus capabilities).
    pub argsz: u32,
    /// `REGION_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of the structure (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// mmap offset (for mappable regions).
    pub offset: u64,
    /// Capability chain (empty when there is none or the client's argsz cut it off).
    pub caps: Vec<RegionCap>,
}

/// DEVICE_GET_IRQ_INFO reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Size of the full reply payload (16).
    pub argsz: u32,
    /// `IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of interrupts of this index.
    pub count: u32,
}

/// The action of a DEVICE_SET_IRQS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqAction {
    /// Mask the interrupts (or, with eventfds, signal on masking).
    Mask,
    /// Unmask the interrupts (or, with eventfds, signal on unmasking).
    Unmask,
    /// Trigger the interrupts (or, with eventfds, signal them on trigger).
    Trigger,
}

/// The data of a DEVICE_SET_IRQS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IrqData {
    /// No data: act on every sub-index in range.
    None,
    /// One boolean per sub-index: act where true.
    Bool(Vec<bool>),
    /// Eventfds travel as SCM_RIGHTS, one per sub-index; none de-assigns.
    Eventfd,
}

/// DEVICE_SET_IRQS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetIrqs {
    /// Size of the request payload.
    pub argsz: u32,
    /// What to do.
    pub action: IrqAction,
    /// With what data.
    pub data: IrqData,
    /// IRQ index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes (0 with [`IrqData::None`] disables the whole index).
    pub count: u32,
}

impl SetIrqs {
    /// How many fds the request says travel with it: `count` for
    /// [`IrqData::Eventfd`], 0 otherwise. With eventfds, receiving none
    /// means "de-assign".
    pub fn expected_fds(&self) -> usize {
        match self.data {
            IrqData::Eventfd => self.count as usize,
            _ => 0,
        }
    }

    fn flags(&self) -> u32 {
        let action = match self.action {
            IrqAction::Mask => IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => IRQ_SET_ACTION_TRIGGER,
        };
        let data = match self.data {
            IrqData::None => IRQ_SET_DATA_NONE,
            IrqData::Bool(_) => IRQ_SET_DATA_BOOL,
            IrqData::Eventfd => IRQ_SET_DATA_EVENTFD,
        };
        action | data
    }
}

/// Region access without data: REGION_READ request, REGION_WRITE reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes to transfer (or transferred).
    pub count: u32,
}

/// Region access with data: REGION_WRITE request, REGION_READ reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionData {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes (their length is the wire `count`).
    pub data: Vec<u8>,
}

/// DMA access without data: DMA_READ request, DMA_WRITE reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaAccess {
    /// Client DMA address.
    pub address: u64,
    /// Bytes to transfer (or transferred).
    pub count: u64,
}

/// DMA access with data: DMA_WRITE request, DMA_READ reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaData {
    /// Client DMA address.
    pub address: u64,
    /// The bytes (their length is the wire `count`).
    pub data: Vec<u8>,
}

/// One write of a REGION_WRITE_MULTI (at most 8 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOne {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes, 0 to [`WRITE_MULTI_DATA`] of them.
    pub data: Vec<u8>,
}

/// A request, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// VERSION.
    Version(Version),
    /// DMA_MAP (an fd may travel with it).
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO with the client's `argsz`.
    DeviceGetInfo {
        /// Maximum reply payload size.
        argsz: u32,
    },
    /// DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo {
        /// Maximum reply payload size.
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo {
        /// Maximum reply payload size.
        argsz: u32,
        /// IRQ index.
        index: u32,
    },
    /// DEVICE_SET_IRQS (eventfds may travel with it).
    DeviceSetIrqs(SetIrqs),
    /// REGION_READ.
    RegionRead(RegionAccess),
    /// REGION_WRITE (QEMU posts these with no-reply).
    RegionWrite(RegionData),
    /// DMA_READ (server → client).
    DmaRead(DmaAccess),
    /// DMA_WRITE (server → client).
    DmaWrite(DmaData),
    /// DEVICE_RESET.
    DeviceReset,
    /// REGION_WRITE_MULTI.
    RegionWriteMulti(Vec<WriteOne>),
}

impl Request {
    /// The command of this request.
    pub fn command(&self) -> Command {
        match self {
            Request::Version(_) => Command::Version,
            Request::DmaMap(_) => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo { .. } => Command::DeviceGetInfo,
            Request::DeviceGetRegionInfo { .. } => Command::DeviceGetRegionInfo,
            Request::DeviceGetIrqInfo { .. } => Command::DeviceGetIrqInfo,
            Request::DeviceSetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead(_) => Command::RegionRead,
            Request::RegionWrite(_) => Command::RegionWrite,
            Request::DmaRead(_) => Command::DmaRead,
            Request::DmaWrite(_) => Command::DmaWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::RegionWriteMulti(_) => Command::RegionWriteMulti,
        }
    }
}

/// A successful reply, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// VERSION.
    Version(Version),
    /// DMA_MAP (no payload).
    DmaMap,
    /// DMA_UNMAP (echoes the request, plus the bitmap if asked for).
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfo),
    /// DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo(RegionInfo),
    /// DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo(IrqInfo),
    /// DEVICE_SET_IRQS (no payload).
    DeviceSetIrqs,
    /// REGION_READ, with the data.
    RegionRead(RegionData),
    /// REGION_WRITE.
    RegionWrite(RegionAccess),
    /// DMA_READ, with the data.
    DmaRead(DmaData),
    /// DMA_WRITE; QEMU's client sends no payload (`None`).
    DmaWrite(Option<DmaAccess>),
    /// DEVICE_RESET (no payload).
    DeviceReset,
    /// REGION_WRITE_MULTI: number of writes completed.
    RegionWriteMulti {
        /// Writes completed.
        wr_cnt: u64,
    },
}

impl Reply {
    /// The command this reply answers.
    pub fn command(&self) -> Command {
        match self {
            Reply::Version(_) => Command::Version,
            Reply::DmaMap => Command::DmaMap,
            Reply::DmaUnmap(_) => Command::DmaUnmap,
            Reply::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Reply::DeviceGetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Reply::DeviceGetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Reply::DeviceSetIrqs => Command::DeviceSetIrqs,
            Reply::RegionRead(_) => Command::RegionRead,
            Reply::RegionWrite(_) => Command::RegionWrite,
            Reply::DmaRead(_) => Command::DmaRead,
            Reply::DmaWrite(_) => Command::DmaWrite,
            Reply::DeviceReset => Command::DeviceReset,
            Reply::RegionWriteMulti { .. } => Command::RegionWriteMulti,
        }
    }
}

/// What a message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A request.
    Request(Request),
    /// A successful reply.
    Reply(Reply),
    /// An error reply: header only, with the errno.
    ErrorReply {
        /// Raw command number the error answers.
        command: u16,
        /// The errno (may be 0).
        errno: u32,
    },
}

/// One whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id (a reply echoes its request's).
    pub id: u16,
    /// For requests: the sender wants no reply.
    pub no_reply: bool,
    /// The content.
    pub body: Body,
}

/// The codec: limits plus the DMA layout in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Codec {
    /// Size limits.
    pub limits: Limits,
    /// DMA_READ/WRITE layout.
    pub dma_layout: DmaLayout,
}

/// Bounded little-endian reader over one payload; every read names its field.
struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
    command: Command,
    kind: MsgKind,
}

impl<'a> Rd<'a> {
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(Error::Truncated {
                command: self.command,
                kind: self.kind,
                field,
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, field)?);
        Ok(a)
    }
    fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(field)?))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        s
    }
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    fn bad(&self, field: &'static str, reason: &'static str) -> Error {
        Error::BadField {
            command: self.command,
            kind: self.kind,
            field,
            reason,
        }
    }
    fn size(&self, expected: usize) -> Error {
        Error::PayloadSize {
            command: self.command,
            kind: self.kind,
            have: self.buf.len(),
            expected,
        }
    }
    /// The payload must be exactly `n` bytes.
    fn exact(&self, n: usize) -> Result<()> {
        if self.buf.len() == n {
            Ok(())
        } else {
            Err(self.size(n))
        }
    }
}

#[derive(Default)]
struct Wr(Vec<u8>);

impl Wr {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

fn len_u32(command: Command, kind: MsgKind, field: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::BadField {
        command,
        kind,
        field,
        reason: "does not fit in 32 bits",
    })
}

impl Codec {
    /// A codec with these limits and layout.
    pub fn new(limits: Limits, dma_layout: DmaLayout) -> Self {
        Codec { limits, dma_layout }
    }

    /// Decodes one whole frame (header and payload, as [`FrameDecoder`] yields it).
    pub fn decode(&self, frame: &[u8]) -> Result<Message> {
        let h = Header::parse(frame, self.limits.max_msg_size)?;
        if frame.len() != h.size as usize {
            return Err(Error::FrameLength {
                size: h.size,
                have: frame.len(),
            });
        }
        let payload = &frame[HEADER_SIZE..];
        let kind = h.kind().ok_or(Error::BadFlags {
            command: h.command,
            flags: h.flags,
        })?;
        if kind == MsgKind::Reply && h.flags & FLAG_ERROR != 0 {
            // "If an error occurs, the reply message must only include the reply header."
            if !payload.is_empty() {
                return Err(Error::ErrorReplyPayload {
                    command: h.command,
                    size: h.size,
                });
            }
            return Ok(Message {
                id: h.id,
                no_reply: false,
                body: Body::ErrorReply {
                    command: h.command,
                    errno: h.error,
                },
            });
        }
        let command =
            Command::from_u16(h.command).ok_or(Error::UnknownCommand { command: h.command })?;
        let mut rd = Rd {
            buf: payload,
            pos: 0,
            command,
            kind,
        };
        let body = match kind {
            MsgKind::Request => Body::Request(self.decode_request(&mut rd)?),
            MsgKind::Reply => Body::Reply(self.decode_reply(&mut rd)?),
        };
        Ok(Message {
            id: h.id,
            no_reply: h.no_reply(),
            body,
        })
    }

    fn check_xfer(&self, command: Command, count: u64) -> Result<()> {
        if count > self.limits.max_data_xfer_size {
            return Err(Error::TransferTooLarge {
                command,
                count,
                max: self.limits.max_data_xfer_size,
            });
        }
        Ok(())
    }

    fn decode_request(&self, rd: &mut Rd<'_>) -> Result<Request> {
        let command = rd.command;
        Ok(match command {
            Command::Version => Request::Version(decode_version(rd)?),
            Command::DmaMap => {
                rd.exact(DMA_MAP_SIZE)?;
                let m = DmaMap {
                    argsz: rd.u32("argsz")?,
                    flags: rd.u32("flags")?,
                    offset: rd.u64("offset")?,
                    address: rd.u64("address")?,
                    size: rd.u64("size")?,
                };
                if m.flags & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 {
                    return Err(rd.bad("flags", "unknown bits"));
                }
                Request::DmaMap(m)
            }
            Command::DmaUnmap => Request::DmaUnmap(decode_unmap(rd, false)?),
            Command::DeviceGetInfo => {
                rd.exact(DEVICE_INFO_SIZE)?;
                let argsz = rd.u32("argsz")?;
                Request::DeviceGetInfo { argsz }
            }
            Command::DeviceGetRegionInfo => {
                rd.exact(REGION_INFO_SIZE)?;
                let argsz = rd.u32("argsz")?;
                rd.u32("flags")?;
                let index = rd.u32("index")?;
                Request::DeviceGetRegionInfo { argsz, index }
            }
            Command::DeviceGetIrqInfo => {
                rd.exact(IRQ_INFO_SIZE)?;
                let argsz = rd.u32("argsz")?;
                rd.u32("flags")?;
                let index = rd.u32("index")?;
                Request::DeviceGetIrqInfo { argsz, index }
            }
            Command::DeviceSetIrqs => Request::DeviceSetIrqs(decode_set_irqs(rd)?),
            Command::RegionRead => {
                rd.exact(REGION_ACCESS_SIZE)?;
                let a = RegionAccess {
                    offset: rd.u64("offset")?,
                    region: rd.u32("region")?,
                    count: rd.u32("count")?,
                };
                self.check_xfer(command, u64::from(a.count))?;
                Request::RegionRead(a)
            }
            Command::RegionWrite => Request::RegionWrite(self.decode_region_data(rd)?),
            Command::DmaRead => {
                let address = rd.u64("address")?;
                let count = match self.dma_layout {
                    DmaLayout::Spec => {
                        rd.exact(DMA_ACCESS_SPEC)?;
                        rd.u64("count")?
                    }
                    DmaLayout::Qemu => {
                        // QEMU's struct is 12 bytes padded to 16.
                        rd.exact(DMA_ACCESS_SPEC)?;
                        u64::from(rd.u32("count")?)
                    }
                };
                self.check_xfer(command, count)?;
                Request::DmaRead(DmaAccess { address, count })
            }
            Command::DmaWrite => Request::DmaWrite(self.decode_dma_data(rd)?),
            Command::DeviceReset => {
                rd.exact(0)?;
                Request::DeviceReset
            }
            Command::RegionWriteMulti => {
                let n = rd.u64("wr_cnt")?;
                if n == 0 || n > MAX_WRITE_MULTI as u64 {
                    return Err(rd.bad("wr_cnt", "must be 1 to 200"));
                }
                let n = n as usize;
                rd.exact(8 + n * WRITE_ONE_SIZE)?;
                let mut wrs = Vec::with_capacity(n);
                for _ in 0..n {
                    let offset = rd.u64("wrs.offset")?;
                    let region = rd.u32("wrs.region")?;
                    let count = rd.u32("wrs.count")?;
                    let data = rd.bytes(WRITE_MULTI_DATA, "wrs.data")?;
                    let Some(data) = data.get(..count as usize) else {
                        return Err(rd.bad("wrs.count", "more than 8 bytes"));
                    };
                    wrs.push(WriteOne {
                        offset,
                        region,
                        data: data.to_vec(),
                    });
                }
                Request::RegionWriteMulti(wrs)
            }
            Command::DeviceGetRegionIoFds
            | Command::DirtyPages
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite => return Err(Error::Unsupported { command }),
        })
    }

    fn decode_reply(&self, rd: &mut Rd<'_>) -> Result<Reply> {
        let command = rd.command;
        Ok(match command {
            Command::Version => Reply::Version(decode_version(rd)?),
            Command::DmaMap => {
                rd.exact(0)?;
                Reply::DmaMap
            }
            Command::DmaUnmap => Reply::DmaUnmap(decode_unmap(rd, true)?),
            Command::DeviceGetInfo => {
                rd.exact(DEVICE_INFO_SIZE)?;
                Reply::DeviceGetInfo(DeviceInfo {
                    argsz: rd.u32("argsz")?,
                    flags: rd.u32("flags")?,
                    num_regions: rd.u32("num_regions")?,
                    num_irqs: rd.u32("num_irqs")?,
                })
            }
            Command::DeviceGetRegionInfo => Reply::DeviceGetRegionInfo(decode_region_info(rd)?),
            Command::DeviceGetIrqInfo => {
                rd.exact(IRQ_INFO_SIZE)?;
                Reply::DeviceGetIrqInfo(IrqInfo {
                    argsz: rd.u32("argsz")?,
                    flags: rd.u32("flags")?,
                    index: rd.u32("index")?,
                    count: rd.u32("count")?,
                })
            }
            Command::DeviceSetIrqs => {
                rd.exact(0)?;
                Reply::DeviceSetIrqs
            }
            Command::RegionRead => Reply::RegionRead(self.decode_region_data(rd)?),
            Command::RegionWrite => {
                rd.exact(REGION_ACCESS_SIZE)?;
                Reply::RegionWrite(RegionAccess {
                    offset: rd.u64("offset")?,
                    region: rd.u32("region")?,
                    count: rd.u32("count")?,
                })
            }
            Command::DmaRead => Reply::DmaRead(self.decode_dma_data(rd)?),
            Command::DmaWrite => match rd.buf.len() {
                // QEMU answers with a bare header.
                0 => Reply::DmaWrite(None),
                // The spec's table: 64-bit address, 32-bit count.
                DMA_ACCESS_QEMU => Reply::DmaWrite(Some(DmaAccess {
                    address: rd.u64("address")?,
                    count: u64::from(rd.u32("count")?),
                })),
                // libvfio-user's struct: 64-bit count.
                DMA_ACCESS_SPEC => Reply::DmaWrite(Some(DmaAccess {
                    address: rd.u64("address")?,
                    count: rd.u64("count")?,
                })),
                _ => return Err(rd.size(DMA_ACCESS_QEMU)),
            },
            Command::DeviceReset => {
                rd.exact(0)?;
                Reply::DeviceReset
            }
            Command::RegionWriteMulti => {
                rd.exact(8)?;
                Reply::RegionWriteMulti {
                    wr_cnt: rd.u64("wr_cnt")?,
                }
            }
            Command::DeviceGetRegionIoFds
            | Command::DirtyPages
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite => return Err(Error::Unsupported { command }),
        })
    }

    fn decode_region_data(&self, rd: &mut Rd<'_>) -> Result<RegionData> {
        let offset = rd.u64("offset")?;
        let region = rd.u32("region")?;
        let count = rd.u32("count")?;
        self.check_xfer(rd.command, u64::from(count))?;
        rd.exact(REGION_ACCESS_SIZE + count as usize)?;
        Ok(RegionData {
            offset,
            region,
            data: rd.rest().to_vec(),
        })
    }

    fn decode_dma_data(&self, rd: &mut Rd<'_>) -> Result<DmaData> {
        let address = rd.u64("address")?;
        match self.dma_layout {
            DmaLayout::Spec => {
                let count = rd.u64("count")?;
                self.check_xfer(rd.command, count)?;
                rd.exact(DMA_ACCESS_SPEC + count as usize)?;
                Ok(DmaData {
                    address,
                    data: rd.rest().to_vec(),
                })
            }
            DmaLayout::Qemu => {
                let count = rd.u32("count")?;
                self.check_xfer(rd.command, u64::from(count))?;
                // Data at 12, then the 4 bytes that pad QEMU's struct to 16.
                rd.exact(DMA_ACCESS_SPEC + count as usize)?;
                let data = rd.bytes(count as usize, "data")?;
                Ok(DmaData {
                    address,
                    data: data.to_vec(),
                })
            }
        }
    }

    /// Encodes one message. Fails if it would exceed the limits or if a field
    /// cannot be represented (a count over 32 bits, more than 8 bytes in a
    /// multi-write entry, a bitmap present without its flag).
    pub fn encode(&self, msg: &Message) -> Result<Vec<u8>> {
        let (command, payload, flags, errno) = match &msg.body {
            Body::Request(r) => {
                let flags = if msg.no_reply {
                    FLAG_TYPE_REQUEST | FLAG_NO_REPLY
                } else {
                    FLAG_TYPE_REQUEST
                };
                let c = r.command();
                (c as u16, self.encode_request(r)?, flags, 0)
            }
            Body::Reply(r) => (
                r.command() as u16,
                self.encode_reply(r)?,
                FLAG_TYPE_REPLY,
                0,
            ),
            Body::ErrorReply { command, errno } => {
                (*command, Vec::new(), FLAG_TYPE_REPLY | FLAG_ERROR, *errno)
            }
        };
        let total = HEADER_SIZE + payload.len();
        if total > self.limits.max_msg_size || u32::try_from(total).is_err() {
            return Err(Error::TooLarge {
                size: total as u64,
                max: self.limits.max_msg_size,
            });
        }
        let h = Header {
            id: msg.id,
            command,
            size: total as u32,
            flags,
            error: errno,
        };
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&h.to_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    fn encode_request(&self, r: &Request) -> Result<Vec<u8>> {
        let k = MsgKind::Request;
        let mut w = Wr::default();
        match r {
            Request::Version(v) => encode_version(&mut w, v)?,
            Request::DmaMap(m) => {
                w.u32(m.argsz)
                    .u32(m.flags)
                    .u64(m.offset)
                    .u64(m.address)
                    .u64(m.size);
            }
            Request::DmaUnmap(u) => encode_unmap(&mut w, u, k)?,
            Request::DeviceGetInfo { argsz } => {
                w.u32(*argsz).u32(0).u32(0).u32(0);
            }
            Request::DeviceGetRegionInfo { argsz, index } => {
                w.u32(*argsz).u32(0).u32(*index).u32(0).u64(0).u64(0);
            }
            Request::DeviceGetIrqInfo { argsz, index } => {
                w.u32(*argsz).u32(0).u32(*index).u32(0);
            }
            Request::DeviceSetIrqs(s) => {
                w.u32(s.argsz)
                    .u32(s.flags())
                    .u32(s.index)
                    .u32(s.start)
                    .u32(s.count);
                if let IrqData::Bool(b) = &s.data {
                    if b.len() != s.count as usize {
                        return Err(bad(r.command(), k, "data", "length differs from count"));
                    }
                    for &x in b {
                        w.bytes(&[u8::from(x)]);
                    }
                }
            }
            Request::RegionRead(a) => {
                w.u64(a.offset).u32(a.region).u32(a.count);
            }
            Request::RegionWrite(d) => encode_region_data(&mut w, d, r.command(), k)?,
            Request::DmaRead(a) => {
                w.u64(a.address);
                match self.dma_layout {
                    DmaLayout::Spec => {
                        w.u64(a.count);
                    }
                    DmaLayout::Qemu => {
                        let c = u32::try_from(a.count)
                            .map_err(|_| bad(r.command(), k, "count", "over 32 bits"))?;
                        w.u32(c).u32(0);
                    }
                }
            }
            Request::DmaWrite(d) => self.encode_dma_data(&mut w, d, r.command(), k)?,
            Request::DeviceReset => {}
            Request::RegionWriteMulti(wrs) => {
                if wrs.is_empty() || wrs.len() > MAX_WRITE_MULTI {
                    return Err(bad(r.command(), k, "wr_cnt", "must be 1 to 200"));
                }
                w.u64(wrs.len() as u64);
                for one in wrs {
                    if one.data.len() > WRITE_MULTI_DATA {
                        return Err(bad(r.command(), k, "wrs.count", "more than 8 bytes"));
                    }
                    let mut data = [0u8; WRITE_MULTI_DATA];
                    data[..one.data.len()].copy_from_slice(&one.data);
                    w.u64(one.offset)
                        .u32(one.region)
                        .u32(one.data.len() as u32)
                        .bytes(&data);
                }
            }
        }
        Ok(w.0)
    }

    fn encode_reply(&self, r: &Reply) -> Result<Vec<u8>> {
        let k = MsgKind::Reply;
        let mut w = Wr::default();
        match r {
            Reply::Version(v) => encode_version(&mut w, v)?,
            Reply::DmaMap | Reply::DeviceSetIrqs | Reply::DeviceReset => {}
            Reply::DmaUnmap(u) => encode_unmap(&mut w, u, k)?,
            Reply::DeviceGetInfo(i) => {
                w.u32(i.argsz)
                    .u32(i.flags)
                    .u32(i.num_regions)
                    .u32(i.num_irqs);
            }
            Reply::DeviceGetRegionInfo(i) => encode_region_info(&mut w, i)?,
            Reply::DeviceGetIrqInfo(i) => {
                w.u32(i.argsz).u32(i.flags).u32(i.index).u32(i.count);
            }
            Reply::RegionRead(d) => encode_region_data(&mut w, d, r.command(), k)?,
            Reply::RegionWrite(a) => {
                w.u64(a.offset).u32(a.region).u32(a.count);
            }
            Reply::DmaRead(d) => self.encode_dma_data(&mut w, d, r.command(), k)?,
            Reply::DmaWrite(None) => {}
            Reply::DmaWrite(Some(a)) => {
                w.u64(a.address);
                match u32::try_from(a.count) {
                    Ok(c) => w.u32(c),
                    Err(_) => w.u64(a.count),
                };
            }
            Reply::RegionWriteMulti { wr_cnt } => {
                w.u64(*wr_cnt);
            }
        }
        Ok(w.0)
    }

    fn encode_dma_data(
        &self,
        w: &mut Wr,
        d: &DmaData,
        command: Command,
        kind: MsgKind,
    ) -> Result<()> {
        w.u64(d.address);
        match self.dma_layout {
            DmaLayout::Spec => {
                w.u64(d.data.len() as u64).bytes(&d.data);
            }
            DmaLayout::Qemu => {
                let c = len_u32(command, kind, "count", d.data.len())?;
                w.u32(c).bytes(&d.data).u32(0);
            }
        }
        Ok(())
    }
}

fn bad(command: Command, kind: MsgKind, field: &'static str, reason: &'static str) -> Error {
    Error::BadField {
        command,
        kind,
        field,
        reason,
    }
}

fn decode_version(rd: &mut Rd<'_>) -> Result<Version> {
    let kind = rd.kind;
    let major = rd.u16("major")?;
    let minor = rd.u16("minor")?;
    let rest = rd.rest();
    // The JSON is NUL-terminated; stop at the first NUL.
    let json = match rest.iter().position(|&b| b == 0) {
        Some(n) => &rest[..n],
        None => rest,
    };
    let capabilities = if json.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: Value =
            serde_json::from_slice(json).map_err(|source| Error::Json { kind, source })?;
        let Value::Object(top) = v else {
            return Err(Error::BadJson {
                kind,
                reason: "version data is not a JSON object",
            });
        };
        match top.get("capabilities") {
            None => Some(Capabilities::default()),
            Some(Value::Object(c)) => Some(parse_caps(c, kind)?),
            Some(_) => {
                return Err(Error::BadJson {
                    kind,
                    reason: "capabilities is not a JSON object",
                })
            }
        }
    };
    Ok(Version {
        major,
        minor,
        capabilities,
    })
}

fn cap_u64(
    m: &Map<String, Value>,
    key: &str,
    field: &'static str,
    kind: MsgKind,
) -> Result<Option<u64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(Error::BadCapability {
            kind,
            field,
            reason: "not a non-negative integer",
        }),
    }
}

fn cap_u32(
    m: &Map<String, Value>,
    key: &str,
    field: &'static str,
    kind: MsgKind,
) -> Result<Option<u32>> {
    match cap_u64(m, key, field, kind)? {
        None => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| Error::BadCapability {
                kind,
                field,
                reason: "over 32 bits",
            }),
    }
}

fn cap_bool(
    m: &Map<String, Value>,
    key: &str,
    field: &'static str,
    kind: MsgKind,
) -> Result<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or(Error::BadCapability {
            kind,
            field,
            reason: "not a boolean",
        }),
    }
}

fn cap_obj<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    field: &'static str,
    kind: MsgKind,
) -> Result<Option<&'a Map<String, Value>>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(Error::BadCapability {
            kind,
            field,
            reason: "not an object",
        }),
    }
}

/// Reads the known capabilities; unknown members are ignored.
fn parse_caps(c: &Map<String, Value>, kind: MsgKind) -> Result<Capabilities> {
    let migration = match cap_obj(c, "migration", "migration", kind)? {
        None => None,
        Some(m) => Some(MigrationCaps {
            pgsize: cap_u64(m, "pgsize", "migration.pgsize", kind)?,
            max_bitmap_size: cap_u64(m, "max_bitmap_size", "migration.max_bitmap_size", kind)?,
        }),
    };
    let twin_socket = match cap_obj(c, "twin_socket", "twin_socket", kind)? {
        None => None,
        Some(t) => Some(TwinSocket {
            supported: cap_bool(t, "supported", "twin_socket.supported", kind)?,
            fd_index: cap_u32(t, "fd_index", "twin_socket.fd_index", kind)?,
        }),
    };
    Ok(Capabilities {
        max_msg_fds: cap_u32(c, "max_msg_fds", "max_msg_fds", kind)?,
        max_data_xfer_size: cap_u64(c, "max_data_xfer_size", "max_data_xfer_size", kind)?,
        pgsizes: cap_u64(c, "pgsizes", "pgsizes", kind)?,
        max_dma_maps: cap_u32(c, "max_dma_maps", "max_dma_maps", kind)?,
        migration,
        write_multiple: cap_bool(c, "write_multiple", "write_multiple", kind)?,
        twin_socket,
    })
}

fn decode_set_irqs(rd: &mut Rd<'_>) -> Result<SetIrqs> {
    let argsz = rd.u32("argsz")?;
    let flags = rd.u32("flags")?;
    let index = rd.u32("index")?;
    let start = rd.u32("start")?;
    let count = rd.u32("count")?;
    const DATA: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
    const ACTION: u32 = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;
    if flags & !(DATA | ACTION) != 0 {
        return Err(rd.bad("flags", "unknown bits"));
    }
    let action = match flags & ACTION {
        IRQ_SET_ACTION_MASK => IrqAction::Mask,
        IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
        IRQ_SET_ACTION_TRIGGER => IrqAction::Trigger,
        _ => return Err(rd.bad("flags", "not exactly one action")),
    };
    if count > MAX_IRQ_COUNT {
        return Err(rd.bad("count", "over 2048"));
    }
    if start.checked_add(count).is_none() {
        return Err(rd.bad("start", "start + count overflows"));
    }
    // argsz is not checked: QEMU's generic code counts the fds in it.
    let data = match flags & DATA {
        IRQ_SET_DATA_NONE => {
            rd.exact(IRQ_SET_FIXED)?;
            IrqData::None
        }
        IRQ_SET_DATA_BOOL => {
            rd.exact(IRQ_SET_FIXED + count as usize)?;
            IrqData::Bool(rd.rest().iter().map(|&b| b != 0).collect())
        }
        IRQ_SET_DATA_EVENTFD => {
            rd.exact(IRQ_SET_FIXED)?;
            IrqData::Eventfd
        }
        _ => return Err(rd.bad("flags", "not exactly one data type")),
    };
    Ok(SetIrqs {
        argsz,
        action,
        data,
        index,
        start,
        count,
    })
}

fn encode_version(w: &mut Wr, v: &Version) -> Result<()> {
    w.u16(v.major).u16(v.minor);
    if let Some(c) = &v.capabilities {
        let json =
            serde_json::to_vec(&VersionJson { capabilities: c }).map_err(|source| Error::Json {
                kind: MsgKind::Request,
                source,
            })?;
        w.bytes(&json).bytes(&[0]);
    }
    Ok(())
}

fn decode_unmap(rd: &mut Rd<'_>, reply: bool) -> Result<DmaUnmap> {
    let argsz = rd.u32("argsz")?;
    let flags = rd.u32("flags")?;
    let address = rd.u64("address")?;
    let size = rd.u64("size")?;
    if flags & !(DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | DMA_UNMAP_FLAG_ALL) != 0 {
        return Err(rd.bad("flags", "unknown bits"));
    }
    let bitmap = if flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
        let pgsize = rd.u64("bitmap.pgsize")?;
        let bsize = rd.u64("bitmap.size")?;
        let data = if reply {
            if bsize != rd.remaining() as u64 {
                return Err(rd.bad("bitmap.size", "differs from the bytes that follow"));
            }
            rd.rest().to_vec()
        } else {
            rd.exact(DMA_UNMAP_SIZE + BITMAP_SIZE)?;
            Vec::new()
        };
        Some(DirtyBitmap {
            pgsize,
            size: bsize,
            data,
        })
    } else {
        rd.exact(DMA_UNMAP_SIZE)?;
        None
    };
    Ok(DmaUnmap {
        argsz,
        flags,
        address,
        size,
        bitmap,
    })
}

fn encode_unmap(w: &mut Wr, u: &DmaUnmap, kind: MsgKind) -> Result<()> {
    let has_flag = u.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
    if has_flag != u.bitmap.is_some() {
        return Err(bad(
            Command::DmaUnmap,
            kind,
            "bitmap",
            "present exactly when GET_DIRTY_BITMAP is set",
        ));
    }
    w.u32(u.argsz).u32(u.flags).u64(u.address).u64(u.size);
    if let Some(b) = &u.bitmap {
        w.u64(b.pgsize).u64(b.size);
        if kind == MsgKind::Reply {
            if b.data.len() as u64 != b.size {
                return Err(bad(
                    Command::DmaUnmap,
                    kind,
                    "bitmap.size",
                    "differs from data",
                ));
            }
            w.bytes(&b.data);
        }
    }
    Ok(())
}

fn decode_cap(rd: &Rd<'_>, id: u16, version: u16, body: &[u8]) -> Result<RegionCap> {
    let mut b = Rd {
        buf: body,
        pos: 0,
        command: rd.command,
        kind: rd.kind,
    };
    Ok(match id {
        REGION_CAP_SPARSE_MMAP if version == 1 => {
            let nr = b.u32("sparse.nr_areas")?;
            b.u32("sparse.reserved")?;
            if nr as usize > b.remaining() / SPARSE_AREA_SIZE {
                return Err(b.bad("sparse.nr_areas", "more areas than bytes"));
            }
            let mut areas = Vec::with_capacity(nr as usize);
            for _ in 0..nr {
                areas.push(SparseArea {
                    offset: b.u64("sparse.offset")?,
                    size: b.u64("sparse.size")?,
                });
            }
            RegionCap::SparseMmap(areas)
        }
        REGION_CAP_TYPE if version == 1 => RegionCap::Type {
            ty: b.u32("type.type")?,
            subtype: b.u32("type.subtype")?,
        },
        REGION_CAP_MSIX_MAPPABLE if version == 1 => RegionCap::MsixMappable,
        _ => RegionCap::Other {
            id,
            version,
            data: body.to_vec(),
        },
    })
}

fn decode_region_info(rd: &mut Rd<'_>) -> Result<RegionInfo> {
    let mut info = RegionInfo {
        argsz: rd.u32("argsz")?,
        flags: rd.u32("flags")?,
        index: rd.u32("index")?,
        cap_offset: rd.u32("cap_offset")?,
        size: rd.u64("size")?,
        offset: rd.u64("offset")?,
        caps: Vec::new(),
    };
    let buf = rd.buf;
    // The chain is absent when the flag is clear or when the client's argsz
    // was too small for it (the reply then stops after the structure).
    if info.flags & REGION_FLAG_CAPS == 0 || info.cap_offset == 0 || buf.len() == REGION_INFO_SIZE {
        if buf.len() != REGION_INFO_SIZE {
            return Err(rd.size(REGION_INFO_SIZE));
        }
        return Ok(info);
    }
    let mut at = info.cap_offset as usize;
    if at < REGION_INFO_SIZE {
        return Err(rd.bad("cap_offset", "points into the region info"));
    }
    loop {
        if info.caps.len() == MAX_REGION_CAPS {
            return Err(rd.bad("cap.next", "chain too long"));
        }
        let Some(hdr) = at
            .checked_add(CAP_HEADER_SIZE)
            .and_then(|end| buf.get(at..end))
        else {
            return Err(rd.bad("cap.next", "points past the payload"));
        };
        let id = u16::from_le_bytes([hdr[0], hdr[1]]);
        let version = u16::from_le_bytes([hdr[2], hdr[3]]);
        let next = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        let body_start = at + CAP_HEADER_SIZE;
        let body_end = if next == 0 { buf.len() } else { next };
        if next != 0 && next < body_start {
            // Also rules out loops: every step moves forward.
            return Err(rd.bad("cap.next", "does not move forward"));
        }
        let Some(body) = buf.get(body_start..body_end) else {
            return Err(rd.bad("cap.next", "points past the payload"));
        };
        let cap = decode_cap(rd, id, version, body)?;
        info.caps.push(cap);
        if next == 0 {
            break;
        }
        at = next;
    }
    Ok(info)
}

fn cap_body(cap: &RegionCap) -> (u16, u16, Vec<u8>) {
    let mut w = Wr::default();
    match cap {
        RegionCap::SparseMmap(areas) => {
            w.u32(areas.len() as u32).u32(0);
            for a in areas {
                w.u64(a.offset).u64(a.size);
            }
            (REGION_CAP_SPARSE_MMAP, 1, w.0)
        }
        RegionCap::Type { ty, subtype } => {
            w.u32(*ty).u32(*subtype);
            (REGION_CAP_TYPE, 1, w.0)
        }
        RegionCap::MsixMappable => (REGION_CAP_MSIX_MAPPABLE, 1, w.0),
        RegionCap::Other { id, version, data } => (*id, *version, data.clone()),
    }
}

fn encode_region_info(w: &mut Wr, i: &RegionInfo) -> Result<()> {
    let k = MsgKind::Reply;
    let c = Command::DeviceGetRegionInfo;
    if i.caps.len() > MAX_REGION_CAPS {
        return Err(bad(c, k, "caps", "chain too long"));
    }
    let (flags, cap_offset) = if i.caps.is_empty() {
        (i.flags, i.cap_offset)
    } else {
        (i.flags | REGION_FLAG_CAPS, REGION_INFO_SIZE as u32)
    };
    w.u32(i.argsz)
        .u32(flags)
        .u32(i.index)
        .u32(cap_offset)
        .u64(i.size)
        .u64(i.offset);
    let n = i.caps.len();
    for (idx, cap) in i.caps.iter().enumerate() {
        let (id, version, body) = cap_body(cap);
        let start = w.0.len();
        let mut len = CAP_HEADER_SIZE + body.len();
        // The last capability runs to the end of the payload, so only the
        // ones before it are padded (to 8 bytes, as the kernel lays them out).
        if idx + 1 < n {
            len = len.div_ceil(8) * 8;
        }
        let next = if idx + 1 < n {
            len_u32(c, k, "cap.next", start + len)?
        } else {
            0
        };
        w.u16(id).u16(version).u32(next).bytes(&body);
        w.0.resize(start + len, 0);
    }
    Ok(())
}

fn encode_region_data(w: &mut Wr, d: &RegionData, command: Command, kind: MsgKind) -> Result<()> {
    let c = len_u32(command, kind, "count", d.data.len())?;
    w.u64(d.offset).u32(d.region).u32(c).bytes(&d.data);
    Ok(())
}

/// An incremental frame splitter for a stream socket.
///
/// [`push`](FrameDecoder::push) what the socket gave; [`next_frame`](FrameDecoder::next_frame)
/// yields whole frames (header included) for [`Codec::decode`]. A header is
/// validated as soon as its 16 bytes are in, so an oversized frame is refused
/// before its body is buffered. After an error the stream cannot be
/// resynchronised: every later call fails with [`Error::StreamBroken`] and
/// the connection should be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_msg_size: usize,
    broken: bool,
}

impl FrameDecoder {
    /// A splitter refusing frames above `max_msg_size` bytes.
    pub fn new(max_msg_size: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max_msg_size,
            broken: false,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame with its parsed header, `Ok(None)` if more bytes
    /// are needed.
    pub fn next_frame(&mut self) -> Result<Option<(Header, Vec<u8>)>> {
        if self.broken {
            return Err(Error::StreamBroken);
        }
        if self.buf.len() < HEADER_SIZE {
            return Ok(None);
        }
        let h = match Header::parse(&self.buf, self.max_msg_size) {
            Ok(h) => h,
            Err(e) => {
                self.broken = true;
                return Err(e);
            }
        };
        let size = h.size as usize;
        if self.buf.len() < size {
            return Ok(None);
        }
        let frame: Vec<u8> = self.buf.drain(..size).collect();
        Ok(Some((h, frame)))
    }
}

#[cfg(test)]
mod tests;
