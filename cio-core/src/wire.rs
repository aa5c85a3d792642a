//! The cio wire protocol: frame header, messages, encoding and strict
//! decoding. `docs/protocol.md` describes the same thing byte by byte.
//!
//! Every frame is a 24-byte little-endian header followed by a body of at
//! most [`MAX_BODY`] bytes:
//!
//! ```text
//! 0   u32  body length
//! 4   u16  message type
//! 6   u16  flags (must be 0 in version 1)
//! 8   u64  sequence number of this frame (per direction, from 1, +1 a frame)
//! 16  u64  reply_to: the sequence number of the request this answers, or 0
//! ```
//!
//! Decoding checks, in this order: the body length against [`MAX_BODY`]
//! (before the body is even received), the flags, the message type, the
//! minimum size (every field present) and the maximum size (no trailing
//! bytes, per-field caps).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::device::{DeviceInfo, IrqInfo, IrqKind, RegionInfo, RegionKind, ResetMethod};
use crate::dma::DmaDir;
use crate::usbip::{UsbDevice, UsbInterface, UsbSpeed, BUSID_LEN};

/// Header length in bytes.
pub const HEADER_LEN: usize = 24;
/// Largest DMA payload in one `DmaData` frame.
pub const MAX_DMA_CHUNK: usize = 1 << 20;
/// Largest body of any frame.
pub const MAX_BODY: usize = MAX_DMA_CHUNK + 64;
/// Largest single region read or write.
pub const MAX_IO: usize = 4096;
/// Largest bulk region read or write (`RegionReadBulk`, `RegionWriteBulk`).
pub const MAX_BULK: usize = 1 << 20;
/// Largest ping payload.
pub const MAX_PING: usize = 64 * 1024;
/// Largest chunk of a USB/IP stream in one `UsbData` frame.
pub const MAX_USB_CHUNK: usize = 256 * 1024;
/// Largest string (names, error messages).
pub const MAX_STRING: usize = 1024;
/// Largest number of devices in a list, regions or irq kinds in an info.
pub const MAX_ITEMS: usize = 4096;
/// Length of handshake nonces and MACs.
pub const NONCE_LEN: usize = 32;

/// Highest protocol version spoken by this build. Version 2 adds
/// acknowledgements (`Ack`) and resumable sessions (`Resume`, `Resumed`).
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest protocol version still spoken (plain sessions, no resume).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Feature: posted (unacknowledged) region writes.
pub const FEATURE_POSTED_WRITES: u64 = 1 << 0;
/// Feature: DMA mappings with shadow sync (`DmaMap`, `DmaData`, `SyncForCpu`).
pub const FEATURE_DMA_SYNC: u64 = 1 << 1;
/// Feature (version 2): the session survives its connection. Both sides
/// keep what they sent until the peer acknowledges it (`Ack`), and a new
/// connection can take the session over (`Resume`), replaying exactly the
/// frames the peer has not received.
pub const FEATURE_RESUME: u64 = 1 << 2;
/// Feature: bulk region access (`RegionReadBulk`, `RegionWriteBulk`): one
/// request covers up to [`MAX_BULK`] bytes of a region, which the backend
/// splits into the accesses the device accepts.
pub const FEATURE_BULK: u64 = 1 << 3;
/// Feature: posted DMA mappings (`DmaMap` and `DmaUnmap` with `posted`):
/// answered only when they fail, as posted writes are, for a frontend that
/// cannot wait a round trip per mapping (a VM's IOMMU unmaps every buffer).
pub const FEATURE_POSTED_DMA: u64 = 1 << 4;
/// Every feature this build implements.
pub const FEATURES: u64 =
    FEATURE_POSTED_WRITES | FEATURE_DMA_SYNC | FEATURE_RESUME | FEATURE_BULK | FEATURE_POSTED_DMA;

/// Authentication the server demands, announced in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuthMethod {
    /// None (loopback or Unix socket only).
    None = 0,
    /// Mutual challenge–response with a pre-shared key (HMAC-SHA256).
    PreSharedKey = 1,
}

/// What `SetIrqs` does to the vectors it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IrqAction {
    /// Stop delivering every vector of the kind.
    Disable = 0,
    /// Deliver vectors `start..start+count` as `Irq` events.
    Enable = 1,
    /// Unmask INTx after it was handled.
    Unmask = 2,
}

/// An error code carried by `Error` frames. Unknown codes are kept as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// A frame could not be decoded; the session ends.
    pub const MALFORMED: Self = Self(1);
    /// The message type is unknown or not valid in this direction; the session ends.
    pub const UNKNOWN_MESSAGE: Self = Self(2);
    /// No common protocol version.
    pub const VERSION: Self = Self(3);
    /// The server needs a pre-shared key and none was proven.
    pub const AUTH_REQUIRED: Self = Self(4);
    /// The key proof did not verify.
    pub const AUTH_FAILED: Self = Self(5);
    /// No device by that name.
    pub const NO_DEVICE: Self = Self(6);
    /// The device is open in another session.
    pub const BUSY: Self = Self(7);
    /// The handle is not open in this session.
    pub const BAD_HANDLE: Self = Self(8);
    /// A region access was refused (region, width, alignment, range).
    pub const ACCESS: Self = Self(9);
    /// An interrupt request was refused.
    pub const IRQ: Self = Self(10);
    /// A DMA request was refused.
    pub const DMA: Self = Self(11);
    /// The device reported a failure.
    pub const DEVICE: Self = Self(12);
    /// A per-session limit would be exceeded.
    pub const LIMIT: Self = Self(13);
    /// The message is valid but not in this state (e.g. before the handshake).
    pub const STATE: Self = Self(14);
    /// The server is shutting down.
    pub const SHUTDOWN: Self = Self(15);
    /// A USB export failed on the server (sysfs, usbip-host).
    pub const USB: Self = Self(16);
    /// The server could not keep this connection now (its handshake slot
    /// went to a newer one): connecting again may work.
    pub const RETRY: Self = Self(17);
    /// The listener speaks TLS only and the client did not.
    pub const TLS_REQUIRED: Self = Self(18);

    /// Short name for logs and messages.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "malformed frame",
            2 => "unknown message",
            3 => "version mismatch",
            4 => "authentication required",
            5 => "authentication failed",
            6 => "no such device",
            7 => "device busy",
            8 => "bad handle",
            9 => "access refused",
            10 => "irq refused",
            11 => "dma refused",
            12 => "device error",
            13 => "limit exceeded",
            14 => "wrong state",
            15 => "shutting down",
            16 => "usb export failed",
            17 => "try again",
            18 => "TLS required",
            _ => "unknown error",
        }
    }
}

/// One line of a device list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Name to open it by.
    pub name: String,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// 24-bit class code.
    pub class: u32,
    /// Open in some session right now.
    pub busy: bool,
}

