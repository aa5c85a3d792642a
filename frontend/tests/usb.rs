//! USB remoting without a kernel: the emulated CDC-ACM device, imported
//! through a cio session and through plain USB/IP, driven by a userspace
//! USB/IP client (the same URB stream vhci-hcd would carry).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cio_backend::usb::stock::{UsbipHandle, UsbipServer};
use cio_backend::usb::UsbProvider;
use cio_core::usbip::{cmd, UrbHeader, UsbSpeed, URB_HEADER_LEN};
use cio_core::wire::Message;
use cio_core::ErrorCode;
use cio_frontend::usb::{self, UrbStream, UsbError, UsbSource};
use cio_frontend::ClientError;
use cio_transports::{Endpoint, Psk};
use common::{opts, usb_server, Raw, KEY};

/// A minimal USB/IP host side: submits URBs and reads their completions.
struct Host {
    s: UrbStream,
    seq: u32,
    devid: u32,
}

struct Ret {
    status: i32,
    data: Vec<u8>,
    seqnum: u32,
}

impl Host {
    fn new(s: UrbStream, devid: u32) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { s, seq: 0, devid }
    }

    fn submit(&mut self, ep: u32, dir_in: bool, setup: [u8; 8], out: &[u8], len: usize) -> u32 {
        self.seq += 1;
        let mut b = BytesMut::new();
        UrbHeader {
            command: cmd::SUBMIT,
            seqnum: self.seq,
            devid: self.devid,
            direction: dir_in as u32,
            ep,
            length: if dir_in { len } else { out.len() } as i32,
            setup,
            ..Default::default()
        }
        .encode(&mut b);
        b.extend_from_slice(out);
        self.s.write_all(&b).unwrap();
        self.seq
    }

    fn unlink(&mut self, target: u32) -> u32 {
        self.seq += 1;
        let mut b = BytesMut::new();
        UrbHeader {
            command: cmd::UNLINK,
            seqnum: self.seq,
            devid: self.devid,
            flags_or_status: target as i32,
            ..Default::default()
        }
        .encode(&mut b);
        self.s.write_all(&b).unwrap();
        self.seq
    }

    /// Reads one RET_SUBMIT or RET_UNLINK; `dir_in` says whether data follows.
    fn ret(&mut self, dir_in: bool) -> Ret {
        let mut h = [0u8; URB_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = UrbHeader::decode(&h);
        assert!(h.command == cmd::RET_SUBMIT || h.command == cmd::RET_UNLINK);
        let mut data = vec![
            0;
            if dir_in && h.command == cmd::RET_SUBMIT {
                h.length as usize
            } else {
                0
            }
        ];
        self.s.read_exact(&mut data).unwrap();
        Ret {
            status: h.flags_or_status,
            data,
            seqnum: h.seqnum,
        }
    }

    fn control_in(&mut self, setup: [u8; 8], len: usize) -> Ret {
        let seq = self.submit(0, true, setup, &[], len);
        let r = self.ret(true);
        assert_eq!(r.seqnum, seq);
        r
    }
}

fn get_descriptor(kind: u8, index: u8, len: u16) -> [u8; 8] {
    let l = len.to_le_bytes();
    [0x80, 6, index, kind, 0, 0, l[0], l[1]]
}

