//! Malformed and hostile input: each case gets a clear error or a clean
//! session end, and the daemon keeps serving everyone else.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use cio_backend::Limits;
use cio_core::wire::{kind, ErrorCode, Message, HEADER_LEN};
use cio_core::{Device, DeviceError, DmaDir, DmaRegion, PAGE_SIZE};
use cio_frontend::{Client, ClientError, ClientOptions};
use cio_transports::Psk;
use common::Raw;

fn header(len: u32, kind: u16, seq: u64) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32_le(len);
    b.put_u16_le(kind);
    b.put_u16_le(0);
    b.put_u64_le(seq);
    b.put_u64_le(0);
    b
}

#[test]
fn truncated_frame_then_close_ends_only_that_session() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut held = c.open("edu0").unwrap();
    let mut raw = Raw::ready(s.endpoint());
    let mut f = header(100, kind::PING, 2);
    f.put_slice(&[0; 10]);
    raw.send_bytes(&f);
    raw.conn.shutdown().unwrap();
    s.wait_stats(Duration::from_secs(5), |st| st.protocol_errors == 1)
        .expect("counted as a protocol error");
    // The other session and its device are untouched.
    assert_eq!(held.read32(0, 0).unwrap(), 0x010000ed);
    common::bystander_works(&s);
}

#[test]
fn body_shorter_than_its_fields_is_malformed() {
    let s = common::server();
    let mut raw = Raw::ready(s.endpoint());
    let mut f = header(2, kind::RESET, 2);
    f.put_slice(&[1, 0]);
    raw.send_bytes(&f);
    let (_, msg) = raw.expect_error(ErrorCode::MALFORMED);
    assert!(msg.contains("truncated") && msg.contains("handle"), "{msg}");
    raw.expect_closed();
    common::bystander_works(&s);
}

#[test]
fn oversized_length_is_refused_without_waiting_for_the_body() {
    let s = common::server();
    let mut raw = Raw::ready(s.endpoint());
    raw.send_bytes(&header(u32::MAX, kind::DMA_DATA, 2));
    let (_, msg) = raw.expect_error(ErrorCode::MALFORMED);
    assert!(msg.contains("exceeds"), "{msg}");
    raw.expect_closed();
    common::bystander_works(&s);
}

#[test]
fn unknown_message_type_is_refused() {
    let s = common::server();
    let mut raw = Raw::ready(s.endpoint());
    raw.send_bytes(&header(0, 0x6666, 2));
    let (_, msg) = raw.expect_error(ErrorCode::MALFORMED);
    assert!(msg.contains("unknown message type 0x6666"), "{msg}");
    raw.expect_closed();
    common::bystander_works(&s);
}

#[test]
fn server_only_messages_from_a_client_are_refused() {
    let s = common::server();
    let mut raw = Raw::ready(s.endpoint());
    raw.send(&Message::Irq {
        handle: 1,
        kind: cio_core::IrqKind::Msi,
        vector: 0,
    });
    raw.expect_error(ErrorCode::UNKNOWN_MESSAGE);
    raw.expect_closed();
}

