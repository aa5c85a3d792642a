//! Connections that never authenticate cannot lock a client out: idle ones
//! (before Hello, after Hello, mid-frame), many from one address, one each
//! from many addresses, and reconnect churn, all at once, while a client
//! with the key keeps being served within a second.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cio_backend::Limits;
use cio_core::wire::{Message, FEATURES};
use cio_core::Device;
use cio_frontend::{Client, ClientOptions};
use cio_transports::Psk;

/// A TCP connection to `to` from loopback address `from` (any 127/8
/// address is this machine's).
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

fn hello() -> BytesMut {
    let mut b = BytesMut::new();
    Message::Hello {
        version: 2,
        features: FEATURES,
        session: 0,
        nonce: [1; 32],
        client: "idle".into(),
    }
    .encode(1, 0, &mut b);
    b
}

/// An idle connection of kind `i % 3`: silent, Hello then silent, or half
/// a frame then silent.
fn idle(from: &str, to: SocketAddr, i: usize) -> Option<TcpStream> {
    let mut s = connect_from(from, to).ok()?;
    let h = hello();
    let _ = match i % 3 {
        0 => Ok(()),
        1 => s.write_all(&h),
        _ => s.write_all(&h[..10]),
    };
    Some(s)
}

#[test]
fn idle_and_churning_connections_do_not_lock_out_a_client_with_the_key() {
    let psk = Psk::new(common::KEY.to_vec()).unwrap();
    let limits = Limits {
        max_handshakes: 8,
        max_handshakes_per_peer: 4,
        max_sessions: 4,
        ..Limits::default()
    };
    let s = common::server_with(Some(psk.clone()), limits);
    let to = s.endpoint().resolve().unwrap()[0];
    // Twice the handshake slots from one address: four get slots, the rest
    // are told why and closed.
    let mut held: Vec<TcpStream> = (0..16).filter_map(|i| idle("127.0.0.2", to, i)).collect();
    let r = s.wait_stats(Duration::from_secs(5), |st| st.handshaking == 4);
    assert!(r.is_ok(), "per-peer limit: {r:?}");
    // Twice the slots again, one each from many addresses.
    for i in 0..16 {
        held.extend(idle(&format!("127.0.1.{}", i + 1), to, i));
    }
    // And churn from yet more addresses while the client works.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut n, end) = (0u32, Instant::now() + Duration::from_secs(20));
            while !stop.load(Ordering::Relaxed) && Instant::now() < end && n < 5000 {
                let from = format!("127.0.2.{}", n % 200 + 1);
                if let Some(mut c) = idle(&from, to, n as usize) {
                    let _ = c.write_all(&hello());
                }
                n += 1;
            }
            n
        })
    };
    let opts = ClientOptions {
        psk: Some(psk),
        ..common::opts()
    };
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let c = Client::connect(s.endpoint(), opts.clone()).unwrap();
        let mut m = c.open("mem0").unwrap();
        m.write32(0, 0, 7).unwrap();
        assert_eq!(m.read32(0, 0).unwrap(), 7);
        worst = worst.max(t.elapsed());
        assert!(s.stats().handshaking <= 8, "{:?}", s.stats());
        drop(m);
        drop(c);
    }
    stop.store(true, Ordering::Relaxed);
    let churned = churn.join().unwrap();
    println!("served 5 times, slowest {worst:?}, during {churned} churning connections");
    assert!(worst < Duration::from_secs(1), "slowest {worst:?}");
    drop(held);
    let r = s.wait_stats(Duration::from_secs(10), |st| {
        st.sessions == 0 && st.handshaking == 0
    });
    assert!(r.is_ok(), "everything ended: {r:?}");
}

#[test]
fn refused_connections_are_told_which_limit_refused_them() {
    let limits = Limits {
        max_handshakes_per_peer: 1,
        ..Limits::default()
    };
    let s = common::server_with(None, limits);
    let to = s.endpoint().resolve().unwrap()[0];
    let _first = idle("127.0.0.5", to, 0).unwrap();
    let r = s.wait_stats(Duration::from_secs(5), |st| st.handshaking == 1);
    assert!(r.is_ok());
    let second = connect_from("127.0.0.5", to).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = common::Raw {
        conn: cio_transports::Conn::Tcp(second),
        out: cio_transports::OutQueue::new(),
        dec: cio_core::FrameDecoder::new(),
    };
    let (_, why) = raw.expect_error(cio_core::ErrorCode::LIMIT);
    assert!(why.contains("max_handshakes_per_peer"), "{why}");
    // Another address is not affected.
    common::bystander_works(&s);
}

/// A protocol-2 client that opens mem0 and then goes silent (as a frozen
/// process: no pings, no FIN).
fn frozen_holder(ep: &cio_transports::Endpoint) -> common::Raw {
    let mut raw = common::Raw::connect(ep);
    raw.send(&Message::Hello {
        version: 2,
        features: FEATURES & !cio_core::wire::FEATURE_RESUME,
        session: 0,
        nonce: [2; 32],
        client: "frozen".into(),
    });
    assert!(matches!(raw.recv().unwrap().msg, Message::Welcome { .. }));
    raw.open("mem0");
    raw
}

