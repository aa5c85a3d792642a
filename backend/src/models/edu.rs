//! An emulated QEMU `edu` device (QEMU `docs/specs/edu.rst`), with QEMU's
//! register semantics, so a driver can be developed and tested without a
//! guest and the same driver later pointed at a real edu through VFIO.
//!
//! BAR0 (1 MiB, 4- and 8-byte accesses):
//!
//! | offset | register |
//! |---|---|
//! | 0x00 | identification 0x010000ed (RO) |
//! | 0x04 | liveness: reads back the bitwise inverse of what was written |
//! | 0x08 | factorial: write n, read n! (u32, wrapping) once status bit 0 clears |
//! | 0x20 | status: bit 0 computing (RO), bit 7 raise irq 0x1 after factorial |
//! | 0x24 | interrupt status (RO) |
//! | 0x60 | interrupt raise (WO): ORs the value into interrupt status |
//! | 0x64 | interrupt acknowledge (WO): clears those bits, lowers INTx at 0 |
//! | 0x80 | DMA source address |
//! | 0x88 | DMA destination address |
//! | 0x90 | DMA count |
//! | 0x98 | DMA command: bit 0 start, bit 1 direction (1: to RAM), bit 2 raise irq 0x100 |
//!
//! Accesses below 0x80 other than 4 bytes read all-ones and are ignored on
//! write, as in QEMU; unknown offsets read all-ones. The device buffer is
//! 4 KiB at 0x40000 in the DMA engine's address space (not in BAR0).
//!
//! Differences from QEMU, on purpose: factorials and DMA complete before the
//! triggering write returns (a driver that polls the status bits works with
//! both); a DMA outside the device buffer or the mappings is refused with an
//! error instead of being logged and done anyway (QEMU 7.2 aborts); reset
//! clears the registers and the buffer (QEMU's edu has no reset handler).

use std::sync::Arc;

use cio_core::device::{REGION_READ, REGION_WRITE, WIDTH_4, WIDTH_8};
use cio_core::{
    Device, DeviceError, DeviceInfo, DmaRegion, DmaSpace, EventFd, IrqInfo, IrqKind, RegionInfo,
    RegionKind, CONFIG_REGION,
};

use super::config_space::{self, Bar, ConfigSpace, Identity};
use super::irq::IrqLines;

pub use cio_hw_profiles::edu::*;

/// The emulated edu function.
#[derive(Debug)]
pub struct Edu {
    info: DeviceInfo,
    config: ConfigSpace,
    addr4: u32,
    fact: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_cnt: u64,
    dma_cmd: u64,
    buf: Box<[u8; DMA_SIZE as usize]>,
    dma: DmaSpace,
    irqs: IrqLines,
}

/// QEMU's edu decodes 4-byte accesses everywhere and 8-byte accesses from
/// 0x80 on; anything else reads all-ones and is ignored on write.
fn valid_access(addr: u64, size: usize) -> bool {
    size == 4 || (size == 8 && addr >= 0x80)
}

impl Edu {
    /// A powered-on edu served as `name`.
    pub fn new(name: &str) -> Self {
        let id = Identity {
            vendor: VENDOR,
            device: DEVICE,
            subsystem_vendor: 0x1af4,
            subsystem_device: 0x1100,
            class: 0x00ff00,
            revision: 0x10,
        };
        let info = id.info(
            name,
            vec![
                RegionInfo {
                    index: 0,
                    kind: RegionKind::Mmio,
                    size: BAR0_SIZE,
                    flags: REGION_READ | REGION_WRITE,
                    widths: WIDTH_4 | WIDTH_8,
                },
                config_space::region_info(),
            ],
            vec![
                IrqInfo {
                    kind: IrqKind::Intx,
                    count: 1,
                },
                IrqInfo {
                    kind: IrqKind::Msi,
                    count: 1,
                },
            ],
        );
        let bars = [Bar {
            index: 0,
            size: BAR0_SIZE,
            flags: 0,
        }];
        Self {
            info,
            config: ConfigSpace::new(id, &bars, 1, true),
            addr4: 0,
            fact: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_cnt: 0,
            dma_cmd: 0,
            buf: Box::new([0; DMA_SIZE as usize]),
            dma: DmaSpace::new(),
            irqs: IrqLines::default(),
        }
    }

    fn raise_irq(&mut self, val: u32) {
        self.irq_status |= val;
        if self.irq_status != 0 && self.irqs.msi_enabled() {
            self.irqs.msi_notify(0);
        }
        self.update_intx();
    }

    fn lower_irq(&mut self, val: u32) {
        self.irq_status &= !val;
        self.update_intx();
    }

    /// INTx follows the interrupt status while MSI is off, as in QEMU's
    /// edu; the status register shows it, Interrupt Disable keeps it off
    /// the line.
    fn update_intx(&mut self) {
        let asserted = self.irq_status != 0 && !self.irqs.msi_enabled();
        self.config.set_intx_status(asserted);
        self.irqs
            .set_intx_level(asserted && !self.config.intx_disabled());
    }