#[test]
fn requests_before_the_handshake_are_refused() {
    let s = common::server();
    let mut raw = Raw::connect(s.endpoint());
    raw.send(&Message::Open {
        name: "edu0".into(),
    });
    let (_, msg) = raw.expect_error(ErrorCode::STATE);
    assert!(msg.contains("expected Hello"), "{msg}");
    raw.expect_closed();
    assert!(!s.stats().open_devices > 0);
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_timeout() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let s = common::server_with(None, limits);
    let start = Instant::now();
    let mut raw = Raw::connect(s.endpoint());
    let (_, msg) = raw.expect_error(ErrorCode::STATE);
    assert!(msg.contains("timed out"), "{msg}");
    raw.expect_closed();
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn out_of_range_and_odd_accesses_get_errors_and_the_session_goes_on() {
    let s = common::server();
    let mut raw = Raw::ready(s.endpoint());
    let h = raw.open("edu0");
    let read = |offset: u64, len: u32| Message::RegionRead {
        handle: h,
        region: 0,
        offset,
        len,
    };
    let cases = [
        (read(1 << 20, 4), "past the end"),
        (read(u64::MAX - 3, 4), "past the end"),
        (read(0, 3), "does not accept 3-byte"),
        (read(0, 2), "does not accept 2-byte"),
        (read(2, 4), "not aligned"),
        (
            Message::RegionRead {
                handle: h,
                region: 5,
                offset: 0,
                len: 4,
            },
            "no region 5",
        ),
        (
            Message::RegionRead {
                handle: 99,
                region: 0,
                offset: 0,
                len: 4,
            },
            "handle 99",
        ),
    ];
    for (m, want) in cases {
        let seq = raw.send(&m);
        let code = if want.starts_with("handle") {
            ErrorCode::BAD_HANDLE
        } else {
            ErrorCode::ACCESS
        };
        let (reply_to, msg) = raw.expect_error(code);
        assert_eq!(reply_to, seq);
        assert!(msg.contains(want), "{want}: {msg}");
    }
    // A posted write past the end is reported asynchronously against its
    // own sequence number.
    let seq = raw.send(&Message::RegionWrite {
        handle: h,
        region: 0,
        offset: 1 << 20,
        data: Bytes::from_static(&[0; 4]),
    });
    let (reply_to, msg) = raw.expect_error(ErrorCode::ACCESS);
    assert_eq!(reply_to, seq);
    assert!(msg.contains("past the end"), "{msg}");
    // Still serving this session.
    raw.send(&read(0, 4));
    match raw.recv().unwrap().msg {
        Message::ReadData { data } => assert_eq!(&data[..], &0x010000edu32.to_le_bytes()),
        m => panic!("{m:?}"),
    }
}

#[test]
fn remote_device_checks_accesses_before_sending() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    assert!(matches!(
        d.read(0, 1 << 20, &mut [0; 8]),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write(0, 1, &[0; 4]),
        Err(DeviceError::Unaligned { .. })
    ));
    assert!(matches!(
        d.read(9, 0, &mut [0; 4]),
        Err(DeviceError::NoRegion(9))
    ));
}

#[test]
fn overlapping_dma_maps_are_refused_on_both_sides() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    d.dma_map(Arc::new(
        DmaRegion::new(0x10_0000, 4 * PAGE_SIZE, DmaDir::Bidirectional).unwrap(),
    ))
    .unwrap();
    let e = d
        .dma_map(Arc::new(
            DmaRegion::new(0x10_3000, 2 * PAGE_SIZE, DmaDir::ToDevice).unwrap(),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("dma mapping"), "{e}");
    assert!(format!("{:?}", e).contains("Overlap"), "{e:?}");

    // The backend refuses it too, for a client that does not check.
    let mut raw = Raw::ready(s.endpoint());
    let h = raw.open("mem0");
    let map = |iova: u64, len: u64| Message::DmaMap {
        handle: h,
        iova,
        len,
        dir: DmaDir::Bidirectional,
        posted: false,
    };
    raw.send(&map(0x1000, 0x4000));
    assert_eq!(raw.recv().unwrap().msg, Message::Ok);
    raw.send(&map(0x4000, 0x1000));
    let (_, msg) = raw.expect_error(ErrorCode::DMA);
    assert!(msg.contains("overlaps the mapping at 0x1000"), "{msg}");
    raw.send(&map(0x8001, 0x1000));
    let (_, msg) = raw.expect_error(ErrorCode::DMA);
    assert!(msg.contains("multiples of 4096"), "{msg}");
    raw.send(&map(0x10_0000, 1 << 50));
    let (_, msg) = raw.expect_error(ErrorCode::LIMIT);
    assert!(msg.contains("dma limit"), "{msg}");
    // Pushing data outside any mapping is reported, and the session goes on.
    let seq = raw.send(&Message::DmaData {
        handle: h,
        iova: 0x9000,
        data: Bytes::from_static(&[1; 8]),
    });
    let (reply_to, msg) = raw.expect_error(ErrorCode::DMA);
    assert_eq!(reply_to, seq);
    assert!(msg.contains("not inside a mapping"), "{msg}");
    raw.send(&Message::Ping {
        payload: Bytes::new(),
    });
    assert!(matches!(raw.recv().unwrap().msg, Message::Pong { .. }));
}

