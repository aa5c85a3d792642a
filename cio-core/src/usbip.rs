//! USB/IP as the Linux kernel and the stock `usbip`/`usbipd` tools speak it
//! (`Documentation/usb/usbip_protocol.rst`): the operation messages that
//! list and import devices, and the URB stream headers that follow an
//! import. Everything is big-endian. No I/O here.

use bytes::{Buf, BufMut, BytesMut};

/// Protocol version in operation headers.
pub const USBIP_VERSION: u16 = 0x0111;
/// Default TCP port of a USB/IP server.
pub const USBIP_PORT: u16 = 3240;
/// Operation header length.
pub const OP_HEADER_LEN: usize = 8;
/// Length of the device record in `OP_REP_DEVLIST` / `OP_REP_IMPORT`.
pub const DEVICE_LEN: usize = 312;
/// Length of a bus id field.
pub const BUSID_LEN: usize = 32;
/// Length of a URB stream header (`CMD_SUBMIT`, `RET_SUBMIT`, ...).
pub const URB_HEADER_LEN: usize = 48;

/// Operation codes.
pub mod op {
    #![allow(missing_docs)]
    pub const REQ_DEVLIST: u16 = 0x8005;
    pub const REP_DEVLIST: u16 = 0x0005;
    pub const REQ_IMPORT: u16 = 0x8003;
    pub const REP_IMPORT: u16 = 0x0003;
}

/// URB stream commands.
pub mod cmd {
    #![allow(missing_docs)]
    pub const SUBMIT: u32 = 1;
    pub const UNLINK: u32 = 2;
    pub const RET_SUBMIT: u32 = 3;
    pub const RET_UNLINK: u32 = 4;
}

/// A USB speed as the kernel numbers it (`enum usb_device_speed`), which is
/// also what USB/IP carries and what vhci-hcd's `attach` wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum UsbSpeed {
    /// Unknown.
    Unknown = 0,
    /// 1.5 Mbit/s.
    Low = 1,
    /// 12 Mbit/s.
    Full = 2,
    /// 480 Mbit/s.
    High = 3,
    /// Wireless USB.
    Wireless = 4,
    /// 5 Gbit/s.
    Super = 5,
    /// 10 Gbit/s or more.
    SuperPlus = 6,
}

impl UsbSpeed {
    /// From the number on the wire.
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Low,
            2 => Self::Full,
            3 => Self::High,
            4 => Self::Wireless,
            5 => Self::Super,
            6 => Self::SuperPlus,
            _ => Self::Unknown,
        }
    }

    /// From sysfs's `speed` attribute (Mbit/s: "1.5", "12", "480", "5000"...).
    pub fn from_sysfs(s: &str) -> Self {
        match s.trim() {
            "1.5" => Self::Low,
            "12" => Self::Full,
            "480" => Self::High,
            "53.3-480" => Self::Wireless,
            "5000" => Self::Super,
            "10000" | "20000" => Self::SuperPlus,
            _ => Self::Unknown,
        }
    }

    /// True for speeds that need a SuperSpeed root-hub port.
    pub fn is_superspeed(self) -> bool {
        matches!(self, Self::Super | Self::SuperPlus)
    }

    /// Short human name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown speed",
            Self::Low => "Low Speed (1.5 Mbps)",
            Self::Full => "Full Speed (12 Mbps)",
            Self::High => "High Speed (480 Mbps)",
            Self::Wireless => "Wireless",
            Self::Super => "Super Speed (5000 Mbps)",
            Self::SuperPlus => "Super Speed Plus (10000 Mbps)",
        }
    }
}

/// One interface of a device (class triple).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsbInterface {
    /// bInterfaceClass.
    pub class: u8,
    /// bInterfaceSubClass.
    pub subclass: u8,
    /// bInterfaceProtocol.
    pub protocol: u8,
}

