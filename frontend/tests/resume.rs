//! Sessions that survive their connection: a proxy between client and
//! backend cuts the link (resets and silent drops) while a workload of
//! posted writes, reads, interrupts and DMA both ways runs; afterwards every
//! count is exact. Also: grace expiry, refused resumes, resume time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_backend::models::memory::{reg, CMD_FROM_MEMORY, CMD_IRQ, CMD_TO_MEMORY};
use cio_backend::{Limits, ServerHandle};
use cio_core::wire::{ErrorCode, Message, FEATURES};
use cio_core::{Device, DmaDir, DmaRegion, EventFd, IrqKind};
use cio_frontend::{Client, ClientError, ClientOptions, RemoteDevice};
use cio_transports::{Endpoint, ResumeKey, Side};
use common::proxy::{Cut, Proxy};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const BAR0: u32 = 0;
const BAR2: u32 = 2;
/// A word the test writes once at the start: reads back only if the
/// device was never reset.
const MARKER: u64 = 0xf_fff0;
const MARK: u32 = 0x5eed_cafe;

fn limits() -> Limits {
    Limits {
        resume_grace: Duration::from_secs(20),
        link_timeout: Duration::from_secs(2),
        ..Limits::default()
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        reply_timeout: Duration::from_secs(20),
        keepalive: Duration::from_millis(50),
        resume_timeout: Duration::from_secs(15),
        ..ClientOptions::default()
    }
}

fn connect(ep: &Endpoint) -> Client {
    let c = Client::connect(ep, opts()).unwrap();
    assert!(c.resumable(), "both sides speak protocol 2");
    c
}

/// Waits for one interrupt on `fd` and returns how many were signalled.
fn wait_irq(fd: &EventFd) -> u64 {
    cio_frontend::drivers::edu::wait_eventfd(fd, Duration::from_secs(20)).expect("an interrupt")
}

