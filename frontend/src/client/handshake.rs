//! The client side of the handshake: `Hello`, `Welcome`, and the key
//! proofs both ways.

use std::io;

use cio_core::wire::{AuthMethod, Message, FEATURES, PROTOCOL_VERSION};
use cio_core::FrameDecoder;
use cio_transports::{auth, Conn, OutQueue, Side};

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
}

/// Runs the handshake (and key proofs) on `conn`.
pub(crate) fn handshake(conn: &Conn, opts: &ClientOptions) -> Result<Handshake, ClientError> {
    let io_err = |e: io::Error| ClientError::Disconnected(format!("configuring the socket: {e}"));
    conn.set_read_timeout(Some(opts.reply_timeout))
        .map_err(io_err)?;
    conn.set_write_timeout(Some(opts.reply_timeout))
        .map_err(io_err)?;
    let mut out = OutQueue::new();
    let mut dec = FrameDecoder::new();
    let client_nonce = auth::nonce()?;
    out.push(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            features: FEATURES,
            session: 0,
            nonce: client_nonce,
            client: opts.name.clone(),
        },
        0,
    );
    let send = |out: &mut OutQueue| {
        out.write_to(conn, Some(opts.reply_timeout))
            .map_err(|e| ClientError::Disconnected(format!("handshake: {e}")))
    };
    send(&mut out)?;
    let (session, features, method, server_nonce) = match read_frame(conn, &mut dec)?.msg {
        Message::Welcome {
            version,
            features,
            session,
            auth,
            nonce,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(ClientError::Protocol(format!(
                    "backend chose protocol {version}"
                )));
            }
            (session, features, auth, nonce)
        }
        m => {
            return Err(ClientError::Protocol(format!(
                "expected Welcome, got {:#06x}",
                m.kind()
            )))
        }
    };
    match (method, &opts.psk) {
        (AuthMethod::None, None) => {}
        (AuthMethod::None, Some(_)) => return Err(ClientError::ServerNotAuthenticated),
        (AuthMethod::PreSharedKey, None) => return Err(ClientError::KeyRequired),
        (AuthMethod::PreSharedKey, Some(psk)) => {
            let mac = psk.proof(Side::Client, &client_nonce, &server_nonce, session);
            out.push(&Message::AuthProof { mac }, 0);
            send(&mut out)?;
            match read_frame(conn, &mut dec)?.msg {
                Message::AuthOk { mac }
                    if psk.verify(Side::Server, &client_nonce, &server_nonce, session, &mac) => {}
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
    Ok(Handshake {
        out,
        dec,
        session,
        features,
    })
}
