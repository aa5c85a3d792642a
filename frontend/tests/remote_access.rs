//! A remote device over real loopback TCP behaves like the local one:
//! config space, BARs at every width, posted-write ordering, factorial,
//! interrupts, DMA both ways, exclusive open, reset.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cio_core::{
    Device, DeviceError, DmaDir, DmaRegion, EventFd, IrqKind, CONFIG_REGION, PAGE_SIZE,
};
use cio_frontend::drivers::edu::{self, reg, wait_eventfd, Edu};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

#[test]
fn config_space_reads_ids_and_honours_write_masks() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    assert_eq!(d.read32(CONFIG_REGION, 0).unwrap(), 0x11e8_1234);
    let mut b1 = [0u8];
    d.read(CONFIG_REGION, 0x3d, &mut b1).unwrap();
    assert_eq!(b1[0], 1, "interrupt pin A");
    let mut b2 = [0u8; 2];
    d.read(CONFIG_REGION, 0x02, &mut b2).unwrap();
    assert_eq!(u16::from_le_bytes(b2), 0x11e8);
    // Read-only ids ignore writes; the command register keeps its bits.
    d.write32(CONFIG_REGION, 0, 0).unwrap();
    d.write(CONFIG_REGION, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    assert_eq!(d.read32(CONFIG_REGION, 0).unwrap(), 0x11e8_1234);
    d.read(CONFIG_REGION, 0x04, &mut b2).unwrap();
    assert_eq!(u16::from_le_bytes(b2), 0x0006);
    // BAR sizing.
    d.write32(CONFIG_REGION, 0x10, 0xffff_ffff).unwrap();
    assert_eq!(d.read32(CONFIG_REGION, 0x10).unwrap(), 0xfff0_0000);
}

#[test]
fn bar_access_at_every_supported_width() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut mem = c.open("mem0").unwrap();
    let vals: [&[u8]; 4] = [
        &[0xa1],
        &[0xb2, 0xb3],
        &[1, 2, 3, 4],
        &[9, 8, 7, 6, 5, 4, 3, 2],
    ];
    for (i, v) in vals.iter().enumerate() {
        let off = 0x1000 + 0x10 * i as u64;
        mem.write(0, off, v).unwrap();
        let mut back = vec![0u8; v.len()];
        mem.read(0, off, &mut back).unwrap();
        assert_eq!(&back, v, "{}-byte access", v.len());
    }
    // Narrow reads of a wide write see little-endian bytes.
    mem.write64(0, 0x2000, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(mem.read32(0, 0x2004).unwrap(), 0x1122_3344);
    let mut b = [0u8; 2];
    mem.read(0, 0x2000, &mut b).unwrap();
    assert_eq!(b, [0x88, 0x77]);

    let mut edu = c.open("edu0").unwrap();
    edu.write32(0, reg::LIVENESS, 0x0f0f_0000).unwrap();
    assert_eq!(edu.read32(0, reg::LIVENESS).unwrap(), 0xf0f0_ffff);
    edu.write64(0, reg::DMA_SRC, 0x0123_4567_89ab_cdef).unwrap();
    assert_eq!(edu.read64(0, reg::DMA_SRC).unwrap(), 0x0123_4567_89ab_cdef);
    assert_eq!(edu.read32(0, reg::DMA_SRC).unwrap(), 0x89ab_cdef);
    // QEMU semantics: 8-byte accesses below 0x80 read all-ones.
    assert_eq!(edu.read64(0, reg::ID).unwrap(), u64::MAX);
    // Widths edu does not accept are refused before they leave the frontend.
    let e = edu.read(0, reg::ID, &mut [0u8; 2]).unwrap_err();
    assert!(matches!(e, DeviceError::BadWidth { len: 2, .. }), "{e}");
}

#[test]
fn posted_writes_arrive_in_order() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut mem = c.open("mem0").unwrap();
    // 1000 writes, each slot overwritten 100 times: only in-order delivery
    // leaves the last value in every slot.
    for i in 0..1000u64 {
        mem.write64(0, (i % 10) * 8, i).unwrap();
    }
    for slot in 0..10u64 {
        assert_eq!(mem.read64(0, slot * 8).unwrap(), 990 + slot, "slot {slot}");
    }
    // 1000 distinct addresses: none lost.
    for i in 0..1000u64 {
        mem.write32(0, 0x10000 + i * 4, i as u32 ^ 0x5a5a_0000)
            .unwrap();
    }
    mem.flush().unwrap();
    for i in 0..1000u64 {
        assert_eq!(
            mem.read32(0, 0x10000 + i * 4).unwrap(),
            i as u32 ^ 0x5a5a_0000
        );
    }
}

