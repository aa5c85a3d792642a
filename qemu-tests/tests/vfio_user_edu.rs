//! QEMU 11's vfio-user client against `cio vfio-user`: a guest (RAM shared
//! by memfd, a vIOMMU) boots with two `vfio-user-pci` edus, both served from
//! the host: one by the model inside `cio vfio-user --emulate edu` (DMA into
//! guest memory in place), one by a host `ciod` through a cio session (a
//! remote device: DMA through a mirror compared with guest memory). The
//! guest's own kernel binds both to vfio-pci, so every DMA goes through its
//! vIOMMU and reaches the servers as QEMU's DMA_MAP/UNMAP; its ciod serves
//! them, and the host runs the edu driver's self-test on each through it:
//! factorials, MSI and INTx, DMA both ways.

use std::time::Duration;

use cio_core::Device;
use cio_frontend::drivers::edu::self_test_parts;
use cio_frontend::{Client, ClientOptions};
use cio_qemu_tests::{
    qemu11, rig, vfio_user_device, vfio_user_server, Guest, HostCiod, TempDir, SHARED_RAM,
};
use cio_transports::{Endpoint, Psk};

#[test]
fn guest_vfio_drives_host_edus_through_qemu_vfio_user() {
    let Some(rig) = rig() else { return };
    let qemu11 = qemu11(&rig);
    let dir = TempDir(std::env::temp_dir().join(format!("cio-vu-edu-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();

    // A host ciod with the emulated edu, for the remote one.
    let ciod = HostCiod::start(&rig, &dir.0);
    let (listen, psk_arg) = (&ciod.listen, ciod.psk_arg());

    let local_sock = dir.0.join("local.sock");
    let remote_sock = dir.0.join("remote.sock");
    let local_log = dir.0.join("local.log");
    let remote_log = dir.0.join("remote.log");
    let _local = vfio_user_server(&rig, &["--emulate", "edu"], &local_sock, &local_log);
    let _remote = vfio_user_server(
        &rig,
        &[listen, "edu0", "--psk-file", psk_arg],
        &remote_sock,
        &remote_log,
    );
    let logs = || {
        format!(
            "---- cio vfio-user --emulate edu ----\n{}---- cio vfio-user (remote edu) ----\n{}",
            std::fs::read_to_string(&local_log).unwrap_or_default(),
            std::fs::read_to_string(&remote_log).unwrap_or_default()
        )
    };

    // In the guest: slot 5 (local) becomes vedu0, slot 6 (remote) vedu1.
    let (d_local, d_remote) = (
        vfio_user_device(&local_sock, 5),
        vfio_user_device(&remote_sock, 6),
    );
    let mut args: Vec<&str> = SHARED_RAM.to_vec();
    args.extend(["-device", &d_local, "-device", &d_remote]);
    let mut g = Guest::boot_qemu(&qemu11, &rig, &args, "");
    if let Err(e) = g.wait_for("CIO-READY", Duration::from_secs(180)) {
        panic!("{e}\n{}", logs());
    }
    let vfio = g.lines_with("CIO-VFIO vedu");
    assert_eq!(vfio.len(), 2, "both edus bound to vfio-pci: {vfio:?}");

    let ep: Endpoint = format!("127.0.0.1:{}", g.port).parse().unwrap();
    let client = Client::connect(
        &ep,
        ClientOptions {
            psk: Some(Psk::new(g.key.as_bytes().to_vec()).unwrap()),
            reply_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    for (name, what) in [("vedu0", "in-process edu"), ("vedu1", "remote edu")] {
        let mut dev = client.open(name).unwrap();
        assert_eq!(Device::info(&dev).vendor, 0x1234, "{name}");
        // No reset: the guest's kernel finds no reset method on the device
        // QEMU shows it (the edu model has neither FLR nor PM).
        let report = self_test_parts(&mut dev, Some(0x10_0000), false, |s| {
            eprintln!("{what}: {s}")
        })
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", logs()));
        assert_eq!(report.id, 0x010000ed, "{what}");
        assert_eq!(
            report.interrupts, 3,
            "{what}: MSI (factorial, DMA) and INTx through QEMU's eventfds"
        );
        assert_eq!(report.dma_bytes, 2 * 4095, "{what}");
    }
}
