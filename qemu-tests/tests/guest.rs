//! cio across a VM boundary: a QEMU guest (TCG) whose own kernel binds the
//! QEMU edu device to vfio-pci and runs ciod; the host drives it through
//! user-net's port forward with a pre-shared key.
//!
//! Until the VFIO provider lands, ciod in the guest serves its emulated edu;
//! what this proves is the rig (kernel, modules, VFIO binding, networking,
//! static ciod, readiness) and the protocol, auth and driver across a real
//! network path into a VM.

use std::time::Duration;

use cio_frontend::drivers::edu::self_test;
use cio_frontend::{Client, ClientError, ClientOptions};
use cio_qemu_tests::{rig, Guest};
use cio_transports::{Endpoint, Psk};

#[test]
fn guest_binds_edu_to_vfio_and_serves_cio_over_user_net() {
    let Some(rig) = rig() else { return };
    let mut g = Guest::boot(&rig, &["edu"]);
    g.wait_for("CIO-READY", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));

    // The guest's kernel bound edu to vfio-pci and created its VFIO group.
    let vfio = g.lines_with("CIO-VFIO");
    assert_eq!(vfio.len(), 1, "one edu bound: {vfio:?}");
    assert!(vfio[0].contains("driver vfio-pci"), "{}", vfio[0]);

    let ep: Endpoint = format!("127.0.0.1:{}", g.port).parse().unwrap();
    let opts = |key: &[u8]| ClientOptions {
        psk: Some(Psk::new(key.to_vec()).unwrap()),
        reply_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    };

    // A wrong key is refused by the guest's ciod.
    let e = Client::connect(&ep, opts(b"not-the-guest-key-at-all")).unwrap_err();
    assert!(matches!(e, ClientError::Server { .. }), "{e}");

    // The right key: list, open and run the whole edu driver self-test
    // (factorials, MSI and INTx, DMA both ways, reset) across the VM.
    let client = Client::connect(&ep, opts(g.key.as_bytes())).unwrap();
    let names: Vec<String> = client.list().unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["edu0"]);
    let mut dev = client.open("edu0").unwrap();
    let report = self_test(&mut dev, 0x10_0000, |step| eprintln!("guest edu: {step}")).unwrap();
    assert_eq!(report.id, 0x010000ed);
    assert_eq!(report.interrupts, 3);
    assert_eq!(dev.irq_events(), 3);
}
