//! `--json`: what the listing and status commands print for scripts. The
//! field names are stable; `docs/json.md` lists them.

use cio_core::device::{REGION_64BIT, REGION_PREFETCH, REGION_READ, REGION_WRITE};
use cio_core::usbip::UsbDevice;
use cio_core::wire::DeviceSummary;
use cio_core::{DeviceInfo, DmaDir, IrqKind, RegionKind, ResetMethod};
use cio_frontend::Ticket;
use serde_json::{json, Value};

fn irq_kind(k: IrqKind) -> &'static str {
    match k {
        IrqKind::Intx => "intx",
        IrqKind::Msi => "msi",
        IrqKind::Msix => "msix",
    }
}

fn reset(r: ResetMethod) -> &'static str {
    match r {
        ResetMethod::Unknown => "unknown",
        ResetMethod::None => "none",
        ResetMethod::Full => "full",
        ResetMethod::PowerState => "power-state",
    }
}

fn dir(d: DmaDir) -> &'static str {
    match d {
        DmaDir::ToDevice => "to-device",
        DmaDir::FromDevice => "from-device",
        DmaDir::Bidirectional => "bidirectional",
    }
}

/// `cio list`.
pub fn device_list(backend: &str, devices: &[DeviceSummary]) -> Value {
    let devices: Vec<Value> = devices
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "vendor": d.vendor,
                "device": d.device,
                "class": d.class,
                "busy": d.busy,
            })
        })
        .collect();
    json!({ "backend": backend, "devices": devices })
}

/// `cio info`.
pub fn device_info(info: &DeviceInfo) -> Value {
    let regions: Vec<Value> = info
        .regions
        .iter()
        .map(|r| {
            let widths: Vec<u8> = [1u8, 2, 4, 8]
                .into_iter()
                .filter(|w| r.widths & w != 0)
                .collect();
            json!({
                "index": r.index,
                "kind": match r.kind {
                    RegionKind::Config => "config",
                    RegionKind::Mmio => "mmio",
                    RegionKind::Pio => "pio",
                },
                "size": r.size,
                "readable": r.flags & REGION_READ != 0,
                "writable": r.flags & REGION_WRITE != 0,
                "prefetchable": r.flags & REGION_PREFETCH != 0,
                "bits64": r.flags & REGION_64BIT != 0,
                "widths": widths,
            })
        })
        .collect();
    let irqs: Vec<Value> = info
        .irqs
        .iter()
        .map(|i| json!({ "kind": irq_kind(i.kind), "count": i.count }))
        .collect();
    json!({
        "name": info.name,
        "vendor": info.vendor,
        "device": info.device,
        "subsystem_vendor": info.subsystem_vendor,
        "subsystem_device": info.subsystem_device,
        "class": info.class,
        "revision": info.revision,
        "reset": reset(info.reset),
        "regions": regions,
        "irqs": irqs,
    })
}

/// `cio usb list`.
pub fn usb_devices(source: &str, devices: &[UsbDevice]) -> Value {
    let devices: Vec<Value> = devices
        .iter()
        .map(|d| {
            let interfaces: Vec<Value> = d
                .interfaces
                .iter()
                .map(
                    |f| json!({ "class": f.class, "subclass": f.subclass, "protocol": f.protocol }),
                )
                .collect();
            json!({
                "busid": d.busid,
                "product_name": d.product_name,
                "vendor": d.vendor,
                "product": d.product,
                "bcd_device": d.bcd_device,
                "busnum": d.busnum,
                "devnum": d.devnum,
                "speed": d.speed as u32,
                "speed_name": d.speed.name(),
                "class": d.class,
                "subclass": d.subclass,
                "protocol": d.protocol,
                "interfaces": interfaces,
            })
        })
        .collect();
    json!({ "source": source, "devices": devices })
}

/// A vhci-hcd port in use, with what sysfs says of its device.
#[derive(Debug)]
pub struct PortView {
    /// The port.
    pub port: cio_frontend::usb::VhciPort,
    /// `idVendor`, `idProduct`, `product` of the device here.
    pub vendor: String,
    /// See `vendor`.
    pub product_id: String,
    /// See `vendor`.
    pub product: String,
    /// Where it came from (the attach's record), if known.
    pub source: Option<String>,
}

/// `cio usb port`.
pub fn usb_ports(ports: &[PortView]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|v| {
            json!({
                "port": v.port.port,
                "speed": v.port.speed as u32,
                "speed_name": v.port.speed.name(),
                "local_busid": v.port.local_busid,
                "remote_busnum": v.port.devid >> 16,
                "remote_devnum": v.port.devid & 0xffff,
                "vendor": v.vendor,
                "product": v.product_id,
                "product_name": v.product,
                "source": v.source,
            })
        })
        .collect();
    json!({ "ports": ports })
}

/// `cio session show`.
pub fn ticket(t: &Ticket) -> Value {
    let expires = t
        .expires
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let devices: Vec<Value> = t
        .devices()
        .iter()
        .map(|d| {
            let mappings: Vec<Value> = d
                .mappings
                .iter()
                .map(|&(iova, len, d)| json!({ "iova": iova, "len": len, "dir": dir(d) }))
                .collect();
            let irqs: Vec<Value> = d
                .irqs
                .iter()
                .map(|&(k, v)| json!({ "kind": irq_kind(k), "vector": v }))
                .collect();
            json!({ "handle": d.handle, "name": d.info.name, "mappings": mappings, "irqs": irqs })
        })
        .collect();
    json!({
        "backend": t.endpoint.to_string(),
        "session": format!("{:#x}", t.session),
        "expires_unix_ms": expires.as_millis() as u64,
        "expired": t.expired(),
        "devices": devices,
    })
}
