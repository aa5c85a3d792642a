//! Helpers shared by the integration tests: an in-process `ciod` on a real
//! loopback TCP port, and clients for it.
#![allow(dead_code)]

pub mod proxy;

use std::time::Duration;

use cio_backend::models::{Edu, Memory};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_frontend::{Client, ClientOptions};
use cio_transports::{Endpoint, Psk};

pub const KEY: &[u8] = b"test-key-0123456789abcdef";

/// A server on 127.0.0.1 with an ephemeral port serving edu0 and mem0.
pub fn server() -> ServerHandle {
    server_with(None, Limits::default())
}

/// A server exporting one emulated CDC-ACM USB device (emu-1), edu0 and mem0.
pub fn usb_server(
    psk: Option<Psk>,
) -> (ServerHandle, std::sync::Arc<cio_backend::usb::UsbProvider>) {
    usb_server_with(psk, Limits::default())
}

pub fn usb_server_with(
    psk: Option<Psk>,
    limits: Limits,
) -> (ServerHandle, std::sync::Arc<cio_backend::usb::UsbProvider>) {
    use cio_backend::usb::{CdcAcmEcho, UsbProvider};
    let usb = std::sync::Arc::new(UsbProvider::new(
        vec![],
        vec![std::sync::Arc::new(CdcAcmEcho)],
    ));
    (spawn(psk, limits, usb.clone()), usb)
}

pub fn server_with(psk: Option<Psk>, limits: Limits) -> ServerHandle {
    spawn(psk, limits, Default::default())
}

fn spawn(
    psk: Option<Psk>,
    limits: Limits,
    usb: std::sync::Arc<cio_backend::usb::UsbProvider>,
) -> ServerHandle {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk,
        devices: vec![
            Box::new(Edu::new("edu0")),
            Box::new(Memory::new("mem0", 1 << 20).unwrap()),
        ],
        limits,
        usb,
        security: Default::default(),
    };
    Server::bind(cfg).unwrap().spawn().unwrap()
}

pub fn connect(ep: &Endpoint) -> Client {
    Client::connect(ep, opts()).unwrap()
}

pub fn opts() -> ClientOptions {
    ClientOptions {
        reply_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

/// Waits until the server has no sessions, devices, shadow memory or irq
/// fds left, and fails the test with the counters if it does not happen.
pub fn assert_idle(s: &ServerHandle) {
    let r = s.wait_stats(Duration::from_secs(5), |st| {
        st.sessions == 0 && st.open_devices == 0 && st.shadow_bytes == 0 && st.irq_fds == 0
    });
    assert!(
        r.is_ok(),
        "server did not release everything: {:?}",
        r.unwrap_err()
    );
}

/// A client that speaks the wire protocol by hand, to send what the real
/// client never would.
pub struct Raw {
    pub conn: cio_transports::Conn,
    pub out: cio_transports::OutQueue,
    pub dec: cio_core::FrameDecoder,
}

impl Raw {
    pub fn connect(ep: &Endpoint) -> Self {
        let conn = cio_transports::Conn::connect(ep, Duration::from_secs(5)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self {
            conn,
            out: cio_transports::OutQueue::new(),
            dec: cio_core::FrameDecoder::new(),
        }
    }

    /// Connects and completes a handshake without a key.
    pub fn ready(ep: &Endpoint) -> Self {
        let mut r = Self::connect(ep);
        r.send(&cio_core::Message::Hello {
            version: 1,
            features: cio_core::wire::FEATURES,
            session: 0,
            nonce: [0; 32],
            client: "raw".into(),
        });
        match r.recv().expect("welcome").msg {
            cio_core::Message::Welcome { .. } => {}
            m => panic!("expected Welcome, got {m:?}"),
        }
        r
    }

    pub fn send(&mut self, m: &cio_core::Message) -> u64 {
        let seq = self.out.push(m, 0);
        assert!(self
            .out
            .write_to(&self.conn, Some(Duration::from_secs(5)))
            .unwrap());
        seq
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        use std::io::Write;
        (&self.conn).write_all(b).unwrap();
    }

    /// The next frame, or None once the server closed the connection.
    pub fn recv(&mut self) -> Option<cio_core::Frame> {
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(f);
            }
            match self.conn.recv_into(self.dec.buffer(), 65536, false) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("receiving: {e}"),
            }
        }
    }

    /// The next frame must be an Error with `code`; returns its message.
    pub fn expect_error(&mut self, code: cio_core::ErrorCode) -> (u64, String) {
        match self.recv() {
            Some(cio_core::Frame {
                reply_to,
                msg: cio_core::Message::Error { code: c, message },
                ..
            }) => {
                assert_eq!(c, code, "error code for {message:?}");
                (reply_to, message)
            }
            other => panic!("expected an error {code:?}, got {other:?}"),
        }
    }

    /// The server must close the connection with nothing more to say.
    pub fn expect_closed(&mut self) {
        if let Some(f) = self.recv() {
            panic!("expected the connection to close, got {f:?}");
        }
    }

    /// Opens `name` and returns its handle.
    pub fn open(&mut self, name: &str) -> u32 {
        self.send(&cio_core::Message::Open { name: name.into() });
        match self.recv().unwrap().msg {
            cio_core::Message::Opened { handle, .. } => handle,
            m => panic!("expected Opened, got {m:?}"),
        }
    }

    /// Imports USB device `busid` (relayed) and checks it was granted.
    pub fn usb_import(&mut self, busid: &str) {
        self.send(&cio_core::Message::UsbImport {
            busid: busid.into(),
            direct: false,
        });
        match self.recv().unwrap().msg {
            cio_core::Message::UsbImported { device } => assert_eq!(device.busid, busid),
            m => panic!("expected UsbImported, got {m:?}"),
        }
    }
}