#[test]
fn a_frozen_device_holder_loses_the_device_after_the_link_timeout() {
    let limits = Limits {
        link_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let s = common::server_with(None, limits);
    // A live client that is merely idle keeps its session: it pings.
    let live = Client::connect(
        s.endpoint(),
        ClientOptions {
            keepalive: Duration::from_millis(100),
            resume: false,
            ..common::opts()
        },
    )
    .unwrap();
    assert!(!live.resumable());
    let mut edu = live.open("edu0").unwrap();
    let _frozen = frozen_holder(s.endpoint());
    assert_eq!(s.stats().open_devices, 2);
    let t = Instant::now();
    let r = s.wait_stats(Duration::from_secs(5), |st| st.open_devices == 1);
    assert!(r.is_ok(), "the frozen holder kept mem0: {r:?}");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "released after {took:?}");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        edu.read32(0, 0).unwrap(),
        0x010000ed,
        "the idle pinging client still works"
    );
    // mem0 is free for the next user.
    common::bystander_works(&s);
}

/// This process's resident memory.
fn rss() -> u64 {
    cio_backend::procfs::kb("/proc/self/status", "VmRSS:").expect("VmRSS in /proc/self/status")
        << 10
}

#[test]
fn shadow_memory_is_bounded_per_session_and_in_all_and_others_are_still_served() {
    use cio_core::{DmaDir, DmaRegion};
    const MIB: u64 = 1 << 20;
    let s = common::server_with(
        None,
        Limits {
            max_mapped_bytes: 48 * MIB,
            max_mapped_total: 64 * MIB,
            ..Limits::default()
        },
    );
    let before = rss();
    let hog = common::connect(s.endpoint());
    let mut m = hog.open("mem0").unwrap();
    // Maps and touches (pushes) its whole share: 48 MiB in 3 mappings.
    let mut regions = Vec::new();
    for i in 0..3u64 {
        let r = Arc::new(DmaRegion::new(i << 32, 16 * MIB, DmaDir::ToDevice).unwrap());
        m.dma_map(Arc::clone(&r)).unwrap();
        r.with_mut(0, (16 * MIB) as usize, |b| b.fill(0x5a))
            .unwrap();
        regions.push(r);
    }
    m.read32(0, 0).unwrap(); // the fence pushes every dirty page
                             // One byte more is refused, naming the session's limit.
    let extra = Arc::new(DmaRegion::new(3 << 32, 4096, DmaDir::ToDevice).unwrap());
    let e = m.dma_map(Arc::clone(&extra)).unwrap_err().to_string();
    assert!(e.contains("max_mapped_bytes"), "{e}");
    assert_eq!(s.stats().shadow_bytes, 48 * MIB);

    // A second client gets what is left of the total, then is refused
    // naming the total, and is otherwise served as usual.
    let other = common::connect(s.endpoint());
    let mut e0 = other.open("edu0").unwrap();
    let r = Arc::new(DmaRegion::new(1 << 32, 16 * MIB, DmaDir::ToDevice).unwrap());
    e0.dma_map(Arc::clone(&r)).unwrap();
    let more = Arc::new(DmaRegion::new(2 << 32, 4096, DmaDir::ToDevice).unwrap());
    let e = e0.dma_map(more).unwrap_err().to_string();
    assert!(e.contains("max_mapped_total"), "{e}");
    assert_eq!(e0.read32(0, 0).unwrap(), 0x010000ed);
    assert!(s.stats().shadow_bytes <= 64 * MIB);
    // The daemon's memory grew by the shadow it committed (48 MiB) and
    // the test's own copies (48 MiB), not more.
    let grown = rss().saturating_sub(before);
    assert!(grown < 140 * MIB, "RSS grew by {} MiB", grown >> 20);

    // Unmapping gives the space back to everyone.
    for r in &regions {
        m.dma_unmap(r.iova()).unwrap();
    }
    let again = Arc::new(DmaRegion::new(2 << 32, 16 * MIB, DmaDir::ToDevice).unwrap());
    e0.dma_map(again).unwrap();
}

#[test]
fn replies_queued_for_clients_that_do_not_read_are_bounded_in_all() {
    const KIB: usize = 1 << 10;
    let s = common::server_with(
        None,
        Limits {
            max_sessions: 4,
            max_queued_total: 1024 * KIB,
            ..Limits::default()
        },
    );
    // Three clients ask for 64 KiB pongs and never read them: without the
    // total each could queue 32 MiB.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..3)
        .map(|_| {
            let mut raw = common::Raw::ready(s.endpoint());
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                raw.conn
                    .set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let ping = Message::Ping {
                    payload: vec![7u8; 64 * KIB].into(),
                };
                for _ in 0..200 {
                    raw.out.push(&ping, 0);
                    if raw
                        .out
                        .write_to(&raw.conn, Some(Duration::from_millis(200)))
                        .is_err()
                        || stop.load(Ordering::Relaxed)
                    {
                        break;
                    }
                }
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                drop(raw);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let queued = s.stats().queued_bytes;
    // Past the total each hog stops at its fair share (256 KiB); sessions
    // reading at the same moment overshoot by a few replies each. Without
    // the total each could hold 32 MiB.
    assert!(
        queued <= 1024 * KIB + 3 * 256 * KIB,
        "{} KiB queued in all",
        queued / KIB
    );
    // And a fourth client is served at once.
    let t = Instant::now();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    assert_eq!(d.read32(0, 0).unwrap(), 0x010000ed);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
}
