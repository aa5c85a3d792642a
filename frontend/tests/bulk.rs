//! Bulk region access (`Device::read_bulk`/`write_bulk`): one request per
//! `MAX_BULK` bytes, the backend making the accesses the device accepts.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cio_backend::models::{Edu, Memory};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_core::wire::MAX_BULK;
use cio_core::{Device, DeviceError, DeviceInfo, DmaRegion, EventFd, IrqKind};

/// Calls the backend's device got: bulk transfers and single accesses.
#[derive(Default)]
struct Calls {
    bulk: AtomicUsize,
    single: AtomicUsize,
}

/// A memory device that counts what reaches it.
struct Counted(Memory, Arc<Calls>);

impl Device for Counted {
    fn info(&self) -> &DeviceInfo {
        self.0.info()
    }
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.1.single.fetch_add(1, Ordering::Relaxed);
        self.0.read(region, offset, data)
    }
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.1.single.fetch_add(1, Ordering::Relaxed);
        self.0.write(region, offset, data)
    }
    fn read_bulk(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.1.bulk.fetch_add(1, Ordering::Relaxed);
        self.0.read_bulk(region, offset, data)
    }
    fn write_bulk(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.1.bulk.fetch_add(1, Ordering::Relaxed);
        self.0.write_bulk(region, offset, data)
    }
    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        self.0.set_irqs(kind, start, fds)
    }
    fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        self.0.unmask_intx()
    }
    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        self.0.dma_map(region)
    }
    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        self.0.dma_unmap(iova)
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.0.reset()
    }
}

const BAR: u64 = 4 << 20;

fn server() -> (ServerHandle, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk: None,
        devices: vec![
            Box::new(Edu::new("edu0")),
            Box::new(Counted(
                Memory::new("mem0", BAR).unwrap(),
                Arc::clone(&calls),
            )),
        ],
        limits: Limits::default(),
        usb: Default::default(),
        security: Default::default(),
    };
    (Server::bind(cfg).unwrap().spawn().unwrap(), calls)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn megabytes_move_in_one_request_per_chunk_and_match_single_accesses() {
    let (s, calls) = server();
    let client = common::connect(s.endpoint());
    let mut mem = client.open("mem0").unwrap();

    // 2.5 MiB at an odd offset: three chunks each way.
    let len = 2 * MAX_BULK + MAX_BULK / 2;
    let data = pattern(len, 7);
    mem.write_bulk(0, 0x1003, &data).unwrap();
    let mut back = vec![0u8; len];
    mem.read_bulk(0, 0x1003, &mut back).unwrap();
    assert!(back == data, "bulk read returns what bulk write wrote");
    assert_eq!(calls.bulk.load(Ordering::Relaxed), 6, "3 requests each way");
    assert_eq!(calls.single.load(Ordering::Relaxed), 0);

    // The same bytes through single accesses, and single writes seen by a
    // bulk read.
    assert_eq!(mem.read8(0, 0x1003).unwrap(), data[0]);
    let at = 0x1003 + 0x2_0005;
    let mut b = [0u8; 8];
    mem.read(0, at & !7, &mut b).unwrap();
    let base = (at & !7) - 0x1003;
    assert_eq!(&b[..], &data[base as usize..base as usize + 8]);
    mem.write32(0, 0x10, 0xdead_beef).unwrap();
    let mut head = [0u8; 8];
    mem.read_bulk(0, 0x10, &mut head).unwrap();
    assert_eq!(&head[..4], &0xdead_beefu32.to_le_bytes());

    // Refused before anything is sent, with the reason.
    let e = mem.read_bulk(0, BAR - 4, &mut [0u8; 8]).unwrap_err();
    assert!(matches!(e, DeviceError::OutOfRange { .. }), "{e}");
    let e = mem.write_bulk(9, 0, &[0u8; 8]).unwrap_err();
    assert!(matches!(e, DeviceError::NoRegion(9)), "{e}");
    drop(mem);
    drop(client);
    common::assert_idle(&s);
}

#[test]
fn register_regions_are_read_as_their_accesses() {
    let (s, _) = server();
    let client = common::connect(s.endpoint());
    let mut edu = client.open("edu0").unwrap();
    // Dwords, as the registers are made for: the id register and the
    // liveness register (which reads back the inverse of what was written).
    edu.write32(0, 4, 0x1234_5678).unwrap();
    let mut regs = [0u8; 16];
    edu.read_bulk(0, 0, &mut regs).unwrap();
    assert_eq!(&regs[..4], &edu.read32(0, 0).unwrap().to_le_bytes());
    assert_eq!(&regs[4..8], &(!0x1234_5678u32).to_le_bytes());
    // edu takes no 1- or 2-byte accesses: a transfer that needs one is
    // refused with the width the region takes.
    let e = edu.read_bulk(0, 0, &mut [0u8; 6]).unwrap_err();
    assert!(matches!(e, DeviceError::BadWidth { len: 2, .. }), "{e}");
    let e = edu.read_bulk(0, 2, &mut [0u8; 8]).unwrap_err();
    assert!(matches!(e, DeviceError::Unaligned { len: 4, .. }), "{e}");
    // The session goes on.
    assert_eq!(edu.read32(0, 0).unwrap(), 0x010000ed);
}
