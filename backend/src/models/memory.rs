//! An emulated "memory" device: BAR0 is plain RAM of a chosen size,
//! accessible at every width, and BAR2 holds a DMA engine that copies
//! between BAR0 and DMA memory. Used for ordering tests and benchmarks that
//! need a large BAR with no side effects, bulk DMA and an interrupt doorbell.
//!
//! BAR2 (4 KiB, 4- and 8-byte accesses):
//!
//! | offset | register |
//! |---|---|
//! | 0x00 | DMA address (IOVA) |
//! | 0x08 | offset in BAR0 |
//! | 0x10 | length |
//! | 0x18 | command (WO): 1 = BAR0 to DMA memory, 2 = DMA memory to BAR0; bit 2 raises MSI 0 when done |
//! | 0x20 | completed commands (RO) |
//! | 0x28 | doorbell (WO): any write raises MSI 0 |
//!
//! Commands complete before the write that starts them returns. A command
//! whose ranges fall outside BAR0 or the DMA mappings fails with an error
//! and copies nothing.

use std::sync::Arc;

use bytes::BytesMut;

use cio_core::device::{
    REGION_64BIT, REGION_PREFETCH, REGION_READ, REGION_WRITE, WIDTH_1, WIDTH_2, WIDTH_4, WIDTH_8,
};
use cio_core::{
    Device, DeviceError, DeviceInfo, DmaRegion, DmaSpace, EventFd, IrqInfo, IrqKind, RegionInfo,
    RegionKind, CONFIG_REGION,
};
use memmap2::MmapMut;

use super::config_space::{self, Bar, ConfigSpace, Identity};
use super::irq::IrqLines;

/// Vendor id (QEMU's test range).
pub const VENDOR: u16 = 0x1234;
/// Device id chosen for cio's memory model.
pub const DEVICE: u16 = 0xc10d;
/// Default BAR0 size.
pub const DEFAULT_SIZE: u64 = 1 << 20;
/// Largest BAR0 (memory is committed only when touched).
pub const MAX_SIZE: u64 = 1 << 36;
/// Size of the control BAR (BAR2).
pub const CONTROL_SIZE: u64 = 4096;

/// Register offsets in BAR2.
pub mod reg {
    #![allow(missing_docs)]
    pub const DMA_ADDR: u64 = 0x00;
    pub const BAR_OFFSET: u64 = 0x08;
    pub const LEN: u64 = 0x10;
    pub const CMD: u64 = 0x18;
    pub const COMPLETED: u64 = 0x20;
    pub const DOORBELL: u64 = 0x28;
}

/// Command: copy BAR0 to DMA memory (the device writes target memory).
pub const CMD_TO_MEMORY: u64 = 1;
/// Command: copy DMA memory to BAR0 (the device reads target memory).
pub const CMD_FROM_MEMORY: u64 = 2;
/// Command flag: raise MSI 0 when done.
pub const CMD_IRQ: u64 = 4;

/// Checks a BAR0 size: a power of two from 4 KiB to [`MAX_SIZE`].
pub fn check_size(size: u64) -> Result<(), String> {
    if size.is_power_of_two() && (4096..=MAX_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "memory BAR size {size:#x} must be a power of two from 4 KiB to {MAX_SIZE:#x}"
        ))
    }
}

/// The emulated memory function.
#[derive(Debug)]
pub struct Memory {
    info: DeviceInfo,
    config: ConfigSpace,
    ram: MmapMut,
    dma: DmaSpace,
    regs: [u64; 3],
    completed: u64,
    irqs: IrqLines,
}

impl Memory {
    /// A memory device served as `name` with a BAR0 of `size` bytes (a power
    /// of two from 4 KiB to [`MAX_SIZE`]).
    pub fn new(name: &str, size: u64) -> Result<Self, DeviceError> {
        check_size(size).map_err(DeviceError::Failed)?;
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
        let info = id.info(
            name,
            vec![
                RegionInfo {
                    index: 0,
                    kind: RegionKind::Mmio,
                    size,
                    flags: REGION_READ | REGION_WRITE | flags,
                    widths: WIDTH_1 | WIDTH_2 | WIDTH_4 | WIDTH_8,
                },
                RegionInfo {
                    index: 2,
                    kind: RegionKind::Mmio,
                    size: CONTROL_SIZE,
                    flags: REGION_READ | REGION_WRITE,
                    widths: WIDTH_4 | WIDTH_8,
                },
                config_space::region_info(),
            ],
            vec![IrqInfo {
                kind: IrqKind::Msi,
                count: 1,
            }],
        );
        let bars = [
            Bar {
                index: 0,
                size,
                flags,
            },
            Bar {
                index: 2,
                size: CONTROL_SIZE,
                flags: 0,
            },
        ];
        Ok(Self {
            info,
            config: ConfigSpace::new(id, &bars, 0, true),
            ram,
            dma: DmaSpace::new(),
            regs: [0; 3],
            completed: 0,
            irqs: IrqLines::default(),
        })
    }