fn psk(k: &[u8]) -> Psk {
    Psk::new(k.to_vec()).unwrap()
}

#[test]
fn wrong_or_missing_keys_are_refused_before_any_device_is_visible() {
    let s = common::server_with(Some(psk(common::KEY)), Limits::default());
    let with = |key: Option<Psk>| {
        Client::connect(
            s.endpoint(),
            ClientOptions {
                psk: key,
                ..common::opts()
            },
        )
    };
    let e = with(Some(psk(b"not-the-right-key-at-all"))).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Server {
                code: ErrorCode::AUTH_FAILED,
                ..
            }
        ),
        "{e}"
    );
    let e = with(None).unwrap_err();
    assert!(matches!(e, ClientError::KeyRequired), "{e}");

    // A raw client that skips the proof and asks for the device list.
    let mut raw = Raw::connect(s.endpoint());
    raw.send(&Message::Hello {
        version: 1,
        features: 0,
        session: 0,
        nonce: [0; 32],
        client: "raw".into(),
    });
    assert!(matches!(raw.recv().unwrap().msg, Message::Welcome { .. }));
    raw.send(&Message::ListDevices);
    raw.expect_error(ErrorCode::AUTH_REQUIRED);
    raw.expect_closed();

    let c = with(Some(psk(common::KEY))).unwrap();
    assert_eq!(c.list().unwrap().len(), 2);

    // A client with a key refuses a backend that does not ask for it.
    let open = common::server();
    let e = Client::connect(
        open.endpoint(),
        ClientOptions {
            psk: Some(psk(common::KEY)),
            ..common::opts()
        },
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::ServerNotAuthenticated), "{e}");
    s.wait_stats(Duration::from_secs(5), |st| st.protocol_errors >= 2)
        .expect("failed proofs are protocol errors");
}

#[test]
fn non_loopback_listen_without_key_is_refused() {
    let e = cio_backend::Server::bind(cio_backend::ServerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        psk: None,
        devices: vec![],
        limits: Limits::default(),
        usb: Default::default(),
        security: cio_backend::Security::InsecurePlaintext,
    })
    .unwrap_err();
    assert!(e.to_string().contains("without a pre-shared key"), "{e}");
}

#[test]
fn client_vanishing_mid_request_releases_its_device() {
    let s = common::server();
    {
        let mut raw = Raw::ready(s.endpoint());
        let h = raw.open("edu0");
        raw.send(&Message::DmaMap {
            handle: h,
            iova: 0x10_0000,
            len: 0x10_0000,
            dir: DmaDir::Bidirectional,
            posted: false,
        });
        // A read request, then gone before the reply.
        raw.send(&Message::RegionRead {
            handle: h,
            region: 0,
            offset: 0,
            len: 4,
        });
    }
    common::assert_idle(&s);
    let c = common::connect(s.endpoint());
    c.open("edu0")
        .expect("device released by the vanished session");
}

