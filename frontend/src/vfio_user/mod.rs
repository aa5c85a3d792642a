//! vfio-user: presenting a cio device to a VMM as a PCI device.
//!
//! [vfio-user] is the protocol QEMU's `vfio-user-pci` device (QEMU 10.1 and
//! later) speaks over a Unix socket to a device that lives in another
//! process: the VFIO ioctls (device info, regions, IRQs, DMA maps, reset)
//! become messages, region reads and writes travel as messages (writes
//! posted), guest memory is shared by fd with `DMA_MAP` or reached with
//! server-to-client `DMA_READ`/`DMA_WRITE`, and interrupts are eventfds passed
//! with `SCM_RIGHTS`.
//!
//! Two layers: the I/O-free codec in [`wire`] (the 16-byte header, a typed
//! request and reply for each command QEMU's client uses, validation with
//! every length capped, an incremental [`FrameDecoder`]), and the [`Server`]
//! in [`server`], which serves one client on a Unix socket and presents any
//! [`cio_core::Device`] — a [`RemoteDevice`](crate::RemoteDevice) on
//! another host, or an emulated model — as a PCI device: regions, interrupts
//! on the client's eventfds, reset. fds travel by `SCM_RIGHTS` (through
//! `nix`; the one `unsafe` step is in a private `sys` module).
//!
//! Guest memory reaches the device either by fd (mapped in place, or
//! mirrored for a device on another host) or, when QEMU does not share it,
//! by the server's own DMA_READ/DMA_WRITE requests: its `port` module sends them
//! and matches the answers, and `relay` holds each interrupt back
//! until the device's writes before it are in guest memory.
//!
//! ```
//! use cio_frontend::vfio_user::{Body, Codec, FrameDecoder, Message, Request};
//!
//! let codec = Codec::default();
//! let reset = Message { id: 7, no_reply: false, body: Body::Request(Request::DeviceReset) };
//! let bytes = codec.encode(&reset).unwrap();
//!
//! let mut frames = FrameDecoder::new(codec.limits.max_msg_size);
//! frames.push(&bytes[..5]);
//! assert!(frames.next_frame().unwrap().is_none());
//! frames.push(&bytes[5..]);
//! let (_header, frame) = frames.next_frame().unwrap().unwrap();
//! assert_eq!(codec.decode(&frame).unwrap(), reset);
//! ```
//!
//! [vfio-user]: https://www.qemu.org/docs/master/interop/vfio-user.html

mod port;
mod relay;
pub mod server;
mod sys;
pub mod wire;

pub use server::{Error as ServerError, Served, Server, ServerConfig};

pub use wire::{
    Body, Capabilities, Codec, Command, DmaAccess, DmaData, DmaLayout, DmaMap, DmaUnmap,
    Error as WireError, FrameDecoder, Header, IrqAction, IrqData, IrqInfo, Limits, Message,
    MsgKind, RegionAccess, RegionCap, RegionData, RegionInfo, Reply, Request, SetIrqs, SparseArea,
    Version, WriteOne,
};