/// A bystander session that must keep working while others misbehave.
pub fn bystander_works(s: &ServerHandle) {
    use cio_core::Device;
    let client = connect(s.endpoint());
    let mut mem = client.open("mem0").unwrap();
    mem.write64(0, 0x100, 0xfeed_f00d_dead_beef).unwrap();
    assert_eq!(mem.read64(0, 0x100).unwrap(), 0xfeed_f00d_dead_beef);
}

/// Waits until only `sessions` sessions remain (their devices still open).
pub fn assert_idle_except(s: &ServerHandle, sessions: usize) {
    let r = s.wait_stats(Duration::from_secs(10), |st| st.sessions == sessions);
    assert!(r.is_ok(), "sessions did not end: {:?}", r.unwrap_err());
}

/// Open file descriptors, with what they point at.
pub fn fds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        // The directory listing itself.
        .filter(|t| !t.starts_with("/proc/"))
        .collect();
    v.sort();
    v
}

/// The memory device's DMA engine both ways over `len` bytes: target memory
/// to BAR0 (pushed before the command), BAR0 back to other target memory
/// (pulled before the read reply), compared byte for byte. Returns the data
/// (BAR0 holds it afterwards).
pub fn memory_dma_round_trip(m: &mut cio_frontend::RemoteDevice, len: u64) -> Vec<u8> {
    use cio_backend::models::memory::{reg, CMD_FROM_MEMORY, CMD_TO_MEMORY};
    use cio_core::{Device, DmaDir, DmaRegion};
    use std::sync::Arc;
    let src = Arc::new(DmaRegion::new(0x100_0000, len, DmaDir::ToDevice).unwrap());
    let dst = Arc::new(DmaRegion::new(0x200_0000, len, DmaDir::FromDevice).unwrap());
    m.dma_map(Arc::clone(&src)).unwrap();
    m.dma_map(Arc::clone(&dst)).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i ^ (i >> 9)) as u8).collect();
    src.write(0, &data).unwrap();
    m.write64(2, reg::DMA_ADDR, 0x100_0000).unwrap();
    m.write64(2, reg::BAR_OFFSET, 0).unwrap();
    m.write64(2, reg::LEN, len).unwrap();
    m.write64(2, reg::CMD, CMD_FROM_MEMORY).unwrap();
    m.write64(2, reg::DMA_ADDR, 0x200_0000).unwrap();
    m.write64(2, reg::CMD, CMD_TO_MEMORY).unwrap();
    let done = m.read64(2, reg::COMPLETED).unwrap();
    assert!(done >= 2, "completed {done}");
    let mut back = vec![0u8; len as usize];
    dst.read(0, &mut back).unwrap();
    assert!(back == data, "DMA round trip differs");
    data
}
