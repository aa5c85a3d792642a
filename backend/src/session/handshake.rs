//! The server side of the handshake: `Hello` → `Welcome`, then, when the
//! server has a key, `AuthProof` → `AuthOk`. No device is visible before
//! it completes.

use cio_core::wire::{AuthMethod, ErrorCode, Message, FEATURES, NONCE_LEN, PROTOCOL_VERSION};
use cio_transports::{auth, Side};
use tracing::info;

use super::{Outbox, ReqError, Shared};

/// Where a session is in its handshake.
#[derive(Debug)]
pub(crate) enum State {
    /// Waiting for `Hello`.
    Hello,
    /// Waiting for the client's proof of the key.
    Proof {
        client: [u8; NONCE_LEN],
        server: [u8; NONCE_LEN],
    },
    /// Authenticated: requests are served.
    Ready,
}

impl State {
    /// True once requests may be served.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// Advances the handshake with frame `seq`. An error ends the session
    /// (the caller sends it).
    pub(crate) fn step(
        &mut self,
        seq: u64,
        msg: Message,
        shared: &Shared,
        session: u64,
        peer: &str,
        out: &mut dyn Outbox,
    ) -> Result<(), ReqError> {
        match (&*self, msg) {
            (
                Self::Hello,
                Message::Hello {
                    version,
                    features,
                    session: resume,
                    nonce,
                    client,
                },
            ) => {
                if version < PROTOCOL_VERSION {
                    let why = format!(
                        "client speaks protocol {version}; this server needs {PROTOCOL_VERSION}"
                    );
                    return Err((ErrorCode::VERSION, why));
                }
                if resume != 0 {
                    let why = format!("resuming session {resume} is not supported by this server");
                    return Err((ErrorCode::STATE, why));
                }
                let server = auth::nonce()
                    .map_err(|e| (ErrorCode::STATE, format!("no server nonce: {e}")))?;
                let method = if shared.psk.is_some() {
                    AuthMethod::PreSharedKey
                } else {
                    AuthMethod::None
                };
                out.push(
                    &Message::Welcome {
                        version: PROTOCOL_VERSION,
                        features: features & FEATURES,
                        session,
                        auth: method,
                        nonce: server,
                    },
                    seq,
                );
                info!(session, peer, client = %client, auth = ?method, "hello");
                *self = match method {
                    AuthMethod::PreSharedKey => Self::Proof {
                        client: nonce,
                        server,
                    },
                    AuthMethod::None => Self::Ready,
                };
                Ok(())
            }
            (Self::Proof { client, server }, Message::AuthProof { mac }) => {
                let (client, server) = (*client, *server);
                let psk = shared.psk.as_ref().expect("proof state implies a key");
                if !psk.verify(Side::Client, &client, &server, session, &mac) {
                    let why = "pre-shared key proof did not verify (wrong key?)".to_string();
                    return Err((ErrorCode::AUTH_FAILED, why));
                }
                let mac = psk.proof(Side::Server, &client, &server, session);
                out.push(&Message::AuthOk { mac }, seq);
                *self = Self::Ready;
                Ok(())
            }
            (Self::Hello, m) => {
                let why = format!("expected Hello, got message type {:#06x}", m.kind());
                Err((ErrorCode::STATE, why))
            }
            (Self::Proof { .. }, m) => {
                let why = format!("expected AuthProof, got message type {:#06x}", m.kind());
                Err((ErrorCode::AUTH_REQUIRED, why))
            }
            (Self::Ready, m) => {
                let why = format!("message type {:#06x} after the handshake", m.kind());
                Err((ErrorCode::STATE, why))
            }
        }
    }
}
