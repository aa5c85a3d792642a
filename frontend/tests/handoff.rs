//! Handing a live session to another frontend: the adopter gets the same
//! devices, mappings and interrupt routes, nothing is reset, and its fresh
//! target memory holds what the device and the first frontend left there.
//! Tickets are single-use and expire.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cio_backend::models::memory::{reg, CMD_FROM_MEMORY, CMD_IRQ, CMD_TO_MEMORY};
use cio_backend::Limits;
use cio_core::{Device, DmaDir, DmaRegion, EventFd, IrqKind};
use cio_frontend::{Client, ClientError, ClientOptions, RemoteDevice, Ticket};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const TX: u64 = 0x10_0000;
const RX: u64 = 0x20_0000;
const SPAN: u64 = 8192;
const MARKER: u64 = 0xf_fff0;

fn limits() -> Limits {
    Limits {
        resume_grace: Duration::from_secs(10),
        ..Limits::default()
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        keepalive: Duration::from_millis(100),
        ..common::opts()
    }
}

fn wait_irq(fd: &EventFd) -> u64 {
    cio_frontend::drivers::edu::wait_eventfd(fd, Duration::from_secs(10)).expect("an interrupt")
}

/// The device copies BAR0 at 0x4000 into RX and raises MSI 0.
fn copy_out(m: &mut RemoteDevice) {
    m.write64(2, reg::DMA_ADDR, RX).unwrap();
    m.write64(2, reg::BAR_OFFSET, 0x4000).unwrap();
    m.write64(2, reg::LEN, SPAN).unwrap();
    m.write64(2, reg::CMD, CMD_TO_MEMORY | CMD_IRQ).unwrap();
}

/// A session with mem0 open, two mappings, MSI routed, a marker written,
/// and one DMA round trip done; then suspended.
fn suspended(ep: &cio_transports::Endpoint, data: &[u8]) -> (Client, Ticket) {
    let a = Client::connect(ep, opts()).unwrap();
    let mut m = a.open("mem0").unwrap();
    m.write32(0, MARKER, 0x5eed).unwrap();
    let tx = Arc::new(DmaRegion::new(TX, SPAN, DmaDir::ToDevice).unwrap());
    let rx = Arc::new(DmaRegion::new(RX, SPAN, DmaDir::FromDevice).unwrap());
    m.dma_map(Arc::clone(&tx)).unwrap();
    m.dma_map(Arc::clone(&rx)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    m.set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&fd))
        .unwrap();
    tx.write(0, data).unwrap();
    m.write64(2, reg::DMA_ADDR, TX).unwrap();
    m.write64(2, reg::BAR_OFFSET, 0x4000).unwrap();
    m.write64(2, reg::LEN, SPAN).unwrap();
    m.write64(2, reg::CMD, CMD_FROM_MEMORY).unwrap();
    copy_out(&mut m);
    assert_eq!(wait_irq(&fd), 1);
    let ticket = a.suspend().unwrap();
    // The first frontend has let go.
    let e = m.read32(0, MARKER).unwrap_err().to_string();
    assert!(e.contains("handed off"), "{e}");
    (a, ticket)
}