    fn mmio_read(&self, addr: u64, size: usize) -> u64 {
        if !valid_access(addr, size) {
            return !0;
        }
        match addr {
            reg::ID => ID.into(),
            reg::LIVENESS => self.addr4.into(),
            reg::FACTORIAL => self.fact.into(),
            reg::STATUS => self.status.into(),
            reg::IRQ_STATUS => self.irq_status.into(),
            reg::DMA_SRC => self.dma_src,
            reg::DMA_DST => self.dma_dst,
            reg::DMA_COUNT => self.dma_cnt,
            reg::DMA_CMD => self.dma_cmd,
            _ => !0,
        }
    }

    fn mmio_write(&mut self, addr: u64, val: u64, size: usize) -> Result<(), DeviceError> {
        if !valid_access(addr, size) {
            return Ok(());
        }
        let running = self.dma_cmd & DMA_RUN != 0;
        match addr {
            reg::LIVENESS => self.addr4 = !(val as u32),
            reg::FACTORIAL if self.status & STATUS_COMPUTING == 0 => {
                let mut n = val as u32;
                let mut r: u32 = 1;
                while n > 0 {
                    r = r.wrapping_mul(n);
                    n -= 1;
                }
                self.fact = r;
                if self.status & STATUS_IRQFACT != 0 {
                    self.raise_irq(FACT_IRQ);
                }
            }
            reg::STATUS => {
                self.status = (self.status & !STATUS_IRQFACT) | (val as u32 & STATUS_IRQFACT);
            }
            reg::IRQ_RAISE => self.raise_irq(val as u32),
            reg::IRQ_ACK => self.lower_irq(val as u32),
            reg::DMA_SRC if !running => self.dma_src = val,
            reg::DMA_DST if !running => self.dma_dst = val,
            reg::DMA_COUNT if !running => self.dma_cnt = val,
            reg::DMA_CMD if !running && val & DMA_RUN != 0 => {
                self.dma_cmd = val;
                return self.run_dma();
            }
            _ => {}
        }
        Ok(())
    }

    fn run_dma(&mut self) -> Result<(), DeviceError> {
        let to_ram = self.dma_cmd & DMA_TO_RAM != 0;
        let (buf_addr, ram_addr) = if to_ram {
            (self.dma_src, self.dma_dst)
        } else {
            (self.dma_dst, self.dma_src)
        };
        let result = self.transfer(to_ram, buf_addr, ram_addr & DMA_MASK);
        self.dma_cmd &= !DMA_RUN;
        result?;
        if self.dma_cmd & DMA_IRQ_ENABLE != 0 {
            self.raise_irq(DMA_IRQ);
        }
        Ok(())
    }

    fn transfer(&mut self, to_ram: bool, buf_addr: u64, ram: u64) -> Result<(), DeviceError> {
        let cnt = self.dma_cnt;
        let inside = buf_addr >= DMA_START
            && buf_addr
                .checked_add(cnt)
                .is_some_and(|end| end <= DMA_START + DMA_SIZE);
        if !inside {
            return Err(DeviceError::Failed(format!(
                "edu: DMA of {cnt:#x} bytes at device address {buf_addr:#x} is outside the device buffer {DMA_START:#x}..{:#x}",
                DMA_START + DMA_SIZE
            )));
        }
        let off = (buf_addr - DMA_START) as usize;
        let span = off..off + cnt as usize;
        if to_ram {
            self.dma.device_write(ram, &self.buf[span])?;
        } else {
            self.dma.device_read(ram, &mut self.buf[span])?;
        }
        Ok(())
    }
}

impl Device for Edu {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), false)?;
        if region == CONFIG_REGION {
            self.config.read(offset, data);
        } else {
            let v = self.mmio_read(offset, data.len());
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.info.check_access(region, offset, data.len(), true)?;
        if region == CONFIG_REGION {
            self.config.write(offset, data);
            // Interrupt Disable may have changed.
            self.update_intx();
            return Ok(());
        }
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.mmio_write(offset, u64::from_le_bytes(v), data.len())
    }

    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        self.irqs.set(&self.info, kind, start, fds)?;
        self.config.set_msi_enabled(self.irqs.msi_enabled());
        Ok(())
    }

    fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        self.irqs.unmask_intx();
        Ok(())
    }

    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        Ok(self.dma.insert(region)?)
    }

    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        Ok(self.dma.remove(iova)?)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.config.reset();
        self.config.set_msi_enabled(self.irqs.msi_enabled());
        self.addr4 = 0;
        self.fact = 0;
        self.status = 0;
        self.lower_irq(!0);
        self.dma_src = 0;
        self.dma_dst = 0;
        self.dma_cnt = 0;
        self.dma_cmd = 0;
        self.buf.fill(0);
        Ok(())
    }
}