fn pattern(round: u32, len: usize) -> Vec<u8> {
    let mut x = u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// xorshift for cut timings: the same points every run.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

const MIN_ROUNDS: u32 = 200;
/// Cuts the workload must go through.
const CUTS: u32 = 40;
const SPAN: u64 = 8192;
const TX_IOVA: u64 = 0x10_0000;
const RX_IOVA: u64 = 0x20_0000;

/// One round: the device copies target memory into BAR0 (DMA from the
/// target), 32 posted counter writes, then copies BAR0 back into a second
/// buffer and raises MSI 0 (DMA to the target, then an interrupt).
fn round(m: &mut RemoteDevice, tx: &DmaRegion, rx: &DmaRegion, fd: &EventFd, r: u32) {
    let data = pattern(r, SPAN as usize);
    tx.write(0, &data).unwrap();
    let bar_off = 0x1_0000 + u64::from(r % 8) * SPAN;
    m.write64(BAR2, reg::DMA_ADDR, TX_IOVA).unwrap();
    m.write64(BAR2, reg::BAR_OFFSET, bar_off).unwrap();
    m.write64(BAR2, reg::LEN, SPAN).unwrap();
    m.write64(BAR2, reg::CMD, CMD_FROM_MEMORY).unwrap();
    for j in 0..32u32 {
        m.write32(BAR0, u64::from(j) * 4, r * 32 + j).unwrap();
    }
    m.write64(BAR2, reg::DMA_ADDR, RX_IOVA).unwrap();
    m.write64(BAR2, reg::CMD, CMD_TO_MEMORY | CMD_IRQ).unwrap();
    assert_eq!(wait_irq(fd), 1, "round {r}: exactly one interrupt");
    m.sync_for_cpu(RX_IOVA, SPAN).unwrap();
    let mut got = vec![0; SPAN as usize];
    rx.read(0, &mut got).unwrap();
    assert!(
        got == data,
        "round {r}: DMA bytes differ after the round trip"
    );
    if r % 10 == 9 {
        let done = m.read64(BAR2, reg::COMPLETED).unwrap();
        assert_eq!(
            done,
            2 * u64::from(r + 1),
            "round {r}: commands run exactly once"
        );
        for j in 0..32u32 {
            let v = m.read32(BAR0, u64::from(j) * 4).unwrap();
            assert_eq!(
                v,
                r * 32 + j,
                "round {r}: counter {j} (lost, doubled or reordered write)"
            );
        }
    }
}

fn setup(c: &Client) -> (RemoteDevice, Arc<DmaRegion>, Arc<DmaRegion>, EventFd) {
    let mut m = c.open("mem0").unwrap();
    m.write32(BAR0, MARKER, MARK).unwrap();
    let tx = Arc::new(DmaRegion::new(TX_IOVA, SPAN, DmaDir::ToDevice).unwrap());
    let rx = Arc::new(DmaRegion::new(RX_IOVA, SPAN, DmaDir::FromDevice).unwrap());
    m.dma_map(Arc::clone(&tx)).unwrap();
    m.dma_map(Arc::clone(&rx)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    m.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
        .unwrap();
    (m, tx, rx, fd)
}

fn wait_for(s: &ServerHandle, what: &str, pred: impl Fn(&cio_backend::Stats) -> bool) {
    let r = s.wait_stats(Duration::from_secs(30), pred);
    assert!(r.is_ok(), "{what}: {:?}", r.unwrap_err());
}

#[test]
fn a_workload_survives_cuts_with_nothing_lost_doubled_or_reset() {
    let s = common::server_with(None, limits());
    let proxy = Arc::new(Proxy::start(s.endpoint()));
    let c = connect(&proxy.endpoint());
    let (mut m, tx, rx, fd) = setup(&c);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutter = {
        let (proxy, done) = (Arc::clone(&proxy), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut rng = Lcg(7);
            let (mut resets, mut silent) = (0, 0);
            let end = Instant::now() + Duration::from_secs(120);
            while resets + silent < CUTS && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5 + rng.below(60)));
                let how = if rng.below(3) == 0 {
                    Cut::Silent
                } else {
                    Cut::Reset
                };
                if proxy.cut(how) > 0 {
                    match how {
                        Cut::Reset => resets += 1,
                        Cut::Silent => silent += 1,
                    }
                }
                // Let it come back before the next cut now and then.
                if rng.below(2) == 0 {
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (resets, silent)
        })
    };
    // Rounds go on until the cutter is through its schedule.
    let mut rounds = 0;
    while rounds < MIN_ROUNDS || !done.load(std::sync::atomic::Ordering::Relaxed) {
        round(&mut m, &tx, &rx, &fd, rounds);
        rounds += 1;
    }
    let (resets, silent) = cutter.join().unwrap();
    println!(
        "{resets} resets and {silent} silent drops during {rounds} rounds; {} connections",
        proxy.accepted()
    );
    assert!(
        resets >= 20 && silent >= 8,
        "too few cuts to mean anything: {resets} resets, {silent} silent"
    );
    // Totals: every command once, every interrupt once, nothing late.
    let completed = m.read64(BAR2, reg::COMPLETED).unwrap();
    assert_eq!(completed, 2 * u64::from(rounds));
    assert_eq!(
        m.irq_events(),
        u64::from(rounds),
        "interrupt frames delivered"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(fd.read().is_err(), "no interrupt after the last one");
    assert_eq!(
        m.read32(BAR0, MARKER).unwrap(),
        MARK,
        "the device was reset"
    );
    let st = s.stats();
    assert!(st.resumes >= (resets + silent) as u64 / 2, "resumes {st:?}");
    assert_eq!(st.sessions, 1, "one session all along: {st:?}");
    drop(m);
    drop(c);
    common::assert_idle(&s);
}

#[test]
fn resume_time_after_a_cut() {
    let s = common::server_with(None, limits());
    let proxy = Proxy::start(s.endpoint());
    let c = connect(&proxy.endpoint());
    let mut m = c.open("mem0").unwrap();
    let mut times = Vec::new();
    for i in 0..25u32 {
        // The write is posted and leaves at once; the reset follows before
        // the backend could answer anything, so the read after it needs
        // the new connection (and the write, replayed or not, applied).
        m.write32(BAR0, 0x100, i).unwrap();
        assert_eq!(proxy.cut(Cut::Reset), 1);
        let cut = Instant::now();
        assert_eq!(m.read32(BAR0, 0x100).unwrap(), i);
        times.push(cut.elapsed());
    }
    times.sort();
    println!(
        "resume after a reset (resets sent to both ends -> first read answered on the new link), 25 cuts: median {:?}, min {:?}, max {:?}",
        times[12], times[0], times[24]
    );
    assert_eq!(s.stats().resumes, 25);
}

#[test]
fn grace_expiry_releases_the_device_as_a_goodbye_would() {
    let s = common::server_with(
        None,
        Limits {
            resume_grace: Duration::from_millis(500),
            ..limits()
        },
    );
    let proxy = Proxy::start(s.endpoint());
    let c = Client::connect(
        &proxy.endpoint(),
        ClientOptions {
            resume_timeout: Duration::from_secs(2),
            ..opts()
        },
    )
    .unwrap();
    let mut m = c.open("mem0").unwrap();
    m.write32(BAR0, MARKER, MARK).unwrap();
    m.flush().unwrap();
    proxy.refuse(true);
    proxy.cut(Cut::Silent);
    wait_for(&s, "parked", |st| st.parked == 1);
    wait_for(&s, "released after the grace period", |st| {
        st.parked == 0 && st.open_devices == 0 && st.sessions == 0
    });
    // The client gives up with a clear error.
    let e = m.read32(BAR0, MARKER).unwrap_err().to_string();
    assert!(e.contains("resum"), "{e}");
    // Released exactly as today: reset, so the next user sees no marker.
    let other = common::connect(s.endpoint());
    let mut m2 = other.open("mem0").unwrap();
    assert_eq!(m2.read32(BAR0, MARKER).unwrap(), 0);
}

/// A protocol-2 handshake by hand, so the test knows the resume key.
struct Hand {
    raw: common::Raw,
    session: u64,
    key: ResumeKey,
}

fn hand_session(ep: &Endpoint) -> Hand {
    let mut raw = common::Raw::connect(ep);
    let nonce = [3u8; 32];
    raw.send(&Message::Hello {
        version: 2,
        features: FEATURES,
        session: 0,
        nonce,
        client: "by hand".into(),
    });
    let Some(cio_core::Frame {
        msg:
            Message::Welcome {
                session,
                nonce: server,
                features,
                ..
            },
        ..
    }) = raw.recv()
    else {
        panic!("no Welcome")
    };
    assert_ne!(features & cio_core::wire::FEATURE_RESUME, 0);
    let key = ResumeKey::derive(None, &nonce, &server, session);
    Hand { raw, session, key }
}

/// Hello naming `session` on a new connection; returns it and the server nonce.
fn resume_hello(ep: &Endpoint, session: u64, nonce: [u8; 32]) -> (common::Raw, [u8; 32]) {
    let mut raw = common::Raw::connect(ep);
    raw.send(&Message::Hello {
        version: 2,
        features: FEATURES,
        session,
        nonce,
        client: "resumer".into(),
    });
    match raw.recv().map(|f| f.msg) {
        Some(Message::Welcome {
            nonce: server,
            session: s,
            ..
        }) => {
            assert_eq!(s, session);
            (raw, server)
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[test]
fn wrong_replayed_or_unknown_resumes_are_refused_and_the_owner_keeps_working() {
    let s = common::server_with(None, limits());
    let ep = s.endpoint().clone();
    let mut owner = hand_session(&ep);
    let h = owner.raw.open("mem0");
    // Unknown session.
    let mut raw = common::Raw::connect(&ep);
    raw.send(&Message::Hello {
        version: 2,
        features: FEATURES,
        session: owner.session ^ 1,
        nonce: [1; 32],
        client: "guess".into(),
    });
    let (_, why) = raw.expect_error(ErrorCode::STATE);
    assert!(why.contains("no session"), "{why}");
    // A wrong proof.
    let (mut raw, _) = resume_hello(&ep, owner.session, [4; 32]);
    raw.send(&Message::Resume {
        received: 0,
        mac: [0; 32],
    });
    let (_, why) = raw.expect_error(ErrorCode::AUTH_FAILED);
    assert!(why.contains("did not verify"), "{why}");
    // A proof captured from one connection, replayed on another (whose
    // server nonce differs).
    let c = [5u8; 32];
    let (first, server) = resume_hello(&ep, owner.session, c);
    let mac = owner.key.proof(Side::Client, &c, &server, owner.session, 0);
    let (mut second, _) = resume_hello(&ep, owner.session, c);
    second.send(&Message::Resume { received: 0, mac });
    second.expect_error(ErrorCode::AUTH_FAILED);
    drop(first);
    // Through every refusal the owner kept working.
    owner.raw.send(&Message::RegionRead {
        handle: h,
        region: 0,
        offset: 0,
        len: 4,
    });
    assert!(matches!(
        owner.raw.recv().unwrap().msg,
        Message::ReadData { .. }
    ));
    // A right proof with a resume point the server never reached: the
    // session cannot go on and ends (its device released).
    let (mut raw, server) = resume_hello(&ep, owner.session, c);
    let mac = owner
        .key
        .proof(Side::Client, &c, &server, owner.session, 1 << 40);
    raw.send(&Message::Resume {
        received: 1 << 40,
        mac,
    });
    assert!(raw.recv().is_none(), "no Resumed for an impossible point");
    wait_for(&s, "the session ended", |st| {
        st.sessions == 0 && st.open_devices == 0
    });
    common::bystander_works(&s);
}

#[test]
fn a_resume_replays_exactly_what_the_peer_did_not_receive() {
    // By hand, frame by frame: requests sent on a link that dies before
    // the answers arrive are answered on the new link, once.
    let s = common::server_with(None, limits());
    let ep = s.endpoint().clone();
    let mut owner = hand_session(&ep);
    let h = owner.raw.open("mem0"); // frames 2 (Open) and reply
                                    // Posted write (frame 3), then a read (frame 4) whose reply we never read.
    owner.raw.send(&Message::RegionWrite {
        handle: h,
        region: 0,
        offset: 0x40,
        data: bytes::Bytes::from_static(&[1, 2, 3, 4]),
    });
    let read = owner.raw.send(&Message::RegionRead {
        handle: h,
        region: 0,
        offset: 0x40,
        len: 4,
    });
    std::thread::sleep(Duration::from_millis(100));
    owner.raw.conn.shutdown().unwrap();
    wait_for(&s, "parked", |st| st.parked == 1);
    // We received Welcome (1) and Opened (2) from the server.
    let c = [8u8; 32];
    let (mut raw, server) = resume_hello(&ep, owner.session, c);
    let mac = owner.key.proof(Side::Client, &c, &server, owner.session, 2);
    raw.send(&Message::Resume { received: 2, mac });
    let f = raw.recv().unwrap();
    let Message::Resumed { received, .. } = f.msg else {
        panic!("expected Resumed, got {f:?}")
    };
    assert_eq!(received, read, "the server handled every frame we sent");
    // Now in the session's numbering: the read's reply, frame 3.
    raw.dec.set_next_seq(3);
    let f = raw.recv().unwrap();
    assert_eq!((f.seq, f.reply_to), (3, read));
    assert!(matches!(&f.msg, Message::ReadData { data } if data[..] == [1, 2, 3, 4]));
    // Our next frame continues our numbering (after the read).
    raw.out = cio_transports::OutQueue::starting_at(read + 1);
    raw.send(&Message::Ping {
        payload: bytes::Bytes::from_static(b"x"),
    });
    let f = raw.recv().unwrap();
    assert!(matches!(f.msg, Message::Pong { .. }), "{f:?}");
    assert_eq!(s.stats().resumes, 1);
}

#[test]
fn version_1_clients_keep_plain_sessions() {
    let s = common::server_with(None, limits());
    let mut raw = common::Raw::connect(s.endpoint());
    raw.send(&Message::Hello {
        version: 1,
        features: FEATURES,
        session: 0,
        nonce: [0; 32],
        client: "old".into(),
    });
    match raw.recv().unwrap().msg {
        Message::Welcome {
            version, features, ..
        } => {
            assert_eq!(version, 1);
            assert_eq!(features & cio_core::wire::FEATURE_RESUME, 0);
        }
        m => panic!("{m:?}"),
    }
    raw.open("mem0");
    raw.conn.shutdown().unwrap();
    // Not parked: released at once, as before.
    common::assert_idle(&s);
    assert_eq!(s.stats().parked, 0);
    // And a server with no grace period keeps no session.
    let s = common::server_with(
        None,
        Limits {
            resume_grace: Duration::ZERO,
            ..limits()
        },
    );
    let c = Client::connect(s.endpoint(), opts()).unwrap();
    assert!(!c.resumable());
    let _: Option<ClientError> = None;
}

#[test]
fn bulk_device_writes_far_above_the_queue_limit_keep_a_resumable_session_alive() {
    // The backend queues far more DMA data than its queue limit at once and
    // stops reading (so sees no Ack) until the queue drains; DMA data is
    // kept as references to the shadow, so that is no reason to end.
    let s = common::server_with(None, limits());
    let c = connect(s.endpoint());
    let mut m = c.open("mem0").unwrap();
    const BIG: u64 = 96 << 20;
    let rx = Arc::new(DmaRegion::new(RX_IOVA, BIG, DmaDir::FromDevice).unwrap());
    m.dma_map(Arc::clone(&rx)).unwrap();
    m.write32(BAR0, 0x80, 0x1234_5678).unwrap();
    m.write64(BAR2, reg::BAR_OFFSET, 0).unwrap();
    m.write64(BAR2, reg::LEN, 1 << 20).unwrap();
    for round in 0..2u64 {
        for i in 0..BIG >> 20 {
            m.write64(BAR2, reg::DMA_ADDR, RX_IOVA + (i << 20)).unwrap();
            m.write64(BAR2, reg::CMD, CMD_TO_MEMORY).unwrap();
        }
        m.sync_for_cpu(RX_IOVA, BIG).unwrap();
        let mut w = [0u8; 4];
        rx.read(BIG - (1 << 20) + 0x80, &mut w).unwrap();
        assert_eq!(u32::from_le_bytes(w), 0x1234_5678, "round {round}");
    }
    assert_eq!(s.stats().sessions, 1, "the session is still there");
}