#[test]
fn factorial_polled() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    let mut e = Edu::new(&mut d).unwrap();
    assert_eq!(e.factorial(10).unwrap(), 3_628_800);
    assert_eq!(e.factorial(13).unwrap(), 6_227_020_800u64 as u32);
}

#[test]
fn msi_and_intx_interrupts_with_status_and_ack() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    let t = Duration::from_secs(5);

    let msi = EventFd::new(EFD_NONBLOCK).unwrap();
    d.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&msi))
        .unwrap();
    // MSI enable shows in the config space capability, as VFIO shows it.
    let mut ctl = [0u8; 2];
    d.read(CONFIG_REGION, 0x42, &mut ctl).unwrap();
    assert_eq!(ctl[0] & 1, 1);
    for round in 0..3 {
        d.write32(0, reg::IRQ_RAISE, 0x10 << round).unwrap();
        wait_eventfd(&msi, t).unwrap();
        assert_eq!(d.read32(0, reg::IRQ_STATUS).unwrap(), 0x10 << round);
        d.write32(0, reg::IRQ_ACK, 0x10 << round).unwrap();
    }
    assert_eq!(d.read32(0, reg::IRQ_STATUS).unwrap(), 0);
    d.set_irqs(IrqKind::Msi, 0, &[]).unwrap();

    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    d.set_irqs(IrqKind::Intx, 0, std::slice::from_ref(&intx))
        .unwrap();
    d.write32(0, reg::IRQ_RAISE, 0x1).unwrap();
    wait_eventfd(&intx, t).unwrap();
    // Level still high but automasked: a second raise does not fire.
    d.write32(0, reg::IRQ_RAISE, 0x2).unwrap();
    d.flush().unwrap();
    assert!(intx.read().is_err(), "masked INTx fired");
    // Unmasking while the line is high fires again.
    d.unmask_intx().unwrap();
    wait_eventfd(&intx, t).unwrap();
    d.write32(0, reg::IRQ_ACK, 0x3).unwrap();
    d.unmask_intx().unwrap();
    d.flush().unwrap();
    assert!(intx.read().is_err(), "INTx fired with the line low");
    assert_eq!(d.irq_events(), 5);

    let e = d
        .set_irqs(IrqKind::Msix, 0, std::slice::from_ref(&msi))
        .unwrap_err();
    assert!(matches!(e, DeviceError::NoIrq { .. }), "{e}");
}

#[test]
fn dma_both_directions_byte_for_byte_with_directional_mappings() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    let to_dev = Arc::new(DmaRegion::new(0x20_0000, 5 * PAGE_SIZE, DmaDir::ToDevice).unwrap());
    let from_dev = Arc::new(DmaRegion::new(0x30_0000, 5 * PAGE_SIZE, DmaDir::FromDevice).unwrap());
    d.dma_map(Arc::clone(&to_dev)).unwrap();
    d.dma_map(Arc::clone(&from_dev)).unwrap();
    let mut e = Edu::new(&mut d).unwrap();
    for (k, len) in [1u64, 64, 1000, 4095].into_iter().enumerate() {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k as u8))
            .collect();
        let page = k as u64 * PAGE_SIZE;
        to_dev.write(page + 1, &data).unwrap(); // unaligned start inside the page
        e.dma(0x20_0000 + page + 1, edu::EDU_BUFFER, len, false, false)
            .unwrap();
        e.dma(edu::EDU_BUFFER, 0x30_0000 + page + 7, len, true, false)
            .unwrap();
        let mut back = vec![0u8; len as usize];
        from_dev.read(page + 7, &mut back).unwrap();
        assert_eq!(back, data, "round trip of {len} bytes");
    }
    // The device may not write a to-device mapping: a posted DMA command
    // fails, and the next non-posted operation reports it.
    e.dma(edu::EDU_BUFFER, 0x20_0000, 16, true, true).unwrap();
    let err = e.irq_status().unwrap_err();
    assert!(
        matches!(&err, edu::EduError::Device(DeviceError::Posted { message, .. }) if message.contains("not allowed")),
        "{err}"
    );
    // Unmapping pulls the device's last writes first, and frees the shadow.
    assert_eq!(s.stats().shadow_bytes, 10 * PAGE_SIZE);
    d.dma_unmap(0x20_0000).unwrap();
    d.dma_unmap(0x30_0000).unwrap();
    assert_eq!(s.stats().shadow_bytes, 0);
    assert!(matches!(d.dma_unmap(0x30_0000), Err(DeviceError::Dma(_))));
}

