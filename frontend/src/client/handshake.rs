//! The client side of the handshake: `Hello`, `Welcome`, and the key
//! proofs both ways; or, on a new connection of a resumable session,
//! `Resume`/`Resumed`.

use std::io;

use cio_core::wire::{
    AuthMethod, Message, FEATURES, FEATURE_RESUME, MIN_PROTOCOL_VERSION, NONCE_LEN,
    PROTOCOL_VERSION,
};
use cio_core::FrameDecoder;
use cio_transports::{auth, Conn, OutQueue, ResumeKey, Side};

use super::{timed_out, ClientError, ClientOptions};

/// Reads the next frame synchronously (handshake and other one-off
/// exchanges); an `Error` frame becomes [`ClientError::Server`].
pub(crate) fn read_frame(
    conn: &Conn,
    dec: &mut FrameDecoder,
) -> Result<cio_core::Frame, ClientError> {
    loop {
        if let Some(f) = dec
            .next_frame()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            if let Message::Error { code, message } = f.msg {
                return Err(ClientError::Server { code, message });
            }
            return Ok(f);
        }
        match conn.recv_into(dec.buffer(), 4096, false) {
            Ok(0) => {
                return Err(ClientError::Disconnected(
                    "backend closed the connection".into(),
                ))
            }
            Ok(_) => {}
            Err(e) if timed_out(&e) => {
                return Err(ClientError::Disconnected(
                    "no reply from the backend in time".into(),
                ))
            }
            Err(e) => return Err(ClientError::Disconnected(format!("receiving: {e}"))),
        }
    }
}

/// A session after a successful handshake.
#[derive(Debug)]
pub(crate) struct Handshake {
    pub(crate) out: OutQueue,
    pub(crate) dec: FrameDecoder,
    pub(crate) session: u64,
    pub(crate) features: u64,
    /// The key resumes prove, when the backend keeps the session resumable.
    pub(crate) resume: Option<ResumeKey>,
    /// The protocol version the backend chose.
    pub(crate) version: u16,
}

/// Blocking socket calls give up after the reply timeout.
fn configure(conn: &Conn, opts: &ClientOptions) -> Result<(), ClientError> {
    let io_err = |e: io::Error| ClientError::Disconnected(format!("configuring the socket: {e}"));
    conn.set_read_timeout(Some(opts.reply_timeout))
        .map_err(io_err)?;
    conn.set_write_timeout(Some(opts.reply_timeout))
        .map_err(io_err)
}

/// Sends what `out` holds, blocking.
fn send(conn: &Conn, out: &mut OutQueue, opts: &ClientOptions) -> Result<(), ClientError> {
    out.write_to(conn, Some(opts.reply_timeout))
        .map(|_| ())
        .map_err(|e| ClientError::Disconnected(format!("handshake: {e}")))
}

/// Reads `Welcome`: (version, features, session, auth, nonce).
fn welcome(
    conn: &Conn,
    dec: &mut FrameDecoder,
) -> Result<(u16, u64, u64, AuthMethod, [u8; NONCE_LEN]), ClientError> {
    match read_frame(conn, dec)?.msg {
        Message::Welcome {
            version,
            features,
            session,
            auth,
            nonce,
        } => {
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                return Err(ClientError::Protocol(format!(
                    "backend chose protocol {version}; this client speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
                )));
            }
            Ok((version, features, session, auth, nonce))
        }
        m => Err(ClientError::Protocol(format!(
            "expected Welcome, got {:#06x}",
            m.kind()
        ))),
    }
}

