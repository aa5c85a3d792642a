//! cio frames: a stream of bytes through the frame decoder, and single
//! message bodies through `Message::decode`. Nothing panics, and whatever
//! decodes encodes back to the same message.
#![no_main]

use bytes::{Bytes, BytesMut};
use cio_core::wire::{Message, HEADER_LEN};
use cio_core::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fn round_trip(m: &Message) {
    let mut out = BytesMut::new();
    m.encode(7, 3, &mut out);
    let body = out.split_off(HEADER_LEN).freeze();
    let again = Message::decode(m.kind(), body).expect("an encoded message decodes");
    assert_eq!(&again, m);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // One body of the message type the next two bytes name.
        if rest.len() < 2 {
            return;
        }
        let kind = u16::from_le_bytes([rest[0], rest[1]]);
        if let Ok(m) = Message::decode(kind, Bytes::copy_from_slice(&rest[2..])) {
            round_trip(&m);
        }
        return;
    }
    // A stream arriving in pieces of 1..=64 bytes; sequence numbers taken
    // from the stream itself when bit 1 is set (else they must count up).
    let step = usize::from(mode >> 2) % 64 + 1;
    let mut dec = FrameDecoder::new();
    for piece in rest.chunks(step) {
        dec.buffer().extend_from_slice(piece);
        loop {
            if mode & 2 != 0 && dec.buffer().len() >= HEADER_LEN {
                let seq = u64::from_le_bytes(dec.buffer()[8..16].try_into().expect("8 bytes"));
                dec.set_next_seq(seq);
            }
            match dec.next_frame() {
                Ok(Some(f)) => round_trip(&f.msg),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
