//! Nothing leaks: after normal, failing, vanishing, resumed and expired
//! sessions the process has the same file descriptors and threads and no
//! shadow DMA mappings left. One test in its own binary, so no other test
//! opens fds meanwhile.

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use cio_core::wire::Message;
use cio_core::{Device, DmaDir, DmaRegion, EventFd, IrqKind};
use cio_frontend::drivers::edu;
use cio_frontend::{Client, ClientOptions};
use common::proxy::{Cut, Proxy};
use std::time::Duration;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Virtual size of the process in bytes (VmSize in /proc/self/status).
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn sessions_of_every_kind_leave_no_fds_or_shadow_memory_behind() {
    // Mappings so large that a leaked one stands out of allocator noise
    // (memory is committed lazily, so they cost address space only).
    const BIG: u64 = 4 << 30;
    let s = common::server_with(
        None,
        cio_backend::Limits {
            resume_grace: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let resumable = ClientOptions {
        keepalive: Duration::from_millis(50),
        resume_timeout: Duration::from_millis(200),
        ..common::opts()
    };
    // Warm up lazily created process state (thread-locals, resolver).
    drop(common::connect(s.endpoint()));
    common::assert_idle(&s);
    let before = common::fds();
    // The warm-up session's thread ends just after it counts itself out.
    std::thread::sleep(Duration::from_millis(200));
    let tasks = threads();
    let vm = vm_size();

    for round in 0..5 {
        // A full driver run with DMA and interrupts.
        {
            let c = common::connect(s.endpoint());
            let mut d = c.open("edu0").unwrap();
            edu::self_test(&mut d, 0x10_0000, |_| {}).unwrap();
            let big = Arc::new(DmaRegion::new(0x1_0000_0000, BIG, DmaDir::Bidirectional).unwrap());
            d.dma_map(Arc::clone(&big)).unwrap();
            big.write(BIG - 1, &[round]).unwrap();
            d.flush().unwrap();
            let fd = EventFd::new(EFD_NONBLOCK).unwrap();
            d.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
                .unwrap();
            assert!(
                vm_size() >= vm + 2 * BIG,
                "target region and its shadow are visible"
            );
            // Session ends with the mapping and irqs still in place.
        }
        // A malformed frame.
        {
            let mut raw = common::Raw::ready(s.endpoint());
            let mut f = BytesMut::new();
            Message::Ok.encode(2, 0, &mut f);
            f[4..6].copy_from_slice(&0x7777u16.to_le_bytes());
            raw.send_bytes(&f);
            raw.recv();
            raw.expect_closed();
        }
        // A client that opens, maps and vanishes mid-frame.
        {
            let mut raw = common::Raw::ready(s.endpoint());
            let h = raw.open("mem0");
            raw.send(&Message::DmaMap {
                handle: h,
                iova: 0,
                len: BIG,
                dir: DmaDir::FromDevice,
                posted: false,
            });
            raw.recv();
            let mut f = BytesMut::new();
            Message::Reset { handle: h }.encode(4, 0, &mut f);
            raw.send_bytes(&f[..10]);
        }
        // A session resumed after five resets, with DMA and interrupts.
        {
            let proxy = Proxy::start(s.endpoint());
            let c = Client::connect(&proxy.endpoint(), resumable.clone()).unwrap();
            assert!(c.resumable());
            let mut d = c.open("mem0").unwrap();
            let r = Arc::new(DmaRegion::new(0, 1 << 20, DmaDir::Bidirectional).unwrap());
            d.dma_map(Arc::clone(&r)).unwrap();
            let fd = EventFd::new(EFD_NONBLOCK).unwrap();
            d.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
                .unwrap();
            for i in 0..5u32 {
                d.write32(0, 0x10, i).unwrap();
                assert_eq!(proxy.cut(Cut::Reset), 1);
                assert_eq!(d.read32(0, 0x10).unwrap(), i);
            }
            assert_eq!(proxy.accepted(), 6);
        }
        // A session handed to an adopter.
        {
            let a = Client::connect(s.endpoint(), resumable.clone()).unwrap();
            let mut d = a.open("mem0").unwrap();
            let r = Arc::new(DmaRegion::new(0, BIG, DmaDir::Bidirectional).unwrap());
            d.dma_map(Arc::clone(&r)).unwrap();
            let fd = EventFd::new(EFD_NONBLOCK).unwrap();
            d.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
                .unwrap();
            let ticket = a.suspend().unwrap();
            drop((d, a, r, fd));
            let (b, devs) = Client::adopt(&ticket, resumable.clone()).unwrap();
            assert!(devs[0].dma_region(0).is_some());
            drop((devs, b));
        }
        // A session whose client cannot come back: parked, then expired.
        {
            let proxy = Proxy::start(s.endpoint());
            let c = Client::connect(&proxy.endpoint(), resumable.clone()).unwrap();
            let mut d = c.open("mem0").unwrap();
            let r = Arc::new(DmaRegion::new(0, BIG, DmaDir::FromDevice).unwrap());
            d.dma_map(Arc::clone(&r)).unwrap();
            proxy.refuse(true);
            proxy.cut(Cut::Reset);
            assert!(d.read32(0, 0x10).is_err(), "no way back");
            drop(d);
            drop(c);
            let parked = s.wait_stats(Duration::from_secs(5), |st| {
                st.parked == 0 && st.sessions == 0
            });
            assert!(parked.is_ok(), "grace expiry: {:?}", parked.unwrap_err());
        }
        common::assert_idle(&s);
    }
    assert_eq!(common::fds(), before, "file descriptors leaked");
    let after = s.wait_stats(Duration::from_secs(5), |_| threads() == tasks);
    assert!(
        after.is_ok(),
        "threads leaked: {tasks} before, {} after",
        threads()
    );
    let grown = vm_size().saturating_sub(vm);
    assert!(
        grown < BIG,
        "address space grew by {grown:#x} bytes: DMA memory leaked"
    );
    s.shutdown();
}
