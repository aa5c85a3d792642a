//! USB/IP: device lists, import replies, operation and URB headers. Nothing
//! panics, and a device list that decodes encodes back to itself.
#![no_main]

use bytes::BytesMut;
use cio_core::usbip::{
    decode_devlist, encode_devlist, get_device, OpHeader, UrbHeader, OP_HEADER_LEN, URB_HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(devices) = decode_devlist(data) {
        let mut out = BytesMut::new();
        encode_devlist(&devices, &mut out);
        let body = &out[OP_HEADER_LEN..];
        assert_eq!(
            decode_devlist(body).expect("an encoded list decodes"),
            devices
        );
    }
    let mut b = data;
    let _ = get_device(&mut b);
    if let Some(h) = data.first_chunk::<OP_HEADER_LEN>() {
        if let Ok(op) = OpHeader::decode(h) {
            let mut out = BytesMut::new();
            op.encode(&mut out);
            assert_eq!(&out[..], &h[..]);
        }
    }
    if let Some(h) = data.first_chunk::<URB_HEADER_LEN>() {
        let urb = UrbHeader::decode(h);
        let mut out = BytesMut::new();
        urb.encode(&mut out);
        assert_eq!(
            UrbHeader::decode(out[..].try_into().expect("48 bytes")),
            urb
        );
    }
});
