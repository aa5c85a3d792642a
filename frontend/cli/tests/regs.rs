//! `cio read`, `cio write`, `cio dump` against a running backend.

mod common;

use common::cio;

#[test]
fn registers_by_offset_and_name_and_clear_refusals() {
    let s = common::backend(None);
    let h = s.endpoint().to_string();
    let (ok, out) = cio(&["read", &h, "edu0", "bar0", "0"]);
    assert!(ok && out.contains("bar0+0x0 (id) = 0x010000ed"), "{out}");
    let (ok, out) = cio(&["read", &h, "edu0", "0", "id"]);
    assert!(ok && out.contains("= 0x010000ed"), "{out}");
    let (ok, out) = cio(&["read", &h, "edu0", "config", "0", "2"]);
    assert!(ok && out.contains("config+0x0 = 0x1234"), "{out}");
    let (ok, out) = cio(&["write", &h, "edu0", "bar0", "liveness", "0x5"]);
    assert!(
        ok && out.contains("bar0+0x4 (liveness) <- 0x00000005"),
        "{out}"
    );
    let (ok, out) = cio(&[
        "write",
        &h,
        "mem0",
        "bar0",
        "0x10",
        "0x1122334455667788",
        "8",
    ]);
    assert!(ok, "{out}");
    for (args, want) in [
        (
            vec!["read", &h, "edu0", "bar0", "0", "2"],
            "accepted widths: 4, 8",
        ),
        (
            vec!["read", &h, "edu0", "bar0", "nope"],
            "no register \"nope\"",
        ),
        (
            vec!["read", &h, "edu0", "bar0", "0x100000"],
            "past the end of region 0",
        ),
        (vec!["read", &h, "edu0", "bar9", "0"], "no region"),
        (vec!["read", &h, "edu0", "rom", "0"], "give 0-5"),
        (
            vec!["write", &h, "edu0", "bar0", "0", "0x1_0000_0000"],
            "does not fit in 4 bytes",
        ),
        (
            vec!["read", &h, "edu0", "bar0", "0", "3"],
            "give 1, 2, 4 or 8",
        ),
        (vec!["read", &h, "nodev", "bar0", "0"], "no device named"),
    ] {
        let (ok, out) = cio(&args);
        assert!(!ok, "{args:?} passed: {out}");
        assert!(out.contains(want), "{args:?}: expected {want:?} in {out}");
    }
}

#[test]
fn dumps_as_hex_and_raw() {
    let s = common::backend(None);
    let h = s.endpoint().to_string();
    let (ok, out) = cio(&["dump", &h, "edu0", "bar0", "--len", "16"]);
    assert!(ok, "{out}");
    // The identification register, little-endian, then liveness (0).
    assert!(
        out.starts_with("00000000: ed 00 00 01 00 00 00 00"),
        "{out}"
    );
    let file = std::env::temp_dir().join(format!("cio-dump-{}", std::process::id()));
    let f = file.to_str().unwrap();
    let (ok, out) = cio(&[
        "dump", &h, "mem0", "bar0", "--offset", "0x100", "--len", "4096", "--out", f,
    ]);
    assert!(ok && out.contains("4096 bytes"), "{out}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 4096);
    std::fs::remove_file(&file).unwrap();
    // The whole (64 KiB) region when no length is given.
    let (ok, out) = cio(&["dump", &h, "mem0", "bar0"]);
    assert!(ok && out.lines().count() == 4096, "{}", out.lines().count());
}

#[test]
fn config_space_decoded() {
    let s = common::backend(None);
    let h = s.endpoint().to_string();
    let (ok, out) = cio(&["config", &h, "edu0"]);
    assert!(ok, "{out}");
    for want in [
        "edu0: 1234:11e8 (rev 10) class 00ff00",
        "Subsystem: 1af4:1100",
        "Interrupt: pin A",
        "Capabilities: [40] MSI: Enable- Count=1/1 64bit+",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    let (ok, out) = cio(&["config", &h, "mem0"]);
    assert!(
        ok && out.contains("BAR0: 0x0000000c"),
        "64-bit prefetchable BAR0: {out}"
    );
}

#[test]
fn a_profile_given_by_file_names_registers() {
    let s = common::backend(None);
    let h = s.endpoint().to_string();
    let path = std::env::temp_dir().join(format!("cio-profile-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "name = \"mine\"\ndescription = \"x\"\nvendor = 0x1234\ndevice = 0xc10d\nreset = \"none\"\nquirks = []\n\
         [[bar]]\nindex = 2\nsize = 0x1000\nwidths = [8]\n\
         [[bar.register]]\nname = \"source\"\noffset = 0x0\nwidth = 8\naccess = \"rw\"\ndescription = \"d\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (ok, out) = cio(&[
        "--profile",
        p,
        "write",
        &h,
        "mem0",
        "bar2",
        "source",
        "0x1234",
    ]);
    assert!(
        ok && out.contains("bar2+0x0 (source) <- 0x0000000000001234"),
        "{out}"
    );
    // Without it the built-in profile's names apply.
    let (ok, out) = cio(&["read", &h, "mem0", "bar2", "source"]);
    assert!(!ok && out.contains("no register \"source\""), "{out}");
    std::fs::write(&path, "name = \"broken\"").unwrap();
    let (ok, out) = cio(&["--profile", p, "list", &h]);
    assert!(!ok, "{out}");
    std::fs::remove_file(&path).unwrap();
}
