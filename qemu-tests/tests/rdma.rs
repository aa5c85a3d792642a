//! cio over RDMA between two QEMU guests on a private wire (`-netdev
//! socket` on the host's loopback), soft-RoCE (`rdma_rxe`) in both. Guest A
//! serves its real edu through VFIO (`vedu0`) and the emulated edu and
//! memory device with `ciod-rdma` on `rdma:192.168.77.1:7451`; guest B runs
//! the clients (`cio-rdma`). Both are ciod and cio built with the `rdma`
//! feature.

use std::time::Duration;

use cio_qemu_tests::{free_port, rig, Guest};

const A: &str = "192.168.77.1";
const B: &str = "192.168.77.2";

/// Boots guest A (edu, wire listener) then guest B (wire connector).
fn two_guests(rig: &std::path::Path) -> (Guest, Guest) {
    let wire = free_port();
    let listen = format!("socket,id=w0,listen=127.0.0.1:{wire}");
    let mut a = Guest::boot_with(
        rig,
        &[
            "-device",
            "edu",
            "-netdev",
            &listen,
            "-device",
            "virtio-net-pci,netdev=w0,mac=52:54:00:cc:00:01",
        ],
        &format!("cio.rdma=eth1:{A}"),
    );
    a.wait_for("CIO-READY", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("guest A: {e}"));
    let connect = format!("socket,id=w0,connect=127.0.0.1:{wire}");
    let mut b = Guest::boot_with(
        rig,
        &[
            "-netdev",
            &connect,
            "-device",
            "virtio-net-pci,netdev=w0,mac=52:54:00:cc:00:02",
        ],
        &format!("cio.rdma=eth1:{B}"),
    );
    b.wait_for("CIO-READY", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("guest B: {e}"));
    // B's clients prove guest A's key.
    let (rc, out) = b
        .run(
            &format!("echo {} > /tmp/psk-a && chmod 600 /tmp/psk-a", a.key),
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(rc, 0, "{out}");
    (a, b)
}

/// Runs `cio-rdma ARGS` in guest B against guest A; returns status and
/// output.
fn cio(b: &mut Guest, args: &str, timeout: Duration) -> (i32, String) {
    b.run(
        &format!("cio-rdma --psk-file /tmp/psk-a --insecure-plaintext {args}"),
        timeout,
    )
    .unwrap_or_else(|e| panic!("cio-rdma {args}: {e}"))
}

#[test]
fn edu_and_memory_device_over_soft_roce_between_two_guests() {
    let Some(rig) = rig() else { return };
    let (mut a, mut b) = two_guests(&rig);
    let ep = format!("rdma:{A}:7451");

    let (rc, out) = cio(&mut b, &format!("list {ep}"), Duration::from_secs(60));
    assert_eq!(rc, 0, "cio list over RDMA:\n{out}");
    for name in ["vedu0", "edu0", "mem0"] {
        assert!(out.contains(name), "{name} listed over RDMA:\n{out}");
    }

    // The real edu (through guest A's VFIO and vIOMMU), the emulated edu
    // and the memory device, each by a client of its own on the RDMA link:
    // edu self-tests (factorials, MSI, DMA both ways) and posted-write
    // bursts read back in order, with DMA both ways; beside them a hostile
    // client sends garbage, cut frames and silence on the same link.
    let (rc, out) = cio(
        &mut b,
        &format!(
            "soak --backend {ep} --edu vedu0 --edu edu0 --memory mem0 --seconds 20 --every 10"
        ),
        Duration::from_secs(120),
    );
    assert_eq!(rc, 0, "soak over RDMA:\n{out}");
    assert!(out.contains(" 0 errors"), "{out}");

    let (_, log) = a.run("cat /tmp/ciod.log", Duration::from_secs(20)).unwrap();
    eprintln!("guest A's ciod:\n{log}");
}
