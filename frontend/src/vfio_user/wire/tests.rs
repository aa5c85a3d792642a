use super::*;

/// A frame built by hand from the spec's header table.
fn frame(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&command.to_le_bytes());
    f.extend_from_slice(&((HEADER_SIZE + payload.len()) as u32).to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn req(id: u16, r: Request) -> Message {
    Message {
        id,
        no_reply: false,
        body: Body::Request(r),
    }
}

fn rep(id: u16, r: Reply) -> Message {
    Message {
        id,
        no_reply: false,
        body: Body::Reply(r),
    }
}

fn le(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn qemu() -> Codec {
    Codec::new(Limits::default(), DmaLayout::Qemu)
}

fn caps_full() -> Capabilities {
    Capabilities {
        max_msg_fds: Some(8),
        max_data_xfer_size: Some(1 << 20),
        pgsizes: Some(4096),
        max_dma_maps: Some(65535),
        migration: Some(MigrationCaps {
            pgsize: Some(4096),
            max_bitmap_size: Some(256 << 20),
        }),
        write_multiple: Some(true),
        twin_socket: Some(TwinSocket {
            supported: Some(false),
            fd_index: None,
        }),
    }
}

/// One of every message the codec carries, both directions.
fn every_message() -> Vec<Message> {
    let unmap = DmaUnmap {
        argsz: 24,
        flags: DMA_UNMAP_FLAG_ALL,
        address: 0,
        size: 0,
        bitmap: None,
    };
    let unmap_dirty_req = DmaUnmap {
        argsz: 48,
        flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        address: 0x1000,
        size: 0x8000,
        bitmap: Some(DirtyBitmap {
            pgsize: 4096,
            size: 8,
            data: vec![],
        }),
    };
    let mut unmap_dirty_rep = unmap_dirty_req.clone();
    if let Some(b) = unmap_dirty_rep.bitmap.as_mut() {
        b.data = vec![0xff, 0, 0, 0, 0, 0, 0, 0];
    }
    let region_info = RegionInfo {
        argsz: 32 + 8 + 8 + 32 + 16,
        flags: REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP,
        index: 0,
        cap_offset: 0,
        size: 0x4000,
        offset: 0,
        caps: vec![
            RegionCap::SparseMmap(vec![
                SparseArea {
                    offset: 0x1000,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x3000,
                    size: 0x1000,
                },
            ]),
            RegionCap::Type { ty: 1, subtype: 2 },
            RegionCap::MsixMappable,
            RegionCap::Other {
                id: 77,
                version: 3,
                data: vec![1, 2, 3],
            },
        ],
    };
    let mut v = vec![
        req(
            1,
            Request::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Some(caps_full()),
            }),
        ),
        req(
            2,
            Request::Version(Version {
                major: 1,
                minor: 2,
                capabilities: None,
            }),
        ),
        req(
            3,
            Request::DmaMap(DmaMap {
                argsz: 32,
                flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                offset: 0x2000,
                address: 0x1_0000_0000,
                size: 0x10_0000,
            }),
        ),
        req(4, Request::DmaUnmap(unmap.clone())),
        req(5, Request::DmaUnmap(unmap_dirty_req)),
        req(6, Request::DeviceGetInfo { argsz: 16 }),
        req(
            7,
            Request::DeviceGetRegionInfo {
                argsz: 4096,
                index: 7,
            },
        ),
        req(
            8,
            Request::DeviceGetIrqInfo {
                argsz: 16,
                index: 2,
            },
        ),
        req(
            9,
            Request::DeviceSetIrqs(SetIrqs {
                argsz: 20 + 4 * 3,
                action: IrqAction::Trigger,
                data: IrqData::Eventfd,
                index: 2,
                start: 0,
                count: 3,
            }),
        ),
        req(
            10,
            Request::DeviceSetIrqs(SetIrqs {
                argsz: 23,
                action: IrqAction::Mask,
                data: IrqData::Bool(vec![true, false, true]),
                index: 0,
                start: 1,
                count: 3,
            }),
        ),
        req(
            11,
            Request::DeviceSetIrqs(SetIrqs {
                argsz: 20,
                action: IrqAction::Unmask,
                data: IrqData::None,
                index: 0,
                start: 0,
                count: 0,
            }),
        ),
        req(
            12,
            Request::RegionRead(RegionAccess {
                offset: 0x10,
                region: 7,
                count: 4,
            }),
        ),
        Message {
            id: 13,
            no_reply: true,
            body: Body::Request(Request::RegionWrite(RegionData {
                offset: 0x20,
                region: 0,
                data: vec![1, 2, 3, 4],
            })),
        },
        req(
            14,
            Request::DmaRead(DmaAccess {
                address: 0x8000,
                count: 64,
            }),
        ),
        req(
            15,
            Request::DmaWrite(DmaData {
                address: 0x9000,
                data: (0..40).collect(),
            }),
        ),
        req(16, Request::DeviceReset),
        req(
            17,
            Request::RegionWriteMulti(vec![
                WriteOne {
                    offset: 0,
                    region: 0,
                    data: vec![1, 2, 3, 4, 5, 6, 7, 8],
                },
                WriteOne {
                    offset: 8,
                    region: 2,
                    data: vec![9],
                },
                WriteOne {
                    offset: 9,
                    region: 2,
                    data: vec![],
                },
            ]),
        ),
        rep(
            1,
            Reply::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Some(Capabilities {
                    max_data_xfer_size: Some(65536),
                    ..Default::default()
                }),
            }),
        ),
        rep(3, Reply::DmaMap),
        rep(4, Reply::DmaUnmap(unmap)),
        rep(5, Reply::DmaUnmap(unmap_dirty_rep)),
        rep(
            6,
            Reply::DeviceGetInfo(DeviceInfo {
                argsz: 16,
                flags: DEVICE_FLAG_RESET | DEVICE_FLAG_PCI,
                num_regions: 9,
                num_irqs: 5,
            }),
        ),
        rep(7, Reply::DeviceGetRegionInfo(region_info)),
        rep(
            7,
            Reply::DeviceGetRegionInfo(RegionInfo {
                argsz: 32,
                flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
                index: 7,
                cap_offset: 0,
                size: 256,
                offset: 0,
                caps: vec![],
            }),
        ),
        rep(
            8,
            Reply::DeviceGetIrqInfo(IrqInfo {
                argsz: 16,
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
                index: 2,
                count: 16,
            }),
        ),
        rep(9, Reply::DeviceSetIrqs),
        rep(
            12,
            Reply::RegionRead(RegionData {
                offset: 0x10,
                region: 7,
                data: vec![0x86, 0x80, 0x10, 0x11],
            }),
        ),
        rep(
            13,
            Reply::RegionWrite(RegionAccess {
                offset: 0x20,
                region: 0,
                count: 4,
            }),
        ),
        rep(
            14,
            Reply::DmaRead(DmaData {
                address: 0x8000,
                data: vec![0xaa; 64],
            }),
        ),
        rep(15, Reply::DmaWrite(None)),
        rep(
            15,
            Reply::DmaWrite(Some(DmaAccess {
                address: 0x9000,
                count: 40,
            })),
        ),
        rep(16, Reply::DeviceReset),
        rep(17, Reply::RegionWriteMulti { wr_cnt: 3 }),
        Message {
            id: 18,
            no_reply: false,
            body: Body::ErrorReply {
                command: Command::DmaMap as u16,
                errno: 17,
            },
        },
    ];
    // An error reply to a command this codec does not know keeps its number.
    v.push(Message {
        id: 19,
        no_reply: false,
        body: Body::ErrorReply {
            command: 999,
            errno: 0,
        },
    });
    v
}

