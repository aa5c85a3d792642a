//! The same edu driver against the in-process model and against a remote
//! edu over loopback TCP.

mod common;

use cio_backend::models::Edu;
use cio_frontend::drivers::edu::self_test;

#[test]
fn self_test_passes_on_the_local_model() {
    let mut dev = Edu::new("edu0");
    let r = self_test(&mut dev, 0x10_0000, |_| {}).unwrap();
    assert_eq!(r.id, 0x010000ed);
    assert_eq!(r.interrupts, 3);
    assert_eq!(r.dma_bytes, 2 * 4095);
}

#[test]
fn self_test_passes_on_a_remote_device_and_gives_the_same_report() {
    let s = common::server();
    let local = self_test(&mut Edu::new("edu0"), 0x10_0000, |_| {}).unwrap();
    {
        let client = common::connect(s.endpoint());
        let mut dev = client.open("edu0").unwrap();
        let mut steps = Vec::new();
        let remote = self_test(&mut dev, 0x10_0000, |m| steps.push(m.to_owned())).unwrap();
        assert_eq!(remote.factorials, local.factorials);
        assert_eq!(remote.dma_checksum, local.dma_checksum);
        assert_eq!(remote.interrupts, local.interrupts);
        assert_eq!(dev.irq_events(), 3);
        assert!(steps.len() >= 6, "{steps:?}");
    }
    common::assert_idle(&s);
}
