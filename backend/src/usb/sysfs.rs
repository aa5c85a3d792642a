//! Real USB devices through sysfs and the kernel's `usbip-host`.
//!
//! Listing reads `/sys/bus/usb/devices/BUSID/*`. Exporting follows the
//! kernel's own recipe (what `usbip bind` and `usbipd` do): add the bus id
//! to `usbip-host`'s `match_busid`, unbind the device from its driver, bind
//! it to `usbip-host`, then write the number of one end of a connected
//! stream socket to the device's `usbip_sockfd`. Restoring undoes it in
//! reverse and asks the bus to probe the device again, so its original
//! driver takes it back.

use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cio_core::usbip::{UsbDevice, UsbInterface, UsbSpeed};
use tracing::{debug, info, warn};

use super::UsbError;

/// Where ciod records the driver each exported device had, so that a
/// restarted ciod can give back devices a crashed one left on usbip-host.
pub const STATE_DIR: &str = "/run/cio/ciod-usb";
/// bDeviceClass of hubs (never exported).
pub const CLASS_HUB: u8 = 9;
const HOST_DRIVER: &str = "usbip-host";
/// `usbip_status` values.
const SDEV_AVAILABLE: u32 = 1;
const SDEV_USED: u32 = 2;

/// True for bus ids like `1-1` or `3-2.4.1`.
pub fn is_busid(s: &str) -> bool {
    let Some((bus, ports)) = s.split_once('-') else {
        return false;
    };
    let num = |x: &str| !x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit());
    num(bus) && ports.split('.').all(num)
}

fn read_attr(dir: &Path, name: &str) -> io::Result<String> {
    let p = dir.join(name);
    fs::read_to_string(&p)
        .map(|s| s.trim().to_owned())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

fn parse<T>(
    dir: &Path,
    name: &str,
    radix: u32,
    from: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
) -> io::Result<T> {
    let s = read_attr(dir, name)?;
    from(&s, radix).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {s:?} is not a number", dir.join(name).display()),
        )
    })
}

fn hex8(dir: &Path, name: &str) -> io::Result<u8> {
    parse(dir, name, 16, u8::from_str_radix)
}

fn hex16(dir: &Path, name: &str) -> io::Result<u16> {
    parse(dir, name, 16, u16::from_str_radix)
}

/// Describes the device `busid` from its sysfs directory.
pub fn describe(root: &Path, busid: &str) -> io::Result<UsbDevice> {
    let dir = root.join("bus/usb/devices").join(busid);
    let config: u8 = read_attr(&dir, "bConfigurationValue")?.parse().unwrap_or(0);
    let mut interfaces = Vec::new();
    let prefix = format!("{busid}:{config}.");
    let mut names: Vec<_> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort_by_key(|n| n[prefix.len()..].parse::<u32>().unwrap_or(u32::MAX));
    for n in names {
        let i = dir.join(n);
        interfaces.push(UsbInterface {
            class: hex8(&i, "bInterfaceClass")?,
            subclass: hex8(&i, "bInterfaceSubClass")?,
            protocol: hex8(&i, "bInterfaceProtocol")?,
        });
    }
    let path = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    Ok(UsbDevice {
        path: path.to_string_lossy().into_owned(),
        busid: busid.to_owned(),
        busnum: parse(&dir, "busnum", 10, u32::from_str_radix)?,
        devnum: parse(&dir, "devnum", 10, u32::from_str_radix)?,
        speed: UsbSpeed::from_sysfs(&read_attr(&dir, "speed")?),
        vendor: hex16(&dir, "idVendor")?,
        product: hex16(&dir, "idProduct")?,
        bcd_device: hex16(&dir, "bcdDevice")?,
        class: hex8(&dir, "bDeviceClass")?,
        subclass: hex8(&dir, "bDeviceSubClass")?,
        protocol: hex8(&dir, "bDeviceProtocol")?,
        configuration: config,
        num_configurations: read_attr(&dir, "bNumConfigurations")?.parse().unwrap_or(1),
        interfaces,
        product_name: read_attr(&dir, "product").unwrap_or_default(),
    })
}

/// Every USB device (not root hubs, not interfaces) under `root`, by bus id.
/// A machine without USB gives an empty list.
pub fn list(root: &Path) -> io::Result<Vec<UsbDevice>> {
    let dir = root.join("bus/usb/devices");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_busid(n))
        .collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        match describe(root, &id) {
            Ok(d) => out.push(d),
            // A device unplugged while we read it is not an error.
            Err(e) => debug!("skipping USB device {id}: {e}"),
        }
    }
    Ok(out)
}

