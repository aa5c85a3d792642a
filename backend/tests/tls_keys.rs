//! The `ciod` binary with TLS: `ciod keygen`, a listener that lets in only
//! the authorized client keys, SIGHUP reloading them without a restart,
//! and the refusal to listen beyond loopback in plaintext.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cio_core::wire::{Message, PROTOCOL_VERSION};
use cio_core::FrameDecoder;
use cio_transports::{ClientTls, Conn, Endpoint, Fingerprint, Identity, Pin};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(d: &Daemon, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), d.0.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig}");
}

fn ciod(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ciod"));
    c.args(args);
    c
}

/// Hello over TLS as `me`; the backend's first answer, as text.
fn hello(ep: &Endpoint, me: &Identity, backend: Fingerprint) -> Result<String, String> {
    let tls = ClientTls {
        identity: me.clone(),
        pin: Pin::Key(backend),
    };
    let conn = Conn::connect_tls(ep, Duration::from_secs(5), &tls).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = bytes::BytesMut::new();
    Message::Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        session: 0,
        nonce: [7; 32],
        client: "test".into(),
    }
    .encode(1, 0, &mut buf);
    (&conn).write_all(&buf).map_err(|e| e.to_string())?;
    let mut dec = FrameDecoder::new();
    loop {
        if let Some(f) = dec.next_frame().map_err(|e| e.to_string())? {
            return Ok(format!("{:?}", f.msg));
        }
        match conn.recv_into(dec.buffer(), 4096, false) {
            Ok(0) => return Err("closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn keygen_authorized_clients_and_sighup_reload() {
    let dir = std::env::temp_dir().join(format!("ciod-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let key = dir.join("ciod.pem");
    let out = ciod(&["keygen", key.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let fp: Fingerprint = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(Identity::load(&key).unwrap().fingerprint(), fp);
    let again = ciod(&["keygen", key.to_str().unwrap()]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("exists already (key {fp})")));

    let (alice, bob) = (
        Identity::generate("a").unwrap(),
        Identity::generate("b").unwrap(),
    );
    let clients = dir.join("authorized_clients");
    std::fs::write(&clients, format!("{} alice\n", alice.fingerprint())).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let ep: Endpoint = listen.parse().unwrap();
    let mut d = Daemon(
        ciod(&["--listen", &listen, "--emulate", "edu", "--identity"])
            .arg(&key)
            .arg("--authorized-clients")
            .arg(&clients)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let welcome = loop {
        match hello(&ep, &alice, fp) {
            Ok(w) => break w,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("alice: {e}"),
        }
    };
    assert!(welcome.starts_with("Welcome"), "{welcome}");
    let e = hello(&ep, &bob, fp).unwrap_err();
    assert!(e.contains("refused this client's key"), "{e}");

    std::fs::write(
        &clients,
        format!("{} alice\n{} bob\n", alice.fingerprint(), bob.fingerprint()),
    )
    .unwrap();
    signal(&d, "HUP");
    let start = Instant::now();
    loop {
        match hello(&ep, &bob, fp) {
            Ok(w) => {
                assert!(w.starts_with("Welcome"), "{w}");
                break;
            }
            Err(e) if start.elapsed() > Duration::from_secs(5) => panic!("after SIGHUP: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "SIGHUP did not stop ciod"
    );
    signal(&d, "TERM");
    assert!(d.0.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plaintext_beyond_loopback_is_refused_at_start() {
    let out = ciod(&["--listen", "0.0.0.0:0", "--emulate", "edu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("without TLS") && text.contains("ciod keygen"),
        "{text}"
    );
}
