//! Pre-shared-key authentication: a mutual challenge–response with
//! HMAC-SHA256, run inside the cio handshake before any device is visible.
//!
//! The client sends a random nonce in `Hello`, the server one in `Welcome`.
//! The client proves the key with `HMAC(key, "cio-v1 client" | Nc | Ns | id)`,
//! the server answers with `HMAC(key, "cio-v1 server" | Ns | Nc | id)`, so
//! each side knows the other holds the key and neither MAC can be replayed
//! into another session. The key never crosses the wire.

use std::fmt;
use std::path::Path;

use cio_core::wire::NONCE_LEN;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Error;

type Nonce = [u8; NONCE_LEN];

/// `HMAC-SHA256(key, label | first | second | session | extra)`: every MAC
/// and derived key of the handshakes has this shape.
fn mac(
    key: &[u8],
    label: &[u8],
    first: &Nonce,
    second: &Nonce,
    session: u64,
    extra: &[u8],
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes keys of any length");
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(&session.to_le_bytes());
    m.update(extra);
    m
}

fn bytes(m: Hmac<Sha256>) -> Nonce {
    m.finalize().into_bytes().into()
}

/// Shortest accepted key.
pub const MIN_KEY_LEN: usize = 16;

/// A pre-shared key.
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let key = key.into();
        if key.len() < MIN_KEY_LEN {
            return Err(Error::WeakKey(key.len()));
        }
        Ok(Self(key))
    }

    /// Reads a key file. Trailing whitespace (a final newline) is not part
    /// of the key. Generate one with `head -c 32 /dev/urandom | base64 > F`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let mut key = std::fs::read(path).map_err(|source| Error::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
            key.pop();
        }
        Self::new(key)
    }

    /// `HMAC(key, label | own nonce | peer nonce | session | binding)` for
    /// `side`. `binding` is the TLS session's exported keying material
    /// ([`crate::Conn::binding`]), empty on a plain connection: a proof made
    /// through a TLS session that a man in the middle terminates does not
    /// verify on the other side of it.
    fn mac(
        &self,
        side: Side,
        client: &Nonce,
        server: &Nonce,
        session: u64,
        binding: &[u8],
    ) -> Hmac<Sha256> {
        match side {
            Side::Client => mac(&self.0, b"cio-v1 client", client, server, session, binding),
            Side::Server => mac(&self.0, b"cio-v1 server", server, client, session, binding),
        }
    }

    /// The proof `side` sends.
    pub fn proof(
        &self,
        side: Side,
        client: &Nonce,
        server: &Nonce,
        session: u64,
        binding: &[u8],
    ) -> Nonce {
        bytes(self.mac(side, client, server, session, binding))
    }

    /// Checks, in constant time, a proof `side` sent.
    pub fn verify(
        &self,
        side: Side,
        client: &Nonce,
        server: &Nonce,
        session: u64,
        binding: &[u8],
        proof: &Nonce,
    ) -> bool {
        self.mac(side, client, server, session, binding)
            .verify_slice(proof)
            .is_ok()
    }
}

/// The secret a session's resume proofs are keyed with. Both sides derive
/// it when the session's first handshake completes:
/// `HMAC(key, "cio-v2 resume key" | Nc | Ns | id)`, so it is bound to that
/// handshake and useless to anyone who saw it without the pre-shared key.
/// A session without a key (loopback and Unix sockets only) derives it
/// with an empty key: there it guards against mistakes, not attackers
/// (anyone who can connect there may open devices anyway).
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeKey([u8; NONCE_LEN]);

impl fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeKey(..)")
    }
}

impl ResumeKey {
    /// The key of the session `session` whose handshake used these nonces.
    pub fn derive(psk: Option<&Psk>, client: &Nonce, server: &Nonce, session: u64) -> Self {
        let key = psk.map_or(&[][..], |p| &p.0[..]);
        Self(bytes(mac(
            key,
            b"cio-v2 resume key",
            client,
            server,
            session,
            &[],
        )))
    }

    /// The key of a session adopted with a ticket `secret` on the
    /// connection with these nonces: the adopter's own, unknown to the
    /// frontend that handed the session on.
    pub fn adopted(secret: &Nonce, client: &Nonce, server: &Nonce, session: u64) -> Self {
        Self(bytes(mac(
            secret,
            b"cio-v2 adopted key",
            client,
            server,
            session,
            &[],
        )))
    }

    /// `HMAC(resume key, label | own nonce | peer nonce | id | received)`.
    fn mac(
        &self,
        side: Side,
        client: &Nonce,
        server: &Nonce,
        session: u64,
        received: u64,
    ) -> Hmac<Sha256> {
        let r = received.to_le_bytes();
        match side {
            Side::Client => mac(
                &self.0,
                b"cio-v2 resume client",
                client,
                server,
                session,
                &r,
            ),
            Side::Server => mac(
                &self.0,
                b"cio-v2 resume server",
                server,
                client,
                session,
                &r,
            ),
        }
    }

