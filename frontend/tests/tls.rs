//! TLS links: a pinned session carries everything a plain one does, and
//! every wrong key, missing key, protocol mix-up and man in the middle is
//! refused with an error that says which, before any device is visible.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use cio_backend::models::{Edu, Memory};
use cio_backend::{Limits, Security, Server, ServerConfig, ServerHandle};
use cio_core::Device;
use cio_frontend::drivers::edu;
use cio_frontend::{Client, ClientOptions};
use cio_transports::{AuthorizedClients, ClientTls, Conn, Endpoint, Identity, Pin, Psk, ServerTls};
use common::proxy::{Cut, Proxy};

fn backend(security: Security, psk: Option<Psk>) -> ServerHandle {
    Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk,
        devices: vec![
            Box::new(Edu::new("edu0")),
            Box::new(Memory::new("mem0", 1 << 20).unwrap()),
        ],
        limits: Limits::default(),
        usb: Default::default(),
        security,
    })
    .unwrap()
    .spawn()
    .unwrap()
}

/// A backend with its own key that lets `clients` in.
fn tls_backend(clients: &[&Identity], psk: Option<Psk>) -> (ServerHandle, Identity) {
    let id = Identity::generate("backend").unwrap();
    let mut allowed = AuthorizedClients::default();
    for (i, c) in clients.iter().enumerate() {
        allowed.insert(c.fingerprint(), &format!("client{i}"));
    }
    let any = psk.is_some() && clients.is_empty();
    let tls = ServerTls::new(&id, allowed, any).unwrap();
    (backend(Security::Tls(tls), psk), id)
}

fn tls_opts(me: &Identity, pin: Pin) -> ClientOptions {
    ClientOptions {
        tls: Some(ClientTls {
            identity: me.clone(),
            pin,
        }),
        ..common::opts()
    }
}

fn refused(ep: &Endpoint, opts: ClientOptions) -> String {
    match Client::connect(ep, opts) {
        Ok(c) => panic!(
            "connected; devices visible: {:?}",
            c.list().map(|l| l.len())
        ),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s += &format!(": {c}");
                src = c.source();
            }
            s
        }
    }
}

#[test]
fn a_pinned_session_carries_registers_interrupts_and_bulk_dma() {
    let me = Identity::generate("client").unwrap();
    let (s, id) = tls_backend(&[&me], None);
    let c = Client::connect(s.endpoint(), tls_opts(&me, Pin::Key(id.fingerprint()))).unwrap();
    assert_eq!(c.list().unwrap().len(), 2);
    {
        let mut d = c.open("edu0").unwrap();
        edu::self_test(&mut d, 0x10_0000, |_| {}).unwrap();
    }
    let mut m = c.open("mem0").unwrap();
    common::memory_dma_round_trip(&mut m, 768 * 1024);
    // 4096 posted writes, then one read that must see the last of them.
    for i in 0..4096u64 {
        m.write64(0, (i % 512) * 8, i).unwrap();
    }
    assert_eq!(m.read64(0, 511 * 8).unwrap(), 4095);
}

#[test]
fn a_resumable_tls_session_survives_cuts() {
    let me = Identity::generate("client").unwrap();
    let (s, id) = tls_backend(&[&me], None);
    let proxy = Proxy::start(s.endpoint());
    let opts = ClientOptions {
        keepalive: Duration::from_millis(50),
        ..tls_opts(&me, Pin::Key(id.fingerprint()))
    };
    let c = Client::connect(&proxy.endpoint(), opts).unwrap();
    let mut d = c.open("mem0").unwrap();
    for round in 0..6u64 {
        d.write64(0, 8 * round, round + 100).unwrap();
        assert_eq!(d.read64(0, 8 * round).unwrap(), round + 100);
        proxy.cut(if round % 2 == 0 {
            Cut::Reset
        } else {
            Cut::Silent
        });
    }
    for round in 0..6u64 {
        assert_eq!(
            d.read64(0, 8 * round).unwrap(),
            round + 100,
            "lost across a cut"
        );
    }
    assert!(proxy.accepted() >= 6, "the cuts made new TLS connections");
}

