//! A VM's move, device staying put, as two `cio vfio-user` processes see
//! it: the first serves a remote edu with `--handoff-to` and, when its
//! client leaves (QEMU after `device_del`), suspends the cio session into a
//! ticket; the second `--adopt`s it and serves the same open device, whose
//! state the new client's first reset (QEMU's realize) does not touch. A
//! small vfio-user client stands in for both QEMUs. (The whole move, with
//! `cio migrate` and two QEMUs, is in qemu-tests/tests/vfio_user_migrate.rs.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cio_frontend::vfio_user::wire::{self, HEADER_SIZE};
use cio_frontend::vfio_user::{
    Body, Capabilities, Codec, Message, RegionAccess, RegionData, Reply, Request, Version,
};
use cio_hw_profiles::edu;

const BAR0: u32 = 0;

/// A vfio-user client on `socket` (waits for the server to listen).
struct Vu {
    s: UnixStream,
    codec: Codec,
    id: u16,
}

impl Vu {
    fn connect(socket: &Path) -> Vu {
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

    fn call(&mut self, req: Request) -> Reply {
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

    fn read32(&mut self, offset: u64) -> u32 {
        let Reply::RegionRead(d) = self.call(Request::RegionRead(RegionAccess {
            offset,
            region: BAR0,
            count: 4,
        })) else {
            panic!("no region data")
        };
        u32::from_le_bytes(d.data.try_into().unwrap())
    }

    fn write32(&mut self, offset: u64, v: u32) {
        let r = self.call(Request::RegionWrite(RegionData {
            offset,
            region: BAR0,
            data: v.to_le_bytes().to_vec(),
        }));
        assert!(matches!(r, Reply::RegionWrite { .. }), "{r:?}");
    }

    fn reset(&mut self) {
        assert_eq!(self.call(Request::DeviceReset), Reply::DeviceReset);
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cio"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running cio")
}

/// Waits (at most 20 s) for `child` to exit; whether it succeeded, and
/// what it printed.
fn finish(mut child: Child) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn an_adopted_device_keeps_its_state_across_two_servers() {
    let backend = common::backend(None);
    let host = backend.endpoint().to_string();
    let tmp = std::env::temp_dir().join(format!("cio-vu-handoff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (a, b, ticket) = (tmp.join("a.sock"), tmp.join("b.sock"), tmp.join("ticket"));
    let t = ticket.to_str().unwrap();

    // The source: the guest's driver leaves a result in the device.
    let first = spawn(&[
        "vfio-user",
        &host,
        "edu0",
        "--socket",
        a.to_str().unwrap(),
        "--handoff-to",
        t,
    ]);
    let mut vu = Vu::connect(&a);
    vu.write32(edu::reg::FACTORIAL, 5);
    assert_eq!(vu.read32(edu::reg::FACTORIAL), 120);
    drop(vu);
    let (ok, out) = finish(first);
    assert!(ok, "{out}");
    assert!(out.contains("suspended into"), "{out}");
    assert!(ticket.exists());
    // The device stayed open for the ticket.
    assert_eq!(backend.stats().open_devices, 1);

    // The destination: the same device, not reset by the realize.
    let second = spawn(&["vfio-user", "--adopt", t, "--socket", b.to_str().unwrap()]);
    let mut vu = Vu::connect(&b);
    vu.reset();
    assert_eq!(vu.read32(0), edu::ID);
    assert_eq!(
        vu.read32(edu::reg::FACTORIAL),
        120,
        "the adopted device was reset"
    );
    // The guest's own resets reach it.
    vu.reset();
    assert_eq!(vu.read32(edu::reg::FACTORIAL), 0);
    drop(vu);
    let (ok, out) = finish(second);
    assert!(ok, "{out}");
    assert!(out.contains("adopted session"), "{out}");
    backend
        .wait_stats(Duration::from_secs(10), |st| st.open_devices == 0)
        .expect("the device released when the adopter said goodbye");

    // A ticket used once is spent.
    let (ok, out) = common::cio(&["vfio-user", "--adopt", t, "--socket", a.to_str().unwrap()]);
    assert!(!ok, "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn cio_migrate_says_what_it_cannot_reach() {
    let tmp = std::env::temp_dir().join(format!("cio-migrate-{}", std::process::id()));
    let (src, dst) = (tmp.join("src.qmp"), tmp.join("dst.qmp"));
    let (ok, out) = common::cio(&[
        "migrate",
        "--from",
        src.to_str().unwrap(),
        "--to",
        dst.to_str().unwrap(),
        "--device",
        "vu0",
        "--bus",
        "rp0",
        "--ticket",
        tmp.join("t").to_str().unwrap(),
        "--socket",
        tmp.join("b.sock").to_str().unwrap(),
        "--uri",
        "unix:/nonexistent",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("source QMP") && out.contains("src.qmp"),
        "{out}"
    );
}
