//! The server side of the handshake: `Hello` → `Welcome`, then, when the
//! server has a key, `AuthProof` → `AuthOk`; or, when `Hello` names a
//! session, `Resume`, which hands this connection to that session. No
//! device is visible before it completes.

use cio_core::wire::{
    AuthMethod, ErrorCode, Message, FEATURES, FEATURE_RESUME, MIN_PROTOCOL_VERSION, NONCE_LEN,
    PROTOCOL_VERSION,
};
use cio_transports::{auth, ResumeKey, Side};
use std::sync::atomic::Ordering;

use tracing::debug;

use super::{Outbox, ReqError, Shared};

type Nonce = [u8; NONCE_LEN];

/// Where a connection is in its handshake.
#[derive(Debug)]
pub(crate) enum State {
    /// Waiting for `Hello`.
    Hello,
    /// Waiting for the client's proof of the key.
    Proof {
        client: Nonce,
        server: Nonce,
        features: u64,
        version: u16,
    },
    /// Waiting for the proof that the client may take session `target` over.
    ResumeProof {
        client: Nonce,
        server: Nonce,
        target: u64,
    },
    /// Authenticated: requests are served.
    Ready,
}

/// What a handshake step led to.
#[derive(Debug)]
pub(crate) enum Step {
    /// More handshake frames to come.
    Continue,
    /// The session is authenticated; with [`FEATURE_RESUME`] granted it
    /// gets the key its resumes must prove.
    Ready {
        version: u16,
        resume: Option<ResumeKey>,
    },
    /// The client proved it may take session `target` over: the
    /// connection goes to that session. `adopt` holds the ticket secret of
    /// a handoff (the resume point is then the session's own).
    Resume {
        target: u64,
        client: Nonce,
        server: Nonce,
        received: u64,
        adopt: Option<Nonce>,
    },
}