/// Enumerates the device, exercises class requests, echoes 300 KiB in
/// bulk transfers and unlinks a pending transfer.
fn drive_cdc_acm(mut h: Host) {
    let d = h.control_in(get_descriptor(1, 0, 18), 18);
    assert_eq!(d.status, 0);
    assert_eq!(d.data.len(), 18);
    assert_eq!(u16::from_le_bytes([d.data[8], d.data[9]]), 0x1209);
    let c = h.control_in(get_descriptor(2, 0, 255), 255);
    assert_eq!(c.data.len(), 67, "whole configuration");
    let s = h.control_in(get_descriptor(3, 2, 255), 255);
    let name: Vec<u16> = s.data[2..]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(String::from_utf16(&name).unwrap(), "cio CDC-ACM echo");
    assert_eq!(
        h.control_in(get_descriptor(6, 0, 10), 10).status,
        -32,
        "no qualifier: stall"
    );
    // SET_CONFIGURATION 1, then SET_LINE_CODING / GET_LINE_CODING.
    let seq = h.submit(0, false, [0, 9, 1, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!((h.ret(false).seqnum, 0), (seq, 0));
    let coding = [0x00, 0xc2, 0x01, 0x00, 0, 0, 8]; // 115200 8N1
    h.submit(0, false, [0x21, 0x20, 0, 0, 0, 0, 7, 0], &coding, 0);
    assert_eq!(h.ret(false).status, 0);
    assert_eq!(h.control_in([0xa1, 0x21, 0, 0, 0, 0, 7, 0], 7).data, coding);

    // Bulk echo: writes and reads interleaved, contents checked.
    let payload: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let mut echoed = Vec::new();
    for chunk in payload.chunks(16 * 1024) {
        h.submit(2, false, [0; 8], chunk, 0);
        let w = h.ret(false);
        assert_eq!(w.status, 0);
        h.submit(2, true, [0; 8], &[], 16 * 1024);
        let r = h.ret(true);
        assert_eq!(r.status, 0);
        echoed.extend_from_slice(&r.data);
    }
    while echoed.len() < payload.len() {
        h.submit(2, true, [0; 8], &[], 64 * 1024);
        echoed.extend_from_slice(&h.ret(true).data);
    }
    assert!(echoed == payload, "echo differs");

    // A read with nothing to read stays pending until unlinked.
    let pending = h.submit(2, true, [0; 8], &[], 512);
    let u = h.unlink(pending);
    let r = h.ret(false);
    assert_eq!((r.seqnum, r.status), (u, -104), "unlinked with -ECONNRESET");
    // A bad endpoint stalls.
    h.submit(5, true, [0; 8], &[], 8);
    assert_eq!(h.ret(true).status, -32);
    h.s.shutdown();
}

fn usbip_server(p: &Arc<UsbProvider>) -> UsbipHandle {
    UsbipServer::bind("127.0.0.1:0".parse().unwrap(), Arc::clone(p))
        .unwrap()
        .spawn()
        .unwrap()
}

fn cio_source(ep: &Endpoint) -> UsbSource {
    UsbSource::Cio(ep.clone())
}

fn wait_unexported(p: &UsbProvider) {
    let end = Instant::now() + Duration::from_secs(10);
    while p.exported() != 0 {
        assert!(Instant::now() < end, "export was not released");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn emulated_device_through_a_cio_session() {
    let (s, p) = usb_server(None);
    let src = cio_source(s.endpoint());
    let list = usb::list(&src, &opts()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].busid, "emu-1");
    assert_eq!(list[0].speed, UsbSpeed::High);
    assert_eq!(list[0].interfaces.len(), 2);
    let imp = usb::import(&src, "emu-1", &opts(), false).unwrap();
    assert_eq!(p.exported(), 1);
    let devid = imp.device.devid();
    let (stream, relay) = imp.into_stream().unwrap();
    drive_cdc_acm(Host::new(stream, devid));
    assert_eq!(relay.unwrap().join().unwrap(), usb::RelayEnd::Detached);
    wait_unexported(&p);
    // Re-importable at once, and PCI devices are still served.
    drop(usb::import(&src, "emu-1", &opts(), false).unwrap());
    wait_unexported(&p);
    common::bystander_works(&s);
}

#[test]
fn emulated_device_through_plain_usbip() {
    let (_s, p) = usb_server(None);
    let u = usbip_server(&p);
    let src = UsbSource::Usbip(u.local_addr());
    let list = usb::list(&src, &opts()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].vendor, list[0].product), (0x1209, 0x0001));
    let imp = usb::import(&src, "emu-1", &opts(), false).unwrap();
    let devid = imp.device.devid();
    let (stream, relay) = imp.into_stream().unwrap();
    assert!(relay.is_none());
    drive_cdc_acm(Host::new(stream, devid));
    wait_unexported(&p);
    // Stopping the server ends imports (and restores their devices).
    let imp = usb::import(&src, "emu-1", &opts(), false).unwrap();
    assert_eq!(p.exported(), 1);
    u.shutdown();
    assert_eq!(p.exported(), 0);
    drop(imp);
}

#[test]
fn usb_bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let psk = Psk::new(KEY.to_vec()).unwrap();
    let (s, p) = usb_server(Some(psk.clone()));
    let src = cio_source(s.endpoint());
    let keyed = cio_frontend::ClientOptions {
        psk: Some(psk),
        ..opts()
    };
    // No key, wrong key.
    let e = usb::list(&src, &opts()).unwrap_err();
    assert!(
        matches!(e, UsbError::Client(ClientError::KeyRequired)),
        "{e}"
    );
    let wrong = cio_frontend::ClientOptions {
        psk: Some(Psk::new(b"another-key-0123456789".to_vec()).unwrap()),
        ..opts()
    };
    assert!(usb::import(&src, "emu-1", &wrong, false).is_err());
    assert_eq!(p.exported(), 0);
    // Unknown device.
    let e = usb::import(&src, "9-9", &keyed, false).unwrap_err();
    match e {
        UsbError::Client(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::NO_DEVICE);
            assert!(message.contains("9-9"), "{message}");
        }
        e => panic!("{e}"),
    }
    // Emulated devices have no kernel side to hand the connection to.
    let e = usb::import(&src, "emu-1", &keyed, true).unwrap_err();
    assert!(e.to_string().contains("usbip-host"), "{e}");
    assert_eq!(p.exported(), 0);
    // Busy while imported; free again once the importer vanishes.
    let first = usb::import(&src, "emu-1", &keyed, false).unwrap();
    let e = usb::import(&src, "emu-1", &keyed, false).unwrap_err();
    assert!(
        matches!(&e, UsbError::Client(ClientError::Server { code, .. }) if *code == ErrorCode::BUSY),
        "{e}"
    );
    drop(first); // the connection closes without a goodbye
    wait_unexported(&p);
    drop(usb::import(&src, "emu-1", &keyed, false).unwrap());
    wait_unexported(&p);
}

