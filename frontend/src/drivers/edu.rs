//! A driver for QEMU's `edu` device, and a self-test that exercises every
//! feature: identification, liveness, factorial (polled and by interrupt),
//! MSI and INTx interrupts, DMA in both directions, reset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_core::{
    Device, DeviceError, DmaDir, DmaRegion, EventFd, IrqKind, CONFIG_REGION, PAGE_SIZE,
};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

// The register map is the device's, shared with the emulated model
// through cio-hw-profiles.
/// Device buffer address in the DMA engine's address space.
pub use cio_hw_profiles::edu::DMA_START as EDU_BUFFER;
/// Identification register value.
pub use cio_hw_profiles::edu::ID as EDU_ID;
pub use cio_hw_profiles::edu::{reg, DMA_IRQ, FACT_IRQ};
use cio_hw_profiles::edu::{
    DMA_IRQ_ENABLE as CMD_IRQ, DMA_RUN as CMD_RUN, DMA_TO_RAM as CMD_TO_RAM, STATUS_COMPUTING,
    STATUS_IRQFACT,
};

/// Largest transfer this driver issues (QEMU 7.2 rejects a full 4096).
pub const MAX_TRANSFER: u64 = 4095;

const BAR0: u32 = 0;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;
const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;

/// Driver errors.
#[derive(Debug, thiserror::Error)]
pub enum EduError {
    /// The device is not an edu.
    #[error("not an edu device: {0:04x}:{1:04x}")]
    NotEdu(u16, u16),
    /// A device access failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A DMA buffer operation failed.
    #[error(transparent)]
    Dma(#[from] cio_core::DmaError),
    /// The device did not finish in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The device answered something wrong.
    #[error("{0}")]
    Check(String),
}

/// Drives one edu through any [`Device`].
#[derive(Debug)]
pub struct Edu<'a, D: Device + ?Sized> {
    dev: &'a mut D,
    timeout: Duration,
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), EduError> {
    if ok {
        Ok(())
    } else {
        Err(EduError::Check(what()))
    }
}

/// Waits until `fd` is signalled (and consumes the signal).
pub fn wait_eventfd(fd: &EventFd, timeout: Duration) -> Result<u64, EduError> {
    counted(cio_core::device::wait_eventfd(fd, timeout)?, timeout)
}

fn counted(n: u64, timeout: Duration) -> Result<u64, EduError> {
    if n == 0 {
        return Err(EduError::Timeout(timeout, "an interrupt"));
    }
    Ok(n)
}

impl<'a, D: Device + ?Sized> Edu<'a, D> {
    /// Waits for the interrupt routed to `fd` ([`Device::wait_irq`]: on a
    /// remote device this thread reads the connection meanwhile).
    pub fn wait_irq(&mut self, fd: &EventFd) -> Result<u64, EduError> {
        counted(self.dev.wait_irq(fd, self.timeout)?, self.timeout)
    }

