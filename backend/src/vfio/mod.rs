//! Real PCI functions through the kernel's VFIO: the `Device` for a
//! function bound to `vfio-pci` (see `ciod --help` for binding).
//!
//! BARs VFIO lets us map whole (no sparse areas such as an MSI-X table) are
//! mapped, and an access is one load or store of its width; other regions
//! are read and written with positioned I/O on the device fd. Every access
//! is checked against the region first.
//! Interrupts go to eventfds through `VFIO_DEVICE_SET_IRQS`. Reset uses
//! `VFIO_DEVICE_RESET` and says so when the function has no reset method.
//!
//! DMA: every mapping gets its own buffer (`sys::RawBuf`), mapped into the
//! VFIO container at the mapping's IOVA and touched only through volatile
//! copies (vfio-ioctls forbids Rust references to DMA memory). The session's
//! shadow `DmaRegion` stays ordinary memory: `prepare_dma` copies the pages
//! the frontend pushed into the buffer before the device is accessed, and
//! `collect_dma` copies pages the device changed back into the shadow
//! (found by comparing, page by page: cost follows mapped bytes of
//! device-writable mappings, which IOMMU dirty tracking could improve).

mod sys;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cio_core::device::{
    REGION_64BIT, REGION_PREFETCH, REGION_READ, REGION_WRITE, WIDTH_1, WIDTH_2, WIDTH_4, WIDTH_8,
};
use cio_core::{
    Device, DeviceError, DeviceInfo, DmaError, DmaRegion, EventFd, IrqInfo, IrqKind, RegionInfo,
    RegionKind, ResetMethod, CONFIG_REGION,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

/// VFIO region flag: readable.
const VFIO_REGION_READ: u32 = 1;
/// VFIO region flag: writable.
const VFIO_REGION_WRITE: u32 = 2;
/// VFIO region flag: mmap-able.
const VFIO_REGION_MMAP: u32 = 4;

/// A DMA mapping: the shadow the protocol syncs, and the buffer the device
/// really uses.
struct Mapping {
    region: Arc<DmaRegion>,
    buf: sys::RawBuf,
}

/// A PCI function bound to vfio-pci.
pub struct VfioPci {
    info: DeviceInfo,
    bdf: String,
    offsets: Vec<(u32, u64)>,
    // Fields drop in this order: BAR mappings and DMA buffers (unmapped
    // from the IOMMU in `drop`) go before the device and its container,
    // which cannot release the group while the device fd is still mapped.
    mmio: Vec<(u32, sys::MmioMap)>,
    mappings: Vec<Mapping>,
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci").field("bdf", &self.bdf).finish()
    }
}

