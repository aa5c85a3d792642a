//! USB devices served over cio sessions and plain USB/IP.
//!
//! A [`UsbProvider`] knows the devices a server may export: real devices
//! found in sysfs (exported through the kernel's `usbip-host`, see
//! [`sysfs`]) and emulated ones ([`emulated`]). Importing one yields a
//! [`UsbExport`]: a connected stream socket that carries the device's USB/IP
//! URB stream (the kernel's `usbip-host` or the emulator holds the other
//! end). Whoever imported it relays that stream: a cio session in `UsbData`
//! frames, or [`stock::UsbipServer`] over plain TCP. Dropping the export,
//! however the import ended, closes the stream and gives the device back to
//! the driver it had before.

pub mod emulated;
pub mod stock;
pub mod sysfs;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use cio_core::usbip::UsbDevice;
use tracing::{info, warn};

pub use emulated::{CdcAcmEcho, UsbModel};

/// USB export errors.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    /// No exportable device has that bus id.
    #[error("no exportable USB device {0:?} (see `cio usb list`)")]
    NoDevice(String),
    /// The device is exported already.
    #[error("USB device {0} is already exported")]
    Busy(String),
    /// A sysfs step failed.
    #[error("{what}")]
    Sysfs {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another OS call failed.
    #[error("{0}")]
    Io(String),
}

/// Which real devices a provider may export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbFilter {
    /// Every device except hubs.
    All,
    /// The device with this bus id (e.g. `1-1.2`).
    BusId(String),
    /// Devices with this vendor:product id.
    Id(u16, u16),
}

impl FromStr for UsbFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Self::All);
        }
        if let Some((v, p)) = s.split_once(':') {
            let hex = |x: &str| {
                (!x.is_empty() && x.len() <= 4)
                    .then(|| u16::from_str_radix(x, 16).ok())
                    .flatten()
            };
            if let (Some(v), Some(p)) = (hex(v), hex(p)) {
                return Ok(Self::Id(v, p));
            }
            return Err(format!(
                "{s:?} is neither a bus id (like 1-1.2) nor a vendor:product id (like 0781:5567)"
            ));
        }
        if sysfs::is_busid(s) {
            Ok(Self::BusId(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a USB bus id: expected BUS-PORT[.PORT...] like 1-1.2, a vendor:product id, or all"
            ))
        }
    }
}

impl UsbFilter {
    fn matches(&self, d: &UsbDevice) -> bool {
        match self {
            Self::All => true,
            Self::BusId(b) => *b == d.busid,
            Self::Id(v, p) => d.vendor == *v && d.product == *p,
        }
    }
}

/// The USB devices a server exports.
pub struct UsbProvider {
    sysfs: PathBuf,
    state: PathBuf,
    filters: Vec<UsbFilter>,
    emulated: Vec<(String, Arc<dyn UsbModel>)>,
    busy: Mutex<HashSet<String>>,
}

impl fmt::Debug for UsbProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsbProvider")
            .field("sysfs", &self.sysfs)
            .field("filters", &self.filters)
            .field("emulated", &self.emulated.len())
            .finish()
    }
}

impl Default for UsbProvider {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new())
    }
}

impl UsbProvider {
    /// Real devices matching `filters` (none: no real device) and the
    /// emulated models, each under bus id `emu-N` (N from 1).
    pub fn new(filters: Vec<UsbFilter>, models: Vec<Arc<dyn UsbModel>>) -> Self {
        Self {
            sysfs: PathBuf::from("/sys"),
            state: PathBuf::from(sysfs::STATE_DIR),
            filters,
            emulated: models
                .into_iter()
                .enumerate()
                .map(|(i, m)| (format!("emu-{}", i + 1), m))
                .collect(),
            busy: Mutex::new(HashSet::new()),
        }
    }

    /// Reads devices from another sysfs root (tests).
    pub fn with_sysfs(mut self, root: impl Into<PathBuf>) -> Self {
        self.sysfs = root.into();
        self.state = self.sysfs.join("cio-state");
        self
    }

    /// Gives back the devices an earlier, killed ciod left bound to
    /// usbip-host; returns their bus ids. Call once at start.
    pub fn recover(&self) -> Vec<String> {
        sysfs::recover(&self.sysfs, &self.state)
    }

