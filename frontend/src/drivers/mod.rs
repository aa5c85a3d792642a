//! Drivers written against [`cio_core::Device`]: they run unchanged on an
//! in-process model, a [`RemoteDevice`](crate::RemoteDevice) or (on the
//! backend host) a VFIO device.

pub mod edu;
pub mod nvme;