#[test]
fn posted_mappings_order_before_what_follows_and_report_failures_later() {
    let s = common::server_with(
        None,
        cio_backend::Limits {
            max_mapped_bytes: 1 << 20,
            ..Default::default()
        },
    );
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    // Mapped and used at once: the map frame reaches the backend before
    // the data and the doorbell behind it; nothing waits for an answer.
    let buf = Arc::new(DmaRegion::new(0x50_0000, 2 * PAGE_SIZE, DmaDir::Bidirectional).unwrap());
    d.dma_map_posted(Arc::clone(&buf)).unwrap();
    buf.write(0, b"posted map").unwrap();
    {
        let mut e = Edu::new(&mut d).unwrap();
        e.dma(0x50_0000, edu::EDU_BUFFER, 10, false, false).unwrap();
        e.dma(edu::EDU_BUFFER, 0x50_0000 + PAGE_SIZE, 10, true, false)
            .unwrap();
    }
    let mut back = [0u8; 10];
    buf.read(PAGE_SIZE, &mut back).unwrap();
    assert_eq!(&back, b"posted map");
    assert_eq!(s.stats().shadow_bytes, 2 * PAGE_SIZE);
    // A posted unmap frees the shadow without an answer.
    d.dma_unmap_posted(0x50_0000).unwrap();
    d.flush().unwrap();
    assert_eq!(s.stats().shadow_bytes, 0);
    // A mapping the backend refuses (beyond the session's 1 MiB of shadow)
    // is reported by the next call that waits, and the session goes on.
    let big = Arc::new(DmaRegion::new(1 << 32, 2 << 20, DmaDir::ToDevice).unwrap());
    d.dma_map_posted(big).unwrap();
    let err = d.flush().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Posted { message, .. } if message.contains("limit")),
        "{err}"
    );
    assert_eq!(
        d.read32(0, 0).unwrap(),
        0x010000ed,
        "the session still serves"
    );
}

#[test]
fn explicit_sync_for_cpu_and_for_device() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    let buf = Arc::new(DmaRegion::new(0x40_0000, 2 * PAGE_SIZE, DmaDir::Bidirectional).unwrap());
    d.dma_map(Arc::clone(&buf)).unwrap();
    buf.write(0, b"hello device").unwrap();
    d.sync_for_device(0x40_0000, PAGE_SIZE).unwrap();
    assert_eq!(buf.dirty_pages(), 0, "sync_for_device sent the page");
    let mut e = Edu::new(&mut d).unwrap();
    e.dma(0x40_0000, edu::EDU_BUFFER, 12, false, false).unwrap();
    e.dma(edu::EDU_BUFFER, 0x40_0000 + PAGE_SIZE, 12, true, false)
        .unwrap();
    d.sync_for_cpu(0x40_0000 + PAGE_SIZE, PAGE_SIZE).unwrap();
    let mut back = [0u8; 12];
    buf.read(PAGE_SIZE, &mut back).unwrap();
    assert_eq!(&back, b"hello device");
}

#[test]
fn second_open_is_busy_until_the_first_closes() {
    let s = common::server();
    let a = common::connect(s.endpoint());
    let b = common::connect(s.endpoint());
    let dev = a.open("edu0").unwrap();
    let e = b.open("edu0").unwrap_err();
    assert!(e.to_string().contains("in use by session"), "{e}");
    assert!(b.list().unwrap().iter().any(|d| d.name == "edu0" && d.busy));
    drop(dev);
    b.open("edu0").unwrap();
}