fn pattern() -> Vec<u8> {
    (0..SPAN as usize).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn an_adopter_continues_the_session_with_nothing_reset_and_memory_brought_over() {
    let s = common::server_with(None, limits());
    let data = pattern();
    let (a, ticket) = suspended(s.endpoint(), &data);
    let parked = s.wait_stats(Duration::from_secs(5), |st| st.parked == 1);
    assert!(parked.is_ok(), "parked for the adopter: {parked:?}");
    // Through a file, as between two processes.
    let dir = std::env::temp_dir().join(format!("cio-ticket-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    ticket.save(&dir).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "a ticket is a secret");
    let loaded = Ticket::load(&dir).unwrap();
    std::fs::remove_file(&dir).unwrap();
    let devs = loaded.devices();
    assert_eq!(
        (devs.len(), devs[0].handle, devs[0].info.name.as_str()),
        (1, 1, "mem0")
    );
    assert_eq!(devs[0].mappings.len(), 2);
    assert_eq!(devs[0].irqs, [(IrqKind::Msi, 0)]);
    drop(a);

    let (b, mut devs) = Client::adopt(&loaded, opts()).unwrap();
    assert!(b.resumable());
    let mut m = devs.pop().unwrap();
    // Device state intact: the marker, the command count.
    assert_eq!(m.read32(0, MARKER).unwrap(), 0x5eed, "the device was reset");
    assert_eq!(m.read64(2, reg::COMPLETED).unwrap(), 2);
    // Fresh target memory holds what was there.
    let mut got = vec![0; SPAN as usize];
    m.dma_region(RX).unwrap().read(0, &mut got).unwrap();
    assert!(got == data, "device-written memory brought over");
    m.dma_region(TX).unwrap().read(0, &mut got).unwrap();
    assert!(got == data, "target-written memory brought over");
    // The interrupt route works, on the adopter's eventfd.
    let fd = m.irq_eventfd(IrqKind::Msi, 0).unwrap();
    m.dma_region(RX).unwrap().write(0, &[0; 16]).unwrap();
    copy_out(&mut m);
    assert_eq!(wait_irq(&fd), 1);
    m.sync_for_cpu(RX, SPAN).unwrap();
    m.dma_region(RX).unwrap().read(0, &mut got).unwrap();
    assert!(got == data);
    // And new work through the adopter's own target memory.
    let tx = m.dma_region(TX).unwrap();
    tx.write(0, &[0xab; 64]).unwrap();
    m.write64(2, reg::DMA_ADDR, TX).unwrap();
    m.write64(2, reg::CMD, CMD_FROM_MEMORY).unwrap();
    assert_eq!(m.read32(0, 0x4000).unwrap(), 0xabab_abab);

    // The ticket is spent: a second adopter is refused, the first goes on.
    let e = Client::adopt(&loaded, opts()).unwrap_err();
    assert!(e.to_string().contains("used already"), "{e}");
    assert_eq!(m.read32(0, MARKER).unwrap(), 0x5eed);
    assert_eq!(s.stats().resumes, 1);
    drop(m);
    drop(b);
    common::assert_idle(&s);
}

#[test]
fn expired_and_forged_tickets_are_refused() {
    let s = common::server_with(
        None,
        Limits {
            resume_grace: Duration::from_millis(300),
            ..limits()
        },
    );
    let (_a, ticket) = suspended(s.endpoint(), &pattern());
    std::thread::sleep(Duration::from_millis(400));
    let e = Client::adopt(&ticket, opts()).unwrap_err();
    assert!(matches!(e, ClientError::Ticket(_)), "{e:?}");
    assert!(e.to_string().contains("expired"), "{e}");
    // Grace over: the device went back, reset.
    common::assert_idle(&s);
    // A ticket whose expiry was pushed back finds no session.
    let text = ticket
        .to_text()
        .replace("\"expires_unix_ms\": ", "\"expires_unix_ms\": 9");
    let forged = Ticket::from_text(&text).unwrap();
    let e = Client::adopt(&forged, opts()).unwrap_err().to_string();
    assert!(e.contains("no session"), "{e}");
    // A live session's ticket with a wrong secret.
    let (_a2, ticket) = suspended(s.endpoint(), &pattern());
    let secret = ticket.to_text().split("\"secret\": \"").nth(1).unwrap()[..64].to_string();
    let wrong = Ticket::from_text(&ticket.to_text().replace(&secret, &"00".repeat(32))).unwrap();
    let e = Client::adopt(&wrong, opts()).unwrap_err().to_string();
    assert!(e.contains("did not verify"), "{e}");
    // The right one still works after that.
    let (_b, devs) = Client::adopt(&ticket, opts()).unwrap();
    assert_eq!(devs.len(), 1);
    // Garbage is a clear error, not a panic.
    assert!(Ticket::from_text("{}").is_err());
    assert!(Ticket::from_text("not json").is_err());
}

#[test]
fn only_resumable_sessions_can_be_handed_off() {
    let s = common::server_with(
        None,
        Limits {
            resume_grace: Duration::ZERO,
            ..limits()
        },
    );
    let a = Client::connect(s.endpoint(), opts()).unwrap();
    let mut m = a.open("mem0").unwrap();
    let e = a.suspend().unwrap_err().to_string();
    assert!(e.contains("not resumable"), "{e}");
    // Nothing happened to the session.
    m.write32(0, 0, 1).unwrap();
    assert_eq!(m.read32(0, 0).unwrap(), 1);
}

#[test]
fn an_adopted_session_resumes_after_a_cut_with_the_adopters_own_key() {
    use common::proxy::{Cut, Proxy};
    let s = common::server_with(None, limits());
    let proxy = Proxy::start(s.endpoint());
    let (_a, ticket) = suspended(&proxy.endpoint(), &pattern());
    let (_b, mut devs) = Client::adopt(&ticket, opts()).unwrap();
    let m = &mut devs[0];
    for i in 0..3u32 {
        proxy.wait_live(1);
        m.write32(0, 0x20, i).unwrap();
        assert_eq!(proxy.cut(Cut::Reset), 1);
        assert_eq!(m.read32(0, 0x20).unwrap(), i);
    }
    assert_eq!(m.read32(0, MARKER).unwrap(), 0x5eed);
    assert_eq!(s.stats().resumes, 4, "one adoption, three resumes");
}