impl State {
    /// True once requests may be served.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// Advances the handshake of session `session` with frame `seq`. An
    /// error ends the connection (the caller sends it). `binding` is the TLS
    /// session's keying material the key proofs are bound to (empty on a
    /// plain connection).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &mut self,
        seq: u64,
        msg: Message,
        shared: &Shared,
        session: u64,
        peer: &str,
        binding: &[u8],
        out: &mut dyn Outbox,
    ) -> Result<Step, ReqError> {
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
                if version < MIN_PROTOCOL_VERSION {
                    let why = format!(
                        "client speaks protocol {version}; this server needs {MIN_PROTOCOL_VERSION} or later"
                    );
                    return Err((ErrorCode::VERSION, why));
                }
                let version = version.min(PROTOCOL_VERSION);
                let mut features = features & FEATURES;
                if version < 2 || shared.limits.resume_grace.is_zero() {
                    features &= !FEATURE_RESUME;
                }
                let max = shared.limits.max_sessions;
                if resume == 0 && shared.counters.authenticated.load(Ordering::Acquire) >= max {
                    let why = format!("server already serves its maximum of {max} sessions");
                    return Err((ErrorCode::LIMIT, why));
                }
                if resume != 0 {
                    if features & FEATURE_RESUME == 0 {
                        let why = format!(
                            "resuming session {resume:#x}: this server keeps no sessions for resume (protocol 2 and a grace period are needed)"
                        );
                        return Err((ErrorCode::STATE, why));
                    }
                    if !shared.resumable(resume) {
                        let why = format!(
                            "no session {resume:#x} to resume here (it ended, or its grace period expired)"
                        );
                        return Err((ErrorCode::STATE, why));
                    }
                }
                let server = auth::nonce()
                    .map_err(|e| (ErrorCode::STATE, format!("no server nonce: {e}")))?;
                let method = if shared.psk.is_some() {
                    AuthMethod::PreSharedKey
                } else {
                    AuthMethod::None
                };
                let id = if resume != 0 { resume } else { session };
                out.push(
                    &Message::Welcome {
                        version,
                        features,
                        session: id,
                        auth: method,
                        nonce: server,
                    },
                    seq,
                );
                debug!(session = format_args!("{id:#x}"), peer, client = %client, version, auth = ?method, resume = resume != 0, "hello");
                let (client, features) = (nonce, features);
                if resume != 0 {
                    *self = Self::ResumeProof {
                        client,
                        server,
                        target: resume,
                    };
                    return Ok(Step::Continue);
                }
                match method {
                    AuthMethod::PreSharedKey => {
                        *self = Self::Proof {
                            client,
                            server,
                            features,
                            version,
                        };
                        Ok(Step::Continue)
                    }
                    AuthMethod::None => {
                        Ok(self.ready(shared, session, client, server, features, version))
                    }
                }
            }
            (
                Self::Proof {
                    client,
                    server,
                    features,
                    version,
                },
                Message::AuthProof { mac },
            ) => {
                let (client, server, features, version) = (*client, *server, *features, *version);
                let psk = shared.psk.as_ref().expect("proof state implies a key");
                if !psk.verify(Side::Client, &client, &server, session, binding, &mac) {
                    let why = "pre-shared key proof did not verify (wrong key?)".to_string();
                    return Err((ErrorCode::AUTH_FAILED, why));
                }
                let mac = psk.proof(Side::Server, &client, &server, session, binding);
                out.push(&Message::AuthOk { mac }, seq);
                Ok(self.ready(shared, session, client, server, features, version))
            }
            (
                Self::ResumeProof {
                    client,
                    server,
                    target,
                },
                Message::Resume { received, mac },
            ) => {
                let (client, server, target) = (*client, *server, *target);
                let verified = match shared.resume_key(target) {
                    Ok(key) => key.verify(Side::Client, &client, &server, target, received, &mac),
                    Err(why) => return Err((ErrorCode::AUTH_FAILED, why)),
                };
                if !verified {
                    let why = format!(
                        "resume proof for session {target:#x} did not verify (wrong key, or not this session's client)"
                    );
                    return Err((ErrorCode::AUTH_FAILED, why));
                }
                Ok(Step::Resume {
                    target,
                    client,
                    server,
                    received,
                    adopt: None,
                })
            }
            (
                Self::ResumeProof {
                    client,
                    server,
                    target,
                },
                Message::Adopt { mac },
            ) => {
                let (client, server, target) = (*client, *server, *target);
                let secret = shared
                    .claim_ticket(target, &client, &server, &mac)
                    .map_err(|why| (ErrorCode::AUTH_FAILED, why))?;
                Ok(Step::Resume {
                    target,
                    client,
                    server,
                    received: 0,
                    adopt: Some(secret),
                })
            }
            (Self::Hello, m) => {
                let why = format!("expected Hello, got message type {:#06x}", m.kind());
                Err((ErrorCode::STATE, why))
            }
            (Self::Proof { .. }, m) => {
                let why = format!("expected AuthProof, got message type {:#06x}", m.kind());
                Err((ErrorCode::AUTH_REQUIRED, why))
            }
            (Self::ResumeProof { .. }, m) => {
                let why = format!(
                    "expected Resume or Adopt, got message type {:#06x}",
                    m.kind()
                );
                Err((ErrorCode::AUTH_REQUIRED, why))
            }
            (Self::Ready, m) => {
                let why = format!("message type {:#06x} after the handshake", m.kind());
                Err((ErrorCode::STATE, why))
            }
        }
    }

    fn ready(
        &mut self,
        shared: &Shared,
        session: u64,
        client: Nonce,
        server: Nonce,
        features: u64,
        version: u16,
    ) -> Step {
        *self = Self::Ready;
        let resume = (features & FEATURE_RESUME != 0)
            .then(|| ResumeKey::derive(shared.psk.as_ref(), &client, &server, session));
        Step::Ready { version, resume }
    }
}
