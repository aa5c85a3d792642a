//! cio backend: the source side. [`Server`] serves any set of
//! [`cio_core::Device`]s over any transport; [`models`] has the emulated
//! devices; `ciod` is the daemon binary.
#![deny(missing_docs)]

pub mod access;
pub mod announce;
pub mod config;
pub mod models;
pub mod procfs;
pub mod registry;
pub mod server;
pub mod session;
pub mod usb;
pub mod vfio;

pub use config::{DeviceSpec, FileConfig};
pub use server::{Security, Server, ServerConfig, ServerError, ServerHandle, Stats};
pub use session::Limits;