#[test]
fn reset_restores_power_on_state() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    d.write32(0, reg::LIVENESS, 7).unwrap();
    d.write32(0, reg::IRQ_RAISE, 0x40).unwrap();
    d.write32(0, reg::FACTORIAL, 4).unwrap();
    assert_eq!(d.read32(0, reg::FACTORIAL).unwrap(), 24);
    d.reset().unwrap();
    assert_eq!(d.read32(0, reg::LIVENESS).unwrap(), 0);
    assert_eq!(d.read32(0, reg::IRQ_STATUS).unwrap(), 0);
    assert_eq!(d.read32(0, reg::FACTORIAL).unwrap(), 0);
}

#[test]
fn closing_a_session_resets_the_device_for_the_next_one() {
    let s = common::server();
    {
        let c = common::connect(s.endpoint());
        let mut d = c.open("edu0").unwrap();
        d.write32(0, reg::LIVENESS, 1).unwrap();
        d.dma_map(Arc::new(
            DmaRegion::new(0x10_0000, PAGE_SIZE, DmaDir::Bidirectional).unwrap(),
        ))
        .unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        d.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
            .unwrap();
        d.flush().unwrap();
        assert_eq!(s.stats().irq_fds, 1);
    }
    common::assert_idle(&s);
    let c = common::connect(s.endpoint());
    let mut d = c.open("edu0").unwrap();
    assert_eq!(d.read32(0, reg::LIVENESS).unwrap(), 0);
    // The old mapping is gone: the same IOVA maps again.
    d.dma_map(Arc::new(
        DmaRegion::new(0x10_0000, PAGE_SIZE, DmaDir::Bidirectional).unwrap(),
    ))
    .unwrap();
}

#[test]
fn unix_socket_transport_runs_the_same_driver() {
    let path = std::env::temp_dir().join(format!("cio-test-{}.sock", std::process::id()));
    let s = cio_backend::Server::bind(cio_backend::ServerConfig {
        listen: cio_transports::Endpoint::Unix(path.clone()),
        psk: None,
        devices: vec![Box::new(cio_backend::models::Edu::new("edu0"))],
        limits: Default::default(),
        usb: Default::default(),
        security: Default::default(),
    })
    .unwrap()
    .spawn()
    .unwrap();
    {
        let c = common::connect(s.endpoint());
        let mut d = c.open("edu0").unwrap();
        edu::self_test(&mut d, 0x10_0000, |_| {}).unwrap();
    }
    s.shutdown();
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[test]
fn in_process_pair_transport() {
    let (a, b) = cio_transports::Conn::pair().unwrap();
    let shared = Arc::new(cio_backend::session::Shared::new(
        cio_backend::registry::Registry::new(vec![Box::new(cio_backend::models::Edu::new("edu0"))])
            .unwrap(),
        Default::default(),
        None,
        Default::default(),
    ));
    let (session, _waker) = cio_backend::session::Session::new(a, shared).unwrap();
    let t = std::thread::spawn(move || session.run());
    {
        let c = cio_frontend::Client::with_conn(b, common::opts()).unwrap();
        let mut d = c.open("edu0").unwrap();
        assert_eq!(d.read32(0, reg::ID).unwrap(), 0x010000ed);
    }
    t.join().unwrap();
}

#[test]
fn bulk_dma_both_ways_through_the_memory_device() {
    use cio_backend::models::memory::{reg as mreg, CMD_TO_MEMORY};
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut m = c.open("mem0").unwrap();
    let data = common::memory_dma_round_trip(&mut m, 768 * 1024);
    assert_eq!(
        m.read64(0, 0x1238).unwrap(),
        u64::from_le_bytes(data[0x1238..0x1240].try_into().unwrap())
    );
    // A command outside BAR0 fails, reported at the next non-posted call.
    m.write64(2, mreg::LEN, 2 << 20).unwrap();
    m.write64(2, mreg::CMD, CMD_TO_MEMORY).unwrap();
    let e = m.read64(2, mreg::COMPLETED).unwrap_err();
    assert!(e.to_string().contains("outside the"), "{e}");
    assert_eq!(m.read64(2, mreg::COMPLETED).unwrap(), 2);
}

#[test]
fn typed_helpers_at_every_width() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut m = c.open("mem0").unwrap();
    m.write8(0, 0x10, 0xab).unwrap();
    m.write16(0, 0x12, 0xcdef).unwrap();
    m.write32(0, 0x14, 0x0123_4567).unwrap();
    assert_eq!(m.read8(0, 0x10).unwrap(), 0xab);
    assert_eq!(m.read16(0, 0x12).unwrap(), 0xcdef);
    assert_eq!(m.read32(0, 0x10).unwrap(), 0xcdef_00ab);
    assert_eq!(m.read64(0, 0x10).unwrap(), 0x0123_4567_cdef_00ab);
    let mut e = c.open("edu0").unwrap();
    assert_eq!(
        e.read16(cio_core::device::CONFIG_REGION, 0).unwrap(),
        0x1234
    );
}

