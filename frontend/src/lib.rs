//! cio frontend: the target side. [`Client`] connects to a `ciod`;
//! [`RemoteDevice`] drives one of its devices through the same
//! [`cio_core::Device`] trait a local device implements; [`drivers`] holds
//! drivers that run unchanged against either.
#![deny(missing_docs)]

mod client;
pub mod drivers;
mod remote;
pub mod usb;
pub mod vfio_user;

pub use client::{Client, ClientError, ClientOptions, Ticket, TicketDevice};
pub use remote::RemoteDevice;
