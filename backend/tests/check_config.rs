//! `ciod --check-config`: the shipped example is valid, and each kind of
//! mistake is named.

use std::process::Command;

fn check(text: &str) -> (bool, String) {
    let path = std::env::temp_dir().join(format!(
        "ciod-check-{}-{}.toml",
        std::process::id(),
        text.len()
    ));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ciod"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ciod.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_ciod"))
        .args(["--check-config", example])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("valid"), "{text}");
    for name in ["edu0", "mem0", "nic0"] {
        assert!(text.contains(&format!("device {name:?}")), "{text}");
    }
}

#[test]
fn each_mistake_is_named() {
    for (text, want) in [
        ("lisen = \"x\"\n", "unknown field"),
        ("[[device]]\nmodel = \"vfio\"\n", "needs bdf"),
        (
            "[[device]]\nmodel = \"edu\"\nname = \"a\"\n[[device]]\nmodel = \"edu\"\nname = \"a\"\n",
            "two devices are named",
        ),
        ("[[device]]\nmodel = \"edu\"\nrelease = \"keep\"\n", "unknown variant"),
        ("[[device]]\nmodel = \"memory\"\nsize = \"3M\"\n", "power of two"),
        ("listen = \"0.0.0.0:7451\"\n", "without TLS"),
        (
            "listen = \"0.0.0.0:7451\"\ninsecure_plaintext = true\n",
            "without a pre-shared key",
        ),
        ("identity = \"/nonexistent/ciod.pem\"\n", "/nonexistent/ciod.pem"),
        ("authorized_clients = \"/etc/passwd\"\n", "no identity"),
        ("psk_file = \"/nonexistent/key\"\n", "psk_file"),
        ("listen = \"tcp:\"\n", "listen"),
        ("[[access]]\nclient = \"\"\ndevices = [\"edu0\"]\n", "empty client"),
        ("[[access]]\nclient = \"a\"\ndevice = [\"edu0\"]\n", "unknown field"),
        ("[limits]\nmax_sessions = 0\n", "max_sessions = 0: must be between 1 and 4096"),
        ("[limits]\nmax_mapped_total = \"3X\"\n", "invalid size"),
        ("[limits]\nmax_session = 3\n", "unknown field"),
        ("[limits]\npoll_us = 200000\n", "poll_us = 200000: must be between 0 and 100000"),
    ] {
        let (ok, out) = check(text);
        assert!(!ok, "{text:?} passed: {out}");
        assert!(out.contains(want), "{text:?}: expected {want:?} in {out:?}");
    }
}