    /// The `Resume` (client) or `Resumed` (server) MAC for a new
    /// connection's nonces; `received` is the sender's resume point.
    pub fn proof(
        &self,
        side: Side,
        client: &Nonce,
        server: &Nonce,
        session: u64,
        received: u64,
    ) -> Nonce {
        bytes(self.mac(side, client, server, session, received))
    }

    /// Checks, in constant time, a resume MAC `side` sent.
    pub fn verify(
        &self,
        side: Side,
        client: &Nonce,
        server: &Nonce,
        session: u64,
        received: u64,
        proof: &Nonce,
    ) -> bool {
        self.mac(side, client, server, session, received)
            .verify_slice(proof)
            .is_ok()
    }
}

/// The `Adopt` MAC: `HMAC(secret, "cio-v2 adopt" | Nc | Ns | id)`, proving
/// a handoff ticket's secret on a new connection.
pub fn adopt_proof(secret: &Nonce, client: &Nonce, server: &Nonce, session: u64) -> Nonce {
    bytes(mac(secret, b"cio-v2 adopt", client, server, session, &[]))
}

/// Checks an `Adopt` MAC in constant time.
pub fn verify_adopt(
    secret: &Nonce,
    client: &Nonce,
    server: &Nonce,
    session: u64,
    proof: &Nonce,
) -> bool {
    mac(secret, b"cio-v2 adopt", client, server, session, &[])
        .verify_slice(proof)
        .is_ok()
}

/// A fresh random session id: never 0 (which asks for a new session), and
/// not guessable, so naming a session proves nothing by itself.
pub fn session_id() -> Result<u64, Error> {
    loop {
        let mut b = [0; 8];
        getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
        let id = u64::from_le_bytes(b);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// Which end of the handshake a proof belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The connecting side.
    Client,
    /// The listening side.
    Server,
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| Error::Random(e.to_string()))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_key_nonces_and_session() {
        let k = Psk::new(*b"0123456789abcdef").unwrap();
        let other = Psk::new(*b"0123456789abcdeX").unwrap();
        let (c, s) = (nonce().unwrap(), nonce().unwrap());
        let p = k.proof(Side::Client, &c, &s, 1, &[]);
        assert!(k.verify(Side::Client, &c, &s, 1, &[], &p));
        assert!(!other.verify(Side::Client, &c, &s, 1, &[], &p));
        assert!(!k.verify(Side::Client, &s, &c, 1, &[], &p));
        assert!(!k.verify(Side::Client, &c, &s, 2, &[], &p));
        // A client proof is not a server proof.
        assert!(!k.verify(Side::Server, &c, &s, 1, &[], &p));
        assert!(k.verify(
            Side::Server,
            &c,
            &s,
            1,
            &[],
            &k.proof(Side::Server, &c, &s, 1, &[])
        ));
        let bound = k.proof(Side::Client, &c, &s, 1, b"tls session one");
        assert!(k.verify(Side::Client, &c, &s, 1, b"tls session one", &bound));
        assert!(!k.verify(Side::Client, &c, &s, 1, b"tls session two", &bound));
        assert!(!k.verify(Side::Client, &c, &s, 1, &[], &bound));
    }

    #[test]
    fn resume_proofs_need_the_session_key_and_bind_the_resume_point() {
        let k = Psk::new(*b"0123456789abcdef").unwrap();
        let (c, s) = (nonce().unwrap(), nonce().unwrap());
        let key = ResumeKey::derive(Some(&k), &c, &s, 9);
        // Someone who saw the first handshake but lacks the key derives another.
        assert_ne!(key, ResumeKey::derive(None, &c, &s, 9));
        assert_ne!(key, ResumeKey::derive(Some(&k), &c, &s, 10));
        let (c2, s2) = (nonce().unwrap(), nonce().unwrap());
        let p = key.proof(Side::Client, &c2, &s2, 9, 100);
        assert!(key.verify(Side::Client, &c2, &s2, 9, 100, &p));
        assert!(!key.verify(Side::Client, &c2, &s2, 9, 101, &p));
        assert!(!key.verify(Side::Server, &c2, &s2, 9, 100, &p));
        // A proof made for one connection's nonces fails on the next.
        let (c3, s3) = (nonce().unwrap(), nonce().unwrap());
        assert!(!key.verify(Side::Client, &c3, &s3, 9, 100, &p));
        assert_ne!(session_id().unwrap(), session_id().unwrap());
    }

    #[test]
    fn short_keys_are_refused_and_files_are_trimmed() {
        assert!(matches!(Psk::new(*b"short"), Err(Error::WeakKey(5))));
        let dir = std::env::temp_dir().join(format!("cio-psk-{}", std::process::id()));
        std::fs::write(&dir, b"0123456789abcdef\n").unwrap();
        let a = Psk::from_file(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let b = Psk::new(*b"0123456789abcdef").unwrap();
        let (c, s) = ([1; 32], [2; 32]);
        assert_eq!(
            a.proof(Side::Client, &c, &s, 0, &[]),
            b.proof(Side::Client, &c, &s, 0, &[])
        );
        assert!(matches!(
            Psk::from_file(Path::new("/nonexistent/key")),
            Err(Error::KeyFile { .. })
        ));
    }
}