#[test]
fn wrong_or_unknown_keys_are_refused_with_the_reason() {
    let me = Identity::generate("client").unwrap();
    let stranger = Identity::generate("stranger").unwrap();
    let (s, id) = tls_backend(&[&me], None);
    let ep = s.endpoint();

    // The backend presents a key other than the one pinned.
    let other = Identity::generate("other").unwrap().fingerprint();
    let e = refused(ep, tls_opts(&me, Pin::Key(other)));
    assert!(
        e.contains(&id.fingerprint().to_string()) && e.contains("not the key trusted"),
        "{e}"
    );

    // A client key the backend does not know.
    let e = refused(ep, tls_opts(&stranger, Pin::Key(id.fingerprint())));
    assert!(
        e.contains("refused this client's key") && e.contains(&stranger.fingerprint().to_string()),
        "{e}"
    );

    // Any key only with a pre-shared key: without one the client refuses
    // a backend that did not prove anything.
    let e = refused(ep, tls_opts(&me, Pin::AnyWithPsk));
    assert!(e.contains("needs a pre-shared key"), "{e}");

    // The right pair still works after all that.
    let c = Client::connect(ep, tls_opts(&me, Pin::Key(id.fingerprint()))).unwrap();
    assert_eq!(c.list().unwrap().len(), 2);
}

#[test]
fn plaintext_and_tls_mix_ups_say_so() {
    let me = Identity::generate("client").unwrap();
    let (tls, id) = tls_backend(&[&me], None);
    // A plaintext client to a TLS listener gets a plaintext error frame.
    let e = refused(tls.endpoint(), common::opts());
    assert!(e.contains("TLS only") && e.contains("TLS required"), "{e}");

    // A TLS client to a plaintext listener.
    let plain = backend(Security::LocalPlaintext, None);
    let e = refused(plain.endpoint(), tls_opts(&me, Pin::Key(id.fingerprint())));
    assert!(e.contains("does not speak TLS"), "{e}");

    // Plaintext to an address beyond this machine is refused by both.
    let e = Server::bind(ServerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        psk: None,
        devices: vec![],
        limits: Limits::default(),
        usb: Default::default(),
        security: Security::LocalPlaintext,
    })
    .unwrap_err();
    assert!(e.to_string().contains("without TLS"), "{e}");
    let e = refused(&"192.0.2.1:7451".parse().unwrap(), common::opts());
    assert!(e.contains("in plaintext"), "{e}");
}

/// A man in the middle: terminates the client's TLS with its own key and
/// opens its own TLS connection to the backend, relaying the plaintext.
fn mitm(backend: Endpoint, own: Identity, as_client: Identity, backend_key: Pin) -> Endpoint {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::from(l.local_addr().unwrap());
    let server = ServerTls::new(&own, AuthorizedClients::default(), true).unwrap();
    std::thread::spawn(move || {
        for down in l.incoming().take(4) {
            let Ok(down) = down else { return };
            let server = server.clone();
            let (backend, as_client) = (backend.clone(), as_client.clone());
            std::thread::spawn(move || {
                let down = Conn::Tcp(down).into_tls_server(&server).unwrap();
                let tls = ClientTls {
                    identity: as_client,
                    pin: backend_key,
                };
                let Ok(up) = Conn::connect_tls(&backend, Duration::from_secs(5), &tls) else {
                    return;
                };
                relay(Arc::new(down), Arc::new(up));
            });
        }
    });
    ep
}

