//! cio core: the wire protocol, the [`Device`] trait every device implements,
//! DMA regions with dirty tracking, and the errors they share. No I/O lives
//! here but waiting for an eventfd; transports, the backend and the
//! frontend build on it.
#![deny(missing_docs)]

pub mod device;
pub mod dma;
mod sys;
pub mod usbip;
pub mod wire;

pub use device::{
    Device, DeviceError, DeviceInfo, IrqInfo, IrqKind, RegionInfo, RegionKind, ResetMethod,
    CONFIG_REGION,
};
pub use dma::{DmaDir, DmaError, DmaRegion, DmaSpace, PAGE_SIZE};
pub use sys::poll_readable;
pub use wire::{DmaHead, ErrorCode, Frame, FrameDecoder, Message, WireError};

/// Eventfd type used for interrupt delivery throughout cio.
pub use vmm_sys_util::eventfd::EventFd;

/// An error and all its sources, as one `a: b: c` line for people.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
