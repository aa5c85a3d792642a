//! A VM's move, device staying put, as two `cio vfio-user` processes see
//! it: the first serves a remote edu with `--handoff-to` and, when its
//! client leaves (QEMU after `device_del`), suspends the cio session into a
//! ticket; the second `--adopt`s it and serves the same open device, whose
//! state the new client's first reset (QEMU's realize) does not touch. A
//! small vfio-user client stands in for both QEMUs. (The whole move, with
//! `cio migrate` and two QEMUs, is in qemu-tests/tests/vfio_user_migrate.rs.)

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cio_hw_profiles::edu;
use common::Vu;

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cio"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running cio")
}

/// Waits (at most 20 s) for `child` to exit; whether it succeeded, and
/// what it printed.
fn finish(mut child: Child) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn an_adopted_device_keeps_its_state_across_two_servers() {
    let backend = common::backend(None);
    let host = backend.endpoint().to_string();
    let tmp = std::env::temp_dir().join(format!("cio-vu-handoff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (a, b, ticket) = (tmp.join("a.sock"), tmp.join("b.sock"), tmp.join("ticket"));
    let t = ticket.to_str().unwrap();

    // The source: the guest's driver leaves a result in the device.
    let first = spawn(&[
        "vfio-user",
        &host,
        "edu0",
        "--socket",
        a.to_str().unwrap(),
        "--handoff-to",
        t,
    ]);
    let mut vu = Vu::connect(&a);
    vu.write32(edu::reg::FACTORIAL, 5);
    assert_eq!(vu.read32(edu::reg::FACTORIAL), 120);
    drop(vu);
    let (ok, out) = finish(first);
    assert!(ok, "{out}");
    assert!(out.contains("suspended into"), "{out}");
    assert!(ticket.exists());
    // The device stayed open for the ticket.
    assert_eq!(backend.stats().open_devices, 1);

    // The destination: the same device, not reset by the realize.
    let second = spawn(&["vfio-user", "--adopt", t, "--socket", b.to_str().unwrap()]);
    let mut vu = Vu::connect(&b);
    vu.reset();
    assert_eq!(vu.read32(0), edu::ID);
    assert_eq!(
        vu.read32(edu::reg::FACTORIAL),
        120,
        "the adopted device was reset"
    );
    // The guest's own resets reach it.
    vu.reset();
    assert_eq!(vu.read32(edu::reg::FACTORIAL), 0);
    drop(vu);
    let (ok, out) = finish(second);
    assert!(ok, "{out}");
    assert!(out.contains("adopted session"), "{out}");
    backend
        .wait_stats(Duration::from_secs(10), |st| st.open_devices == 0)
        .expect("the device released when the adopter said goodbye");

    // A ticket used once is spent.
    let (ok, out) = common::cio(&["vfio-user", "--adopt", t, "--socket", a.to_str().unwrap()]);
    assert!(!ok, "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn cio_migrate_says_what_it_cannot_reach() {
    let tmp = std::env::temp_dir().join(format!("cio-migrate-{}", std::process::id()));
    let (src, dst) = (tmp.join("src.qmp"), tmp.join("dst.qmp"));
    let (ok, out) = common::cio(&[
        "migrate",
        "--from",
        src.to_str().unwrap(),
        "--to",
        dst.to_str().unwrap(),
        "--device",
        "vu0",
        "--bus",
        "rp0",
        "--ticket",
        tmp.join("t").to_str().unwrap(),
        "--socket",
        tmp.join("b.sock").to_str().unwrap(),
        "--uri",
        "unix:/nonexistent",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("source QMP") && out.contains("src.qmp"),
        "{out}"
    );
}