fn relay(a: Arc<Conn>, b: Arc<Conn>) {
    let pump = |from: Arc<Conn>, to: Arc<Conn>| {
        let mut buf = vec![0u8; 1 << 16];
        for _ in 0..100_000 {
            match (&*from).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if (&*to).write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown();
    };
    for c in [&a, &b] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
    let t = std::thread::spawn(move || pump(a2, b2));
    pump(b, a);
    let _ = t.join();
}

#[test]
fn a_man_in_the_middle_fails_on_the_pin_and_on_the_key_binding() {
    let psk = Psk::new(common::KEY.to_vec()).unwrap();
    let me = Identity::generate("client").unwrap();
    // The backend lets any client key in but demands the pre-shared key.
    let (s, id) = tls_backend(&[], Some(psk.clone()));
    let with_psk = |pin| ClientOptions {
        psk: Some(psk.clone()),
        ..tls_opts(&me, pin)
    };
    // Sanity: directly, the key proof works with any client key.
    Client::connect(s.endpoint(), with_psk(Pin::AnyWithPsk)).unwrap();

    let thief = Identity::generate("mitm").unwrap();
    let ep = mitm(
        s.endpoint().clone(),
        thief.clone(),
        Identity::generate("mitm-client").unwrap(),
        Pin::AnyWithPsk,
    );
    // A pinned client notices the wrong key at once.
    let e = refused(&ep, with_psk(Pin::Key(id.fingerprint())));
    assert!(
        e.contains(&thief.fingerprint().to_string()) && e.contains("not the key trusted"),
        "{e}"
    );
    // One that accepts any key (relying on the pre-shared key) is caught
    // by the proof: it was made for the client's TLS session, not for the
    // one the relay has with the backend.
    let e = refused(&ep, with_psk(Pin::AnyWithPsk));
    assert!(e.contains("proof did not verify"), "{e}");
}

#[test]
fn access_rules_show_each_client_only_its_devices() {
    use cio_backend::access::{Access, Rule};
    let (alice, bob) = (
        Identity::generate("alice").unwrap(),
        Identity::generate("bob").unwrap(),
    );
    let (s, id) = tls_backend(&[&alice, &bob], None);
    let rule = |client: &str, devices: &[&str]| Rule {
        client: client.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
    };
    // tls_backend names them client0 (alice) and client1 (bob).
    s.set_access(
        Access::new(vec![rule("client0", &["edu0"]), rule("client1", &["mem0"])]).unwrap(),
    );
    let pin = Pin::Key(id.fingerprint());
    let a = Client::connect(s.endpoint(), tls_opts(&alice, pin)).unwrap();
    let b = Client::connect(s.endpoint(), tls_opts(&bob, pin)).unwrap();
    let names =
        |c: &Client| -> Vec<String> { c.list().unwrap().into_iter().map(|d| d.name).collect() };
    assert_eq!(names(&a), ["edu0"]);
    assert_eq!(names(&b), ["mem0"]);
    let e = a.open("mem0").unwrap_err().to_string();
    assert!(
        e.contains("no device \"mem0\" that this client may use"),
        "{e}"
    );
    let e = b.open("edu0").unwrap_err().to_string();
    assert!(e.contains("that this client may use"), "{e}");
    let mut bm = b.open("mem0").unwrap();
    bm.write64(0, 0, 42).unwrap();

    // A reload gives bob edu0 too; his open device and session carry on.
    s.set_access(
        Access::new(vec![
            rule("client0", &["edu0"]),
            rule("client1", &["mem0", "edu0"]),
        ])
        .unwrap(),
    );
    assert_eq!(names(&b), ["edu0", "mem0"]);
    assert_eq!(bm.read64(0, 0).unwrap(), 42);
    let mut be = b.open("edu0").unwrap();
    assert_eq!(be.read32(0, 0).unwrap(), 0x010000ed);
    // And alice still sees only hers.
    assert_eq!(names(&a), ["edu0"]);
}

#[test]
fn a_direct_usb_import_is_refused_on_tls_and_the_relayed_one_works() {
    use cio_backend::usb::{CdcAcmEcho, UsbProvider};
    use cio_frontend::usb::{import, UsbSource};
    let me = Identity::generate("client").unwrap();
    let backend_id = Identity::generate("backend").unwrap();
    let mut allowed = AuthorizedClients::default();
    allowed.insert(me.fingerprint(), "me");
    let s = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk: None,
        devices: vec![],
        limits: Limits::default(),
        usb: Arc::new(UsbProvider::new(vec![], vec![Arc::new(CdcAcmEcho)])),
        security: Security::Tls(ServerTls::new(&backend_id, allowed, false).unwrap()),
    })
    .unwrap()
    .spawn()
    .unwrap();
    let src = UsbSource::Cio(s.endpoint().clone());
    let opts = tls_opts(&me, Pin::Key(backend_id.fingerprint()));
    let e = import(&src, "emu-1", &opts, true).unwrap_err().to_string();
    assert!(e.contains("cannot encrypt"), "{e}");
    let relayed = import(&src, "emu-1", &opts, false).unwrap();
    assert_eq!(relayed.device.busid, "emu-1");
}

#[test]
fn a_session_is_handed_off_over_tls_to_another_authorized_key() {
    let (first, second) = (
        Identity::generate("first").unwrap(),
        Identity::generate("second").unwrap(),
    );
    let stranger = Identity::generate("stranger").unwrap();
    let (s, id) = tls_backend(&[&first, &second], None);
    let pin = Pin::Key(id.fingerprint());
    let a = Client::connect(s.endpoint(), tls_opts(&first, pin)).unwrap();
    let mut m = a.open("mem0").unwrap();
    m.write64(0, 0x80, 0x5eed).unwrap();
    let ticket = a.suspend().unwrap();
    drop(m);
    drop(a);
    // A key the backend does not know cannot adopt, ticket or not.
    let e = Client::adopt(&ticket, tls_opts(&stranger, pin)).unwrap_err();
    assert!(e.to_string().contains("refused this client's key"), "{e}");
    let (b, mut devs) = Client::adopt(&ticket, tls_opts(&second, pin)).unwrap();
    let mut m = devs.pop().unwrap();
    assert_eq!(m.read64(0, 0x80).unwrap(), 0x5eed, "the device was reset");
    drop(m);
    drop(b);
}
