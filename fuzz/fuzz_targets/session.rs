//! A whole in-process session driven from bytes: a real `Session` thread
//! with an emulated edu and memory device on one end of a socket pair, and
//! on the other a client that sends a valid `Hello` and then the input as
//! frames (type and body from the input, sequence numbers counted by the
//! harness, so the bodies reach the request handlers) or, when the first
//! byte says so, as raw stream bytes. Whatever comes, the session must end
//! by itself once the client closes its side (no panic, no hang), and give
//! every device back to the registry.
#![no_main]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cio_backend::models::{Edu, Memory};
use cio_backend::registry::Registry;
use cio_backend::session::{Session, Shared};
use cio_backend::Limits;
use cio_core::wire::{Message, HEADER_LEN, PROTOCOL_VERSION};
use cio_transports::Conn;
use libfuzzer_sys::fuzz_target;

fn frame(kind: u16, seq: u64, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&((body.len() as u32).to_le_bytes()));
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(body);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let registry = Registry::new(vec![
        Box::new(Edu::new("edu0")),
        Box::new(Memory::new("mem0", 1 << 16).expect("memory device")),
    ])
    .expect("registry");
    let limits = Limits {
        max_mapped_bytes: 1 << 24,
        max_queued_bytes: 1 << 20,
        resume_grace: Duration::ZERO,
        ..Limits::default()
    };
    let shared = Arc::new(Shared::new(
        Arc::clone(&registry),
        Default::default(),
        None,
        limits,
    ));
    let (a, b) = Conn::pair().expect("socket pair");
    let (session, _waker) = Session::new(a, shared).expect("session");
    let server = std::thread::spawn(move || session.run());

    let mut out = BytesMut::new();
    Message::Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        session: 0,
        nonce: [1; 32],
        client: "fuzz".into(),
    }
    .encode(1, 0, &mut out);
    let mut bytes = out.to_vec();
    if mode & 1 == 0 {
        // Records: kind (2 bytes), body length (1 byte), body.
        let mut seq = 2;
        let mut r = rest;
        while r.len() >= 3 {
            let kind = u16::from_le_bytes([r[0], r[1]]);
            let len = usize::from(r[2]).min(r.len() - 3);
            frame(kind, seq, &r[3..3 + len], &mut bytes);
            seq += 1;
            r = &r[3 + len..];
        }
    } else {
        bytes.extend_from_slice(rest);
    }
    debug_assert!(bytes.len() >= HEADER_LEN);

    // Read replies meanwhile, so the session is never stuck on a full socket.
    let b = Arc::new(b);
    let reader = {
        let b = Arc::clone(&b);
        std::thread::spawn(move || {
            b.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut buf = vec![0u8; 1 << 16];
            while matches!((&*b).read(&mut buf), Ok(n) if n > 0) {}
        })
    };
    let _ = (&*b).write_all(&bytes);
    let _ = b.shutdown();
    server.join().expect("the session thread panicked");
    reader.join().expect("reader");
    // Every device is back: a new open succeeds.
    for name in ["edu0", "mem0"] {
        registry
            .open(name, 1)
            .unwrap_or_else(|e| panic!("{name} still held after the session: {e}"));
    }
});