    fn control_read(&self, offset: u64) -> u64 {
        match offset {
            reg::DMA_ADDR | reg::BAR_OFFSET | reg::LEN => self.regs[(offset / 8) as usize],
            reg::COMPLETED => self.completed,
            _ => 0,
        }
    }

    fn control_write(&mut self, offset: u64, value: u64) -> Result<(), DeviceError> {
        match offset {
            reg::DMA_ADDR | reg::BAR_OFFSET | reg::LEN => self.regs[(offset / 8) as usize] = value,
            reg::CMD => {
                self.run(value)?;
                self.completed += 1;
                if value & CMD_IRQ != 0 {
                    self.irqs.msi_notify(0);
                }
            }
            reg::DOORBELL => self.irqs.msi_notify(0),
            _ => {}
        }
        Ok(())
    }

    fn run(&mut self, cmd: u64) -> Result<(), DeviceError> {
        let [iova, off, len] = self.regs;
        let end = off
            .checked_add(len)
            .filter(|e| *e <= self.ram.len() as u64)
            .ok_or_else(|| {
                DeviceError::Failed(format!(
                    "memory DMA of {len:#x} bytes at BAR0 offset {off:#x} is outside the {:#x}-byte BAR",
                    self.ram.len()
                ))
            })?;
        let span = off as usize..end as usize;
        match cmd & 3 {
            CMD_TO_MEMORY => self.dma.device_write(iova, &self.ram[span])?,
            CMD_FROM_MEMORY => self.dma.device_read(iova, &mut self.ram[span])?,
            other => {
                return Err(DeviceError::Failed(format!(
                    "memory DMA command {other} is not 1 (to memory) or 2 (from memory)"
                )))
            }
        }
        Ok(())
    }
}

impl Device for Memory {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), false)?;
        match region {
            CONFIG_REGION => self.config.read(offset, data),
            2 => {
                let v = self.control_read(offset & !7) >> (8 * (offset & 7));
                data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
            }
            _ => {
                let o = offset as usize;
                data.copy_from_slice(&self.ram[o..o + data.len()]);
            }
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), true)?;
        match region {
            CONFIG_REGION => self.config.write(offset, data),
            2 => {
                let mut v = [0u8; 8];
                v[..data.len()].copy_from_slice(data);
                return self.control_write(offset, u64::from_le_bytes(v));
            }
            _ => {
                let o = offset as usize;
                self.ram[o..o + data.len()].copy_from_slice(data);
            }
        }
        Ok(())
    }

    /// BAR0 is plain memory: one copy, as from a mapped BAR.
    fn read_bulk(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if region != 0 {
            return cio_core::device::read_split(self, region, offset, data);
        }
        self.info.check_bulk(region, offset, data.len(), false)?;
        let o = offset as usize;
        data.copy_from_slice(&self.ram[o..o + data.len()]);
        Ok(())
    }

    /// BAR0 straight into the reply: one copy, no zero-fill first.
    fn read_bulk_into(
        &mut self,
        region: u32,
        offset: u64,
        len: usize,
        out: &mut BytesMut,
    ) -> Result<(), DeviceError> {
        if region != 0 {
            return cio_core::device::read_bulk_zeroed(self, region, offset, len, out);
        }
        self.info.check_bulk(region, offset, len, false)?;
        let o = offset as usize;
        out.extend_from_slice(&self.ram[o..o + len]);
        Ok(())
    }

    fn write_bulk(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if region != 0 {
            return cio_core::device::write_split(self, region, offset, data);
        }
        self.info.check_bulk(region, offset, data.len(), true)?;
        let o = offset as usize;
        self.ram[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        self.irqs.set(&self.info, kind, start, fds)?;
        self.config.set_msi_enabled(self.irqs.msi_enabled());
        Ok(())
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
        self.config.set_msi_enabled(self.irqs.msi_enabled());
        self.regs = [0; 3];
        self.completed = 0;
        Ok(())
    }
}
