//! vfio-user: a byte stream through the frame splitter, and each frame
//! through the codec in both DMA layouts (the spec's and QEMU's). Nothing
//! panics, and whatever decodes encodes to bytes that decode and encode to
//! the same bytes again (the encoder may place capabilities differently
//! from the input, so the first re-encoding is a normal form).
#![no_main]

use cio_frontend::vfio_user::wire::{Codec, DmaLayout, FrameDecoder, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_msg_size: 1 << 16,
        max_data_xfer_size: 1 << 15,
    };
    let layout = if mode & 1 == 0 {
        DmaLayout::Spec
    } else {
        DmaLayout::Qemu
    };
    let codec = Codec::new(limits, layout);
    let mut split = FrameDecoder::new(limits.max_msg_size);
    let step = usize::from(mode >> 1) % 97 + 1;
    for piece in rest.chunks(step) {
        split.push(piece);
        loop {
            match split.next_frame() {
                Ok(Some((_, frame))) => {
                    if let Ok(m) = codec.decode(&frame) {
                        if let Ok(bytes) = codec.encode(&m) {
                            let again = codec.decode(&bytes).expect("encoded decodes");
                            assert_eq!(codec.encode(&again).expect("re-encodes"), bytes);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