fn driver_of(dev: &Path) -> Option<String> {
    fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn write_attr(path: &Path, value: &str) -> Result<(), UsbError> {
    fs::write(path, value).map_err(|source| UsbError::Sysfs {
        what: format!("writing {value:?} to {}", path.display()),
        source,
    })
}

fn status(dev: &Path) -> Option<u32> {
    read_attr(dev, "usbip_status").ok()?.parse().ok()
}

/// A device bound to `usbip-host` for one export.
#[derive(Debug)]
pub struct Binding {
    dev: PathBuf,
    host: PathBuf,
    busid: String,
    /// The driver it had before (None: none; `usbip-host`: leave it bound).
    original: Option<String>,
    /// Record of `original` (see [`STATE_DIR`]).
    record: PathBuf,
}

impl Binding {
    /// Binds `busid` to `usbip-host` and hands it the connected stream
    /// socket `fd` (usbip-host takes its own reference to it). The original
    /// driver is recorded under `state` until the device is restored.
    pub fn export(root: &Path, state: &Path, busid: &str, fd: RawFd) -> Result<Self, UsbError> {
        let dev = root.join("bus/usb/devices").join(busid);
        if !dev.exists() {
            return Err(UsbError::NoDevice(busid.to_owned()));
        }
        let host = root.join("bus/usb/drivers").join(HOST_DRIVER);
        if !host.exists() {
            return Err(UsbError::Io(format!(
                "the usbip-host driver is not loaded on this host (modprobe usbip-host), so {busid} cannot be exported"
            )));
        }
        let original = driver_of(&dev);
        let b = Self {
            dev,
            host,
            busid: busid.to_owned(),
            original: original.clone(),
            record: state.join(busid),
        };
        match original.as_deref() {
            Some(HOST_DRIVER) => {
                if status(&b.dev) == Some(SDEV_USED) {
                    return Err(UsbError::Busy(format!(
                        "{busid} (bound to usbip-host and in use by another USB/IP server)"
                    )));
                }
            }
            other => {
                // From here on, restore() undoes whatever was done.
                let bound = (|| {
                    let recorded = fs::create_dir_all(state)
                        .and_then(|()| fs::write(&b.record, other.unwrap_or("")));
                    if let Err(e) = recorded {
                        warn!(
                            busid,
                            "recording the original driver in {}: {e}",
                            state.display()
                        );
                    }
                    write_attr(&b.host.join("match_busid"), &format!("add {busid}"))?;
                    if let Some(d) = other {
                        let unbind = b.dev.join("driver/unbind");
                        write_attr(&unbind, busid)?;
                        debug!(busid, driver = d, "unbound from its driver");
                    }
                    if driver_of(&b.dev).as_deref() != Some(HOST_DRIVER) {
                        write_attr(&b.host.join("bind"), busid)?;
                    }
                    Ok(())
                })();
                if let Err(e) = bound {
                    b.restore();
                    return Err(e);
                }
            }
        }
        if status(&b.dev) != Some(SDEV_AVAILABLE) {
            let why =
                format!("{busid} is bound to usbip-host but its usbip_status is not 1 (available)");
            b.restore();
            return Err(UsbError::Io(why));
        }
        if let Err(e) = write_attr(&b.dev.join("usbip_sockfd"), &fd.to_string()) {
            b.restore();
            return Err(e);
        }
        info!(busid, original = ?b.original, "bound to usbip-host and connected");
        Ok(b)
    }

    /// True while usbip-host serves a connection for the device.
    pub fn connected(&self) -> bool {
        status(&self.dev) == Some(SDEV_USED)
    }

    /// Makes usbip-host drop its connection.
    pub fn hang_up(&self) {
        if self.connected() {
            if let Err(e) = write_attr(&self.dev.join("usbip_sockfd"), "-1") {
                warn!(busid = %self.busid, "{}", cio_core::error_chain(&e));
            }
        }
    }

    /// Ends the export and gives the device back to its original driver.
    pub fn restore(self) {
        // The stub notices the closed socket on its own; wait briefly so
        // it has left the "used" state before the device is unbound.
        let deadline = Instant::now() + Duration::from_secs(3);
        while status(&self.dev) == Some(SDEV_USED) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.original.as_deref() == Some(HOST_DRIVER) {
            return; // it was exported by someone else before us: leave it so
        }
        let busid = &self.busid;
        let warn_on = |r: Result<(), UsbError>| {
            if let Err(e) = r {
                warn!(busid, "restoring the device: {}", cio_core::error_chain(&e));
            }
        };
        if driver_of(&self.dev).as_deref() == Some(HOST_DRIVER) {
            warn_on(write_attr(&self.host.join("unbind"), busid));
        }
        warn_on(write_attr(
            &self.host.join("match_busid"),
            &format!("del {busid}"),
        ));
        // Let the bus find the original driver again.
        let rebind = self.host.join("rebind");
        let probe = self.host.join("../../drivers_probe");
        let r = if rebind.exists() {
            write_attr(&rebind, busid)
        } else {
            write_attr(&probe, busid)
        };
        warn_on(r);
        let _ = fs::remove_file(&self.record);
        info!(busid, driver = ?driver_of(&self.dev), "device restored");
    }
}

/// Gives back devices a previous ciod left bound to usbip-host (it was
/// killed before it could restore them); returns their bus ids. Devices
/// usbip-host still serves are left alone.
pub fn recover(root: &Path, state: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(state) else {
        return Vec::new();
    };
    let mut restored = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let busid = e.file_name().to_string_lossy().into_owned();
        let record = e.path();
        let dev = root.join("bus/usb/devices").join(&busid);
        if !is_busid(&busid) || driver_of(&dev).as_deref() != Some(HOST_DRIVER) {
            let _ = fs::remove_file(&record); // gone, or already given back
            continue;
        }
        if status(&dev) == Some(SDEV_USED) {
            warn!(
                busid,
                "left on usbip-host by an earlier ciod and still in use: not touched"
            );
            continue;
        }
        let original = fs::read_to_string(&record).unwrap_or_default();
        let original = original.trim();
        Binding {
            dev,
            host: root.join("bus/usb/drivers").join(HOST_DRIVER),
            busid: busid.clone(),
            original: (!original.is_empty()).then(|| original.to_owned()),
            record,
        }
        .restore();
        restored.push(busid);
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids() {
        for ok in ["1-1", "3-2.4.1", "10-12"] {
            assert!(is_busid(ok), "{ok}");
        }
        for bad in ["usb1", "1-1:1.0", "1-", "-1", "1-1..2", "a-1", "1-1.x", ""] {
            assert!(!is_busid(bad), "{bad}");
        }
    }

    fn fake_device(root: &Path, busid: &str, attrs: &[(&str, &str)]) {
        let d = root.join("bus/usb/devices").join(busid);
        fs::create_dir_all(&d).unwrap();
        for (k, v) in attrs {
            fs::write(d.join(k), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn lists_devices_with_interfaces_from_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("cio-sysfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dev = [
            ("busnum", "2"),
            ("devnum", "3"),
            ("speed", "5000"),
            ("idVendor", "46f4"),
            ("idProduct", "0001"),
            ("bcdDevice", "0000"),
            ("bDeviceClass", "00"),
            ("bDeviceSubClass", "00"),
            ("bDeviceProtocol", "00"),
            ("bConfigurationValue", "1"),
            ("bNumConfigurations", "1"),
            ("product", "QEMU USB HARDDRIVE"),
        ];
        fake_device(&root, "2-1", &dev);
        fake_device(
            &root,
            "2-1/2-1:1.0",
            &[
                ("bInterfaceClass", "08"),
                ("bInterfaceSubClass", "06"),
                ("bInterfaceProtocol", "50"),
            ],
        );
        fake_device(&root, "usb2", &dev); // root hub: not listed
        fake_device(&root, "3-1", &[("busnum", "3")]); // half-written: skipped
        let list = list(&root).unwrap();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let d = &list[0];
        assert_eq!((d.busid.as_str(), d.busnum, d.devnum), ("2-1", 2, 3));
        assert_eq!((d.vendor, d.product, d.speed), (0x46f4, 1, UsbSpeed::Super));
        assert_eq!(d.product_name, "QEMU USB HARDDRIVE");
        assert_eq!(
            d.interfaces,
            vec![UsbInterface {
                class: 8,
                subclass: 6,
                protocol: 0x50
            }]
        );
        assert!(list_missing_is_empty());
    }

    #[test]
    fn export_explains_a_missing_driver_and_device() {
        let root = std::env::temp_dir().join(format!("cio-sysfs-x-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake_device(&root, "1-1", &[("busnum", "1")]);
        let state = root.join("state");
        let e = Binding::export(&root, &state, "1-1", 0).unwrap_err();
        assert!(e.to_string().contains("modprobe usbip-host"), "{e}");
        let e = Binding::export(&root, &state, "1-9", 0).unwrap_err();
        assert!(matches!(e, UsbError::NoDevice(_)), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn recovery_gives_back_what_a_killed_ciod_left_on_usbip_host() {
        let root = std::env::temp_dir().join(format!("cio-sysfs-r-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let host = root.join("bus/usb/drivers/usbip-host");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("rebind"), "").unwrap();
        fake_device(&root, "1-1", &[("usbip_status", "1")]);
        fake_device(&root, "1-2", &[("usbip_status", "2")]); // still serving
        for d in ["1-1", "1-2"] {
            std::os::unix::fs::symlink(&host, root.join("bus/usb/devices").join(d).join("driver"))
                .unwrap();
        }
        let state = root.join("state");
        fs::create_dir_all(&state).unwrap();
        for (busid, driver) in [("1-1", "usb"), ("1-2", "usb"), ("4-4", "usb")] {
            fs::write(state.join(busid), driver).unwrap();
        }
        assert_eq!(recover(&root, &state), vec!["1-1".to_string()]);
        assert_eq!(
            fs::read_to_string(host.join("match_busid")).unwrap(),
            "del 1-1"
        );
        assert_eq!(fs::read_to_string(host.join("rebind")).unwrap(), "1-1");
        // 1-1 done and 4-4 gone: records removed; 1-2 in use: kept.
        assert!(!state.join("1-1").exists() && !state.join("4-4").exists());
        assert!(state.join("1-2").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    fn list_missing_is_empty() -> bool {
        list(Path::new("/nonexistent-cio-sysfs"))
            .unwrap()
            .is_empty()
    }
}
