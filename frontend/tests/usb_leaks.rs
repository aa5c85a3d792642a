//! USB imports of every kind leave no file descriptors or threads' sockets
//! behind. Its own binary, so no other test opens fds meanwhile.

mod common;

use std::time::{Duration, Instant};

use cio_backend::usb::stock::UsbipServer;
use cio_frontend::usb::{self, UsbSource};

#[test]
fn usb_imports_leave_no_fds_behind() {
    let (s, p) = common::usb_server(None);
    let u = UsbipServer::bind("127.0.0.1:0".parse().unwrap(), p.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let cio = UsbSource::Cio(s.endpoint().clone());
    let plain = UsbSource::Usbip(u.local_addr());
    let settle = |what: &str| {
        let end = Instant::now() + Duration::from_secs(10);
        while p.exported() != 0 || s.stats().sessions != 0 {
            assert!(Instant::now() < end, "{what}: still exported or in session");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Warm up lazily created process state.
    usb::list(&cio, &common::opts()).unwrap();
    settle("warm-up");
    std::thread::sleep(Duration::from_millis(100));
    let before = common::fds();
    for _ in 0..3 {
        // Relayed import ended by the client.
        let (stream, relay) = usb::import(&cio, "emu-1", &common::opts(), false)
            .unwrap()
            .into_stream()
            .unwrap();
        stream.shutdown();
        relay.unwrap().join().unwrap();
        settle("relayed");
        // Plain USB/IP import, dropped.
        drop(usb::import(&plain, "emu-1", &common::opts(), false).unwrap());
        settle("plain");
        // A raw client that imports and vanishes.
        let mut raw = common::Raw::ready(s.endpoint());
        raw.usb_import("emu-1");
        drop(raw);
        // Lists of both kinds.
        usb::list(&cio, &common::opts()).unwrap();
        usb::list(&plain, &common::opts()).unwrap();
        settle("round");
    }
    // Connection threads of the plain server close their sockets as they end.
    let end = Instant::now() + Duration::from_secs(10);
    while common::fds() != before {
        assert!(
            Instant::now() < end,
            "fds leaked:\nbefore {before:?}\nafter  {:?}",
            common::fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    u.shutdown();
}