/// Runs the handshake (and key proofs) on `conn`, asking for a resumable
/// session when `resumable`.
pub(crate) fn handshake(
    conn: &Conn,
    opts: &ClientOptions,
    resumable: bool,
) -> Result<Handshake, ClientError> {
    configure(conn, opts)?;
    let mut out = OutQueue::new();
    let mut dec = FrameDecoder::new();
    let client_nonce = auth::nonce()?;
    out.push(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            features: if resumable {
                FEATURES
            } else {
                FEATURES & !FEATURE_RESUME
            },
            session: 0,
            nonce: client_nonce,
            client: opts.name.clone(),
        },
        0,
    );
    send(conn, &mut out, opts)?;
    let (version, mut features, session, method, server_nonce) = welcome(conn, &mut dec)?;
    if version < 2 || !resumable {
        features &= !FEATURE_RESUME;
    }
    match (method, &opts.psk) {
        (AuthMethod::None, None) => {}
        (AuthMethod::None, Some(_)) => return Err(ClientError::ServerNotAuthenticated),
        (AuthMethod::PreSharedKey, None) => return Err(ClientError::KeyRequired),
        (AuthMethod::PreSharedKey, Some(psk)) => {
            let binding = conn.binding();
            let binding = binding.as_ref().map_or(&[][..], |b| &b[..]);
            let mac = psk.proof(Side::Client, &client_nonce, &server_nonce, session, binding);
            out.push(&Message::AuthProof { mac }, 0);
            send(conn, &mut out, opts)?;
            match read_frame(conn, &mut dec)?.msg {
                Message::AuthOk { mac }
                    if psk.verify(
                        Side::Server,
                        &client_nonce,
                        &server_nonce,
                        session,
                        binding,
                        &mac,
                    ) => {}
                Message::AuthOk { .. } => return Err(ClientError::BadServerProof),
                m => {
                    return Err(ClientError::Protocol(format!(
                        "expected AuthOk, got {:#06x}",
                        m.kind()
                    )))
                }
            }
        }
    }
    let resume = (features & FEATURE_RESUME != 0)
        .then(|| ResumeKey::derive(opts.psk.as_ref(), &client_nonce, &server_nonce, session));
    if resume.is_some() {
        out.retain();
    }
    Ok(Handshake {
        out,
        dec,
        session,
        features,
        resume,
        version,
    })
}

type Nonce = [u8; NONCE_LEN];

/// What the server said when a new connection took a session over.
struct TakenOver {
    dec: FrameDecoder,
    client: Nonce,
    server: Nonce,
    /// The last frame the server received from this session's client.
    received: u64,
    mac: Nonce,
}

impl TakenOver {
    /// Checks the server's `Resumed` MAC with `key`.
    fn verify(&self, key: &ResumeKey, session: u64) -> Result<(), ClientError> {
        let (c, s) = (&self.client, &self.server);
        if key.verify(Side::Server, c, s, session, self.received, &self.mac) {
            Ok(())
        } else {
            Err(ClientError::BadServerProof)
        }
    }
}

/// `Hello` naming `session`, `Welcome`, the proof `prove` makes from both
/// nonces, and `Resumed`.
fn take_over(
    conn: &Conn,
    opts: &ClientOptions,
    session: u64,
    prove: impl FnOnce(&Nonce, &Nonce) -> Message,
) -> Result<TakenOver, ClientError> {
    configure(conn, opts)?;
    let mut out = OutQueue::new();
    let mut dec = FrameDecoder::new();
    let client = auth::nonce()?;
    out.push(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            features: FEATURES,
            session,
            nonce: client,
            client: opts.name.clone(),
        },
        0,
    );
    send(conn, &mut out, opts)?;
    let (_, features, id, _, server) = welcome(conn, &mut dec)?;
    if id != session || features & FEATURE_RESUME == 0 {
        return Err(ClientError::Protocol(format!(
            "asked to take session {session:#x} over, the backend offered {id:#x}"
        )));
    }
    out.push(&prove(&client, &server), 0);
    send(conn, &mut out, opts)?;
    match read_frame(conn, &mut dec)?.msg {
        Message::Resumed { received, mac } => Ok(TakenOver {
            dec,
            client,
            server,
            received,
            mac,
        }),
        m => Err(ClientError::Protocol(format!(
            "expected Resumed, got {:#06x}",
            m.kind()
        ))),
    }
}

/// Takes session `session` over on the new connection `conn`, telling the
/// backend the client received its frames up to `received`. Returns the
/// decoder to go on with (expecting the backend's frame `received + 1`)
/// and the last frame the backend received.
pub(crate) fn resume(
    conn: &Conn,
    opts: &ClientOptions,
    session: u64,
    key: &ResumeKey,
    received: u64,
) -> Result<(FrameDecoder, u64), ClientError> {
    let t = take_over(conn, opts, session, |c, s| Message::Resume {
        received,
        mac: key.proof(Side::Client, c, s, session, received),
    })?;
    t.verify(key, session)?;
    let mut dec = t.dec;
    dec.set_next_seq(received + 1);
    Ok((dec, t.received))
}

/// Adopts suspended session `session` on `conn` with its ticket `secret`.
/// Returns the decoder (still in the connection's numbering: the caller
/// sets the session's), the last frame the backend received from the
/// suspending client, and this client's own resume key.
pub(crate) fn adopt(
    conn: &Conn,
    opts: &ClientOptions,
    session: u64,
    secret: &Nonce,
) -> Result<(FrameDecoder, u64, ResumeKey), ClientError> {
    let t = take_over(conn, opts, session, |c, s| Message::Adopt {
        mac: auth::adopt_proof(secret, c, s, session),
    })?;
    let key = ResumeKey::adopted(secret, &t.client, &t.server, session);
    t.verify(&key, session)?;
    Ok((t.dec, t.received, key))
}