/// Every message of protocol versions 1 and 2. The type code of each is given by
/// [`Message::kind`]; `docs/protocol.md` lists the layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → server, first frame.
    Hello {
        /// Highest version the client speaks.
        version: u16,
        /// Features the client wants.
        features: u64,
        /// Session to resume, or 0 for a new one.
        session: u64,
        /// Client challenge.
        nonce: [u8; NONCE_LEN],
        /// Free-form client name for logs.
        client: String,
    },
    /// Server → client, answers `Hello`.
    Welcome {
        /// Version chosen.
        version: u16,
        /// Features granted (a subset of those asked).
        features: u64,
        /// Session id.
        session: u64,
        /// Authentication the server requires.
        auth: AuthMethod,
        /// Server challenge.
        nonce: [u8; NONCE_LEN],
    },
    /// Client → server: MAC proving the client knows the key.
    AuthProof {
        /// HMAC over both nonces.
        mac: [u8; NONCE_LEN],
    },
    /// Server → client: the server's MAC; the session is ready.
    AuthOk {
        /// HMAC over both nonces.
        mac: [u8; NONCE_LEN],
    },
    /// Either side: orderly end of the session.
    Goodbye,
    /// Either side (version 2, posted): every frame up to sequence number
    /// `received` arrived and was handled; the sender may forget them.
    Ack {
        /// Highest sequence number received, cumulative.
        received: u64,
    },
    /// Client → server, instead of `AuthProof` when `Hello` names a
    /// session: takes the session over on this connection.
    Resume {
        /// Highest sequence number the client received from the server.
        received: u64,
        /// MAC with the session's resume key over both new nonces, the
        /// session id and `received`.
        mac: [u8; NONCE_LEN],
    },
    /// Client → server (version 2, request): hand this session to another
    /// frontend. The answer carries a single-use ticket secret; the server
    /// then drops this connection and keeps the session parked for the
    /// adopter.
    Suspend,
    /// Server → client: answers `Suspend`.
    Suspended {
        /// Secret an adopter proves (`Adopt`).
        secret: [u8; NONCE_LEN],
        /// Milliseconds the ticket (and the parked session) stays valid.
        ttl_ms: u64,
    },
    /// Client → server, instead of `AuthProof` when `Hello` names a
    /// suspended session: adopts it with the ticket's secret.
    Adopt {
        /// MAC with the ticket secret over both nonces and the session id.
        mac: [u8; NONCE_LEN],
    },
    /// Server → client: the session continues on this connection (after
    /// `Resume` or `Adopt`); the server now replays what the client has not
    /// received.
    Resumed {
        /// Highest sequence number the server received from the client.
        received: u64,
        /// The server's MAC, as for `Resume`.
        mac: [u8; NONCE_LEN],
    },
    /// Either side: echo request.
    Ping {
        /// Echoed back.
        payload: Bytes,
    },
    /// Answer to `Ping`.
    Pong {
        /// The ping's payload.
        payload: Bytes,
    },
    /// Client → server: list devices.
    ListDevices,
    /// Answer to `ListDevices`.
    DeviceList {
        /// Devices served.
        devices: Vec<DeviceSummary>,
    },
    /// Client → server: open a device for this session.
    Open {
        /// Device name.
        name: String,
    },
    /// Answer to `Open`.
    Opened {
        /// Handle for later requests.
        handle: u32,
        /// Device description.
        info: DeviceInfo,
    },
    /// Client → server: close a handle (device is reset, DMA unmapped). Answered by `Ok`.
    Close {
        /// Handle.
        handle: u32,
    },
    /// Non-posted region read. Answered by `ReadData`.
    RegionRead {
        /// Handle.
        handle: u32,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Answer to `RegionRead`.
    ReadData {
        /// The bytes read.
        data: Bytes,
    },
    /// Posted region write: no answer unless it fails (then an `Error` whose
    /// `reply_to` is this frame's sequence number).
    RegionWrite {
        /// Handle.
        handle: u32,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes to write.
        data: Bytes,
    },
    /// Non-posted read of `len` bytes (up to [`MAX_BULK`]) of a region,
    /// which the backend splits into the accesses the device accepts
    /// ([`FEATURE_BULK`]). Answered by `ReadData`.
    RegionReadBulk {
        /// Handle.
        handle: u32,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Posted write of up to [`MAX_BULK`] bytes of a region, split by the
    /// backend like `RegionReadBulk` ([`FEATURE_BULK`]); no answer unless it
    /// fails.
    RegionWriteBulk {
        /// Handle.
        handle: u32,
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes to write.
        data: Bytes,
    },
    /// Configure interrupt delivery. Answered by `Ok`.
    SetIrqs {
        /// Handle.
        handle: u32,
        /// Interrupt kind.
        kind: IrqKind,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// What to do.
        action: IrqAction,
    },
    /// Server → client event: the device raised a vector.
    Irq {
        /// Handle.
        handle: u32,
        /// Interrupt kind.
        kind: IrqKind,
        /// Vector.
        vector: u32,
    },
    /// Declare a DMA mapping; the server allocates its shadow. Answered by
    /// `Ok`, or with `posted` ([`FEATURE_POSTED_DMA`]) only if it fails.
    DmaMap {
        /// Handle.
        handle: u32,
        /// First IOVA.
        iova: u64,
        /// Size.
        len: u64,
        /// Direction.
        dir: DmaDir,
        /// Posted (kind `DMA_MAP_POSTED`): no answer unless it fails.
        posted: bool,
    },
    /// Remove a mapping; device-written data is pulled first. Answered by
    /// `Ok`. With `posted` ([`FEATURE_POSTED_DMA`]) it is answered only if it
    /// fails and nothing is pulled: the device's writes to it not yet sent
    /// are dropped (the sender unmaps what it has seen completed, whose data
    /// came ahead of the completion's interrupt or reply; late data could
    /// land in a new mapping at the same IOVA).
    DmaUnmap {
        /// Handle.
        handle: u32,
        /// IOVA the mapping starts at.
        iova: u64,
        /// Posted (kind `DMA_UNMAP_POSTED`): no answer unless it fails.
        posted: bool,
    },
    /// Posted, either direction: bytes now at `iova` on the sender's side.
    DmaData {
        /// Handle.
        handle: u32,
        /// IOVA of the first byte.
        iova: u64,
        /// Bytes.
        data: Bytes,
    },
    /// Client → server: pull device-written data in the range. Answered by `Ok`
    /// after the `DmaData` frames.
    SyncForCpu {
        /// Handle.
        handle: u32,
        /// First IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// Reset the device. Answered by `Ok`.
    Reset {
        /// Handle.
        handle: u32,
    },
    /// Client → server: list the USB devices the server exports.
    UsbList,
    /// Answer to `UsbList`.
    UsbDeviceList {
        /// Devices, each with its bus id.
        devices: Vec<UsbDevice>,
    },
    /// Client → server: import a USB device. Answered by `UsbImported`;
    /// from then on the session carries that device's USB/IP URB stream in
    /// `UsbData` frames (and `Ping`, `Goodbye`), nothing else. With
    /// `direct`, the URB stream instead flows as plain USB/IP on this
    /// connection itself right after `UsbImported`: both ends hand the
    /// socket to their kernel (usbip-host, vhci-hcd) and no frame follows.
    UsbImport {
        /// Bus id.
        busid: String,
        /// Hand the connection to the kernels after the reply.
        direct: bool,
    },
    /// Answer to `UsbImport`: the device is bound and the stream is open.
    UsbImported {
        /// The device.
        device: UsbDevice,
    },
    /// Posted, either direction: the next bytes of the USB/IP URB stream.
    UsbData {
        /// Stream bytes (any split; frames are not URB-aligned).
        data: Bytes,
    },
    /// Success answer with no data.
    Ok,
    /// Failure: the answer to a request, or an asynchronous report for a
    /// posted frame (`reply_to` names it).
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
}

/// Message type codes.
pub mod kind {
    #![allow(missing_docs)]
    pub const HELLO: u16 = 0x0001;
    pub const WELCOME: u16 = 0x0002;
    pub const AUTH_PROOF: u16 = 0x0003;
    pub const AUTH_OK: u16 = 0x0004;
    pub const GOODBYE: u16 = 0x0005;
    pub const PING: u16 = 0x0006;
    pub const PONG: u16 = 0x0007;
    pub const ACK: u16 = 0x0008;
    pub const RESUME: u16 = 0x0009;
    pub const RESUMED: u16 = 0x000a;
    pub const SUSPEND: u16 = 0x000b;
    pub const SUSPENDED: u16 = 0x000c;
    pub const ADOPT: u16 = 0x000d;
    pub const LIST_DEVICES: u16 = 0x0010;
    pub const DEVICE_LIST: u16 = 0x0011;
    pub const OPEN: u16 = 0x0012;
    pub const OPENED: u16 = 0x0013;
    pub const CLOSE: u16 = 0x0014;
    pub const REGION_READ: u16 = 0x0020;
    pub const READ_DATA: u16 = 0x0021;
    pub const REGION_WRITE: u16 = 0x0022;
    pub const REGION_READ_BULK: u16 = 0x0023;
    pub const REGION_WRITE_BULK: u16 = 0x0024;
    pub const SET_IRQS: u16 = 0x0030;
    pub const IRQ: u16 = 0x0031;
    pub const DMA_MAP: u16 = 0x0040;
    pub const DMA_UNMAP: u16 = 0x0041;
    pub const DMA_DATA: u16 = 0x0042;
    pub const SYNC_FOR_CPU: u16 = 0x0043;
    pub const DMA_MAP_POSTED: u16 = 0x0044;
    pub const DMA_UNMAP_POSTED: u16 = 0x0045;
    pub const RESET: u16 = 0x0050;
    pub const USB_LIST: u16 = 0x0060;
    pub const USB_DEVICE_LIST: u16 = 0x0061;
    pub const USB_IMPORT: u16 = 0x0062;
    pub const USB_IMPORTED: u16 = 0x0063;
    pub const USB_DATA: u16 = 0x0064;
    pub const OK: u16 = 0x007e;
    pub const ERROR: u16 = 0x007f;
}

/// Why a frame could not be decoded. Any of these ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The header announces a body larger than [`MAX_BODY`].
    #[error("frame body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    Oversized(u32),
    /// Reserved header flags are set.
    #[error("reserved header flags {0:#x} are set")]
    Flags(u16),
    /// The message type is unknown.
    #[error("unknown message type {0:#06x}")]
    UnknownType(u16),
    /// The body ends before a field it must hold.
    #[error("message {kind:#06x} is truncated: {field} missing")]
    Truncated {
        /// Message type.
        kind: u16,
        /// First missing field.
        field: &'static str,
    },
    /// The body has bytes after its last field.
    #[error("message {kind:#06x} has {extra} trailing bytes")]
    Trailing {
        /// Message type.
        kind: u16,
        /// Number of extra bytes.
        extra: usize,
    },
    /// A field holds a value out of its range.
    #[error("message {kind:#06x}: invalid {field}")]
    Invalid {
        /// Message type.
        kind: u16,
        /// Field name.
        field: &'static str,
    },
    /// The sequence number is not the next one expected.
    #[error("sequence number {got} where {expected} was expected")]
    Sequence {
        /// Expected sequence number.
        expected: u64,
        /// Received sequence number.
        got: u64,
    },
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Sender's sequence number.
    pub seq: u64,
    /// Request this answers, or 0.
    pub reply_to: u64,
    /// The message.
    pub msg: Message,
}

struct Rd<'a> {
    b: &'a [u8],
    kind: u16,
}