/// A USB device as USB/IP describes it, plus the product string (which cio
/// carries and USB/IP does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDevice {
    /// sysfs path of the device (informational).
    pub path: String,
    /// Bus id, e.g. `1-1.2`: the name to import it by.
    pub busid: String,
    /// Bus number.
    pub busnum: u32,
    /// Device number on its bus.
    pub devnum: u32,
    /// Speed.
    pub speed: UsbSpeed,
    /// idVendor.
    pub vendor: u16,
    /// idProduct.
    pub product: u16,
    /// bcdDevice.
    pub bcd_device: u16,
    /// bDeviceClass.
    pub class: u8,
    /// bDeviceSubClass.
    pub subclass: u8,
    /// bDeviceProtocol.
    pub protocol: u8,
    /// bConfigurationValue.
    pub configuration: u8,
    /// bNumConfigurations.
    pub num_configurations: u8,
    /// Interfaces of the active configuration.
    pub interfaces: Vec<UsbInterface>,
    /// Product string, if the device has one.
    pub product_name: String,
}

impl UsbDevice {
    /// The devid vhci-hcd and URB headers use: `busnum << 16 | devnum`.
    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | (self.devnum & 0xffff)
    }
}

/// A USB/IP protocol violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsbipError {
    /// The peer speaks another protocol version.
    #[error("USB/IP version {0:#06x} is not supported (want 0x0111)")]
    Version(u16),
    /// An operation code this side does not know or expect.
    #[error("unexpected USB/IP operation {0:#06x}")]
    Op(u16),
    /// A message ended early.
    #[error("truncated USB/IP {0}")]
    Truncated(&'static str),
    /// A field is out of range.
    #[error("invalid USB/IP {0}")]
    Invalid(&'static str),
    /// The server refused the request.
    #[error("the USB/IP server refused the request (status {0})")]
    Refused(u32),
}

/// An operation header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    /// Operation code.
    pub code: u16,
    /// Status (0 = ok; replies only).
    pub status: u32,
}

impl OpHeader {
    /// Decodes an 8-byte header, checking the version.
    pub fn decode(b: &[u8; OP_HEADER_LEN]) -> Result<Self, UsbipError> {
        let mut b = &b[..];
        let version = b.get_u16();
        if version != USBIP_VERSION {
            return Err(UsbipError::Version(version));
        }
        Ok(Self {
            code: b.get_u16(),
            status: b.get_u32(),
        })
    }

    /// Appends the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u16(USBIP_VERSION);
        out.put_u16(self.code);
        out.put_u32(self.status);
    }
}

