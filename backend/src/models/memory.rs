//! An emulated "memory" device: BAR0 is plain RAM of a chosen size,
//! accessible at every width. Used for ordering tests and benchmarks that
//! need a large BAR with no side effects.

use std::sync::Arc;

use cio_core::device::{
    REGION_64BIT, REGION_PREFETCH, REGION_READ, REGION_WRITE, WIDTH_1, WIDTH_2, WIDTH_4, WIDTH_8,
};
use cio_core::{
    Device, DeviceError, DeviceInfo, DmaRegion, DmaSpace, EventFd, IrqKind, RegionInfo, RegionKind,
    CONFIG_REGION,
};
use memmap2::MmapMut;

use super::config_space::{Bar, ConfigSpace, Identity, CONFIG_SIZE};

/// Vendor id (QEMU's test range).
pub const VENDOR: u16 = 0x1234;
/// Device id chosen for cio's memory model.
pub const DEVICE: u16 = 0xc10d;
/// Default BAR0 size.
pub const DEFAULT_SIZE: u64 = 1 << 20;
/// Largest BAR0 (memory is committed only when touched).
pub const MAX_SIZE: u64 = 1 << 36;

/// The emulated memory function.
#[derive(Debug)]
pub struct Memory {
    info: DeviceInfo,
    config: ConfigSpace,
    ram: MmapMut,
    dma: DmaSpace,
}

impl Memory {
    /// A memory device served as `name` with a BAR0 of `size` bytes (a power
    /// of two from 4 KiB to [`MAX_SIZE`]).
    pub fn new(name: &str, size: u64) -> Result<Self, DeviceError> {
        if !size.is_power_of_two() || !(4096..=MAX_SIZE).contains(&size) {
            return Err(DeviceError::Failed(format!(
                "memory BAR size {size:#x} must be a power of two from 4 KiB to {MAX_SIZE:#x}"
            )));
        }
        let ram = MmapMut::map_anon(size as usize).map_err(|e| {
            DeviceError::Failed(format!("allocating {size:#x} bytes of BAR memory: {e}"))
        })?;
        let id = Identity {
            vendor: VENDOR,
            device: DEVICE,
            subsystem_vendor: VENDOR,
            subsystem_device: DEVICE,
            class: 0x050000,
            revision: 1,
        };
        let flags = REGION_PREFETCH | REGION_64BIT;
        let info = DeviceInfo {
            name: name.to_owned(),
            vendor: id.vendor,
            device: id.device,
            subsystem_vendor: id.subsystem_vendor,
            subsystem_device: id.subsystem_device,
            class: id.class,
            revision: id.revision,
            regions: vec![
                RegionInfo {
                    index: 0,
                    kind: RegionKind::Mmio,
                    size,
                    flags: REGION_READ | REGION_WRITE | flags,
                    widths: WIDTH_1 | WIDTH_2 | WIDTH_4 | WIDTH_8,
                },
                RegionInfo {
                    index: CONFIG_REGION,
                    kind: RegionKind::Config,
                    size: CONFIG_SIZE as u64,
                    flags: REGION_READ | REGION_WRITE,
                    widths: WIDTH_1 | WIDTH_2 | WIDTH_4,
                },
            ],
            irqs: vec![],
        };
        let bars = [Bar {
            index: 0,
            size,
            flags,
        }];
        Ok(Self {
            info,
            config: ConfigSpace::new(id, &bars, 0, false),
            ram,
            dma: DmaSpace::new(),
        })
    }
}

impl Device for Memory {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), false)?;
        if region == CONFIG_REGION {
            self.config.read(offset, data);
        } else {
            let o = offset as usize;
            data.copy_from_slice(&self.ram[o..o + data.len()]);
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), true)?;
        if region == CONFIG_REGION {
            self.config.write(offset, data);
        } else {
            let o = offset as usize;
            self.ram[o..o + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        Err(DeviceError::NoIrq {
            kind,
            start,
            end: start.saturating_add(fds.len() as u32),
        })
    }

    fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("INTx"))
    }

    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        Ok(self.dma.insert(region)?)
    }

    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        Ok(self.dma.remove(iova)?)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.config.reset();
        // A fresh mapping instead of zero-filling: a large, mostly untouched
        // BAR stays uncommitted.
        self.ram = MmapMut::map_anon(self.ram.len())
            .map_err(|e| DeviceError::Failed(format!("reallocating BAR memory: {e}")))?;
        Ok(())
    }
}
