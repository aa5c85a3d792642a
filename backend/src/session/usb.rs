//! The two ways a session carries an imported USB device.
//!
//! - Relayed ([`UsbRelay`]): the export's USB/IP stream (usbip-host's or an
//!   emulated model's) is polled by the session and moved both ways in
//!   `UsbData` frames.
//! - Direct ([`import_direct`]): usbip-host gets the session's own
//!   connection; the session only waits for the kernel to let go of it.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use cio_core::wire::{ErrorCode, Message, MAX_USB_CHUNK};
use cio_transports::{sys, Conn, OutQueue};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tracing::{info, warn};

use super::link::flush_blocking;
use super::{End, ReqError, Shared};
use crate::usb::{UsbError, UsbExport};

/// Poll token of a relayed export's stream.
pub(crate) const USB: Token = Token(usize::MAX);

/// The USB/IP stream of an imported USB device, relayed in `UsbData` frames.
pub(crate) struct UsbRelay {
    export: UsbExport,
    /// Bytes from the client the device side has not taken yet.
    pending: BytesMut,
    /// The device side may have bytes for us.
    pub(crate) readable: bool,
    /// Receive buffer for the device side (frames share its bytes).
    rx: BytesMut,
}

/// The error a failed import is answered with.
fn usb_error(e: UsbError) -> ReqError {
    let code = match e {
        UsbError::NoDevice(_) => ErrorCode::NO_DEVICE,
        UsbError::Busy(_) => ErrorCode::BUSY,
        _ => ErrorCode::USB,
    };
    (code, cio_core::error_chain(&e))
}

impl UsbRelay {
    /// Imports `busid` for relaying and registers its stream with `poll`.
    pub(crate) fn import(
        shared: &Shared,
        session: u64,
        busid: &str,
        peer: &str,
        poll: &Poll,
    ) -> Result<(Self, Message), ReqError> {
        let export = shared.usb.import(busid, peer).map_err(usb_error)?;
        let stream = export.stream().expect("a relayed export has a stream");
        let fd = stream.as_raw_fd();
        let registered = stream.set_nonblocking(true).and_then(|()| {
            poll.registry().register(
                &mut SourceFd(&fd),
                USB,
                Interest::READABLE | Interest::WRITABLE,
            )
        });
        if let Err(e) = registered {
            return Err((ErrorCode::USB, format!("relaying the USB stream: {e}")));
        }
        let device = export.device.clone();
        info!(
            session = format_args!("{session:#x}"),
            busid, "USB device imported"
        );
        let relay = Self {
            export,
            pending: BytesMut::new(),
            readable: true,
            rx: BytesMut::new(),
        };
        Ok((relay, Message::UsbImported { device }))
    }

    /// Bytes from the client waiting for the device side.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes the payload of a client's `UsbData` frame.
    pub(crate) fn take_client_bytes(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// Moves USB/IP stream bytes: client bytes to the device side, device
    /// bytes into `UsbData` frames (while fewer than `max` bytes are queued).
    pub(crate) fn io(&mut self, out: &mut OutQueue, max: usize) -> Result<(), End> {
        let Some(mut stream) = self.export.stream() else {
            return Ok(());
        };
        while !self.pending.is_empty() {
            match stream.write(&self.pending) {
                Ok(n) => {
                    let _ = self.pending.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(End::clean(format!("USB device stream failed: {e}"))),
            }
        }
        while self.readable && out.len() < max {
            match sys::recv_into(stream.as_fd(), &mut self.rx, MAX_USB_CHUNK, true) {
                Ok(0) => return Err(End::clean("the USB device side closed the stream")),
                Ok(_) => {
                    let data = self.rx.split().freeze();
                    out.push(&Message::UsbData { data }, 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) => return Err(End::clean(format!("USB device stream failed: {e}"))),
            }
        }
        Ok(())
    }
}

/// A direct import: usbip-host gets `conn` itself. The reply to `seq` is
/// the last cio frame on it; on success the export is returned (the
/// session then ends and waits in [`await_direct`]), otherwise the error
/// to answer with.
pub(crate) fn import_direct(
    shared: &Shared,
    session: u64,
    busid: &str,
    peer: &str,
    conn: &Conn,
    seq: u64,
    out: &mut OutQueue,
) -> Result<(UsbExport, Result<(), io::Error>), ReqError> {
    // The kernel notices a vanished peer only through TCP keepalive.
    if let Err(e) = conn.set_keepalive(Duration::from_secs(10), Duration::from_secs(5), 3) {
        warn!(session = format_args!("{session:#x}"), "TCP keepalive: {e}");
    }
    let export = shared
        .usb
        .import_direct(busid, peer, conn)
        .map_err(usb_error)?;
    out.push(
        &Message::UsbImported {
            device: export.device.clone(),
        },
        seq,
    );
    let sent = flush_blocking(out, conn, Duration::from_secs(5));
    if sent.is_err() {
        // The client never learns of the import: end it now.
        export.hang_up();
    }
    Ok((export, sent))
}

/// Waits until usbip-host's connection of a direct import ends (peer
/// detached, link lost, or server shutdown), then restores the device.
pub(crate) fn await_direct(
    shared: &Shared,
    session: u64,
    conn: &Conn,
    poll: &mut Poll,
    export: UsbExport,
) {
    let _ = poll.registry().deregister(&mut SourceFd(&conn.as_raw_fd()));
    let mut events = Events::with_capacity(4);
    info!(session = format_args!("{session:#x}"), busid = %export.device.busid, "serving directly through usbip-host");
    while export.kernel_connected() {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(250)));
        if shared.stopping.load(Ordering::Relaxed) {
            export.hang_up();
        }
    }
    info!(session = format_args!("{session:#x}"), busid = %export.device.busid, "usbip-host's connection ended");
}