/// Checks a PCI address: `DDDD:BB:DD.F`.
pub fn parse_bdf(bdf: &str) -> Result<String, String> {
    let ok = bdf.len() == 12
        && bdf.chars().enumerate().all(|(i, c)| match i {
            4 | 7 => c == ':',
            10 => c == '.',
            11 => ('0'..='7').contains(&c),
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(bdf.to_ascii_lowercase())
    } else {
        Err(format!(
            "{bdf:?} is not a PCI address (DDDD:BB:DD.F, e.g. 0000:00:02.0)"
        ))
    }
}

/// Checks a `vendor:device` id (`VVVV:DDDD`, hex).
pub fn parse_id(id: &str) -> Result<(u16, u16), String> {
    let parsed = id.split_once(':').and_then(|(v, d)| {
        (v.len() == 4 && d.len() == 4)
            .then(|| {
                Some((
                    u16::from_str_radix(v, 16).ok()?,
                    u16::from_str_radix(d, 16).ok()?,
                ))
            })
            .flatten()
    });
    parsed.ok_or_else(|| format!("{id:?} is not a vendor:device id (VVVV:DDDD, e.g. 8086:10d3)"))
}

/// The PCI address of the one function with `vendor:device` bound to
/// vfio-pci; an error if there is none or more than one.
pub fn find_by_id(vendor: u16, device: u16) -> Result<String, String> {
    let read_hex = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
    };
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/bus/pci/devices")
        .map_err(|e| format!("listing PCI devices: {e}"))?
    {
        let Ok(e) = e else { continue };
        let p = e.path();
        if read_hex(&p.join("vendor")) == Some(vendor)
            && read_hex(&p.join("device")) == Some(device)
        {
            let driver = std::fs::read_link(p.join("driver"))
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
            found.push((e.file_name().to_string_lossy().into_owned(), driver));
        }
    }
    let bound: Vec<&String> = found
        .iter()
        .filter(|(_, d)| d.as_deref() == Some("vfio-pci"))
        .map(|(b, _)| b)
        .collect();
    match bound.as_slice() {
        [one] => Ok((*one).clone()),
        [] if found.is_empty() => Err(format!("no PCI function {vendor:04x}:{device:04x} on this host")),
        [] => Err(format!(
            "no {vendor:04x}:{device:04x} function is bound to vfio-pci (found: {})",
            found
                .iter()
                .map(|(b, d)| format!("{b} on {}", d.as_deref().unwrap_or("no driver")))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        many => Err(format!(
            "{} functions {vendor:04x}:{device:04x} are bound to vfio-pci ({}): name one by its PCI address",
            many.len(),
            many.iter().map(|b| b.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn failed(what: impl std::fmt::Display) -> DeviceError {
    DeviceError::Failed(what.to_string())
}

impl VfioPci {
    /// Regions accessed through a mapping rather than read/write calls.
    pub fn mapped_regions(&self) -> Vec<u32> {
        self.mmio.iter().map(|(i, _)| *i).collect()
    }

    /// Opens the function at `bdf` (a PCI address, or a `vendor:device` id
    /// that exactly one function bound to vfio-pci has) and serves it as
    /// `name`.
    pub fn open(bdf: &str, name: &str) -> Result<Self, DeviceError> {
        let bdf = match parse_id(bdf) {
            Ok((v, d)) => find_by_id(v, d).map_err(failed)?,
            Err(_) => parse_bdf(bdf).map_err(failed)?,
        };
        let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
        if !sysfs.exists() {
            return Err(failed(format!("no PCI function {bdf} on this host")));
        }
        let driver = std::fs::read_link(sysfs.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(failed(format!(
                "{bdf} is bound to {}, not vfio-pci: echo vfio-pci > {}/driver_override, unbind it, then echo {bdf} > /sys/bus/pci/drivers_probe",
                driver.as_deref().unwrap_or("no driver"),
                sysfs.display()
            )));
        }
        let container = Arc::new(
            VfioContainer::new(None).map_err(|e| failed(format!("opening /dev/vfio/vfio: {e}")))?,
        );
        let device = VfioDevice::new(&sysfs, Arc::clone(&container) as Arc<dyn VfioOps>, false)
            .map_err(|e| failed(format!("opening VFIO device {bdf}: {e}")))?;
        Self::describe(bdf, name, device, container, &sysfs)
    }

    fn describe(
        bdf: String,
        name: &str,
        device: VfioDevice,
        container: Arc<VfioContainer>,
        sysfs: &Path,
    ) -> Result<Self, DeviceError> {
        let cfg_off = device.get_region_offset(CONFIG_REGION);
        let mut hdr = [0u8; 64];
        sys::pread(device.as_raw_fd(), &mut hdr, cfg_off)
            .map_err(|e| failed(format!("reading config space of {bdf}: {e}")))?;
        let u16_at = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]);
        let (vendor, dev_id) = (u16_at(0), u16_at(2));
        let profile = cio_hw_profiles::Profile::builtin_for(vendor, dev_id);
        let mut regions = Vec::new();
        let mut offsets = Vec::new();
        let mut mmio = Vec::new();
        for index in 0..6u32 {
            let size = device.get_region_size(index);
            if size == 0 {
                continue;
            }
            let bar = u32::from_le_bytes(
                hdr[0x10 + 4 * index as usize..][..4]
                    .try_into()
                    .expect("4 bytes"),
            );
            let io = bar & 1 == 1;
            let mut flags = vfio_flags(device.get_region_flags(index));
            if !io && (bar >> 1) & 3 == 2 {
                flags |= REGION_64BIT;
            }
            if !io && bar & 8 != 0 {
                flags |= REGION_PREFETCH;
            }
            // The device's own access widths when its profile knows them,
            // but never 8 bytes: vfio-pci on x86 (6.1 here) splits an 8-byte
            // access into two 4-byte ones, which changes what the device
            // sees (edu takes the low half as the whole register and
            // ignores the high one). Refusing the width beats a silent split.
            let widths = profile
                .as_ref()
                .and_then(|p| p.bars.iter().find(|b| b.index == index))
                .map(|b| b.widths.iter().fold(0u8, |m, w| m | w))
                .unwrap_or(WIDTH_1 | WIDTH_2 | WIDTH_4)
                & !WIDTH_8;
            regions.push(RegionInfo {
                index,
                kind: if io {
                    RegionKind::Pio
                } else {
                    RegionKind::Mmio
                },
                size,
                flags,
                widths,
            });
            offsets.push((index, device.get_region_offset(index)));
            let sparse = device
                .get_region_caps(index)
                .iter()
                .any(|c| matches!(c, vfio_ioctls::VfioRegionInfoCap::SparseMmap(_)));
            if !io && !sparse && device.get_region_flags(index) & VFIO_REGION_MMAP != 0 {
                match sys::MmioMap::new(
                    device.as_raw_fd(),
                    device.get_region_offset(index),
                    size as usize,
                ) {
                    Ok(m) => mmio.push((index, m)),
                    Err(e) => {
                        tracing::debug!("{bdf}: BAR {index} not mapped ({e}); using read/write")
                    }
                }
            }
        }
        regions.push(RegionInfo {
            index: CONFIG_REGION,
            kind: RegionKind::Config,
            size: device.get_region_size(CONFIG_REGION),
            flags: vfio_flags(device.get_region_flags(CONFIG_REGION)),
            widths: WIDTH_1 | WIDTH_2 | WIDTH_4,
        });
        offsets.push((CONFIG_REGION, cfg_off));
        let irqs = [(IrqKind::Intx, 0u32), (IrqKind::Msi, 1), (IrqKind::Msix, 2)]
            .into_iter()
            .filter_map(|(kind, idx)| {
                let count = device.get_irq_info(idx).map_or(0, |i| i.count);
                (count > 0).then_some(IrqInfo { kind, count })
            })
            .collect();
        let info = DeviceInfo {
            name: name.to_owned(),
            vendor,
            device: dev_id,
            subsystem_vendor: u16_at(0x2c),
            subsystem_device: u16_at(0x2e),
            class: u32::from_le_bytes([hdr[9], hdr[10], hdr[11], 0]),
            revision: hdr[8],
            regions,
            irqs,
            reset: ResetMethod::from_sysfs(
                &std::fs::read_to_string(sysfs.join("reset_method")).unwrap_or_default(),
            ),
        };
        Ok(Self {
            info,
            bdf,
            device,
            offsets,
            mmio,
            mappings: Vec::new(),
            container,
        })
    }

    fn file_offset(&self, region: u32, offset: u64) -> u64 {
        let base = self
            .offsets
            .iter()
            .find(|(i, _)| *i == region)
            .map(|(_, o)| *o)
            .expect("check_access accepted the region");
        base + offset
    }
}

fn vfio_flags(f: u32) -> u8 {
    let mut flags = 0;
    if f & VFIO_REGION_READ != 0 {
        flags |= REGION_READ;
    }
    if f & VFIO_REGION_WRITE != 0 {
        flags |= REGION_WRITE;
    }
    flags
}

fn irq_index(kind: IrqKind) -> u32 {
    kind as u32
}

impl Device for VfioPci {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), false)?;
        if let Some((_, m)) = self.mmio.iter().find(|(i, _)| *i == region) {
            m.read(offset, data);
            return Ok(());
        }
        sys::pread(
            self.device.as_raw_fd(),
            data,
            self.file_offset(region, offset),
        )
        .map_err(|e| {
            failed(format!(
                "{}: reading region {region} at {offset:#x}: {e}",
                self.bdf
            ))
        })
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), true)?;
        if let Some((_, m)) = self.mmio.iter().find(|(i, _)| *i == region) {
            m.write(offset, data);
            return Ok(());
        }
        sys::pwrite(
            self.device.as_raw_fd(),
            data,
            self.file_offset(region, offset),
        )
        .map_err(|e| {
            failed(format!(
                "{}: writing region {region} at {offset:#x}: {e}",
                self.bdf
            ))
        })
    }

    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        let count = self.info.irq_count(kind);
        let end = start.saturating_add(fds.len() as u32);
        if count == 0 || end > count {
            return Err(DeviceError::NoIrq { kind, start, end });
        }
        let idx = irq_index(kind);
        if fds.is_empty() {
            return self
                .device
                .disable_irq(idx)
                .map_err(|e| failed(format!("{}: disabling {kind}: {e}", self.bdf)));
        }
        if start != 0 {
            return Err(DeviceError::Unsupported(
                "enabling VFIO vectors from a non-zero start",
            ));
        }
        self.device
            .enable_irq(idx, fds.iter().collect())
            .map_err(|e| failed(format!("{}: enabling {kind}: {e}", self.bdf)))
    }

    fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        self.device
            .unmask_irq(0)
            .map_err(|e| failed(format!("{}: unmasking INTx: {e}", self.bdf)))
    }

    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        if let Some(m) = self
            .mappings
            .iter()
            .find(|m| m.region.overlaps(region.iova(), region.len()))
        {
            return Err(DmaError::Overlap {
                iova: region.iova(),
                len: region.len(),
                existing: m.region.iova(),
                existing_len: m.region.len(),
            }
            .into());
        }
        let len = region.len() as usize;
        let buf = sys::RawBuf::new(len)
            .map_err(|e| failed(format!("allocating {len:#x} bytes of DMA memory: {e}")))?;
        let mut page = vec![0u8; cio_core::PAGE_SIZE as usize];
        for off in (0..len).step_by(page.len()) {
            region.read(off as u64, &mut page)?;
            buf.write(off, &page);
        }
        buf.dma_map(&self.container, region.iova()).map_err(|e| {
            failed(format!(
                "{}: mapping {:#x}+{len:#x} for DMA: {e}",
                self.bdf,
                region.iova()
            ))
        })?;
        // What was applied so far is in the buffer now.
        region.take_applied_runs(usize::MAX);
        self.mappings.push(Mapping { region, buf });
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        let i = self
            .mappings
            .iter()
            .position(|m| m.region.iova() == iova)
            .ok_or(DmaError::NotMapped(iova))?;
        self.collect_dma()?;
        let m = &self.mappings[i];
        self.container
            .vfio_dma_unmap(iova, m.buf.len())
            .map_err(|e| failed(format!("{}: unmapping {iova:#x}: {e}", self.bdf)))?;
        Ok(self.mappings.remove(i).region)
    }

    fn prepare_dma(&mut self) -> Result<(), DeviceError> {
        for m in &self.mappings {
            if !m.region.dir().device_reads() {
                continue;
            }
            for (off, n) in m.region.take_applied_runs(usize::MAX) {
                m.region
                    .with_slice(off, n, |s| m.buf.write(off as usize, s))?;
            }
        }
        Ok(())
    }

    fn collect_dma(&mut self) -> Result<(), DeviceError> {
        self.prepare_dma()?;
        let mut page = vec![0u8; cio_core::PAGE_SIZE as usize];
        for m in &self.mappings {
            if !m.region.dir().device_writes() {
                continue;
            }
            for off in (0..m.buf.len()).step_by(page.len()) {
                m.buf.read(off, &mut page);
                if !m
                    .region
                    .with_slice(off as u64, page.len(), |s| s == page.as_slice())?
                {
                    m.region.write(off as u64, &page)?;
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        sys::reset(self.device.as_raw_fd()).map_err(|e| {
            failed(format!(
                "{}: VFIO_DEVICE_RESET failed ({e}): the function offers no reset method the kernel can use",
                self.bdf
            ))
        })
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // The IOMMU must forget the buffers before they are unmapped.
        for m in &self.mappings {
            if let Err(e) = self.container.vfio_dma_unmap(m.region.iova(), m.buf.len()) {
                tracing::warn!(
                    "{}: unmapping {:#x} on close: {e}",
                    self.bdf,
                    m.region.iova()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_buffers_copy_both_ways() {
        let b = sys::RawBuf::new(8192).unwrap();
        b.write(4090, &[1, 2, 3, 4, 5, 6]);
        let mut out = [0u8; 8];
        b.read(4088, &mut out);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn pci_addresses_are_checked() {
        assert_eq!(parse_bdf("0000:00:02.0").unwrap(), "0000:00:02.0");
        assert_eq!(parse_bdf("0000:AF:1f.7").unwrap(), "0000:af:1f.7");
        for bad in [
            "00:02.0",
            "0000:00:02.8",
            "0000-00:02.0",
            "0000:00:02.00",
            "../../etc",
        ] {
            assert!(parse_bdf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vendor_device_ids_are_checked() {
        assert_eq!(parse_id("8086:10d3").unwrap(), (0x8086, 0x10d3));
        for bad in [
            "8086",
            "8086:10d",
            "80861:10d3",
            "zzzz:10d3",
            "0000:00:02.0",
        ] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
        let e = VfioPci::open("abcd:ef01", "x").unwrap_err().to_string();
        assert!(e.contains("no PCI function abcd:ef01"), "{e}");
    }

    #[test]
    fn opening_a_missing_function_explains_itself() {
        let e = VfioPci::open("0000:ff:1f.7", "x").unwrap_err().to_string();
        assert!(e.contains("no PCI function 0000:ff:1f.7"), "{e}");
    }
}
