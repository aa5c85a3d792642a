//! cio frontend: the target side. [`Client`] connects to a `ciod`;
//! [`RemoteDevice`] drives one of its devices through the same
//! [`cio_core::Device`] trait a local device implements; [`drivers`] holds
//! drivers that run unchanged against either.
//!
//! Everything needed to connect is re-exported here (addresses, keys,
//! TLS identities), so a program needs only this crate and `cio-core`'s
//! [`Device`] trait, also re-exported:
//!
//! ```no_run
//! use cio_frontend::{Client, ClientOptions, ClientTls, Device, Endpoint, Identity, Pin, Psk};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A backend on another host: TLS, its key pinned (`ciod keygen` printed
//! // it), this client's identity from `cio keygen`, and the pre-shared key.
//! let ep: Endpoint = "192.0.2.10:7451".parse()?;
//! let opts = ClientOptions {
//!     tls: Some(ClientTls {
//!         identity: Identity::load("/root/.config/cio/identity.pem".as_ref())?,
//!         pin: Pin::Key("sha256:8f3a6c0e5d2b4f7a9c1e3b5d7f9a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a".parse()?),
//!     }),
//!     psk: Some(Psk::from_file("/etc/cio/key".as_ref())?),
//!     ..ClientOptions::default()
//! };
//! let client = Client::connect(&ep, opts)?;
//! let mut edu = client.open("edu0")?;
//! println!("id {:#010x}", edu.read32(0, 0)?);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod client;
pub mod drivers;
mod remote;
pub mod usb;
pub mod vfio_user;

pub use client::{Client, ClientError, ClientOptions, Ticket, TicketDevice};
pub use remote::RemoteDevice;

pub use cio_core::Device;
pub use cio_transports::{
    ClientTls, Endpoint, Fingerprint, Identity, KnownBackends, Pin, Psk, DEFAULT_PORT,
};
