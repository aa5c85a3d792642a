//! `cio man` and `cio completions`: generated from the command definitions,
//! so every command is in them.

mod common;

use common::cio;

#[test]
fn man_page_and_completions_name_every_command() {
    let (ok, man) = cio(&["man"]);
    assert!(ok && man.contains(".TH cio 1"), "{man}");
    for cmd in [
        "keygen",
        "trust",
        "list",
        "info",
        "read",
        "dump",
        "usb",
        "vfio\\-user",
        "migrate",
        "soak",
        "bench",
    ] {
        assert!(man.contains(cmd), "man page lacks {cmd}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out) = cio(&["completions", shell]);
        assert!(
            ok && out.contains("keygen") && out.contains("known-backends"),
            "{shell}: {out}"
        );
    }
    let (ok, out) = cio(&["completions", "bash"]);
    assert!(ok && out.contains("complete -F _cio"), "{out}");
}
