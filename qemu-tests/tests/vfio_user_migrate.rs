//! A VM with a `vfio-user-pci` device moves to another QEMU while the device
//! stays on its host: the documented path, since QEMU carries no state for a
//! vfio-user device. A host ciod serves an emulated edu; `cio vfio-user
//! --handoff-to` serves it to the source QEMU, whose guest uses it through
//! its own vfio-pci (the host runs the edu self-test through the guest's
//! ciod). Then `cio migrate` moves it: `device_del` (the guest sees a PCIe hot-unplug), the server
//! suspends its cio session into a ticket; `migrate` to a second QEMU on
//! this machine; `cio vfio-user --adopt` serves the same session to it and
//! `device_add` plugs the device back (a hot-plug); the guest binds it again
//! and the self-test passes through the destination. The device on the
//! host is never closed: the adopter names the session the source handed
//! off, and the destination's realize-time reset does not reach it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cio_core::Device;
use cio_frontend::drivers::edu::self_test_parts;
use cio_frontend::{Client, ClientOptions};
use cio_qemu_tests::{
    qemu11, rig, rig_binary, vfio_user_server, Guest, HostCiod, TempDir, SHARED_RAM,
};
use cio_transports::{Endpoint, Psk};
use serde_json::json;

/// The vfio-user device on the hot-pluggable root port `rp0`.
fn device(sock: &Path) -> serde_json::Value {
    json!({
        "driver": "vfio-user-pci",
        "id": "vu0",
        "bus": "rp0",
        "socket": {"type": "unix", "path": sock},
        "x-msg-timeout": 60000
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits (at most 20 s) until `path` exists.
fn wait_file(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The edu self-test through the guest's ciod at `port` (its key `key`).
fn self_test(port: u16, key: &str, what: &str) {
    let ep: Endpoint = format!("127.0.0.1:{port}").parse().unwrap();
    let client = Client::connect(
        &ep,
        ClientOptions {
            psk: Some(Psk::new(key.as_bytes().to_vec()).unwrap()),
            reply_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: connecting to the guest's ciod: {e}"));
    let mut dev = client.open("vedu0").unwrap();
    assert_eq!(Device::info(&dev).vendor, 0x1234, "{what}");
    let report = self_test_parts(&mut dev, Some(0x10_0000), false, |s| {
        eprintln!("{what}: {s}")
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(report.interrupts, 3, "{what}: MSI and INTx");
    assert_eq!(report.dma_bytes, 2 * 4095, "{what}");
}

#[test]
fn a_vm_moves_with_its_vfio_user_device_unplugged_and_plugged_back() {
    let Some(rig) = rig() else { return };
    let qemu11 = qemu11(&rig);
    let dir = TempDir(std::env::temp_dir().join(format!("cio-vu-mig-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();

    // The device's host: a ciod with the emulated edu.
    let ciod = HostCiod::start(&rig, &dir.0);
    let (listen, psk_arg) = (&ciod.listen, ciod.psk_arg());
    let (sock_a, sock_b) = (dir.0.join("a.sock"), dir.0.join("b.sock"));
    let log_a = dir.0.join("a.log");
    let ticket = dir.0.join("ticket");
    let ticket_arg = ticket.to_str().unwrap();
    let mut first = vfio_user_server(
        &rig,
        &[
            listen,
            "edu0",
            "--psk-file",
            psk_arg,
            "--handoff-to",
            ticket_arg,
        ],
        &sock_a,
        &log_a,
    );

    // The source VM, the device on a hot-pluggable PCIe root port (native
    // PCIe hotplug: the guest's pciehp).
    let root_port = [
        "-device",
        "pcie-root-port,id=rp0,chassis=1,slot=1",
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ];
    let (qmp_a, qmp_b) = (dir.0.join("qmp-a.sock"), dir.0.join("qmp-b.sock"));
    let qmp_arg = |p: &Path| format!("unix:{},server=on,wait=off", p.display());
    let (qa, dev_a) = (qmp_arg(&qmp_a), device(&sock_a).to_string());
    let mut args: Vec<&str> = SHARED_RAM.to_vec();
    args.extend(root_port);
    args.extend(["-qmp", &qa, "-device", &dev_a]);
    let mut src = Guest::boot_qemu(&qemu11, &rig, &args, "");
    src.wait_for("CIO-READY", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\n{}", read(&log_a)));
    let vfio = src.lines_with("CIO-VFIO vedu0");
    assert_eq!(vfio.len(), 1, "the edu bound to vfio-pci: {vfio:?}");
    let bdf = vfio[0]
        .split("CIO-VFIO vedu0 ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    self_test(src.port, &src.key, "before the move");

    // The guest lets go of the device (its ciod holds it through VFIO).
    let (rc, out) = src
        .run("kill $(pidof ciod); sleep 0.5", Duration::from_secs(30))
        .unwrap();
    assert_eq!(rc, 0, "{out}");

    // The destination QEMU, same machine without the device, waiting for
    // the migration.
    let incoming = format!("unix:{}", dir.0.join("mig.sock").display());
    let qb = qmp_arg(&qmp_b);
    let mut args: Vec<&str> = SHARED_RAM.to_vec();
    args.extend(root_port);
    args.extend(["-qmp", &qb, "-incoming", &incoming]);
    let mut dst = Guest::boot_qemu(&qemu11, &rig, &args, "");
    assert!(wait_file(&qmp_b), "the destination QEMU has no QMP socket");

    // The move: unplug, hand off, migrate, adopt, plug back.
    let started = Instant::now();
    let moved = Command::new(rig_binary(&rig, "cio"))
        .args([
            "--psk-file",
            psk_arg,
            "migrate",
            "--device",
            "vu0",
            "--bus",
            "rp0",
        ])
        .arg("--from")
        .arg(&qmp_a)
        .arg("--to")
        .arg(&qmp_b)
        .arg("--ticket")
        .arg(&ticket)
        .arg("--socket")
        .arg(&sock_b)
        .args(["--uri", &incoming])
        .env("RUST_LOG", "info")
        .output()
        .expect("running cio migrate");
    let said = String::from_utf8_lossy(&moved.stderr).to_string();
    let _adopter = said
        .split("adopter (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(|pid| KillPid(pid.to_string()));
    assert!(
        moved.status.success(),
        "cio migrate: {said}
{}
{:?}",
        read(&log_a),
        src.run("dmesg | tail -n 20", Duration::from_secs(30))
    );
    let took = started.elapsed();
    eprintln!("{said}");
    let handed = read(&log_a);
    assert!(first.0.wait().unwrap().success(), "{handed}");
    let session = handed
        .lines()
        .find(|l| l.contains("suspended into"))
        .and_then(|l| l.split("session ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no ticket in the source's log: {handed}"))
        .to_string();
    let log_b = ticket.with_extension("adopter.log");

    // The guest's pciehp brings it up; it goes to vfio-pci again and a
    // ciod serves it as before.
    let bind = format!(
        "d=/sys/bus/pci/devices/{bdf}; i=0; while [ ! -e $d ] && [ $i -lt 300 ]; do i=$((i+1)); sleep 0.1; done; \
         echo vfio-pci > $d/driver_override && echo {bdf} > /sys/bus/pci/drivers_probe && \
         basename $(readlink $d/driver) && \
         (/bin/ciod --listen 0.0.0.0:7451 --no-announce --insecure-plaintext --psk-file /tmp/psk \
         --vfio {bdf}=vedu0 > /tmp/ciod2.log 2>&1 &) && \
         i=0; while ! grep -q ':1D1B 00000000:0000 0A' /proc/net/tcp && [ $i -lt 200 ]; do i=$((i+1)); sleep 0.1; done"
    );
    let (rc, out) = dst.run(&bind, Duration::from_secs(90)).unwrap();
    assert_eq!(
        rc,
        0,
        "{out}\n{:?}",
        dst.run("dmesg | tail -n 20", Duration::from_secs(30))
    );
    assert!(out.contains("vfio-pci"), "{out}");
    // The guest's key is the source's (its memory came along).
    self_test(dst.port, &src.key, "after the move");

    let adopted = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert!(
        adopted.contains(&format!("adopted session {session}")),
        "the adopter took the source's session {session}: {adopted}"
    );
    assert!(
        adopted.contains("does not reach it"),
        "the destination's realize-time reset was kept from the device: {adopted}"
    );
    eprintln!(
        "vfio-user device moved with the VM by cio migrate in {took:?}; guest-visible: a PCIe hot-unplug and a hot-plug"
    );
    drop(dst);
    drop(src);
}

/// Kills a process by pid when dropped (the detached adopter, should the
/// test fail before its client comes and goes).
struct KillPid(String);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.0).status();
    }
}