    /// True if nothing could ever be exported.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty() && self.emulated.is_empty()
    }

    /// Number of devices exported right now.
    pub fn exported(&self) -> usize {
        lock(&self.busy).len()
    }

    /// The exportable devices present now.
    pub fn list(&self) -> Vec<UsbDevice> {
        let mut out = Vec::new();
        if !self.filters.is_empty() {
            match sysfs::list(&self.sysfs) {
                Ok(devs) => out.extend(
                    devs.into_iter()
                        .filter(|d| d.class != sysfs::CLASS_HUB)
                        .filter(|d| self.filters.iter().any(|f| f.matches(d))),
                ),
                Err(e) => warn!("listing USB devices in sysfs: {e}"),
            }
        }
        for (i, (busid, m)) in self.emulated.iter().enumerate() {
            let mut d = m.describe();
            d.busid = busid.clone();
            d.busnum = emulated::BUSNUM;
            d.devnum = i as u32 + 1;
            d.path = format!("/cio/emulated/{busid}");
            out.push(d);
        }
        out
    }

    /// Exports the device with `busid`: binds it to `usbip-host` (or starts
    /// its emulator) and returns the stream end to relay.
    pub fn import(self: &Arc<Self>, busid: &str, peer: &str) -> Result<UsbExport, UsbError> {
        self.export(busid, peer, None)
    }

    /// Exports the device with `busid` straight onto `sock` (a connected
    /// stream socket the kernel's usbip-host then owns): no relay, the
    /// returned export has no stream. Real devices only.
    pub fn import_direct(
        self: &Arc<Self>,
        busid: &str,
        peer: &str,
        sock: &impl AsRawFd,
    ) -> Result<UsbExport, UsbError> {
        self.export(busid, peer, Some(sock.as_raw_fd()))
    }

    fn export(
        self: &Arc<Self>,
        busid: &str,
        peer: &str,
        direct: Option<RawFd>,
    ) -> Result<UsbExport, UsbError> {
        let device = self
            .list()
            .into_iter()
            .find(|d| d.busid == busid)
            .ok_or_else(|| UsbError::NoDevice(busid.to_owned()))?;
        if !lock(&self.busy).insert(busid.to_owned()) {
            return Err(UsbError::Busy(busid.to_owned()));
        }
        let guard = BusyGuard {
            provider: Arc::clone(self),
            busid: busid.to_owned(),
        };
        let io = |what: &str| {
            let what = what.to_owned();
            move |e: io::Error| UsbError::Io(format!("{what}: {e}"))
        };
        let pair = || cio_transports::relay_pair().map_err(io("creating a socket pair"));
        let emulated = self.emulated.iter().find(|(b, _)| b == busid);
        let (stream, binding) = match (emulated, direct) {
            (Some(_), Some(_)) => {
                let why = "only devices exported through usbip-host can be imported directly";
                return Err(UsbError::Io(format!("{busid} is emulated: {why}")));
            }
            (Some((_, model)), None) => {
                let (ours, theirs) = pair()?;
                Arc::clone(model)
                    .serve(theirs, device.devid())
                    .map_err(io("starting the emulated device"))?;
                (Some(ours), None)
            }
            (None, None) => {
                let (ours, theirs) = pair()?;
                // usbip-host takes its own reference to `theirs`.
                let b =
                    sysfs::Binding::export(&self.sysfs, &self.state, busid, theirs.as_raw_fd())?;
                (Some(ours), Some(b))
            }
            (None, Some(fd)) => (
                None,
                Some(sysfs::Binding::export(&self.sysfs, &self.state, busid, fd)?),
            ),
        };
        info!(
            busid,
            peer, "USB device {:04x}:{:04x} exported", device.vendor, device.product
        );
        Ok(UsbExport {
            device,
            stream,
            binding,
            _busy: guard,
        })
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct BusyGuard {
    provider: Arc<UsbProvider>,
    busid: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        lock(&self.provider.busy).remove(&self.busid);
    }
}

/// An exported device: the stream to relay; dropping it ends the export and
/// restores the device's driver.
pub struct UsbExport {
    /// The device as it was exported.
    pub device: UsbDevice,
    stream: Option<UnixStream>,
    binding: Option<sysfs::Binding>,
    _busy: BusyGuard,
}

impl fmt::Debug for UsbExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsbExport")
            .field("busid", &self.device.busid)
            .finish()
    }
}

impl UsbExport {
    /// The URB stream to relay (kernel or emulator on the other end); none
    /// for a direct export, whose stream the kernel owns.
    pub fn stream(&self) -> Option<&UnixStream> {
        self.stream.as_ref()
    }

    /// True while usbip-host still serves the connection it was given.
    pub fn kernel_connected(&self) -> bool {
        self.binding.as_ref().is_some_and(sysfs::Binding::connected)
    }

    /// Makes usbip-host drop its connection (server shutdown).
    pub fn hang_up(&self) {
        if let Some(b) = &self.binding {
            b.hang_up();
        }
    }
}

impl Drop for UsbExport {
    fn drop(&mut self) {
        // Close our end first so usbip-host sees the connection end, then
        // hand the device back to its driver.
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(b) = self.binding.take() {
            b.restore();
        }
        info!(busid = %self.device.busid, "USB export ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_explain() {
        assert_eq!("all".parse::<UsbFilter>(), Ok(UsbFilter::All));
        assert_eq!(
            "1-1.2".parse::<UsbFilter>(),
            Ok(UsbFilter::BusId("1-1.2".into()))
        );
        assert_eq!(
            "0781:5567".parse::<UsbFilter>(),
            Ok(UsbFilter::Id(0x0781, 0x5567))
        );
        for bad in ["07811:1", "xyz", "1-1:1.0", ":", "usb1"] {
            let e = bad.parse::<UsbFilter>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn emulated_devices_are_listed_and_exported_once_at_a_time() {
        let p = Arc::new(UsbProvider::new(vec![], vec![Arc::new(CdcAcmEcho)]));
        let list = p.list();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].busid.as_str(), list[0].devid()),
            ("emu-1", 100 << 16 | 1)
        );
        let x = p.import("emu-1", "test").unwrap();
        assert!(matches!(p.import("emu-1", "test"), Err(UsbError::Busy(_))));
        assert!(matches!(
            p.import("emu-2", "test"),
            Err(UsbError::NoDevice(_))
        ));
        assert!(x.stream().is_some() && !x.kernel_connected());
        drop(x);
        assert_eq!(p.exported(), 0);
        drop(p.import("emu-1", "test").unwrap());
    }
}