    /// Checks the ids and enables the device as Linux's
    /// `pci_enable_device` and `pci_set_master` would: memory decoding and
    /// bus mastering on (VFIO does not set bus master for you), INTx not
    /// disabled (a backend's release policy may have left it disabled).
    pub fn new(dev: &'a mut D) -> Result<Self, EduError> {
        let info = dev.info();
        if (info.vendor, info.device) != (0x1234, 0x11e8) {
            return Err(EduError::NotEdu(info.vendor, info.device));
        }
        let mut cmd = [0u8; 2];
        dev.read(CONFIG_REGION, PCI_COMMAND, &mut cmd)?;
        let cmd = (u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
            & !PCI_COMMAND_INTX_DISABLE;
        dev.write(CONFIG_REGION, PCI_COMMAND, &cmd.to_le_bytes())?;
        Ok(Self {
            dev,
            timeout: Duration::from_secs(5),
        })
    }

    /// The underlying device.
    pub fn device(&mut self) -> &mut D {
        self.dev
    }

    /// Reads the identification register.
    pub fn id(&mut self) -> Result<u32, EduError> {
        Ok(self.dev.read32(BAR0, reg::ID)?)
    }

    /// Writes `v` to the liveness register and returns what it reads back
    /// (`!v` on a live device).
    pub fn liveness(&mut self, v: u32) -> Result<u32, EduError> {
        self.dev.write32(BAR0, reg::LIVENESS, v)?;
        Ok(self.dev.read32(BAR0, reg::LIVENESS)?)
    }

    fn wait_status_clear(
        &mut self,
        offset: u64,
        bit: u64,
        what: &'static str,
    ) -> Result<(), EduError> {
        let start = Instant::now();
        loop {
            let v = if offset == reg::STATUS {
                u64::from(self.dev.read32(BAR0, offset)?)
            } else {
                self.read_reg64(offset)?
            };
            if v & bit == 0 {
                return Ok(());
            }
            if start.elapsed() > self.timeout {
                return Err(EduError::Timeout(self.timeout, what));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn wide(&self) -> bool {
        self.dev
            .info()
            .region(BAR0)
            .is_some_and(|r| r.accepts_width(8))
    }

    /// Writes a 64-bit register; with a 4-byte access when the path refuses
    /// 8-byte ones (VFIO): edu then takes the value as the whole register.
    fn write_reg64(&mut self, offset: u64, value: u64) -> Result<(), EduError> {
        if self.wide() {
            return Ok(self.dev.write64(BAR0, offset, value)?);
        }
        let v = u32::try_from(value).map_err(|_| {
            EduError::Check(format!(
                "{value:#x} does not fit the 4-byte access this path allows"
            ))
        })?;
        Ok(self.dev.write32(BAR0, offset, v)?)
    }

    fn read_reg64(&mut self, offset: u64) -> Result<u64, EduError> {
        if self.wide() {
            return Ok(self.dev.read64(BAR0, offset)?);
        }
        Ok(u64::from(self.dev.read32(BAR0, offset)?))
    }

    /// Computes `n!` (mod 2^32), polling the status register.
    pub fn factorial(&mut self, n: u32) -> Result<u32, EduError> {
        self.dev.write32(BAR0, reg::FACTORIAL, n)?;
        self.wait_status_clear(reg::STATUS, STATUS_COMPUTING.into(), "the factorial")?;
        Ok(self.dev.read32(BAR0, reg::FACTORIAL)?)
    }

    /// Enables or disables the raise-interrupt-after-factorial bit.
    pub fn set_factorial_irq(&mut self, on: bool) -> Result<(), EduError> {
        Ok(self
            .dev
            .write32(BAR0, reg::STATUS, if on { STATUS_IRQFACT } else { 0 })?)
    }

    /// Interrupt status register.
    pub fn irq_status(&mut self) -> Result<u32, EduError> {
        Ok(self.dev.read32(BAR0, reg::IRQ_STATUS)?)
    }

    /// Raises interrupt bits by software.
    pub fn raise(&mut self, bits: u32) -> Result<(), EduError> {
        Ok(self.dev.write32(BAR0, reg::IRQ_RAISE, bits)?)
    }

    /// Acknowledges interrupt bits.
    pub fn ack(&mut self, bits: u32) -> Result<(), EduError> {
        Ok(self.dev.write32(BAR0, reg::IRQ_ACK, bits)?)
    }

    /// Starts a DMA of `count` bytes and waits for it by polling (or, with
    /// `irq`, asks for DMA_IRQ when done and returns at once).
    pub fn dma(
        &mut self,
        src: u64,
        dst: u64,
        count: u64,
        to_ram: bool,
        irq: bool,
    ) -> Result<(), EduError> {
        check(count <= MAX_TRANSFER, || {
            format!("transfer of {count} bytes is over {MAX_TRANSFER}")
        })?;
        self.write_reg64(reg::DMA_SRC, src)?;
        self.write_reg64(reg::DMA_DST, dst)?;
        self.write_reg64(reg::DMA_COUNT, count)?;
        let mut cmd = CMD_RUN;
        if to_ram {
            cmd |= CMD_TO_RAM;
        }
        if irq {
            cmd |= CMD_IRQ;
            return self.write_reg64(reg::DMA_CMD, cmd);
        }
        self.write_reg64(reg::DMA_CMD, cmd)?;
        self.wait_status_clear(reg::DMA_CMD, CMD_RUN, "the DMA")
    }
}

/// What [`self_test`] saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Identification register.
    pub id: u32,
    /// Factorials computed (n, n!).
    pub factorials: Vec<(u32, u32)>,
    /// Interrupts received through eventfds.
    pub interrupts: u32,
    /// Bytes moved by DMA (both directions).
    pub dma_bytes: u64,
    /// FNV-1a checksum of the data that made the round trip.
    pub dma_checksum: u64,
}

/// FNV-1a, 64-bit.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Exercises every edu feature and checks every answer. `log` is told what
/// happens, step by step. The device is reset at the end.
///
/// Uses IOVAs `iova..iova + 2 pages` for DMA (below edu's 28-bit mask).
pub fn self_test<D: Device + ?Sized>(
    dev: &mut D,
    iova: u64,
    log: impl FnMut(&str),
) -> Result<Report, EduError> {
    self_test_parts(dev, Some(iova), true, log)
}

/// [`self_test`] with parts left out: no DMA without `dma_iova`, no reset
/// check without `reset` (QEMU's real edu has no reset method).
pub fn self_test_parts<D: Device + ?Sized>(
    dev: &mut D,
    dma_iova: Option<u64>,
    reset: bool,
    mut log: impl FnMut(&str),
) -> Result<Report, EduError> {
    let mut r = Report::default();
    let mut edu = Edu::new(dev)?;

    r.id = edu.id()?;
    check(r.id == EDU_ID, || {
        format!("identification {:#010x}, expected {EDU_ID:#010x}", r.id)
    })?;
    log(&format!("identification register: {:#010x}", r.id));

    for v in [0x1234_5678u32, 0, 0xffff_ffff] {
        let back = edu.liveness(v)?;
        check(back == !v, || {
            format!("liveness: wrote {v:#x}, read {back:#x}")
        })?;
    }
    log("liveness check: reads back the inverse of each value written");

    for n in [0u32, 1, 5, 10, 12, 13] {
        let f = edu.factorial(n)?;
        let want = (1..=n).fold(1u32, |a, b| a.wrapping_mul(b));
        check(f == want, || format!("{n}! = {f}, expected {want}"))?;
        r.factorials.push((n, f));
    }
    log(&format!("factorials (polled): {:?}", r.factorials));

    // MSI: factorial completion and software-raised interrupts.
    let msi = EventFd::new(EFD_NONBLOCK).map_err(|e| EduError::Check(format!("eventfd: {e}")))?;
    edu.device()
        .set_irqs(IrqKind::Msi, 0, std::slice::from_ref(&msi))?;
    edu.set_factorial_irq(true)?;
    edu.device().write32(BAR0, reg::FACTORIAL, 8)?;
    edu.wait_irq(&msi)?;
    r.interrupts += 1;
    let st = edu.irq_status()?;
    check(st & FACT_IRQ != 0, || {
        format!("irq status {st:#x} lacks the factorial bit")
    })?;
    let f = edu.device().read32(BAR0, reg::FACTORIAL)?;
    check(f == 40320, || format!("8! = {f} after the interrupt"))?;
    edu.ack(FACT_IRQ)?;
    edu.set_factorial_irq(false)?;
    check(edu.irq_status()? == 0, || {
        "irq status not cleared by ack".into()
    })?;
    log("MSI: factorial-done interrupt delivered, status acknowledged");

    if let Some(iova) = dma_iova {
        dma_round_trip(&mut edu, &msi, iova, &mut r, &mut log)?;
    }
    edu.device().set_irqs(IrqKind::Msi, 0, &[])?;
    intx_round_trip(&mut edu, &mut r, &mut log)?;
    if reset {
        edu.liveness(0x55aa)?;
        edu.device().reset()?;
        let l = edu.device().read32(BAR0, reg::LIVENESS)?;
        check(l == 0, || format!("liveness register {l:#x} after reset"))?;
        log("reset: registers back to power-on values");
    }
    Ok(r)
}

/// Target page A -> device buffer -> target page B, completion by MSI.
fn dma_round_trip<D: Device + ?Sized>(
    edu: &mut Edu<'_, D>,
    msi: &EventFd,
    iova: u64,
    r: &mut Report,
    log: &mut impl FnMut(&str),
) -> Result<(), EduError> {
    let len = MAX_TRANSFER;
    let region = Arc::new(DmaRegion::new(iova, 2 * PAGE_SIZE, DmaDir::Bidirectional)?);
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    region.write(0, &pattern)?;
    edu.device().dma_map(Arc::clone(&region))?;
    edu.dma(iova, EDU_BUFFER, len, false, false)?;
    edu.dma(EDU_BUFFER, iova + PAGE_SIZE, len, true, true)?;
    edu.wait_irq(msi)?;
    r.interrupts += 1;
    let st = edu.irq_status()?;
    check(st & DMA_IRQ != 0, || {
        format!("irq status {st:#x} lacks the DMA bit")
    })?;
    edu.ack(DMA_IRQ)?;
    let mut back = vec![0u8; len as usize];
    region.read(PAGE_SIZE, &mut back)?;
    if let Some(i) = back.iter().zip(&pattern).position(|(a, b)| a != b) {
        return Err(EduError::Check(format!(
            "DMA round trip differs at byte {i}: {:#04x} != {:#04x}",
            back[i], pattern[i]
        )));
    }
    r.dma_bytes = 2 * len;
    r.dma_checksum = fnv1a(&back);
    log(&format!(
        "DMA: {len} bytes to the device and back, identical (fnv1a {:#018x}), completion by MSI",
        r.dma_checksum
    ));
    edu.device().dma_unmap(iova)?;
    Ok(())
}

/// INTx: level-triggered, automasked until unmasked.
fn intx_round_trip<D: Device + ?Sized>(
    edu: &mut Edu<'_, D>,
    r: &mut Report,
    log: &mut impl FnMut(&str),
) -> Result<(), EduError> {
    if edu.device().info().irq_count(IrqKind::Intx) > 0 {
        let intx =
            EventFd::new(EFD_NONBLOCK).map_err(|e| EduError::Check(format!("eventfd: {e}")))?;
        edu.device()
            .set_irqs(IrqKind::Intx, 0, std::slice::from_ref(&intx))?;
        edu.raise(0x40)?;
        edu.wait_irq(&intx)?;
        r.interrupts += 1;
        let st = edu.irq_status()?;
        check(st == 0x40, || format!("irq status {st:#x}, expected 0x40"))?;
        edu.ack(0x40)?;
        edu.device().unmask_intx()?;
        edu.device().flush()?;
        check(intx.read().is_err(), || {
            "INTx fired again after the line was lowered".into()
        })?;
        edu.device().set_irqs(IrqKind::Intx, 0, &[])?;
        log("INTx: raised by software, delivered, acknowledged and unmasked");
    }
    Ok(())
}