/// The region info reply after encoding fills in cap_offset and FLAG_CAPS.
fn normalised(m: &Message) -> Message {
    let mut m = m.clone();
    if let Body::Reply(Reply::DeviceGetRegionInfo(i)) = &mut m.body {
        if !i.caps.is_empty() {
            i.cap_offset = 32;
            i.flags |= REGION_FLAG_CAPS;
        }
    }
    m
}

#[test]
fn header_is_sixteen_bytes_little_endian() {
    let h = Header {
        id: 0x0102,
        command: 0x0304,
        size: 0x0506_0708,
        flags: FLAG_TYPE_REPLY | FLAG_ERROR,
        error: 0x0a0b_0c0d,
    };
    let b = h.to_bytes();
    assert_eq!(
        b,
        [2, 1, 4, 3, 8, 7, 6, 5, 0x21, 0, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a]
    );
    assert_eq!(Header::parse(&b, usize::MAX).unwrap(), h);
    assert_eq!(h.kind(), Some(MsgKind::Reply));
}

#[test]
fn every_message_round_trips_in_both_layouts() {
    for codec in [Codec::default(), qemu()] {
        for m in every_message() {
            let bytes = codec.encode(&m).unwrap_or_else(|e| panic!("{m:?}: {e}"));
            let size = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            assert_eq!(size as usize, bytes.len());
            let back = codec
                .decode(&bytes)
                .unwrap_or_else(|e| panic!("{m:?}: {e}"));
            assert_eq!(back, normalised(&m), "{:?}", codec.dma_layout);
            // Re-encoding the decoded message gives the same bytes.
            assert_eq!(codec.encode(&back).unwrap(), bytes);
        }
    }
}

