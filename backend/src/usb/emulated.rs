//! Emulated USB devices that speak the USB/IP URB stream themselves, so
//! everything above them (cio sessions, plain USB/IP, vhci-hcd on a target)
//! can be tested without a kernel driver on the source side.
//!
//! [`CdcAcmEcho`] is a CDC-ACM serial port (the kernel's `cdc_acm` binds it
//! and shows `/dev/ttyACM*`) that sends back every byte written to it.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bytes::BytesMut;
use cio_core::usbip::{cmd, UrbHeader, UsbDevice, UsbInterface, UsbSpeed, URB_HEADER_LEN};
use tracing::{debug, warn};

/// Bus number of emulated devices (their devid is `BUSNUM << 16 | N`).
pub const BUSNUM: u32 = 100;
/// Largest transfer an emulated device accepts.
pub const MAX_TRANSFER: i32 = 16 << 20;

const EPIPE: i32 = -32;
const EINVAL: i32 = -22;
const ECONNRESET: i32 = -104;

/// A device model serving the URB stream of one import.
pub trait UsbModel: Send + Sync {
    /// Its description (the provider fills in bus id, numbers and path).
    fn describe(&self) -> UsbDevice;
    /// Starts serving the URB stream on `stream` (on its own thread); the
    /// model stops when the stream closes.
    fn serve(self: Arc<Self>, stream: UnixStream, devid: u32) -> io::Result<()>;
}

/// A CDC-ACM device that echoes bulk OUT data on bulk IN.
#[derive(Debug, Default)]
pub struct CdcAcmEcho;

const VENDOR: u16 = 0x1209; // pid.codes
const PRODUCT: u16 = 0x0001; // pid.codes test PID
const BULK_EP: u32 = 2;
const NOTIFY_EP: u32 = 1;
/// Echo bytes held before OUT transfers wait for the reader.
const ECHO_CAP: usize = 1 << 20;

const DEVICE_DESC: [u8; 18] = [
    18, 1, 0x00, 0x02, // bcdUSB 2.00
    0x02, 0, 0, 64, // CDC class, ep0 max packet 64
    0x09, 0x12, 0x01, 0x00, // 1209:0001
    0x00, 0x01, 1, 2, 3, 1, // bcdDevice 1.00, strings, 1 configuration
];

const CONFIG_DESC: [u8; 67] = [
    9, 2, 67, 0, 2, 1, 0, 0x80, 50, // config 1: 2 interfaces, 100 mA
    9, 4, 0, 0, 1, 0x02, 0x02, 0x01, 0, // interface 0: CDC ACM, AT commands
    5, 0x24, 0x00, 0x10, 0x01, // CDC header 1.10
    5, 0x24, 0x01, 0x00, 0x01, // call management: data interface 1
    4, 0x24, 0x02, 0x02, // ACM: line coding and serial state
    5, 0x24, 0x06, 0x00, 0x01, // union: master 0, slave 1
    7, 5, 0x81, 0x03, 16, 0, 10, // ep 1 IN interrupt, 16 bytes
    9, 4, 1, 0, 2, 0x0a, 0, 0, 0, // interface 1: CDC data
    7, 5, 0x82, 0x02, 0x00, 0x02, 0, // ep 2 IN bulk, 512 bytes
    7, 5, 0x02, 0x02, 0x00, 0x02, 0, // ep 2 OUT bulk, 512 bytes
];

const STRINGS: [&str; 3] = ["cio", "cio CDC-ACM echo", "0001"];

fn string_desc(index: u8) -> Option<Vec<u8>> {
    if index == 0 {
        return Some(vec![4, 3, 0x09, 0x04]); // English (US)
    }
    let s = STRINGS.get(index as usize - 1)?;
    let mut d = vec![0, 3];
    for u in s.encode_utf16() {
        d.extend_from_slice(&u.to_le_bytes());
    }
    d[0] = d.len() as u8;
    Some(d)
}

impl UsbModel for CdcAcmEcho {
    fn describe(&self) -> UsbDevice {
        UsbDevice {
            path: String::new(),
            busid: String::new(),
            busnum: BUSNUM,
            devnum: 1,
            speed: UsbSpeed::High,
            vendor: VENDOR,
            product: PRODUCT,
            bcd_device: 0x0100,
            class: 0x02,
            subclass: 0,
            protocol: 0,
            configuration: 1,
            num_configurations: 1,
            interfaces: vec![
                UsbInterface {
                    class: 0x02,
                    subclass: 0x02,
                    protocol: 0x01,
                },
                UsbInterface {
                    class: 0x0a,
                    subclass: 0,
                    protocol: 0,
                },
            ],
            product_name: STRINGS[1].into(),
        }
    }

    fn serve(self: Arc<Self>, stream: UnixStream, devid: u32) -> io::Result<()> {
        let reader = stream.try_clone()?;
        std::thread::Builder::new()
            .name("cio-usb-emu".into())
            .spawn(move || {
                let mut echo = Echo::default();
                match echo.run(BufReader::with_capacity(256 << 10, reader), stream) {
                    Ok(()) => debug!(devid, "emulated CDC-ACM stream closed"),
                    Err(e) => warn!(devid, "emulated CDC-ACM stream ended: {e}"),
                }
            })?;
        Ok(())
    }
}

#[derive(Default)]
struct Echo {
    data: VecDeque<u8>,
    /// Bulk IN transfers waiting for data.
    reads: VecDeque<UrbHeader>,
    /// Bulk OUT transfers waiting for room.
    writes: VecDeque<(UrbHeader, Vec<u8>)>,
    /// Interrupt IN transfers (serial state changes never happen).
    notify: Vec<UrbHeader>,
    line_coding: [u8; 7],
    configuration: u8,
}

