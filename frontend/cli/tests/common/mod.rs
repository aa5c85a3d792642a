//! What the tests of the `cio` binary share: running it, and a backend for
//! it to talk to.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_backend::models::{Edu, Memory};
use cio_backend::usb::{CdcAcmEcho, UsbProvider};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_frontend::vfio_user::wire::{self, HEADER_SIZE};
use cio_frontend::vfio_user::{
    Body, Capabilities, Codec, Message, RegionAccess, RegionData, Reply, Request, Version,
};
use cio_transports::Psk;

/// Runs the `cio` binary with `args`.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cio"))
        .args(args)
        .output()
        .expect("running cio")
}

/// Runs `cio`: whether it succeeded, and what it printed (stdout, then
/// stderr).
pub fn cio(args: &[&str]) -> (bool, String) {
    let out = run(args);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A backend on an ephemeral loopback port serving edu0, a 64 KiB mem0
/// and the emulated USB serial port emu-1.
pub fn backend(psk: Option<Psk>) -> ServerHandle {
    Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk,
        devices: vec![
            Box::new(Edu::new("edu0")),
            Box::new(Memory::new("mem0", 1 << 16).unwrap()),
        ],
        limits: Limits::default(),
        usb: Arc::new(UsbProvider::new(vec![], vec![Arc::new(CdcAcmEcho)])),
        security: Default::default(),
    })
    .unwrap()
    .spawn()
    .unwrap()
}

/// vfio-user's region numbers of BAR 0 and the config space.
const BAR0: u32 = 0;
const CONFIG: u32 = 7;

/// A vfio-user client standing in for QEMU.
pub struct Vu {
    s: UnixStream,
    codec: Codec,
    id: u16,
}

impl Vu {
    /// Connects to `socket` (waiting up to 20 s for the server to listen)
    /// and sends VERSION, as QEMU does first.
    pub fn connect(socket: &Path) -> Vu {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{}: {e}", socket.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut vu = Vu {
            s,
            codec: Codec::default(),
            id: 0,
        };
        vu.call(Request::Version(Version {
            major: 0,
            minor: 1,
            capabilities: Some(Capabilities::default()),
        }));
        vu
    }

    /// Sends a request and waits for its reply.
    pub fn call(&mut self, req: Request) -> Reply {
        self.id += 1;
        let msg = Message {
            id: self.id,
            no_reply: false,
            body: Body::Request(req),
        };
        self.s.write_all(&self.codec.encode(&msg).unwrap()).unwrap();
        let mut frame = vec![0u8; HEADER_SIZE];
        self.s.read_exact(&mut frame).unwrap();
        let h = wire::Header::parse(&frame, self.codec.limits.max_msg_size).unwrap();
        frame.resize(h.size as usize, 0);
        self.s.read_exact(&mut frame[HEADER_SIZE..]).unwrap();
        match self.codec.decode(&frame).unwrap().body {
            Body::Reply(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// Reads 4 bytes of BAR 0.
    pub fn read32(&mut self, offset: u64) -> u32 {
        self.read(BAR0, offset)
    }

    /// Reads 4 bytes of the config space.
    pub fn config32(&mut self, offset: u64) -> u32 {
        self.read(CONFIG, offset)
    }

    fn read(&mut self, region: u32, offset: u64) -> u32 {
        let Reply::RegionRead(d) = self.call(Request::RegionRead(RegionAccess {
            offset,
            region,
            count: 4,
        })) else {
            panic!("no region data")
        };
        u32::from_le_bytes(d.data.try_into().unwrap())
    }

    /// Writes 4 bytes of BAR 0 (waiting for the reply).
    pub fn write32(&mut self, offset: u64, v: u32) {
        let r = self.call(Request::RegionWrite(RegionData {
            offset,
            region: BAR0,
            data: v.to_le_bytes().to_vec(),
        }));
        assert!(matches!(r, Reply::RegionWrite { .. }), "{r:?}");
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) {
        assert_eq!(self.call(Request::DeviceReset), Reply::DeviceReset);
    }
}