#[test]
fn every_message_survives_the_frame_decoder_byte_by_byte() {
    let codec = Codec::default();
    let msgs = every_message();
    let stream: Vec<u8> = msgs.iter().flat_map(|m| codec.encode(m).unwrap()).collect();
    let mut fd = FrameDecoder::new(codec.limits.max_msg_size);
    let mut got = Vec::new();
    for b in &stream {
        fd.push(std::slice::from_ref(b));
        while let Some((h, f)) = fd.next_frame().unwrap() {
            assert_eq!(h.size as usize, f.len());
            got.push(codec.decode(&f).unwrap());
        }
    }
    assert_eq!(fd.buffered(), 0);
    let want: Vec<_> = msgs.iter().map(normalised).collect();
    assert_eq!(got, want);
}

#[test]
fn frame_decoder_yields_several_frames_from_one_push() {
    let codec = Codec::default();
    let a = codec.encode(&req(1, Request::DeviceReset)).unwrap();
    let b = codec
        .encode(&req(2, Request::DeviceGetInfo { argsz: 16 }))
        .unwrap();
    let mut fd = FrameDecoder::new(4096);
    fd.push(&[a.clone(), b.clone(), b[..3].to_vec()].concat());
    assert_eq!(fd.next_frame().unwrap().unwrap().1, a);
    assert_eq!(fd.next_frame().unwrap().unwrap().1, b);
    assert!(fd.next_frame().unwrap().is_none());
    assert_eq!(fd.buffered(), 3);
}

#[test]
fn frame_decoder_refuses_oversized_header_before_its_body_and_stays_broken() {
    let mut big = frame(1, 10, 0, &[]);
    big[4..8].copy_from_slice(&1_000_000u32.to_le_bytes());
    let mut fd = FrameDecoder::new(4096);
    fd.push(&big);
    assert!(matches!(
        fd.next_frame(),
        Err(Error::TooLarge {
            size: 1_000_000,
            max: 4096
        })
    ));
    fd.push(&frame(2, 13, 0, &[]));
    assert!(matches!(fd.next_frame(), Err(Error::StreamBroken)));
}

// --- byte vectors built by hand from the spec's layout tables -------------

#[test]
fn qemu_version_request_bytes_decode() {
    // What QEMU 10.1+ sends, with an extra key a newer client might add.
    let json = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"write_multiple":true,"future_key":[1,2]}}"#;
    let payload = le(&[&0u16.to_le_bytes(), &0u16.to_le_bytes(), json, &[0]]);
    let m = Codec::default()
        .decode(&frame(0, 1, FLAG_TYPE_REQUEST, &payload))
        .unwrap();
    let Body::Request(Request::Version(v)) = m.body else {
        panic!("{m:?}")
    };
    let c = v.capabilities.unwrap();
    assert_eq!(c.max_msg_fds(), 16);
    assert_eq!(c.max_data_xfer_size(), 1 << 20);
    assert_eq!(c.pgsizes(), 4096);
    assert_eq!(c.max_dma_maps(), 65535);
    assert!(c.write_multiple());
    assert_eq!(c.migration.unwrap().max_bitmap_size, Some(256 << 20));
}