fn reply(out: &mut BytesMut, h: &UrbHeader, status: i32, data: &[u8], actual: usize) {
    UrbHeader {
        command: cmd::RET_SUBMIT,
        seqnum: h.seqnum,
        flags_or_status: status,
        length: actual as i32,
        ..Default::default()
    }
    .encode(out);
    out.extend_from_slice(data);
}

impl Echo {
    fn run(&mut self, mut r: impl Read, mut w: UnixStream) -> io::Result<()> {
        let mut out = BytesMut::with_capacity(64 << 10);
        loop {
            let mut head = [0u8; URB_HEADER_LEN];
            match r.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let h = UrbHeader::decode(&head);
            let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
            match h.command {
                cmd::SUBMIT => {
                    if !(0..=MAX_TRANSFER).contains(&h.length) {
                        return Err(invalid(format!("transfer length {}", h.length)));
                    }
                    let mut data = Vec::new();
                    if h.direction == 0 {
                        data.resize(h.length as usize, 0);
                        r.read_exact(&mut data)?;
                    }
                    if h.packets > 0 {
                        // Isochronous: skip the packet descriptors and refuse.
                        if h.packets > 1024 {
                            return Err(invalid(format!("{} iso packets", h.packets)));
                        }
                        io::copy(&mut (&mut r).take(h.packets as u64 * 16), &mut io::sink())?;
                        reply(&mut out, &h, EINVAL, &[], 0);
                    } else {
                        self.submit(h, data, &mut out);
                    }
                }
                cmd::UNLINK => {
                    let target = h.flags_or_status as u32;
                    let before = self.reads.len() + self.writes.len() + self.notify.len();
                    self.reads.retain(|u| u.seqnum != target);
                    self.writes.retain(|(u, _)| u.seqnum != target);
                    self.notify.retain(|u| u.seqnum != target);
                    let found = before != self.reads.len() + self.writes.len() + self.notify.len();
                    UrbHeader {
                        command: cmd::RET_UNLINK,
                        seqnum: h.seqnum,
                        flags_or_status: if found { ECONNRESET } else { 0 },
                        ..Default::default()
                    }
                    .encode(&mut out);
                }
                other => return Err(invalid(format!("unknown URB command {other}"))),
            }
            w.write_all(&out)?;
            out.clear();
        }
    }

    fn submit(&mut self, h: UrbHeader, data: Vec<u8>, out: &mut BytesMut) {
        match (h.ep, h.direction) {
            (0, _) => self.control(&h, &data, out),
            (BULK_EP, 0) => {
                self.writes.push_back((h, data));
                self.pump(out);
            }
            (BULK_EP, 1) => {
                self.reads.push_back(h);
                self.pump(out);
            }
            (NOTIFY_EP, 1) => self.notify.push(h),
            _ => reply(out, &h, EPIPE, &[], 0),
        }
    }

    /// Completes whatever transfers can complete now, in order.
    fn pump(&mut self, out: &mut BytesMut) {
        loop {
            let mut progressed = false;
            if let Some((_, d)) = self.writes.front() {
                if self.data.len() + d.len() <= ECHO_CAP || self.data.is_empty() {
                    let (h, d) = self.writes.pop_front().expect("front exists");
                    self.data.extend(&d);
                    reply(out, &h, 0, &[], d.len());
                    progressed = true;
                }
            }
            if !self.data.is_empty() {
                if let Some(h) = self.reads.pop_front() {
                    let n = (h.length as usize).min(self.data.len());
                    let chunk: Vec<u8> = self.data.drain(..n).collect();
                    reply(out, &h, 0, &chunk, n);
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn control(&mut self, h: &UrbHeader, data: &[u8], out: &mut BytesMut) {
        let s = h.setup;
        let (req_type, req) = (s[0], s[1]);
        let value = u16::from_le_bytes([s[2], s[3]]);
        let want = (u16::from_le_bytes([s[6], s[7]]) as usize).min(h.length as usize);
        let answer: Result<Vec<u8>, i32> = match (req_type & 0x60, req) {
            (0x00, 6) => match (value >> 8) as u8 {
                1 => Ok(DEVICE_DESC.to_vec()),
                2 => Ok(CONFIG_DESC.to_vec()),
                3 => string_desc(value as u8).ok_or(EPIPE),
                _ => Err(EPIPE), // no qualifier, BOS, ...
            },
            (0x00, 0) => Ok(vec![0, 0]),          // GET_STATUS
            (0x00, 1 | 3 | 11) => Ok(Vec::new()), // (CLEAR|SET)_FEATURE, SET_INTERFACE
            (0x00, 8) => Ok(vec![self.configuration]),
            (0x00, 9) => {
                self.configuration = value as u8;
                Ok(Vec::new())
            }
            (0x00, 10) => Ok(vec![0]),
            (0x20, 0x20) if data.len() == 7 => {
                self.line_coding.copy_from_slice(data);
                Ok(Vec::new())
            }
            (0x20, 0x21) => Ok(self.line_coding.to_vec()),
            (0x20, 0x22 | 0x23) => Ok(Vec::new()), // control line state, break
            _ => Err(EPIPE),
        };
        match answer {
            Ok(mut d) if h.direction == 1 => {
                d.truncate(want);
                reply(out, h, 0, &d, d.len());
            }
            Ok(_) => reply(out, h, 0, &[], data.len()),
            Err(e) => reply(out, h, e, &[], 0),
        }
    }
}
