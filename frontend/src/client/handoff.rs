//! Handing a live session to another frontend: [`Ticket`], what
//! [`Client::suspend`](super::Client::suspend) gives and
//! [`Client::adopt`](super::Client::adopt) takes.
//!
//! A ticket names the backend and the session, carries the single-use
//! secret the backend issued, and describes what the session owns on the
//! target side (open devices, their DMA mappings and interrupt routes), so
//! that the adopter can supply its own target memory and eventfds for them.
//! It is a secret: whoever holds it can take the devices over until it
//! expires. Files are written readable by their owner only.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use cio_core::wire::{Message, NONCE_LEN};
use cio_core::{DeviceInfo, DmaDir, FrameDecoder, IrqKind};
use cio_transports::Endpoint;
use serde::{Deserialize, Serialize};

use super::ClientError;

/// A suspended session, ready to be adopted once, before it expires.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The backend.
    pub endpoint: Endpoint,
    /// The session.
    pub session: u64,
    /// When the backend stops keeping the session.
    pub expires: SystemTime,
    pub(crate) secret: [u8; NONCE_LEN],
    /// The backend's first frame for the adopter.
    pub(crate) server_next: u64,
    pub(crate) devices: Vec<TicketDevice>,
}

/// One open device of a suspended session.
#[derive(Debug, Clone)]
pub struct TicketDevice {
    /// The backend's handle.
    pub handle: u32,
    /// Its description, as the backend sent it.
    pub info: DeviceInfo,
    /// DMA mappings: IOVA, length, direction.
    pub mappings: Vec<(u64, u64, DmaDir)>,
    /// Interrupt routes: kind and vector.
    pub irqs: Vec<(IrqKind, u32)>,
}

/// The file format (JSON).
#[derive(Serialize, Deserialize)]
struct TicketFile {
    cio_ticket: u32,
    endpoint: String,
    session: String,
    secret: String,
    expires_unix_ms: u64,
    server_next: u64,
    devices: Vec<DeviceFile>,
}

#[derive(Serialize, Deserialize)]
struct DeviceFile {
    handle: u32,
    name: String,
    /// The device's description as the backend sent it (an `Opened`
    /// frame, hex).
    opened: String,
    mappings: Vec<MappingFile>,
    irqs: Vec<IrqFile>,
}

#[derive(Serialize, Deserialize)]
struct MappingFile {
    iova: u64,
    len: u64,
    dir: u8,
}

#[derive(Serialize, Deserialize)]
struct IrqFile {
    kind: u8,
    vector: u32,
}

const FORMAT: u32 = 1;

fn bad(why: impl std::fmt::Display) -> ClientError {
    ClientError::Ticket(why.to_string())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, ClientError> {
    if s.len() % 2 != 0 {
        return Err(bad("odd-length hex string"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| bad("bad hex digit")))
        .collect()
}

impl Ticket {
    /// What it hands on, device by device.
    pub fn devices(&self) -> &[TicketDevice] {
        &self.devices
    }

    /// True once the backend no longer keeps the session.
    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.expires
    }

    /// The ticket as text (JSON), for a file or a pipe.
    pub fn to_text(&self) -> String {
        let devices = self
            .devices
            .iter()
            .map(|d| {
                let mut opened = BytesMut::new();
                Message::Opened {
                    handle: d.handle,
                    info: d.info.clone(),
                }
                .encode(1, 0, &mut opened);
                DeviceFile {
                    handle: d.handle,
                    name: d.info.name.clone(),
                    opened: hex(&opened),
                    mappings: d
                        .mappings
                        .iter()
                        .map(|&(iova, len, dir)| MappingFile {
                            iova,
                            len,
                            dir: dir as u8,
                        })
                        .collect(),
                    irqs: d
                        .irqs
                        .iter()
                        .map(|&(kind, vector)| IrqFile {
                            kind: kind as u8,
                            vector,
                        })
                        .collect(),
                }
            })
            .collect();
        let expires = self.expires.duration_since(UNIX_EPOCH).unwrap_or_default();
        let f = TicketFile {
            cio_ticket: FORMAT,
            endpoint: self.endpoint.to_string(),
            session: format!("{:#018x}", self.session),
            secret: hex(&self.secret),
            expires_unix_ms: expires.as_millis() as u64,
            server_next: self.server_next,
            devices,
        };
        serde_json::to_string_pretty(&f).expect("a ticket serialises") + "\n"
    }

    /// Reads a ticket written by [`to_text`](Self::to_text).
    pub fn from_text(text: &str) -> Result<Self, ClientError> {
        let f: TicketFile = serde_json::from_str(text).map_err(bad)?;
        if f.cio_ticket != FORMAT {
            return Err(bad(format!(
                "ticket format {} (this cio reads {FORMAT})",
                f.cio_ticket
            )));
        }
        let session = u64::from_str_radix(f.session.trim_start_matches("0x"), 16)
            .map_err(|_| bad("bad session id"))?;
        let secret: [u8; NONCE_LEN] = unhex(&f.secret)?
            .try_into()
            .map_err(|_| bad("the secret must be 32 bytes"))?;
        let mut devices = Vec::new();
        for d in f.devices {
            let mut dec = FrameDecoder::new();
            dec.buffer().extend_from_slice(&unhex(&d.opened)?);
            let info = match dec.next_frame().map_err(bad)? {
                Some(cio_core::Frame {
                    msg: Message::Opened { info, .. },
                    ..
                }) => info,
                _ => return Err(bad(format!("device {}: no description", d.name))),
            };
            let mappings = d
                .mappings
                .iter()
                .map(|m| {
                    let dir = DmaDir::from_u8(m.dir).ok_or_else(|| bad("bad DMA direction"))?;
                    Ok((m.iova, m.len, dir))
                })
                .collect::<Result<_, ClientError>>()?;
            let irqs = d
                .irqs
                .iter()
                .map(|i| {
                    let kind = IrqKind::from_u8(i.kind).ok_or_else(|| bad("bad interrupt kind"))?;
                    Ok((kind, i.vector))
                })
                .collect::<Result<_, ClientError>>()?;
            devices.push(TicketDevice {
                handle: d.handle,
                info,
                mappings,
                irqs,
            });
        }
        Ok(Self {
            endpoint: f.endpoint.parse().map_err(bad)?,
            session,
            expires: UNIX_EPOCH + Duration::from_millis(f.expires_unix_ms),
            secret,
            server_next: f.server_next,
            devices,
        })
    }

    /// Writes the ticket to `path`, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| bad(format!("writing {}: {e}", path.display()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(self.to_text().as_bytes()).map_err(io)
    }

    /// Reads a ticket file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
        Self::from_text(&text)
    }
}
