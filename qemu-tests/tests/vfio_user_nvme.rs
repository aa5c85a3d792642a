//! A VM using a device that stays on another host, through its own kernel
//! driver: guest A (QEMU 7.2) serves its nvme, backed by an image file on
//! the host, through VFIO with `ciod`; on the host, `cio vfio-user` opens
//! it over cio and serves it on a Unix socket; guest B (QEMU 11, a vIOMMU)
//! boots with `vfio-user-pci` on that socket, and its kernel's nvme driver
//! binds the remote controller. Guest B reads what the host put in the
//! image, writes 8 MiB and reads it back with O_DIRECT; the host then checks
//! both against the image file itself. Twice: with guest B's RAM shared by
//! memfd (the server maps it), and not shared (the server reaches it with
//! DMA_READ/DMA_WRITE messages).

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use cio_qemu_tests::{
    pattern, qemu11, qmp_quit, rig, vfio_user_device, vfio_user_server, Guest, TempDir, SHARED_RAM,
};
use sha2::{Digest, Sha256};

const SERIAL: &str = "cio-remote-nvme";

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const IMAGE: usize = 16 << 20;
const MIB: usize = 1 << 20;

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The `key=value` of the one console line starting with `marker`.
fn field(g: &Guest, marker: &str, key: &str) -> String {
    let lines = g.lines_with(marker);
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("no {marker} line on guest B's console"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

#[test]
fn guest_kernel_nvme_driver_uses_a_remote_nvme_through_vfio_user() {
    remote_nvme(true);
}

#[test]
fn guest_kernel_nvme_driver_uses_a_remote_nvme_without_shared_memory() {
    remote_nvme(false);
}

/// The whole walk; `shared`: guest B's RAM is shared by memfd.
fn remote_nvme(shared: bool) {
    let Some(rig) = rig() else { return };
    // Two guests each: one walk at a time on this machine.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let qemu11 = qemu11(&rig);
    let dir =
        TempDir(std::env::temp_dir().join(format!("cio-vu-nvme-{}-{shared}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let img = dir.0.join("nvme.img");
    let mut content = pattern(0xb10c, IMAGE);
    // MiB 3 is zeros: guest B's dd reads it into the buffer that held MiB
    // 2, so zeros the device writes must reach guest memory over older
    // bytes (a mirror's copy starts zeroed; only because QEMU maps buffers
    // the device writes readable too is the guest's content compared in).
    content[3 * MIB..4 * MIB].fill(0);
    std::fs::write(&img, &content).unwrap();
    let qmp = dir.0.join("qmp.sock");
    let mut a = Guest::boot_nvme(&rig, SERIAL, &img, &qmp, "cio.nvme-local");

    // The host side: cio's vfio-user server on the remote nvme.
    let sock = dir.0.join("nvme.sock");
    let psk = dir.0.join("psk");
    std::fs::write(&psk, &a.key).unwrap();
    let log = dir.0.join("cio.log");
    let guest_a = format!("127.0.0.1:{}", a.port);
    let server = vfio_user_server(
        &rig,
        &[&guest_a, "vnvme0", "--psk-file", psk.to_str().unwrap()],
        &sock,
        &log,
    );
    let server_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let device = vfio_user_device(&sock, 5);
    let mut args: Vec<&str> = if shared {
        SHARED_RAM.to_vec()
    } else {
        Vec::new()
    };
    // qboot, not SeaBIOS: SeaBIOS drives every nvme it finds (with
    // guest-physical addresses, before the vIOMMU is on), which only slows
    // the boot down.
    args.extend(["-bios", "qboot.rom", "-device", &device]);
    let start = Instant::now();
    // loglevel=5: the nvme driver's warnings (timeouts, resets) on the
    // console.
    let mut b = Guest::boot_qemu(&qemu11, &rig, &args, "cio.test=nvme-remote loglevel=5");
    let done = b.wait_for("CIO-EXIT", Duration::from_secs(400));
    let took = start.elapsed();
    if let Err(e) = done {
        panic!("guest B: {e}\n---- cio vfio-user ----\n{}", server_log());
    }
    if std::env::var_os("CIO_TEST_RUST_LOG").is_some() {
        // Debugging: the server's log outlives the test's directory.
        let keep = std::env::temp_dir().join(format!("cio-vu-nvme-shared-{shared}.log"));
        let _ = std::fs::copy(&log, &keep);
        eprintln!("cio vfio-user's log kept in {}", keep.display());
    }
    eprintln!("guest B booted, bound the remote nvme and did its IO in {took:?}");
    for l in b.lines_with("CIO-") {
        eprintln!("guest B: {l}");
    }

    // Guest B's own kernel driver bound the controller of guest A.
    assert_eq!(field(&b, "CIO-NVME", "serial"), SERIAL);
    assert_eq!(field(&b, "CIO-NVME", "driver"), "nvme");
    assert_eq!(
        field(&b, "CIO-NVME", "sectors"),
        (IMAGE / 512).to_string(),
        "namespace size"
    );
    assert_eq!(
        field(&b, "CIO-READ", "sha256"),
        sha256(&content[..4 * MIB]),
        "what guest B read is the image's first 4 MiB"
    );
    let written = field(&b, "CIO-WRITE", "sha256");
    let back = field(&b, "CIO-BACK", "sha256");
    let dmesg = b.lines_with("CIO-DMESG");
    // (With memfd too the firmware's ROM, which is not in the memfd, is
    // read by messages while the vIOMMU is off; the device writes no ROM.)
    assert_eq!(
        server_log().contains("DMA by messages"),
        !shared,
        "guest memory the device writes reached by DMA_READ/DMA_WRITE exactly when it is not shared"
    );
    let speeds = ["CIO-READ", "CIO-WRITE", "CIO-BACK"].map(|m| field(&b, m, "speed"));
    // Guest A's own nvme driver on the same controller before it went to
    // vfio-pci, with the same reads: the baseline of the same run.
    let local = [
        field(&a, "CIO-LOCAL", "seq_read"),
        field(&a, "CIO-LOCAL", "qd1_4k_read"),
    ];
    let qd1 = field(&b, "CIO-SPEEDS", "qd1_4k_read");
    drop(b);
    drop(server);

    // The bytes are in the image behind guest A's nvme.
    qmp_quit(&qmp);
    a.wait_exit(Duration::from_secs(30)).unwrap();
    let mut f = std::fs::File::open(&img).unwrap();
    let mut tail = vec![0u8; 8 * MIB];
    f.seek(SeekFrom::Start(8 * MIB as u64)).unwrap();
    f.read_exact(&mut tail).unwrap();
    assert_eq!(sha256(&tail), written, "the image holds guest B's write");
    assert_eq!(back, written, "guest B read back what it wrote");
    // Without shared memory the server reads guest memory through guest
    // B's vIOMMU; a buffer of a command that just completed may be read as
    // the guest tears its mapping down, which the guest logs as a DMAR
    // fault (harmless: the device is done with it). Driver errors count
    // either way.
    let errors: Vec<_> = dmesg
        .iter()
        .filter(|l| shared || !l.contains("DMAR"))
        .collect();
    assert!(errors.is_empty(), "driver errors: {dmesg:?}");
    if errors.len() < dmesg.len() {
        eprintln!("guest B logged DMAR faults: {dmesg:?}");
    }
    let how = if shared { "memfd" } else { "DMA messages" };
    eprintln!(
        "guest B's nvme through cio ({how}; O_DIRECT, 1 MiB blocks): read 4 MiB at {}, write 8 MiB at {}, read 8 MiB at {}",
        speeds[0], speeds[1], speeds[2]
    );
    eprintln!(
        "vs guest A's own driver on that nvme: 8 MiB sequential read {} here, {} local ({:.3}); \
         4 KiB reads one at a time {} here, {} local ({:.3})",
        speeds[2],
        local[0],
        rate(&speeds[2]) / rate(&local[0]),
        qd1,
        local[1],
        rate(&qd1) / rate(&local[1]),
    );
}

/// The number in a speed such as `512KiB/s` or `40IOPS`.
fn rate(s: &str) -> f64 {
    s.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '/')
        .parse()
        .unwrap_or(f64::NAN)
}
