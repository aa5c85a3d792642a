//! The userspace NVMe driver (`cio_frontend::drivers::nvme`) on a real
//! controller: QEMU's nvme, backed by an image file on the host, bound to
//! vfio-pci by the guest's kernel and served by the guest's ciod as
//! `vnvme0`. The host brings the controller up across user-net, checks
//! Identify against what QEMU was given, writes and reads back blocks with
//! completions by MSI-X, and, once QEMU has quit, finds the bytes in the
//! image file itself.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use cio_core::Device;
use cio_frontend::drivers::nvme::{Nvme, NvmeError, Options};
use cio_frontend::{Client, ClientOptions};
use cio_qemu_tests::{pattern, qmp_quit, rig, Guest, TempDir};
use cio_transports::{Endpoint, Psk};

const SERIAL: &str = "cio-nvme-test-0";
const IMAGE: u64 = 8 << 20;
/// QEMU's nvme default logical block size.
const BLOCK: u64 = 512;

/// Asks QEMU to quit through its QMP socket (a clean exit: its block
/// layer flushes the image) and waits for its answer.
/// The running QEMU's version ("7.2.22" from "QEMU emulator version
/// 7.2.22 (Debian ...)").
fn qemu_version() -> String {
    let out = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 --version");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn nvme_driver_on_qemu_nvme_through_vfio() {
    let Some(rig) = rig() else { return };
    let dir = TempDir(std::env::temp_dir().join(format!("cio-nvme-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let img = dir.0.join("nvme.img");
    // Nonzero everywhere, so a block the test never wrote is still told
    // apart from one that reads back zeros.
    std::fs::write(&img, pattern(0xfeed, IMAGE as usize)).unwrap();
    let qmp = dir.0.join("qmp.sock");
    let boot = Instant::now();
    let mut g = Guest::boot_nvme(&rig, SERIAL, &img, &qmp, "");
    let booted = boot.elapsed();

    let ep: Endpoint = format!("127.0.0.1:{}", g.port).parse().unwrap();
    let client = Client::connect(
        &ep,
        ClientOptions {
            psk: Some(Psk::new(g.key.as_bytes().to_vec()).unwrap()),
            reply_timeout: Duration::from_secs(30),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let mut dev = client.open("vnvme0").unwrap();
    let vendor = Device::info(&dev).vendor;

    let t = Instant::now();
    let mut nvme = Nvme::new(
        &mut dev,
        Options {
            command_timeout: Duration::from_secs(30),
            // Long enough that every completion should come by interrupt:
            // the count below checks MSI-X delivery, not the fallback.
            irq_poll_interval: Duration::from_secs(5),
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("bringing the controller up: {e}"));
    let up = t.elapsed();

    // Identify: what QEMU was told on its command line, and the image size.
    let ctrl = nvme.controller().clone();
    let ns = *nvme.namespace();
    eprintln!(
        "nvme: vs {:#x}, cap {:#018x}, serial {:?}, model {:?}, firmware {:?}, mdts {}, {} blocks of {} bytes",
        nvme.version(),
        nvme.cap().0,
        ctrl.serial,
        ctrl.model,
        ctrl.firmware,
        ctrl.mdts,
        ns.blocks,
        ns.block_size
    );
    assert_eq!(ctrl.serial, SERIAL);
    assert_eq!(ctrl.model, "QEMU NVMe Ctrl");
    let qemu = qemu_version();
    assert!(
        !ctrl.firmware.is_empty() && qemu.starts_with(&ctrl.firmware),
        "firmware {:?} is QEMU's version {qemu:?}",
        ctrl.firmware
    );
    assert_eq!(ctrl.vendor, vendor, "identify vid = pci vendor id");
    assert_eq!(nvme.version() >> 16, 1, "NVMe 1.x");
    assert_eq!(u64::from(ns.block_size), BLOCK);
    assert_eq!(ns.blocks, IMAGE / BLOCK);
    assert!(nvme.uses_interrupts(), "the function offers MSI-X");

    // Two pages (PRP1 + PRP2) at one LBA, one block at the last LBA.
    let last = ns.blocks - 1;
    let writes = [(8u64, pattern(0x1234, 8192)), (last, pattern(0x5678, 512))];
    let t = Instant::now();
    for (lba, data) in &writes {
        nvme.write_blocks(*lba, data)
            .unwrap_or_else(|e| panic!("writing lba {lba}: {e}"));
    }
    for (lba, data) in &writes {
        let back = nvme
            .read_blocks(*lba, (data.len() as u64 / BLOCK) as u32)
            .unwrap_or_else(|e| panic!("reading lba {lba}: {e}"));
        assert!(back == *data, "lba {lba}: read back differs");
    }
    // A block nobody wrote reads as the image file has it.
    let untouched = nvme.read_blocks(100, 1).unwrap();
    let image = pattern(0xfeed, IMAGE as usize);
    assert!(untouched[..] == image[100 * 512..101 * 512], "lba 100");
    let io = t.elapsed();

    // Refused before the device sees them, with errors that say why.
    let e = nvme.read_blocks(0, 17).unwrap_err();
    assert!(matches!(e, NvmeError::Transfer { .. }), "{e}");
    let e = nvme.read_blocks(ns.blocks, 1).unwrap_err();
    assert!(matches!(e, NvmeError::OutOfRange { .. }), "{e}");

    let stats = nvme.stats();
    eprintln!("nvme: boot {booted:?}, bring-up {up:?}, 5 I/Os in {io:?}, {stats:?}");
    assert_eq!(
        stats.by_interrupt, 5,
        "every I/O completion by MSI-X through VFIO eventfds: {stats:?}"
    );
    nvme.shutdown()
        .unwrap_or_else(|e| panic!("shutting down: {e}"));
    drop(nvme);
    // The controller is shut down: CC.EN clear, and this session may go.
    assert_eq!(dev.read32(0, 0x14).unwrap() & 1, 0, "CC.EN after shutdown");
    drop(dev);
    drop(client);

    // The independent check: QEMU quits cleanly, and the image file holds
    // exactly what the driver wrote, where it wrote it.
    qmp_quit(&qmp);
    let status = g.wait_exit(Duration::from_secs(30));
    let mut f = std::fs::File::open(&img).unwrap();
    let mut on_disk = Vec::new();
    for (lba, data) in &writes {
        let mut b = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(lba * BLOCK)).unwrap();
        f.read_exact(&mut b).unwrap();
        on_disk.push((*lba, b == *data));
    }
    let len = f.metadata().unwrap().len();
    drop(f);
    let status = status.unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "qemu quit with {status}");
    assert_eq!(len, IMAGE, "image size unchanged");
    for (lba, same) in on_disk {
        assert!(
            same,
            "image file at lba {lba} differs from what was written"
        );
    }
}