#[test]
fn version_defaults_apply_when_members_are_absent() {
    let payload = le(&[&[0, 0, 0, 0], br#"{"capabilities":{}}"#]);
    let m = Codec::default()
        .decode(&frame(0, 1, FLAG_TYPE_REPLY, &payload))
        .unwrap();
    let Body::Reply(Reply::Version(v)) = m.body else {
        panic!()
    };
    let c = v.capabilities.unwrap();
    assert_eq!(
        (
            c.max_msg_fds(),
            c.max_data_xfer_size(),
            c.pgsizes(),
            c.max_dma_maps(),
            c.write_multiple()
        ),
        (1, 1 << 20, 4096, 65535, false)
    );
    // No JSON at all, or only a NUL: no capabilities.
    for tail in [&[][..], &[0][..]] {
        let p = le(&[&[0, 0, 0, 0], tail]);
        let m = Codec::default()
            .decode(&frame(0, 1, FLAG_TYPE_REPLY, &p))
            .unwrap();
        assert_eq!(
            m.body,
            Body::Reply(Reply::Version(Version {
                major: 0,
                minor: 0,
                capabilities: None
            }))
        );
    }
}

#[test]
fn dma_map_and_unmap_bytes_decode_with_spec_flag_numbers() {
    let map = le(&[
        &32u32.to_le_bytes(),
        &3u32.to_le_bytes(),
        &0x1000u64.to_le_bytes(),
        &0xc000_0000u64.to_le_bytes(),
        &0x20_0000u64.to_le_bytes(),
    ]);
    let m = Codec::default().decode(&frame(5, 2, 0, &map)).unwrap();
    assert_eq!(
        m.body,
        Body::Request(Request::DmaMap(DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0x1000,
            address: 0xc000_0000,
            size: 0x20_0000
        }))
    );
    // UNMAP_ALL is 1 << 1 in the spec (vfio_user 0.1.7 says 1 << 2).
    let unmap = le(&[
        &24u32.to_le_bytes(),
        &2u32.to_le_bytes(),
        &0u64.to_le_bytes(),
        &0u64.to_le_bytes(),
    ]);
    let m = Codec::default().decode(&frame(6, 3, 0, &unmap)).unwrap();
    let Body::Request(Request::DmaUnmap(u)) = m.body else {
        panic!()
    };
    assert_eq!(u.flags, DMA_UNMAP_FLAG_ALL);
    assert!(u.bitmap.is_none());
    // The crate's GET_DIRTY (1 << 1 there) is UNMAP_ALL here; its UNMAP_ALL
    // (1 << 2) is no flag the spec defines.
    let mut bad = unmap.clone();
    bad[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(
        Codec::default().decode(&frame(6, 3, 0, &bad)),
        Err(Error::BadField { field: "flags", .. })
    ));
}

#[test]
fn set_irqs_eventfd_bytes_say_how_many_fds_to_expect() {
    // MSI-X (index 2), vectors 0..4, DATA_EVENTFD | ACTION_TRIGGER; QEMU's
    // argsz counts the fds as 32-bit ints although they travel out of band.
    let p = le(&[
        &(20u32 + 16).to_le_bytes(),
        &((1u32 << 2) | (1 << 5)).to_le_bytes(),
        &2u32.to_le_bytes(),
        &0u32.to_le_bytes(),
        &4u32.to_le_bytes(),
    ]);
    let m = Codec::default().decode(&frame(9, 8, 0, &p)).unwrap();
    let Body::Request(Request::DeviceSetIrqs(s)) = m.body else {
        panic!()
    };
    assert_eq!(s.action, IrqAction::Trigger);
    assert_eq!(s.data, IrqData::Eventfd);
    assert_eq!(s.expected_fds(), 4);
}

#[test]
fn posted_region_write_bytes_decode() {
    let p = le(&[
        &0x40u64.to_le_bytes(),
        &1u32.to_le_bytes(),
        &2u32.to_le_bytes(),
        &[0xef, 0xbe],
    ]);
    let m = Codec::default()
        .decode(&frame(3, 10, FLAG_NO_REPLY, &p))
        .unwrap();
    assert!(m.no_reply);
    assert_eq!(
        m.body,
        Body::Request(Request::RegionWrite(RegionData {
            offset: 0x40,
            region: 1,
            data: vec![0xef, 0xbe]
        }))
    );
}

#[test]
fn region_info_reply_with_sparse_mmap_matches_hand_layout() {
    let info = RegionInfo {
        argsz: 32 + 8 + 8 + 16,
        flags: REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP,
        index: 0,
        cap_offset: 0,
        size: 0x2000,
        offset: 0x7000_0000,
        caps: vec![RegionCap::SparseMmap(vec![SparseArea {
            offset: 0x1000,
            size: 0x1000,
        }])],
    };
    let want = frame(
        4,
        5,
        FLAG_TYPE_REPLY,
        &le(&[
            &64u32.to_le_bytes(),
            &0xfu32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &32u32.to_le_bytes(),
            &0x2000u64.to_le_bytes(),
            &0x7000_0000u64.to_le_bytes(),
            // cap header: id 1, version 1, next 0
            &1u16.to_le_bytes(),
            &1u16.to_le_bytes(),
            &0u32.to_le_bytes(),
            // nr_areas 1, reserved, one area
            &1u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &0x1000u64.to_le_bytes(),
            &0x1000u64.to_le_bytes(),
        ]),
    );
    let got = Codec::default()
        .encode(&rep(4, Reply::DeviceGetRegionInfo(info)))
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn region_info_reply_cut_short_by_argsz_has_no_caps() {
    // Flags say caps, argsz says 64 are needed, but only the structure came.
    let p = le(&[
        &64u32.to_le_bytes(),
        &REGION_FLAG_CAPS.to_le_bytes(),
        &0u32.to_le_bytes(),
        &32u32.to_le_bytes(),
        &0u64.to_le_bytes(),
        &0u64.to_le_bytes(),
    ]);
    let m = Codec::default()
        .decode(&frame(1, 5, FLAG_TYPE_REPLY, &p))
        .unwrap();
    let Body::Reply(Reply::DeviceGetRegionInfo(i)) = m.body else {
        panic!()
    };
    assert_eq!(i.argsz, 64);
    assert!(i.caps.is_empty());
}

#[test]
fn qemu_dma_layout_puts_data_at_payload_offset_12() {
    // A DMA_READ reply as QEMU builds it: size = count + 32, count is 32
    // bits at payload 8, data at payload 12, 4 zero bytes after the data.
    let p = le(&[
        &0x8000u64.to_le_bytes(),
        &4u32.to_le_bytes(),
        &[1, 2, 3, 4],
        &[0, 0, 0, 0],
    ]);
    let f = frame(14, 11, FLAG_TYPE_REPLY, &p);
    assert_eq!(f.len(), 4 + 32);
    let m = qemu().decode(&f).unwrap();
    assert_eq!(
        m.body,
        Body::Reply(Reply::DmaRead(DmaData {
            address: 0x8000,
            data: vec![1, 2, 3, 4]
        }))
    );
    // The same bytes read with the spec layout are a count mismatch, not data.
    assert!(Codec::default().decode(&f).is_err());
    // Our DMA_WRITE to QEMU: at least 32 bytes, data at message offset 28.
    let w = qemu()
        .encode(&req(
            1,
            Request::DmaWrite(DmaData {
                address: 0x10,
                data: vec![9, 8],
            }),
        ))
        .unwrap();
    assert_eq!(w.len(), 32 + 2);
    assert_eq!(&w[24..28], &2u32.to_le_bytes());
    assert_eq!(&w[28..30], &[9, 8]);
    // QEMU answers a DMA_WRITE with a bare header.
    let m = qemu().decode(&frame(1, 12, FLAG_TYPE_REPLY, &[])).unwrap();
    assert_eq!(m.body, Body::Reply(Reply::DmaWrite(None)));
    // A DMA_READ request is the same 32 bytes in both layouts.
    let r = req(
        2,
        Request::DmaRead(DmaAccess {
            address: 0x20,
            count: 512,
        }),
    );
    assert_eq!(
        qemu().encode(&r).unwrap(),
        Codec::default().encode(&r).unwrap()
    );
}

// --- malformed frames --------------------------------------------------

fn decode_err(f: &[u8]) -> Error {
    match Codec::default().decode(f) {
        Ok(m) => panic!("decoded {m:?}"),
        Err(e) => e,
    }
}

#[test]
fn truncated_header_is_refused() {
    for n in 0..HEADER_SIZE {
        let f = frame(1, 13, 0, &[]);
        assert!(matches!(
            decode_err(&f[..n]),
            Error::TruncatedHeader { have } if have == n
        ));
    }
}

#[test]
fn size_smaller_than_header_is_refused() {
    let mut f = frame(1, 13, 0, &[]);
    f[4..8].copy_from_slice(&15u32.to_le_bytes());
    assert!(matches!(
        decode_err(&f),
        Error::SizeBelowHeader { size: 15 }
    ));
    let mut fd = FrameDecoder::new(4096);
    fd.push(&f);
    assert!(matches!(
        fd.next_frame(),
        Err(Error::SizeBelowHeader { .. })
    ));
}

#[test]
fn size_over_the_limit_is_refused_with_e2big() {
    let codec = Codec::new(
        Limits {
            max_msg_size: 64,
            max_data_xfer_size: 1 << 20,
        },
        DmaLayout::Spec,
    );
    let f = frame(1, 10, 0, &[0; 64]);
    let e = codec.decode(&f).unwrap_err();
    assert!(matches!(e, Error::TooLarge { size: 80, max: 64 }));
    assert_eq!(e.errno(), 7);
    // The encoder keeps to the same limit.
    let big = req(
        1,
        Request::RegionWrite(RegionData {
            offset: 0,
            region: 0,
            data: vec![0; 64],
        }),
    );
    assert!(matches!(codec.encode(&big), Err(Error::TooLarge { .. })));
}

#[test]
fn bad_flags_are_refused_before_size_checks() {
    // Type 2, an unknown bit, an error bit on a request, no-reply on a reply.
    for flags in [2, 0x40, FLAG_ERROR, FLAG_TYPE_REPLY | FLAG_NO_REPLY] {
        let mut f = frame(1, 13, flags, &[]);
        // Even with a bad size, the flags are reported first.
        f[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(
            matches!(decode_err(&f), Error::BadFlags { flags: fl, command: 13 } if fl == flags),
            "{flags:#x}"
        );
    }
}

#[test]
fn wrong_size_for_fixed_size_commands_is_refused() {
    let cases: &[(u16, u32, usize)] = &[
        (2, 0, 32),  // DMA_MAP
        (3, 0, 24),  // DMA_UNMAP
        (4, 0, 16),  // DEVICE_GET_INFO
        (5, 0, 32),  // DEVICE_GET_REGION_INFO
        (7, 0, 16),  // DEVICE_GET_IRQ_INFO
        (9, 0, 16),  // REGION_READ
        (13, 0, 0),  // DEVICE_RESET
        (2, 1, 0),   // DMA_MAP reply
        (4, 1, 16),  // DEVICE_GET_INFO reply
        (7, 1, 16),  // DEVICE_GET_IRQ_INFO reply
        (10, 1, 16), // REGION_WRITE reply
        (15, 1, 8),  // REGION_WRITE_MULTI reply
    ];
    for &(cmd, ty, n) in cases {
        for len in [n + 1, n.wrapping_sub(1)] {
            if len > 64 {
                continue;
            }
            let e = decode_err(&frame(1, cmd, ty, &vec![0; len]));
            assert!(
                matches!(e, Error::PayloadSize { .. } | Error::Truncated { .. }),
                "cmd {cmd} type {ty} len {len}: {e}"
            );
        }
    }
}

#[test]
fn frame_length_must_match_the_header() {
    let mut f = frame(1, 13, 0, &[]);
    f.push(0);
    assert!(matches!(
        decode_err(&f),
        Error::FrameLength { size: 16, have: 17 }
    ));
}

#[test]
fn unknown_and_unsupported_commands_give_an_errno() {
    let e = decode_err(&frame(1, 99, 0, &[]));
    assert!(matches!(e, Error::UnknownCommand { command: 99 }));
    assert_eq!(e.errno(), 22);
    let e = decode_err(&frame(1, 16, 0, &[0; 8]));
    assert!(matches!(
        e,
        Error::Unsupported {
            command: Command::DeviceFeature
        }
    ));
    assert_eq!(e.errno(), 95);
}

#[test]
fn error_reply_with_a_payload_is_refused() {
    let e = decode_err(&frame(1, 2, FLAG_TYPE_REPLY | FLAG_ERROR, &[0; 4]));
    assert!(matches!(e, Error::ErrorReplyPayload { command: 2, .. }));
}

fn version_frame(json: &[u8]) -> Vec<u8> {
    frame(0, 1, 0, &le(&[&[0, 0, 0, 0], json, &[0]]))
}

#[test]
fn version_json_must_be_an_object_with_an_object_of_capabilities() {
    assert!(matches!(
        decode_err(&version_frame(b"[1,2]")),
        Error::BadJson { .. }
    ));
    assert!(matches!(
        decode_err(&version_frame(br#"{"capabilities":3}"#)),
        Error::BadJson { .. }
    ));
    assert!(matches!(
        decode_err(&version_frame(b"{not json")),
        Error::Json { .. }
    ));
    assert!(matches!(
        decode_err(&version_frame(&[0xff, 0xfe])),
        Error::Json { .. }
    ));
    // A truncated VERSION names the field that did not fit.
    assert!(matches!(
        decode_err(&frame(0, 1, 0, &[0, 0, 0])),
        Error::Truncated {
            command: Command::Version,
            field: "minor",
            ..
        }
    ));
}

#[test]
fn version_capability_of_wrong_type_names_the_field() {
    let cases: &[(&[u8], &str)] = &[
        (br#"{"capabilities":{"max_msg_fds":"8"}}"#, "max_msg_fds"),
        (br#"{"capabilities":{"max_msg_fds":-1}}"#, "max_msg_fds"),
        (
            br#"{"capabilities":{"max_msg_fds":4294967296}}"#,
            "max_msg_fds",
        ),
        (br#"{"capabilities":{"pgsizes":1.5}}"#, "pgsizes"),
        (
            br#"{"capabilities":{"write_multiple":1}}"#,
            "write_multiple",
        ),
        (br#"{"capabilities":{"migration":[]}}"#, "migration"),
        (
            br#"{"capabilities":{"migration":{"pgsize":true}}}"#,
            "migration.pgsize",
        ),
        (
            br#"{"capabilities":{"twin_socket":{"supported":"yes"}}}"#,
            "twin_socket.supported",
        ),
    ];
    for &(json, want) in cases {
        let e = decode_err(&version_frame(json));
        assert!(
            matches!(e, Error::BadCapability { field, .. } if field == want),
            "{}: {e}",
            String::from_utf8_lossy(json)
        );
    }
}

#[test]
fn transfer_counts_are_capped() {
    let codec = Codec::new(
        Limits {
            max_msg_size: 1 << 20,
            max_data_xfer_size: 8,
        },
        DmaLayout::Spec,
    );
    let read = le(&[
        &0u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &9u32.to_le_bytes(),
    ]);
    let e = codec.decode(&frame(1, 9, 0, &read)).unwrap_err();
    assert!(matches!(
        e,
        Error::TransferTooLarge {
            count: 9,
            max: 8,
            ..
        }
    ));
    assert_eq!(e.errno(), 7);
    // A DMA_READ reply claiming 2^63 bytes is refused without allocating.
    let dma = le(&[&0u64.to_le_bytes(), &(1u64 << 63).to_le_bytes()]);
    assert!(matches!(
        Codec::default().decode(&frame(1, 11, 1, &dma)),
        Err(Error::TransferTooLarge { .. })
    ));
}

#[test]
fn data_count_must_match_the_data() {
    // REGION_WRITE saying 4 bytes but carrying 3.
    let p = le(&[
        &0u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &4u32.to_le_bytes(),
        &[1, 2, 3],
    ]);
    assert!(matches!(
        decode_err(&frame(1, 10, 0, &p)),
        Error::PayloadSize {
            command: Command::RegionWrite,
            have: 19,
            expected: 20,
            ..
        }
    ));
}

#[test]
fn set_irqs_flags_and_counts_are_checked() {
    let p = |flags: u32, count: u32, extra: usize| {
        let mut v = le(&[
            &20u32.to_le_bytes(),
            &flags.to_le_bytes(),
            &0u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &count.to_le_bytes(),
        ]);
        v.resize(20 + extra, 1);
        frame(1, 8, 0, &v)
    };
    // Two actions, no action, two data kinds, an unknown bit.
    for flags in [0x1 | 0x8 | 0x10, 0x1, 0x3 | 0x20, 0x4 | 0x20 | 0x40] {
        assert!(
            matches!(
                decode_err(&p(flags, 1, 0)),
                Error::BadField { field: "flags", .. }
            ),
            "{flags:#x}"
        );
    }
    assert!(matches!(
        decode_err(&p(0x4 | 0x20, MAX_IRQ_COUNT + 1, 0)),
        Error::BadField { field: "count", .. }
    ));
    // DATA_BOOL needs exactly `count` bytes.
    assert!(matches!(
        decode_err(&p(0x2 | 0x20, 3, 2)),
        Error::PayloadSize { .. }
    ));
    assert!(Codec::default().decode(&p(0x2 | 0x20, 3, 3)).is_ok());
}

#[test]
fn write_multi_counts_are_checked() {
    let one = |count: u32| {
        le(&[
            &0u64.to_le_bytes(),
            &0u32.to_le_bytes(),
            &count.to_le_bytes(),
            &[0; 8],
        ])
    };
    let f = |n: u64, body: &[u8]| frame(1, 15, 0, &le(&[&n.to_le_bytes(), body]));
    assert!(matches!(
        decode_err(&f(0, &[])),
        Error::BadField {
            field: "wr_cnt",
            ..
        }
    ));
    assert!(matches!(
        decode_err(&f(201, &[])),
        Error::BadField {
            field: "wr_cnt",
            ..
        }
    ));
    assert!(matches!(
        decode_err(&f(2, &one(1))),
        Error::PayloadSize { .. }
    ));
    assert!(matches!(
        decode_err(&f(1, &one(9))),
        Error::BadField {
            field: "wrs.count",
            ..
        }
    ));
}

#[test]
fn region_cap_chain_must_move_forward_and_stay_inside() {
    let base = |cap_offset: u32, caps: &[u8]| {
        let p = le(&[
            &0u32.to_le_bytes(),
            &REGION_FLAG_CAPS.to_le_bytes(),
            &0u32.to_le_bytes(),
            &cap_offset.to_le_bytes(),
            &0u64.to_le_bytes(),
            &0u64.to_le_bytes(),
            caps,
        ]);
        frame(1, 5, FLAG_TYPE_REPLY, &p)
    };
    let cap = |id: u16, next: u32, body: &[u8]| {
        le(&[
            &id.to_le_bytes(),
            &1u16.to_le_bytes(),
            &next.to_le_bytes(),
            body,
        ])
    };
    // A cap pointing back at itself.
    let e = decode_err(&base(32, &cap(2, 32, &[0; 8])));
    assert!(
        matches!(
            e,
            Error::BadField {
                field: "cap.next",
                ..
            }
        ),
        "{e}"
    );
    // next past the end.
    let e = decode_err(&base(32, &cap(2, 4096, &[0; 8])));
    assert!(
        matches!(
            e,
            Error::BadField {
                field: "cap.next",
                ..
            }
        ),
        "{e}"
    );
    // cap_offset inside the structure, or past the payload.
    assert!(matches!(
        decode_err(&base(8, &cap(2, 0, &[0; 8]))),
        Error::BadField {
            field: "cap_offset",
            ..
        }
    ));
    assert!(matches!(
        decode_err(&base(100, &cap(2, 0, &[0; 8]))),
        Error::BadField {
            field: "cap.next",
            ..
        }
    ));
    // Sparse mmap claiming more areas than there are bytes.
    let sparse = le(&[&1000u32.to_le_bytes(), &0u32.to_le_bytes(), &[0; 16]]);
    assert!(matches!(
        decode_err(&base(32, &cap(1, 0, &sparse))),
        Error::BadField {
            field: "sparse.nr_areas",
            ..
        }
    ));
    // A truncated TYPE cap names its field.
    assert!(matches!(
        decode_err(&base(32, &cap(2, 0, &[0; 6]))),
        Error::Truncated {
            field: "type.subtype",
            ..
        }
    ));
}

#[test]
fn encoder_refuses_what_the_wire_cannot_say() {
    let codec = Codec::default();
    let bitmap_without_flag = req(
        1,
        Request::DmaUnmap(DmaUnmap {
            bitmap: Some(DirtyBitmap::default()),
            ..Default::default()
        }),
    );
    assert!(codec.encode(&bitmap_without_flag).is_err());
    let nine = req(
        1,
        Request::RegionWriteMulti(vec![WriteOne {
            data: vec![0; 9],
            ..Default::default()
        }]),
    );
    assert!(codec.encode(&nine).is_err());
    let bools = req(
        1,
        Request::DeviceSetIrqs(SetIrqs {
            argsz: 0,
            action: IrqAction::Trigger,
            data: IrqData::Bool(vec![true]),
            index: 0,
            start: 0,
            count: 2,
        }),
    );
    assert!(codec.encode(&bools).is_err());
    let huge = req(
        1,
        Request::DmaRead(DmaAccess {
            address: 0,
            count: 1 << 40,
        }),
    );
    assert!(qemu().encode(&huge).is_err());
}

// --- fuzz-style: no input panics ------------------------------------------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_bytes_and_bit_flips_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let codecs = [
        Codec::default(),
        qemu(),
        Codec::new(
            Limits {
                max_msg_size: 256,
                max_data_xfer_size: 32,
            },
            DmaLayout::Spec,
        ),
    ];
    let seeds: Vec<Vec<u8>> = every_message()
        .iter()
        .map(|m| Codec::default().encode(m).unwrap())
        .collect();
    for i in 0..30_000u32 {
        let codec = &codecs[(i % 3) as usize];
        let mut f = match i % 3 {
            // Pure noise.
            0 => (0..rng.below(96)).map(|_| rng.next() as u8).collect(),
            // A valid message with a few bits flipped.
            1 => {
                let mut f = seeds[rng.below(seeds.len() as u64) as usize].clone();
                for _ in 0..=rng.below(4) {
                    let bit = rng.below(f.len() as u64 * 8) as usize;
                    f[bit / 8] ^= 1 << (bit % 8);
                }
                f
            }
            // A well-formed header for a random command over a noisy payload,
            // so the payload parsers get the traffic.
            _ => {
                let payload: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
                let cmd = rng.below(20) as u16;
                let flags = [
                    0,
                    FLAG_NO_REPLY,
                    FLAG_TYPE_REPLY,
                    FLAG_TYPE_REPLY | FLAG_ERROR,
                ][rng.below(4) as usize];
                frame(1, cmd, flags, &payload)
            }
        };
        if i % 7 == 0 && !f.is_empty() {
            let cut = rng.below(f.len() as u64) as usize;
            f.truncate(cut);
        }
        if let Ok(m) = codec.decode(&f) {
            // Whatever decodes re-encodes, and decodes to the same message.
            let again = codec.encode(&m).expect("a decoded message encodes");
            assert_eq!(codec.decode(&again).unwrap(), normalised(&m));
        }
        let mut fd = FrameDecoder::new(codec.limits.max_msg_size);
        let mut rest = &f[..];
        while !rest.is_empty() {
            let n = (rng.below(rest.len() as u64) + 1) as usize;
            fd.push(&rest[..n]);
            rest = &rest[n..];
            match fd.next_frame() {
                Ok(Some((_, fr))) => {
                    let _ = codec.decode(&fr);
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }
}
