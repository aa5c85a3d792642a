//! Emulated device models. Every model has the same shape: a struct that
//! implements [`cio_core::Device`], built by `new`, with its register map in
//! the module docs and constants for its registers, its config space from
//! [`config_space`] and its interrupts through [`irq::IrqLines`].

pub mod config_space;
pub mod edu;
pub mod irq;
pub mod memory;

pub use edu::Edu;
pub use memory::Memory;