impl<'a> Rd<'a> {
    fn need(&self, n: usize, field: &'static str) -> Result<(), WireError> {
        if self.b.len() < n {
            Err(WireError::Truncated {
                kind: self.kind,
                field,
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, WireError> {
        self.need(1, f)?;
        Ok(self.b.get_u8())
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, WireError> {
        self.need(2, f)?;
        Ok(self.b.get_u16_le())
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, WireError> {
        self.need(4, f)?;
        Ok(self.b.get_u32_le())
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, WireError> {
        self.need(8, f)?;
        Ok(self.b.get_u64_le())
    }
    fn array(&mut self, f: &'static str) -> Result<[u8; NONCE_LEN], WireError> {
        self.need(NONCE_LEN, f)?;
        let mut a = [0; NONCE_LEN];
        self.b.copy_to_slice(&mut a);
        Ok(a)
    }
    fn invalid(&self, field: &'static str) -> WireError {
        WireError::Invalid {
            kind: self.kind,
            field,
        }
    }
    fn string(&mut self, f: &'static str) -> Result<String, WireError> {
        let n = self.u16(f)? as usize;
        if n > MAX_STRING {
            return Err(self.invalid(f));
        }
        self.need(n, f)?;
        let s = std::str::from_utf8(&self.b[..n]).map_err(|_| self.invalid(f))?;
        let s = s.to_owned();
        self.b.advance(n);
        Ok(s)
    }
    fn count(&mut self, f: &'static str) -> Result<usize, WireError> {
        let n = self.u32(f)? as usize;
        if n > MAX_ITEMS {
            return Err(self.invalid(f));
        }
        Ok(n)
    }
    /// A u32-length-prefixed byte string of at most `max` bytes, borrowed
    /// from `body` without copying.
    fn bytes(&mut self, body: &Bytes, max: usize, f: &'static str) -> Result<Bytes, WireError> {
        let n = self.u32(f)? as usize;
        if n > max {
            return Err(self.invalid(f));
        }
        self.need(n, f)?;
        let start = body.len() - self.b.len();
        self.b.advance(n);
        Ok(body.slice(start..start + n))
    }
    /// The fields of a region read (handle, region, offset, len), its
    /// length from 1 to `max`.
    fn region_read(&mut self, max: usize) -> Result<(u32, u32, u64, u32), WireError> {
        let (handle, region, offset) = (
            self.u32("handle")?,
            self.u32("region")?,
            self.u64("offset")?,
        );
        let len = self.u32("len")?;
        if len == 0 || len as usize > max {
            return Err(self.invalid("len"));
        }
        Ok((handle, region, offset, len))
    }
    fn irq_kind(&mut self) -> Result<IrqKind, WireError> {
        let v = self.u8("irq kind")?;
        IrqKind::from_u8(v).ok_or(self.invalid("irq kind"))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                kind: self.kind,
                extra: self.b.len(),
            })
        }
    }
}

fn put_string(out: &mut BytesMut, s: &str) {
    // Strings longer than the limit are cut at a char boundary rather than
    // producing a frame the peer must reject.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16_le(end as u16);
    out.put_slice(&s.as_bytes()[..end]);
}

fn put_header(out: &mut BytesMut, len: u32, kind: u16, seq: u64, reply_to: u64) {
    out.put_u32_le(len);
    out.put_u16_le(kind);
    out.put_u16_le(0);
    out.put_u64_le(seq);
    out.put_u64_le(reply_to);
}

fn put_region_write_body(out: &mut BytesMut, handle: u32, region: u32, offset: u64, data: &[u8]) {
    out.put_u32_le(handle);
    out.put_u32_le(region);
    out.put_u64_le(offset);
    put_bytes(out, data);
}

/// Appends a posted `RegionWrite` frame (with `bulk`, `RegionWriteBulk`)
/// straight from a slice, without building a [`Message`] (the hot path of
/// posted writes).
pub fn encode_region_write(
    seq: u64,
    handle: u32,
    region: u32,
    offset: u64,
    data: &[u8],
    bulk: bool,
    out: &mut BytesMut,
) {
    let k = if bulk {
        kind::REGION_WRITE_BULK
    } else {
        kind::REGION_WRITE
    };
    put_header(out, (20 + data.len()) as u32, k, seq, 0);
    put_region_write_body(out, handle, region, offset, data);
}

/// Appends the header and fixed fields of a `DmaData` frame whose
/// `len`-byte payload the caller sends right after (zero-copy sends).
pub fn encode_dma_data_head(
    seq: u64,
    reply_to: u64,
    handle: u32,
    iova: u64,
    len: usize,
    out: &mut BytesMut,
) {
    put_header(out, (16 + len) as u32, kind::DMA_DATA, seq, reply_to);
    out.put_u32_le(handle);
    out.put_u64_le(iova);
    out.put_u32_le(len as u32);
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

impl Message {
    /// The type code.
    pub fn kind(&self) -> u16 {
        use kind::*;
        match self {
            Self::Hello { .. } => HELLO,
            Self::Welcome { .. } => WELCOME,
            Self::AuthProof { .. } => AUTH_PROOF,
            Self::AuthOk { .. } => AUTH_OK,
            Self::Goodbye => GOODBYE,
            Self::Ack { .. } => ACK,
            Self::Resume { .. } => RESUME,
            Self::Resumed { .. } => RESUMED,
            Self::Suspend => SUSPEND,
            Self::Suspended { .. } => SUSPENDED,
            Self::Adopt { .. } => ADOPT,
            Self::Ping { .. } => PING,
            Self::Pong { .. } => PONG,
            Self::ListDevices => LIST_DEVICES,
            Self::DeviceList { .. } => DEVICE_LIST,
            Self::Open { .. } => OPEN,
            Self::Opened { .. } => OPENED,
            Self::Close { .. } => CLOSE,
            Self::RegionRead { .. } => REGION_READ,
            Self::ReadData { .. } => READ_DATA,
            Self::RegionWrite { .. } => REGION_WRITE,
            Self::RegionReadBulk { .. } => REGION_READ_BULK,
            Self::RegionWriteBulk { .. } => REGION_WRITE_BULK,
            Self::SetIrqs { .. } => SET_IRQS,
            Self::Irq { .. } => IRQ,
            Self::DmaMap { posted: false, .. } => DMA_MAP,
            Self::DmaMap { posted: true, .. } => DMA_MAP_POSTED,
            Self::DmaUnmap { posted: false, .. } => DMA_UNMAP,
            Self::DmaUnmap { posted: true, .. } => DMA_UNMAP_POSTED,
            Self::DmaData { .. } => DMA_DATA,
            Self::SyncForCpu { .. } => SYNC_FOR_CPU,
            Self::Reset { .. } => RESET,
            Self::UsbList => USB_LIST,
            Self::UsbDeviceList { .. } => USB_DEVICE_LIST,
            Self::UsbImport { .. } => USB_IMPORT,
            Self::UsbImported { .. } => USB_IMPORTED,
            Self::UsbData { .. } => USB_DATA,
            Self::Ok => OK,
            Self::Error { .. } => ERROR,
        }
    }

    /// Appends the whole frame (header and body) to `out`.
    pub fn encode(&self, seq: u64, reply_to: u64, out: &mut BytesMut) {
        let start = out.len();
        put_header(out, 0, self.kind(), seq, reply_to); // length patched below
        self.encode_body(out);
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Like [`encode`](Self::encode), but a large DMA or USB payload is not copied:
    /// the frame's head goes into `out` and the payload is returned, to be
    /// sent right after it (with a vectored write).
    pub fn encode_vectored(&self, seq: u64, reply_to: u64, out: &mut BytesMut) -> Option<Bytes> {
        const ZERO_COPY_MIN: usize = 16 * 1024;
        match self {
            Self::DmaData { handle, iova, data } if data.len() >= ZERO_COPY_MIN => {
                encode_dma_data_head(seq, reply_to, *handle, *iova, data.len(), out);
                Some(data.clone())
            }
            Self::ReadData { data } if data.len() >= ZERO_COPY_MIN => {
                put_header(out, (4 + data.len()) as u32, kind::READ_DATA, seq, reply_to);
                out.put_u32_le(data.len() as u32);
                Some(data.clone())
            }
            Self::UsbData { data } if data.len() >= ZERO_COPY_MIN => {
                put_header(out, (4 + data.len()) as u32, kind::USB_DATA, seq, reply_to);
                out.put_u32_le(data.len() as u32);
                Some(data.clone())
            }
            _ => {
                self.encode(seq, reply_to, out);
                None
            }
        }
    }

    fn encode_body(&self, out: &mut BytesMut) {
        match self {
            Self::Hello {
                version,
                features,
                session,
                nonce,
                client,
            } => {
                out.put_u16_le(*version);
                out.put_u64_le(*features);
                out.put_u64_le(*session);
                out.put_slice(nonce);
                put_string(out, client);
            }
            Self::Welcome {
                version,
                features,
                session,
                auth,
                nonce,
            } => {
                out.put_u16_le(*version);
                out.put_u64_le(*features);
                out.put_u64_le(*session);
                out.put_u8(*auth as u8);
                out.put_slice(nonce);
            }
            Self::AuthProof { mac } | Self::AuthOk { mac } => out.put_slice(mac),
            Self::Ack { received } => out.put_u64_le(*received),
            Self::Resume { received, mac } | Self::Resumed { received, mac } => {
                out.put_u64_le(*received);
                out.put_slice(mac);
            }
            Self::Goodbye | Self::ListDevices | Self::UsbList | Self::Ok | Self::Suspend => {}
            Self::Suspended { secret, ttl_ms } => {
                out.put_slice(secret);
                out.put_u64_le(*ttl_ms);
            }
            Self::Adopt { mac } => out.put_slice(mac),
            Self::Ping { payload } | Self::Pong { payload } => put_bytes(out, payload),
            Self::DeviceList { devices } => {
                out.put_u32_le(devices.len() as u32);
                for d in devices {
                    put_string(out, &d.name);
                    out.put_u16_le(d.vendor);
                    out.put_u16_le(d.device);
                    out.put_u32_le(d.class);
                    out.put_u8(d.busy as u8);
                }
            }
            Self::Open { name } => put_string(out, name),
            Self::Opened { handle, info } => {
                out.put_u32_le(*handle);
                encode_info(out, info);
                // Left out for protocol-1 peers (the server says Unknown).
                if info.reset != ResetMethod::Unknown {
                    out.put_u8(info.reset as u8);
                }
            }
            Self::Close { handle } | Self::Reset { handle } => out.put_u32_le(*handle),
            Self::RegionRead {
                handle,
                region,
                offset,
                len,
            }
            | Self::RegionReadBulk {
                handle,
                region,
                offset,
                len,
            } => {
                out.put_u32_le(*handle);
                out.put_u32_le(*region);
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
            }
            Self::ReadData { data } => put_bytes(out, data),
            Self::RegionWrite {
                handle,
                region,
                offset,
                data,
            }
            | Self::RegionWriteBulk {
                handle,
                region,
                offset,
                data,
            } => put_region_write_body(out, *handle, *region, *offset, data),
            Self::SetIrqs {
                handle,
                kind,
                start,
                count,
                action,
            } => {
                out.put_u32_le(*handle);
                out.put_u8(*kind as u8);
                out.put_u8(*action as u8);
                out.put_u32_le(*start);
                out.put_u32_le(*count);
            }
            Self::Irq {
                handle,
                kind,
                vector,
            } => {
                out.put_u32_le(*handle);
                out.put_u8(*kind as u8);
                out.put_u32_le(*vector);
            }
            Self::DmaMap {
                handle,
                iova,
                len,
                dir,
                posted: _,
            } => {
                out.put_u32_le(*handle);
                out.put_u64_le(*iova);
                out.put_u64_le(*len);
                out.put_u8(*dir as u8);
            }
            Self::DmaUnmap {
                handle,
                iova,
                posted: _,
            } => {
                out.put_u32_le(*handle);
                out.put_u64_le(*iova);
            }
            Self::DmaData { handle, iova, data } => {
                out.put_u32_le(*handle);
                out.put_u64_le(*iova);
                put_bytes(out, data);
            }
            Self::SyncForCpu { handle, iova, len } => {
                out.put_u32_le(*handle);
                out.put_u64_le(*iova);
                out.put_u64_le(*len);
            }
            Self::Error { code, message } => {
                out.put_u32_le(code.0);
                put_string(out, message);
            }
            Self::UsbDeviceList { devices } => {
                out.put_u32_le(devices.len() as u32);
                for d in devices {
                    put_usb_device(out, d);
                }
            }
            Self::UsbImport { busid, direct } => {
                put_string(out, busid);
                out.put_u8(*direct as u8);
            }
            Self::UsbImported { device } => put_usb_device(out, device),
            Self::UsbData { data } => put_bytes(out, data),
        }
    }

    /// Decodes the body of a message of type `kind`.
    pub fn decode(kind: u16, body: Bytes) -> Result<Self, WireError> {
        use kind::*;
        let mut r = Rd { b: &body, kind };
        let msg = match kind {
            HELLO => Self::Hello {
                version: r.u16("version")?,
                features: r.u64("features")?,
                session: r.u64("session")?,
                nonce: r.array("nonce")?,
                client: r.string("client")?,
            },
            WELCOME => Self::Welcome {
                version: r.u16("version")?,
                features: r.u64("features")?,
                session: r.u64("session")?,
                auth: match r.u8("auth")? {
                    0 => AuthMethod::None,
                    1 => AuthMethod::PreSharedKey,
                    _ => return Err(r.invalid("auth")),
                },
                nonce: r.array("nonce")?,
            },
            AUTH_PROOF => Self::AuthProof {
                mac: r.array("mac")?,
            },
            AUTH_OK => Self::AuthOk {
                mac: r.array("mac")?,
            },
            GOODBYE => Self::Goodbye,
            ACK => Self::Ack {
                received: r.u64("received")?,
            },
            RESUME => Self::Resume {
                received: r.u64("received")?,
                mac: r.array("mac")?,
            },
            RESUMED => Self::Resumed {
                received: r.u64("received")?,
                mac: r.array("mac")?,
            },
            SUSPEND => Self::Suspend,
            SUSPENDED => Self::Suspended {
                secret: r.array("secret")?,
                ttl_ms: r.u64("ttl_ms")?,
            },
            ADOPT => Self::Adopt {
                mac: r.array("mac")?,
            },
            PING => Self::Ping {
                payload: r.bytes(&body, MAX_PING, "payload")?,
            },
            PONG => Self::Pong {
                payload: r.bytes(&body, MAX_PING, "payload")?,
            },
            LIST_DEVICES => Self::ListDevices,
            DEVICE_LIST => {
                let n = r.count("device count")?;
                let mut devices = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    devices.push(DeviceSummary {
                        name: r.string("name")?,
                        vendor: r.u16("vendor")?,
                        device: r.u16("device")?,
                        class: r.u32("class")?,
                        busy: r.u8("busy")? != 0,
                    });
                }
                Self::DeviceList { devices }
            }
            OPEN => Self::Open {
                name: r.string("name")?,
            },
            OPENED => {
                let handle = r.u32("handle")?;
                let mut info = decode_info(&mut r)?;
                // Version 2 appends how the device resets.
                if !r.b.is_empty() {
                    let v = r.u8("reset method")?;
                    info.reset = ResetMethod::from_u8(v).ok_or(r.invalid("reset method"))?;
                }
                Self::Opened { handle, info }
            }
            CLOSE => Self::Close {
                handle: r.u32("handle")?,
            },
            REGION_READ => {
                let (handle, region, offset, len) = r.region_read(MAX_IO)?;
                Self::RegionRead {
                    handle,
                    region,
                    offset,
                    len,
                }
            }
            // Up to MAX_BULK: it may answer a bulk read.
            READ_DATA => Self::ReadData {
                data: r.bytes(&body, MAX_BULK, "data")?,
            },
            REGION_READ_BULK => {
                let (handle, region, offset, len) = r.region_read(MAX_BULK)?;
                Self::RegionReadBulk {
                    handle,
                    region,
                    offset,
                    len,
                }
            }
            REGION_WRITE_BULK => Self::RegionWriteBulk {
                handle: r.u32("handle")?,
                region: r.u32("region")?,
                offset: r.u64("offset")?,
                data: r.bytes(&body, MAX_BULK, "data")?,
            },
            REGION_WRITE => Self::RegionWrite {
                handle: r.u32("handle")?,
                region: r.u32("region")?,
                offset: r.u64("offset")?,
                data: r.bytes(&body, MAX_IO, "data")?,
            },
            SET_IRQS => {
                let handle = r.u32("handle")?;
                let kind = r.irq_kind()?;
                let action = match r.u8("action")? {
                    0 => IrqAction::Disable,
                    1 => IrqAction::Enable,
                    2 => IrqAction::Unmask,
                    _ => return Err(r.invalid("action")),
                };
                Self::SetIrqs {
                    handle,
                    kind,
                    action,
                    start: r.u32("start")?,
                    count: r.u32("count")?,
                }
            }
            IRQ => Self::Irq {
                handle: r.u32("handle")?,
                kind: r.irq_kind()?,
                vector: r.u32("vector")?,
            },
            DMA_MAP | DMA_MAP_POSTED => Self::DmaMap {
                handle: r.u32("handle")?,
                iova: r.u64("iova")?,
                len: r.u64("len")?,
                dir: {
                    let v = r.u8("dir")?;
                    DmaDir::from_u8(v).ok_or(r.invalid("dir"))?
                },
                posted: kind == DMA_MAP_POSTED,
            },
            DMA_UNMAP | DMA_UNMAP_POSTED => Self::DmaUnmap {
                handle: r.u32("handle")?,
                iova: r.u64("iova")?,
                posted: kind == DMA_UNMAP_POSTED,
            },
            DMA_DATA => Self::DmaData {
                handle: r.u32("handle")?,
                iova: r.u64("iova")?,
                data: r.bytes(&body, MAX_DMA_CHUNK, "data")?,
            },
            SYNC_FOR_CPU => Self::SyncForCpu {
                handle: r.u32("handle")?,
                iova: r.u64("iova")?,
                len: r.u64("len")?,
            },
            RESET => Self::Reset {
                handle: r.u32("handle")?,
            },
            USB_LIST => Self::UsbList,
            USB_DEVICE_LIST => {
                let n = r.count("device count")?;
                let mut devices = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    devices.push(decode_usb_device(&mut r)?);
                }
                Self::UsbDeviceList { devices }
            }
            USB_IMPORT => {
                let busid = r.string("busid")?;
                if busid.is_empty() || busid.len() >= BUSID_LEN {
                    return Err(r.invalid("busid"));
                }
                let direct = match r.u8("direct")? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.invalid("direct")),
                };
                Self::UsbImport { busid, direct }
            }
            USB_IMPORTED => Self::UsbImported {
                device: decode_usb_device(&mut r)?,
            },
            USB_DATA => Self::UsbData {
                data: r.bytes(&body, MAX_USB_CHUNK, "data")?,
            },
            OK => Self::Ok,
            ERROR => Self::Error {
                code: ErrorCode(r.u32("code")?),
                message: r.string("message")?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        r.end()?;
        Ok(msg)
    }
}

fn put_usb_device(out: &mut BytesMut, d: &UsbDevice) {
    put_string(out, &d.busid);
    put_string(out, &d.path);
    put_string(out, &d.product_name);
    out.put_u32_le(d.busnum);
    out.put_u32_le(d.devnum);
    out.put_u32_le(d.speed as u32);
    out.put_u16_le(d.vendor);
    out.put_u16_le(d.product);
    out.put_u16_le(d.bcd_device);
    out.put_slice(&[d.class, d.subclass, d.protocol]);
    out.put_u8(d.configuration);
    out.put_u8(d.num_configurations);
    out.put_u8(d.interfaces.len() as u8);
    for i in &d.interfaces {
        out.put_slice(&[i.class, i.subclass, i.protocol]);
    }
}

fn decode_usb_device(r: &mut Rd<'_>) -> Result<UsbDevice, WireError> {
    let busid = r.string("busid")?;
    let path = r.string("path")?;
    let product_name = r.string("product name")?;
    let mut d = UsbDevice {
        busid,
        path,
        product_name,
        busnum: r.u32("busnum")?,
        devnum: r.u32("devnum")?,
        speed: UsbSpeed::from_u32(r.u32("speed")?),
        vendor: r.u16("vendor")?,
        product: r.u16("product")?,
        bcd_device: r.u16("bcdDevice")?,
        class: r.u8("class")?,
        subclass: r.u8("subclass")?,
        protocol: r.u8("protocol")?,
        configuration: r.u8("configuration")?,
        num_configurations: r.u8("configurations")?,
        interfaces: Vec::new(),
    };
    let n = r.u8("interface count")?;
    for _ in 0..n {
        d.interfaces.push(UsbInterface {
            class: r.u8("interface class")?,
            subclass: r.u8("interface subclass")?,
            protocol: r.u8("interface protocol")?,
        });
    }
    Ok(d)
}

fn encode_info(out: &mut BytesMut, info: &DeviceInfo) {
    put_string(out, &info.name);
    out.put_u16_le(info.vendor);
    out.put_u16_le(info.device);
    out.put_u16_le(info.subsystem_vendor);
    out.put_u16_le(info.subsystem_device);
    out.put_u32_le(info.class);
    out.put_u8(info.revision);
    out.put_u32_le(info.regions.len() as u32);
    for r in &info.regions {
        out.put_u32_le(r.index);
        out.put_u8(r.kind as u8);
        out.put_u64_le(r.size);
        out.put_u8(r.flags);
        out.put_u8(r.widths);
    }
    out.put_u32_le(info.irqs.len() as u32);
    for i in &info.irqs {
        out.put_u8(i.kind as u8);
        out.put_u32_le(i.count);
    }
}

fn decode_info(r: &mut Rd<'_>) -> Result<DeviceInfo, WireError> {
    let name = r.string("name")?;
    let vendor = r.u16("vendor")?;
    let device = r.u16("device")?;
    let subsystem_vendor = r.u16("subsystem vendor")?;
    let subsystem_device = r.u16("subsystem device")?;
    let class = r.u32("class")?;
    let revision = r.u8("revision")?;
    let n = r.count("region count")?;
    let mut regions = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        let index = r.u32("region index")?;
        let k = r.u8("region kind")?;
        regions.push(RegionInfo {
            index,
            kind: RegionKind::from_u8(k).ok_or(r.invalid("region kind"))?,
            size: r.u64("region size")?,
            flags: r.u8("region flags")?,
            widths: r.u8("region widths")?,
        });
    }
    let n = r.count("irq count")?;
    let mut irqs = Vec::with_capacity(n.min(8));
    for _ in 0..n {
        irqs.push(IrqInfo {
            kind: r.irq_kind()?,
            count: r.u32("irq vectors")?,
        });
    }
    Ok(DeviceInfo {
        name,
        vendor,
        device,
        subsystem_vendor,
        subsystem_device,
        class,
        revision,
        regions,
        irqs,
        reset: ResetMethod::Unknown,
    })
}

/// A `DmaData` frame whose payload is still arriving; see
/// [`FrameDecoder::dma_head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaHead {
    /// Device handle.
    pub handle: u32,
    /// IOVA of the first payload byte.
    pub iova: u64,
    /// Payload length.
    pub len: usize,
    /// Payload bytes already buffered.
    pub buffered: usize,
}

/// Splits a byte stream into frames. Feed it with [`buffer`](Self::buffer)
/// and call [`next_frame`](Self::next_frame) until it returns `None`.
///
/// It also checks that sequence numbers arrive in order (from 1, +1 a frame).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    next_seq: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder expecting sequence number 1 first.
    pub fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(64 * 1024),
            next_seq: 1,
        }
    }

    /// Sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Continues in another numbering: the next frame must carry `seq`
    /// (a resumed session switches from the new connection's handshake
    /// numbering back to the session's). Buffered bytes are kept.
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    /// The receive buffer: append received bytes to it.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// True if bytes of an incomplete frame are buffered.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// If the buffer starts with the header and fixed fields of a valid
    /// `DmaData` frame whose payload (at least `min_payload` bytes) has not
    /// fully arrived, describes it, so that a reader can receive the rest of
    /// the payload straight into DMA memory. Anything unusual about the frame
    /// returns `None`: it then goes through [`next_frame`](Self::next_frame)
    /// and its checks like any other.
    pub fn dma_head(&self, min_payload: usize) -> Option<DmaHead> {
        const FIXED: usize = 16;
        if self.buf.len() < HEADER_LEN + FIXED {
            return None;
        }
        let mut h = &self.buf[..HEADER_LEN + FIXED];
        let body = h.get_u32_le() as usize;
        let kind = h.get_u16_le();
        let flags = h.get_u16_le();
        let seq = h.get_u64_le();
        let _reply_to = h.get_u64_le();
        let handle = h.get_u32_le();
        let iova = h.get_u64_le();
        let len = h.get_u32_le() as usize;
        let valid = kind == kind::DMA_DATA
            && flags == 0
            && seq == self.next_seq
            && body == FIXED + len
            && (min_payload..=MAX_DMA_CHUNK).contains(&len)
            && self.buf.len() < HEADER_LEN + body;
        valid.then(|| DmaHead {
            handle,
            iova,
            len,
            buffered: self.buf.len() - HEADER_LEN - FIXED,
        })
    }

    /// Consumes the frame [`dma_head`](Self::dma_head) described (it must
    /// have just returned `Some`) and returns the part of its payload that is
    /// already buffered; the reader receives the rest itself.
    pub fn begin_direct(&mut self) -> Bytes {
        self.buf.advance(HEADER_LEN + 16);
        self.next_seq += 1;
        self.buf.split().freeze()
    }

    /// The next complete frame, `None` if more bytes are needed, or the
    /// reason the stream is not valid cio.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = &self.buf[..HEADER_LEN];
        let len = h.get_u32_le();
        let kind = h.get_u16_le();
        let flags = h.get_u16_le();
        let seq = h.get_u64_le();
        let reply_to = h.get_u64_le();
        if len as usize > MAX_BODY {
            return Err(WireError::Oversized(len));
        }
        if flags != 0 {
            return Err(WireError::Flags(flags));
        }
        if self.buf.len() < HEADER_LEN + len as usize {
            return Ok(None);
        }
        if seq != self.next_seq {
            return Err(WireError::Sequence {
                expected: self.next_seq,
                got: seq,
            });
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len as usize).freeze();
        let msg = Message::decode(kind, body)?;
        // Wraps only after 2^64 frames, or from a resume point a peer chose.
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(Some(Frame { seq, reply_to, msg }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{REGION_READ, WIDTH_4};

    fn roundtrip(m: Message) {
        let mut out = BytesMut::new();
        m.encode(1, 0, &mut out);
        let mut d = FrameDecoder::new();
        d.buffer().extend_from_slice(&out);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(f.msg, m);
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn every_message_roundtrips() {
        let info = DeviceInfo {
            name: "edu0".into(),
            vendor: 0x1234,
            device: 0x11e8,
            subsystem_vendor: 0x1af4,
            subsystem_device: 0x1100,
            class: 0xff0000,
            revision: 0x10,
            regions: vec![RegionInfo {
                index: 0,
                kind: RegionKind::Mmio,
                size: 1 << 20,
                flags: REGION_READ,
                widths: WIDTH_4,
            }],
            irqs: vec![IrqInfo {
                kind: IrqKind::Msi,
                count: 1,
            }],
            reset: ResetMethod::Full,
        };
        let usb = UsbDevice {
            path: "/sys/devices/usb1/1-1".into(),
            busid: "1-1".into(),
            busnum: 1,
            devnum: 2,
            speed: UsbSpeed::High,
            vendor: 0x1d6b,
            product: 0x0104,
            bcd_device: 0x0100,
            class: 2,
            subclass: 0,
            protocol: 0,
            configuration: 1,
            num_configurations: 1,
            interfaces: vec![UsbInterface {
                class: 2,
                subclass: 2,
                protocol: 1,
            }],
            product_name: "cio CDC-ACM".into(),
        };
        let msgs = vec![
            Message::Hello {
                version: 1,
                features: 3,
                session: 0,
                nonce: [7; 32],
                client: "tést".into(),
            },
            Message::Welcome {
                version: 1,
                features: 1,
                session: 9,
                auth: AuthMethod::PreSharedKey,
                nonce: [1; 32],
            },
            Message::AuthProof { mac: [2; 32] },
            Message::AuthOk { mac: [3; 32] },
            Message::Ack { received: 77 },
            Message::Resume {
                received: u64::MAX,
                mac: [4; 32],
            },
            Message::Resumed {
                received: 0,
                mac: [5; 32],
            },
            Message::Suspend,
            Message::Suspended {
                secret: [6; 32],
                ttl_ms: 30_000,
            },
            Message::Adopt { mac: [7; 32] },
            Message::Goodbye,
            Message::Ping {
                payload: Bytes::from_static(b"abc"),
            },
            Message::Pong {
                payload: Bytes::new(),
            },
            Message::ListDevices,
            Message::DeviceList {
                devices: vec![DeviceSummary {
                    name: "edu0".into(),
                    vendor: 1,
                    device: 2,
                    class: 3,
                    busy: true,
                }],
            },
            Message::Open {
                name: "edu0".into(),
            },
            Message::Opened { handle: 4, info },
            Message::UsbList,
            Message::UsbDeviceList {
                devices: vec![usb.clone(), usb.clone()],
            },
            Message::UsbImport {
                busid: "1-1.2".into(),
                direct: true,
            },
            Message::UsbImported { device: usb },
            Message::UsbData {
                data: Bytes::from_static(&[0, 0, 0, 3]),
            },
            Message::Close { handle: 4 },
            Message::RegionRead {
                handle: 1,
                region: 0,
                offset: 8,
                len: 4,
            },
            Message::ReadData {
                data: Bytes::from_static(&[1, 2, 3, 4]),
            },
            Message::RegionWrite {
                handle: 1,
                region: 7,
                offset: 4,
                data: Bytes::from_static(&[6, 0]),
            },
            Message::RegionReadBulk {
                handle: 1,
                region: 2,
                offset: 0x1000,
                len: MAX_BULK as u32,
            },
            Message::RegionWriteBulk {
                handle: 1,
                region: 2,
                offset: 0x10,
                data: Bytes::from(vec![3; 5000]),
            },
            Message::ReadData {
                data: Bytes::from(vec![9; MAX_BULK]),
            },
            Message::SetIrqs {
                handle: 1,
                kind: IrqKind::Msix,
                start: 2,
                count: 3,
                action: IrqAction::Enable,
            },
            Message::Irq {
                handle: 1,
                kind: IrqKind::Intx,
                vector: 0,
            },
            Message::DmaMap {
                handle: 1,
                iova: 0x1000,
                len: 0x2000,
                dir: DmaDir::Bidirectional,
                posted: false,
            },
            Message::DmaMap {
                handle: 1,
                iova: 0x1000,
                len: 0x2000,
                dir: DmaDir::ToDevice,
                posted: true,
            },
            Message::DmaUnmap {
                handle: 1,
                iova: 0x1000,
                posted: false,
            },
            Message::DmaUnmap {
                handle: 1,
                iova: 0x1000,
                posted: true,
            },
            Message::DmaData {
                handle: 1,
                iova: 0x1000,
                data: Bytes::from(vec![5; 5000]),
            },
            Message::SyncForCpu {
                handle: 1,
                iova: 0,
                len: 1,
            },
            Message::Reset { handle: 2 },
            Message::Ok,
            Message::Error {
                code: ErrorCode::BUSY,
                message: "in use".into(),
            },
        ];
        for m in msgs {
            roundtrip(m);
        }
    }

    #[test]
    fn direct_region_write_encoding_matches_the_message() {
        let m = Message::RegionWrite {
            handle: 2,
            region: 7,
            offset: 0x44,
            data: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        m.encode(9, 0, &mut a);
        encode_region_write(9, 2, 7, 0x44, &[1, 2, 3, 4], false, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn vectored_encoding_matches_plain_encoding() {
        let dma = Message::DmaData {
            handle: 3,
            iova: 0x5000,
            data: Bytes::from(vec![0xa5; 70_000]),
        };
        let usb = Message::UsbData {
            data: Bytes::from(vec![0x5a; 200_000]),
        };
        let read = Message::ReadData {
            data: Bytes::from(vec![0x3c; 40_000]),
        };
        for m in [dma, usb, read] {
            let mut plain = BytesMut::new();
            m.encode(4, 2, &mut plain);
            let mut head = BytesMut::new();
            let tail = m
                .encode_vectored(4, 2, &mut head)
                .expect("payload split off");
            head.extend_from_slice(&tail);
            assert_eq!(head, plain);
        }
    }

    #[test]
    fn dma_head_describes_only_valid_incomplete_large_frames() {
        let mut out = BytesMut::new();
        Message::Ok.encode(1, 0, &mut out);
        Message::DmaData {
            handle: 3,
            iova: 0x9000,
            data: Bytes::from(vec![7; 100_000]),
        }
        .encode(2, 0, &mut out);
        let mut d = FrameDecoder::new();
        let first = HEADER_LEN;
        d.buffer()
            .extend_from_slice(&out[..first + HEADER_LEN + 16 + 10]);
        // The Ok frame comes first: no DMA head until it is consumed.
        assert_eq!(d.dma_head(1), None);
        assert_eq!(d.next_frame().unwrap().unwrap().msg, Message::Ok);
        let head = d.dma_head(65536).expect("large, incomplete DmaData");
        assert_eq!(
            head,
            DmaHead {
                handle: 3,
                iova: 0x9000,
                len: 100_000,
                buffered: 10
            }
        );
        assert_eq!(d.dma_head(200_000), None, "below the size threshold");
        let prefix = d.begin_direct();
        assert_eq!(&prefix[..], &[7; 10]);
        assert!(!d.has_partial());
        // The next frame must carry sequence number 3.
        let mut more = BytesMut::new();
        Message::Goodbye.encode(3, 0, &mut more);
        d.buffer().extend_from_slice(&more);
        assert_eq!(d.next_frame().unwrap().unwrap().msg, Message::Goodbye);
    }

    #[test]
    fn dma_head_leaves_inconsistent_frames_to_the_normal_checks() {
        let mut d = FrameDecoder::new();
        let b = d.buffer();
        b.put_u32_le(16 + 5000); // body
        b.put_u16_le(kind::DMA_DATA);
        b.put_u16_le(0);
        b.put_u64_le(1);
        b.put_u64_le(0);
        b.put_u32_le(1);
        b.put_u64_le(0);
        b.put_u32_le(9000); // payload length disagrees with the body length
        assert_eq!(d.dma_head(1), None);
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.max(1);
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn decoding_arbitrary_bodies_never_panics() {
        let mut next = rng(0x5eed);
        let kinds: Vec<u16> = (0..0x80).collect();
        for i in 0..200_000 {
            let len = (next() % 96) as usize;
            let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let kind = kinds[i % kinds.len()];
            // Errors are fine; panics and overlong allocations are not.
            let _ = Message::decode(kind, Bytes::from(body));
        }
    }

    #[test]
    fn mutated_valid_frames_decode_or_fail_cleanly() {
        let mut next = rng(42);
        let mut frames = BytesMut::new();
        let samples = [
            Message::Hello {
                version: 1,
                features: 3,
                session: 0,
                nonce: [1; 32],
                client: "c".into(),
            },
            Message::RegionWrite {
                handle: 1,
                region: 0,
                offset: 8,
                data: Bytes::from_static(&[1, 2, 3, 4]),
            },
            Message::DmaData {
                handle: 1,
                iova: 0x1000,
                data: Bytes::from(vec![3; 300]),
            },
            Message::Error {
                code: ErrorCode::BUSY,
                message: "x".into(),
            },
        ];
        for (i, m) in samples.iter().enumerate() {
            m.encode(i as u64 + 1, 0, &mut frames);
        }
        for _ in 0..20_000 {
            let mut b = frames.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % b.len();
                b[at] ^= 1 << (next() % 8);
            }
            let cut = (next() as usize) % (b.len() + 1);
            let mut d = FrameDecoder::new();
            d.buffer().extend_from_slice(&b[..cut]);
            // Drain until it wants more bytes or reports the stream invalid.
            for _ in 0..samples.len() + 1 {
                match d.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = d.dma_head(1);
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut out = BytesMut::new();
        Message::Reset { handle: 1 }.encode(1, 0, &mut out);
        let mut d = FrameDecoder::new();
        for (i, b) in out.iter().enumerate() {
            assert_eq!(d.next_frame().unwrap(), None, "after {i} bytes");
            d.buffer().put_u8(*b);
        }
        assert!(d.next_frame().unwrap().is_some());
    }

    fn raw_frame(len: u32, kind: u16, flags: u16, seq: u64, body: &[u8]) -> FrameDecoder {
        let mut d = FrameDecoder::new();
        let b = d.buffer();
        b.put_u32_le(len);
        b.put_u16_le(kind);
        b.put_u16_le(flags);
        b.put_u64_le(seq);
        b.put_u64_le(0);
        b.put_slice(body);
        d
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut d = raw_frame(u32::MAX, kind::PING, 0, 1, &[]);
        assert_eq!(d.next_frame(), Err(WireError::Oversized(u32::MAX)));
    }

    #[test]
    fn bad_headers_and_bodies_are_rejected() {
        let mut d = raw_frame(0, kind::OK, 1, 1, &[]);
        assert_eq!(d.next_frame(), Err(WireError::Flags(1)));
        let mut d = raw_frame(0, 0x4242, 0, 1, &[]);
        assert_eq!(d.next_frame(), Err(WireError::UnknownType(0x4242)));
        let mut d = raw_frame(2, kind::RESET, 0, 1, &[0, 0]);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Truncated {
                field: "handle",
                ..
            })
        ));
        let mut d = raw_frame(5, kind::RESET, 0, 1, &[0; 5]);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Trailing { extra: 1, .. })
        ));
        let mut d = raw_frame(0, kind::OK, 0, 5, &[]);
        assert_eq!(
            d.next_frame(),
            Err(WireError::Sequence {
                expected: 1,
                got: 5
            })
        );
        // A region write claiming more data than the frame carries.
        let mut body = BytesMut::new();
        body.put_u32_le(1);
        body.put_u32_le(0);
        body.put_u64_le(0);
        body.put_u32_le(100);
        body.put_slice(&[0; 4]);
        let mut d = raw_frame(body.len() as u32, kind::REGION_WRITE, 0, 1, &body);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Truncated { field: "data", .. })
        ));
        // A zero-length read.
        let mut body = BytesMut::new();
        body.put_u32_le(1);
        body.put_u32_le(0);
        body.put_u64_le(0);
        body.put_u32_le(0);
        let mut d = raw_frame(body.len() as u32, kind::REGION_READ, 0, 1, &body);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Invalid { field: "len", .. })
        ));
    }

    #[test]
    fn invalid_utf8_and_enum_values_are_rejected() {
        let mut d = raw_frame(3, kind::OPEN, 0, 1, &[1, 0, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Invalid { field: "name", .. })
        ));
        let mut body = BytesMut::new();
        body.put_u32_le(1);
        body.put_u64_le(0);
        body.put_u64_le(4096);
        body.put_u8(9);
        let mut d = raw_frame(body.len() as u32, kind::DMA_MAP, 0, 1, &body);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Invalid { field: "dir", .. })
        ));
    }
}