#[test]
fn usb_session_state_errors() {
    let (s, p) = usb_server(None);
    // UsbData with nothing imported: an async error, the session goes on.
    let mut raw = Raw::ready(s.endpoint());
    raw.send(&Message::UsbData {
        data: bytes::Bytes::from_static(b"junk"),
    });
    let (_, why) = raw.expect_error(ErrorCode::STATE);
    assert!(why.contains("no USB device"), "{why}");
    // A session holding a PCI device cannot import USB, and vice versa.
    raw.open("edu0");
    raw.send(&Message::UsbImport {
        busid: "emu-1".into(),
        direct: false,
    });
    raw.expect_error(ErrorCode::STATE);
    let mut raw2 = Raw::ready(s.endpoint());
    raw2.usb_import("emu-1");
    raw2.send(&Message::Open {
        name: "edu0".into(),
    });
    raw2.expect_error(ErrorCode::STATE);
    // Garbage in the URB stream: the emulated device drops the stream, the
    // session ends, the export is released, others are unaffected.
    raw2.send(&Message::UsbData {
        data: bytes::Bytes::from(vec![0xff; URB_HEADER_LEN]),
    });
    raw2.expect_closed();
    wait_unexported(&p);
    common::bystander_works(&s);
}

#[test]
fn plain_usbip_bad_requests_are_refused() {
    let (_s, p) = usb_server(None);
    let u = usbip_server(&p);
    let addr = u.local_addr();
    // Wrong version: closed without a reply.
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&[0x01, 0x06, 0x80, 0x05, 0, 0, 0, 0]).unwrap();
    let mut b = Vec::new();
    assert_eq!(c.read_to_end(&mut b).unwrap(), 0);
    // Unknown bus id: status 1.
    let e = usb::import(&UsbSource::Usbip(addr), "7-7", &opts(), false).unwrap_err();
    assert!(
        matches!(e, UsbError::Usbip(cio_core::usbip::UsbipError::Refused(1))),
        "{e}"
    );
    // Still serving.
    assert_eq!(
        usb::list(&UsbSource::Usbip(addr), &opts()).unwrap().len(),
        1
    );
    assert_eq!(p.exported(), 0);
}

#[test]
fn a_silent_usb_client_is_dropped_and_its_device_released() {
    let limits = cio_backend::Limits {
        usb_idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (s, p) = common::usb_server_with(None, limits);
    let mut raw = Raw::ready(s.endpoint());
    raw.usb_import("emu-1");
    assert_eq!(p.exported(), 1);
    // The link goes quiet (no pings): the backend gives the device back.
    let t = Instant::now();
    wait_unexported(&p);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    raw.expect_closed();
    // A relaying frontend pings, so an idle but live import survives.
    let pinging = cio_frontend::ClientOptions {
        keepalive: Duration::from_millis(50),
        ..opts()
    };
    let imp = usb::import(&cio_source(s.endpoint()), "emu-1", &pinging, false).unwrap();
    let (stream, _relay) = imp.into_stream().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(p.exported(), 1, "a live import was dropped");
    stream.shutdown();
    wait_unexported(&p);
}

#[test]
fn small_queue_limits_do_not_stall_the_usb_stream() {
    // Every device->client chunk fills the reply queue: the session has to
    // stop and resume reading the device side and still move every byte.
    let limits = cio_backend::Limits {
        max_queued_bytes: 4096,
        ..Default::default()
    };
    let (s, p) = common::usb_server_with(None, limits);
    let imp = usb::import(&cio_source(s.endpoint()), "emu-1", &opts(), false).unwrap();
    let devid = imp.device.devid();
    let (stream, relay) = imp.into_stream().unwrap();
    let mut h = Host::new(stream, devid);
    // 1 MiB written, then 16 reads queued at once: the device answers with
    // about 1 MiB in one go, far more than one read of its stream.
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    for chunk in payload.chunks(64 * 1024) {
        h.submit(2, false, [0; 8], chunk, 0);
        assert_eq!(h.ret(false).status, 0);
    }
    for _ in 0..16 {
        h.submit(2, true, [0; 8], &[], 64 * 1024);
    }
    let mut echoed = Vec::new();
    for _ in 0..16 {
        echoed.extend_from_slice(&h.ret(true).data);
    }
    assert!(echoed == payload, "echo differs");
    h.s.shutdown();
    relay.unwrap().join().unwrap();
    wait_unexported(&p);
}