/// Writes `s` as a NUL-padded fixed field (cut to leave one NUL).
fn put_fixed(out: &mut BytesMut, s: &str, len: usize) {
    // Room for the NUL, and never half a character.
    let mut end = s.len().min(len - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_slice(&s.as_bytes()[..end]);
    out.put_bytes(0, len - end);
}

/// Reads a NUL-padded fixed field. The kernel reads these as C strings,
/// so a field without its NUL is refused.
pub fn fixed_str(b: &[u8]) -> Result<String, UsbipError> {
    let end = b.iter().position(|&c| c == 0).ok_or(UsbipError::Invalid(
        "string field without its terminating NUL",
    ))?;
    std::str::from_utf8(&b[..end])
        .map(str::to_owned)
        .map_err(|_| UsbipError::Invalid("string field"))
}

/// Appends the 312-byte device record (no interfaces).
pub fn put_device(out: &mut BytesMut, d: &UsbDevice) {
    put_fixed(out, &d.path, 256);
    put_fixed(out, &d.busid, BUSID_LEN);
    out.put_u32(d.busnum);
    out.put_u32(d.devnum);
    out.put_u32(d.speed as u32);
    out.put_u16(d.vendor);
    out.put_u16(d.product);
    out.put_u16(d.bcd_device);
    out.put_u8(d.class);
    out.put_u8(d.subclass);
    out.put_u8(d.protocol);
    out.put_u8(d.configuration);
    out.put_u8(d.num_configurations);
    out.put_u8(d.interfaces.len() as u8);
}

/// Reads a device record; returns it (interfaces empty) and its interface count.
pub fn get_device(b: &mut &[u8]) -> Result<(UsbDevice, u8), UsbipError> {
    if b.len() < DEVICE_LEN {
        return Err(UsbipError::Truncated("device record"));
    }
    let path = fixed_str(&b[..256])?;
    let busid = fixed_str(&b[256..256 + BUSID_LEN])?;
    b.advance(256 + BUSID_LEN);
    let d = UsbDevice {
        path,
        busid,
        busnum: b.get_u32(),
        devnum: b.get_u32(),
        speed: UsbSpeed::from_u32(b.get_u32()),
        vendor: b.get_u16(),
        product: b.get_u16(),
        bcd_device: b.get_u16(),
        class: b.get_u8(),
        subclass: b.get_u8(),
        protocol: b.get_u8(),
        configuration: b.get_u8(),
        num_configurations: b.get_u8(),
        interfaces: Vec::new(),
        product_name: String::new(),
    };
    let n = b.get_u8();
    Ok((d, n))
}

/// Encodes a whole `OP_REP_DEVLIST`.
pub fn encode_devlist(devices: &[UsbDevice], out: &mut BytesMut) {
    OpHeader {
        code: op::REP_DEVLIST,
        status: 0,
    }
    .encode(out);
    out.put_u32(devices.len() as u32);
    for d in devices {
        put_device(out, d);
        for i in &d.interfaces {
            out.put_slice(&[i.class, i.subclass, i.protocol, 0]);
        }
    }
}

/// Decodes the body of an `OP_REP_DEVLIST` (after its header).
pub fn decode_devlist(mut b: &[u8]) -> Result<Vec<UsbDevice>, UsbipError> {
    if b.len() < 4 {
        return Err(UsbipError::Truncated("device count"));
    }
    let n = b.get_u32() as usize;
    if n > 4096 {
        return Err(UsbipError::Invalid("device count"));
    }
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let (mut d, ifs) = get_device(&mut b)?;
        if b.len() < ifs as usize * 4 {
            return Err(UsbipError::Truncated("interfaces"));
        }
        for _ in 0..ifs {
            d.interfaces.push(UsbInterface {
                class: b.get_u8(),
                subclass: b.get_u8(),
                protocol: b.get_u8(),
            });
            b.advance(1);
        }
        out.push(d);
    }
    if !b.is_empty() {
        return Err(UsbipError::Invalid("trailing bytes after the device list"));
    }
    Ok(out)
}

/// Encodes an `OP_REQ_IMPORT` for `busid`.
pub fn encode_import_request(busid: &str, out: &mut BytesMut) {
    OpHeader {
        code: op::REQ_IMPORT,
        status: 0,
    }
    .encode(out);
    put_fixed(out, busid, BUSID_LEN);
}

/// Encodes an `OP_REP_IMPORT`: the device on success, status 1 alone on failure.
pub fn encode_import_reply(device: Option<&UsbDevice>, out: &mut BytesMut) {
    OpHeader {
        code: op::REP_IMPORT,
        status: if device.is_some() { 0 } else { 1 },
    }
    .encode(out);
    if let Some(d) = device {
        put_device(out, d);
    }
}

/// The 48-byte header every URB stream message starts with. Fields that a
/// command does not use are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UrbHeader {
    /// `cmd::*`.
    pub command: u32,
    /// Sequence number chosen by the submitter.
    pub seqnum: u32,
    /// Device id (`busnum << 16 | devnum`); 0 in replies.
    pub devid: u32,
    /// 0 = OUT (host to device), 1 = IN.
    pub direction: u32,
    /// Endpoint number.
    pub ep: u32,
    /// SUBMIT: transfer flags; RET_SUBMIT/RET_UNLINK: status (negative errno);
    /// UNLINK: the seqnum to unlink.
    pub flags_or_status: i32,
    /// SUBMIT: buffer length; RET_SUBMIT: actual length.
    pub length: i32,
    /// Start frame (isochronous).
    pub start_frame: i32,
    /// Isochronous packet count (0 or -1 when not isochronous).
    pub packets: i32,
    /// SUBMIT: interval; RET_SUBMIT: error count.
    pub interval_or_errors: i32,
    /// SUBMIT: the setup packet of a control transfer.
    pub setup: [u8; 8],
}