#[test]
fn backend_vanishing_mid_request_gives_the_caller_an_error() {
    // A fake backend: handshake, open, then it dies while a read is pending.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep: cio_transports::Endpoint = l.local_addr().unwrap().into();
    let fake = std::thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        let conn = cio_transports::Conn::Tcp(sock);
        let mut dec = cio_core::FrameDecoder::new();
        let mut out = cio_transports::OutQueue::new();
        let next = |dec: &mut cio_core::FrameDecoder| loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return f;
            }
            assert!(conn.recv_into(dec.buffer(), 4096, false).unwrap() > 0);
        };
        let hello = next(&mut dec);
        out.push(
            &Message::Welcome {
                version: 1,
                features: 0,
                session: 7,
                auth: cio_core::wire::AuthMethod::None,
                nonce: [0; 32],
            },
            hello.seq,
        );
        out.write_to(&conn, Some(Duration::from_secs(5))).unwrap();
        let open = next(&mut dec);
        out.push(
            &Message::Opened {
                handle: 1,
                info: cio_backend::models::Edu::new("edu0").info().clone(),
            },
            open.seq,
        );
        out.write_to(&conn, Some(Duration::from_secs(5))).unwrap();
        let _read = next(&mut dec);
        // Half a reply, then the process "crashes".
        let mut partial = BytesMut::new();
        Message::ReadData {
            data: Bytes::from_static(&[0; 4]),
        }
        .encode(3, _read.seq, &mut partial);
        (&conn).write_all(&partial[..HEADER_LEN + 2]).unwrap();
        conn.shutdown().unwrap();
    });
    let c = Client::connect(&ep, common::opts()).unwrap();
    let mut d = c.open("edu0").unwrap();
    let start = Instant::now();
    let e = d.read32(0, 0).unwrap_err();
    assert!(matches!(e, DeviceError::Disconnected(_)), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Later calls fail the same way instead of hanging.
    assert!(matches!(d.read32(0, 0), Err(DeviceError::Disconnected(_))));
    fake.join().unwrap();
}

#[test]
fn too_many_sessions_are_refused_with_a_reason() {
    let limits = Limits {
        max_sessions: 1,
        ..Limits::default()
    };
    let s = common::server_with(None, limits);
    let _first = common::connect(s.endpoint());
    let e = Client::connect(s.endpoint(), common::opts()).unwrap_err();
    assert!(e.to_string().contains("maximum of 1 sessions"), "{e}");
}

#[test]
fn random_bytes_after_the_handshake_end_only_that_session() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut held = c.open("edu0").unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..40 {
        let mut raw = Raw::ready(s.endpoint());
        let len = 1 + (round * 37) % 300;
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        raw.send_bytes(&junk);
        let _ = raw.conn.shutdown();
        // Whatever the bytes were, the server answers with at most an error
        // and closes; it never wedges or dies.
        while raw.recv().is_some() {}
    }
    common::assert_idle_except(&s, 1);
    held.write32(0, 0x04, 7).unwrap();
    assert_eq!(held.read32(0, 0x04).unwrap(), !7);
    common::bystander_works(&s);
}

#[test]
fn bulk_requests_past_their_limits_or_the_region_are_refused() {
    let s = common::server();
    let mut raw = Raw::ready(s.endpoint());
    let h = raw.open("edu0");
    // Inside the limits but not the region, or not made of edu's dwords:
    // errors, and the session goes on.
    for (offset, len) in [((1 << 20) - 8, 16u32), (2, 8), (0, 6)] {
        raw.send(&Message::RegionReadBulk {
            handle: h,
            region: 0,
            offset,
            len,
        });
        let (_, msg) = raw.expect_error(ErrorCode::ACCESS);
        assert!(!msg.is_empty());
    }
    raw.send(&Message::RegionReadBulk {
        handle: h,
        region: 0,
        offset: 0,
        len: 8,
    });
    match raw.recv().expect("reply").msg {
        Message::ReadData { data } => assert_eq!(&data[..4], &0x010000edu32.to_le_bytes()),
        m => panic!("{m:?}"),
    }
    // Past MAX_BULK: malformed, the session ends, others are served.
    let mut f = header(20, kind::REGION_READ_BULK, raw.out.next_seq());
    f.put_u32_le(h);
    f.put_u32_le(0);
    f.put_u64_le(0);
    f.put_u32_le(cio_core::wire::MAX_BULK as u32 + 1);
    raw.send_bytes(&f);
    let (_, msg) = raw.expect_error(ErrorCode::MALFORMED);
    assert!(msg.contains("len"), "{msg}");
    raw.expect_closed();
    common::bystander_works(&s);
}