#[test]
fn polling_mode_on_both_sides_runs_the_whole_driver() {
    let limits = cio_backend::Limits {
        poll: Duration::from_micros(200),
        ..cio_backend::Limits::default()
    };
    let s = common::server_with(None, limits);
    let c = cio_frontend::Client::connect(
        s.endpoint(),
        cio_frontend::ClientOptions {
            poll: Duration::from_micros(200),
            ..common::opts()
        },
    )
    .unwrap();
    let mut edu = c.open("edu0").unwrap();
    // Registers, MSI, INTx and DMA: every wait a polling client makes.
    let report = cio_frontend::drivers::edu::self_test(&mut edu, 0x10_0000, |_| {}).unwrap();
    assert_eq!(report.interrupts, 3);
    assert_eq!(report.dma_bytes, 2 * 4095);
    // A reply slower than the polling window is still waited for.
    edu.write32(0, 8, 12).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(edu.read32(0, 8).unwrap(), 479_001_600);
    // The self-test waited for its interrupts in `wait_irq`, polling; past
    // the polling time a wait sleeps, and still ends at its timeout.
    let msi = EventFd::new(EFD_NONBLOCK).unwrap();
    edu.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&msi))
        .unwrap();
    let start = std::time::Instant::now();
    assert_eq!(edu.wait_irq(&msi, Duration::from_millis(300)).unwrap(), 0);
    assert!(start.elapsed() >= Duration::from_millis(300));
    drop(edu);
    drop(c);
    // The backend's session stops spinning and ends with its client.
    common::assert_idle(&s);
}

#[test]
fn a_thread_waiting_for_an_interrupt_reads_for_itself_and_blocks_nobody() {
    let s = common::server();
    let c = common::connect(s.endpoint());
    let mut edu = c.open("edu0").unwrap();
    let mut mem = c.open("mem0").unwrap();
    let msi = EventFd::new(EFD_NONBLOCK).unwrap();
    edu.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&msi))
        .unwrap();

    // The raise is a posted write: the wait sends it, then sees the
    // interrupt, and takes the eventfd's count.
    edu.write32(0, reg::IRQ_RAISE, 0x10).unwrap();
    assert_eq!(edu.wait_irq(&msi, Duration::from_secs(5)).unwrap(), 1);
    assert!(msi.read().is_err(), "the count was taken");
    edu.write32(0, reg::IRQ_ACK, 0x10).unwrap();

    // Nothing raised: the wait ends at its timeout with 0. Meanwhile
    // another thread's calls on the same client go on: the waiter does not
    // hold the receive side while it sleeps (if it did, the first read
    // below would wait for the timeout).
    let wait = Duration::from_millis(1500);
    let (waited, took) = std::thread::scope(|sc| {
        let waiter = sc.spawn(|| {
            let start = std::time::Instant::now();
            (edu.wait_irq(&msi, wait).unwrap(), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        let start = std::time::Instant::now();
        for i in 0..50u32 {
            mem.write32(0, 0x100, i).unwrap();
            assert_eq!(mem.read32(0, 0x100).unwrap(), i);
        }
        let took = start.elapsed();
        (waiter.join().unwrap(), took)
    });
    assert_eq!(waited.0, 0, "no interrupt was raised");
    assert!(waited.1 >= wait, "the wait ended early: {:?}", waited.1);
    assert!(
        took < Duration::from_millis(1000),
        "50 round trips beside a waiting thread took {took:?}"
    );

    // An interrupt dispatched before the wait (by another call reading its
    // reply, or by the pump) is not lost: the wait takes the count at once.
    edu.write32(0, reg::IRQ_RAISE, 0x20).unwrap();
    mem.read32(0, 0x100).unwrap();
    edu.flush().unwrap();
    assert_eq!(edu.wait_irq(&msi, Duration::from_secs(5)).unwrap(), 1);
}
