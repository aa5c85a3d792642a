//! `cio keygen`, `cio trust` and TLS from the command line: a client that
//! made its key, trusted the backend's and was authorized lists devices;
//! each missing step is refused with the command that fixes it.

mod common;

use cio_backend::models::Edu;
use cio_backend::{Limits, Security, Server, ServerConfig};
use cio_transports::{AuthorizedClients, Fingerprint, Identity, ServerTls};
use common::cio;

#[test]
fn keygen_trust_and_a_tls_listing() {
    let dir = std::env::temp_dir().join(format!("cio-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let id = dir.join("id.pem");
    let known = dir.join("known_backends");
    let (id_s, known_s) = (id.to_str().unwrap(), known.to_str().unwrap());

    let (ok, out) = cio(&["keygen", "--out", id_s]);
    assert!(ok, "{out}");
    let me: Fingerprint = out.lines().next().unwrap().parse().unwrap();
    assert_eq!(Identity::load(&id).unwrap().fingerprint(), me);
    let (ok, out) = cio(&["keygen", "--out", id_s]);
    assert!(!ok && out.contains("exists already"), "{out}");

    let backend = Identity::generate("backend").unwrap();
    let mut allowed = AuthorizedClients::default();
    allowed.insert(me, "me");
    let s = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk: None,
        devices: vec![Box::new(Edu::new("edu0"))],
        limits: Limits::default(),
        usb: Default::default(),
        security: Security::Tls(ServerTls::new(&backend, allowed, false).unwrap()),
    })
    .unwrap()
    .spawn()
    .unwrap();
    let host = s.endpoint().to_string();
    let host = host.trim_start_matches("tcp:");
    let base = ["--identity", id_s, "--known-backends", known_s];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        cio(&a)
    };

    // Plaintext to a TLS listener: the backend says what it wants.
    let (ok, out) = with(&["list", host]);
    assert!(!ok && out.contains("TLS only"), "{out}");
    // TLS asked for, but the backend's key is not known yet.
    let (ok, out) = with(&["--tls", "list", host]);
    assert!(!ok && out.contains("cio trust"), "{out}");
    // A wrong key given for this run.
    let wrong = Identity::generate("x").unwrap().fingerprint().to_string();
    let (ok, out) = with(&["--backend-key", &wrong, "list", host]);
    assert!(!ok && out.contains("not the key trusted"), "{out}");

    let fp = backend.fingerprint().to_string();
    let (ok, out) = with(&["trust", host, &fp]);
    assert!(ok, "{out}");
    let (ok, out) = with(&["trust", host, &wrong]);
    assert!(!ok && out.contains("already trusts"), "{out}");
    // Known now: TLS without --tls.
    let (ok, out) = with(&["list", host]);
    assert!(ok && out.contains("edu0"), "{out}");
    let (ok, out) = with(&["read", host, "edu0", "bar0", "0"]);
    assert!(ok && out.contains("0x010000ed"), "{out}");

    // No identity: the error says how to make one.
    let (ok, out) = cio(&[
        "--identity",
        dir.join("none.pem").to_str().unwrap(),
        "--known-backends",
        known_s,
        "list",
        host,
    ]);
    assert!(!ok && out.contains("cio keygen"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