impl UrbHeader {
    /// Decodes a header.
    pub fn decode(b: &[u8; URB_HEADER_LEN]) -> Self {
        let mut r = &b[..];
        let mut h = Self {
            command: r.get_u32(),
            seqnum: r.get_u32(),
            devid: r.get_u32(),
            direction: r.get_u32(),
            ep: r.get_u32(),
            flags_or_status: r.get_i32(),
            length: r.get_i32(),
            start_frame: r.get_i32(),
            packets: r.get_i32(),
            interval_or_errors: r.get_i32(),
            setup: [0; 8],
        };
        r.copy_to_slice(&mut h.setup);
        h
    }

    /// Appends the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.command);
        out.put_u32(self.seqnum);
        out.put_u32(self.devid);
        out.put_u32(self.direction);
        out.put_u32(self.ep);
        out.put_i32(self.flags_or_status);
        out.put_i32(self.length);
        out.put_i32(self.start_frame);
        out.put_i32(self.packets);
        out.put_i32(self.interval_or_errors);
        out.put_slice(&self.setup);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn fixed_fields_need_their_nul_and_never_split_a_character() {
        assert!(fixed_str(&[b'1'; BUSID_LEN]).is_err(), "no NUL");
        let mut out = BytesMut::new();
        // 31 bytes fit; the 2-byte character at 30..32 must not be split.
        let s = format!("{}é", "x".repeat(30));
        put_fixed(&mut out, &s, BUSID_LEN);
        assert_eq!(out.len(), BUSID_LEN);
        assert_eq!(fixed_str(&out).unwrap(), "x".repeat(30));
    }

    use super::*;

    fn dev() -> UsbDevice {
        UsbDevice {
            path: "/sys/devices/pci0000:00/0000:00:04.0/usb2/2-1".into(),
            busid: "2-1".into(),
            busnum: 2,
            devnum: 3,
            speed: UsbSpeed::Super,
            vendor: 0x46f4,
            product: 0x0001,
            bcd_device: 0x0000,
            class: 0,
            subclass: 0,
            protocol: 0,
            configuration: 1,
            num_configurations: 1,
            interfaces: vec![UsbInterface {
                class: 8,
                subclass: 6,
                protocol: 0x50,
            }],
            product_name: String::new(),
        }
    }

    #[test]
    fn devlist_round_trips_with_exact_sizes() {
        let mut out = BytesMut::new();
        encode_devlist(&[dev(), dev()], &mut out);
        assert_eq!(out.len(), 8 + 4 + 2 * (DEVICE_LEN + 4));
        let h = OpHeader::decode(out[..8].try_into().unwrap()).unwrap();
        assert_eq!(h.code, op::REP_DEVLIST);
        assert_eq!(decode_devlist(&out[8..]).unwrap(), vec![dev(), dev()]);
        assert!(decode_devlist(&out[8..out.len() - 1]).is_err());
        let mut long = out[8..].to_vec();
        long.push(0);
        assert!(decode_devlist(&long).is_err());
        assert_eq!(dev().devid(), 0x0002_0003);
    }

    #[test]
    fn headers_check_the_version_and_fields_are_big_endian() {
        assert_eq!(
            OpHeader::decode(&[0x01, 0x10, 0x80, 0x05, 0, 0, 0, 0]),
            Err(UsbipError::Version(0x0110))
        );
        let mut out = BytesMut::new();
        encode_import_request("1-1", &mut out);
        assert_eq!(&out[..4], &[0x01, 0x11, 0x80, 0x03]);
        assert_eq!(out.len(), 8 + BUSID_LEN);
        assert_eq!(fixed_str(&out[8..]).unwrap(), "1-1");
        let h = UrbHeader {
            command: cmd::SUBMIT,
            seqnum: 7,
            length: -1,
            setup: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        };
        let mut out = BytesMut::new();
        h.encode(&mut out);
        assert_eq!(&out[..8], &[0, 0, 0, 1, 0, 0, 0, 7]);
        assert_eq!(UrbHeader::decode(out[..].try_into().unwrap()), h);
    }

    #[test]
    fn sysfs_speeds() {
        assert_eq!(UsbSpeed::from_sysfs("5000\n"), UsbSpeed::Super);
        assert_eq!(UsbSpeed::from_sysfs("480"), UsbSpeed::High);
        assert!(!UsbSpeed::from_sysfs("12").is_superspeed());
        assert_eq!(UsbSpeed::from_sysfs("what"), UsbSpeed::Unknown);
    }
}
