//! `ciod man` and `ciod completions`: generated from the command
//! definitions, so every option is in them.

use std::process::Command;

fn ciod(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ciod"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn man_page_and_completions_name_every_option() {
    let (ok, man) = ciod(&["man"]);
    assert!(ok && man.contains(".TH ciod 1"), "{man}");
    for opt in [
        "identity",
        "authorized\\-clients",
        "insecure\\-plaintext",
        "max\\-mapped\\-total",
        "keygen",
    ] {
        assert!(man.contains(opt), "man page lacks {opt}");
    }
    let (ok, out) = ciod(&["completions", "bash"]);
    assert!(
        ok && out.contains("complete -F _ciod") && out.contains("--authorized-clients"),
        "{out}"
    );
}
