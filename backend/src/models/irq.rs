//! Interrupt lines of an emulated function, with VFIO's semantics: MSI
//! vectors signal their eventfd on every raise; INTx is level-triggered and
//! automasked after each delivery until the driver unmasks it.

use cio_core::{DeviceError, DeviceInfo, EventFd, IrqKind};
use tracing::warn;

/// Routed interrupt eventfds and INTx state.
#[derive(Debug, Default)]
pub struct IrqLines {
    msi: Vec<Option<EventFd>>,
    intx: Option<EventFd>,
    intx_level: bool,
    intx_masked: bool,
}

fn signal(fd: &EventFd) {
    if let Err(e) = fd.write(1) {
        warn!("signalling interrupt eventfd: {e}");
    }
}

impl IrqLines {
    /// Applies `Device::set_irqs` after checking it against `info`.
    pub fn set(
        &mut self,
        info: &DeviceInfo,
        kind: IrqKind,
        start: u32,
        fds: &[EventFd],
    ) -> Result<(), DeviceError> {
        let count = info.irq_count(kind);
        let end = start.saturating_add(fds.len() as u32);
        if count == 0 || (!fds.is_empty() && end > count) {
            return Err(DeviceError::NoIrq { kind, start, end });
        }
        let clone = |fd: &EventFd| {
            fd.try_clone()
                .map_err(|e| DeviceError::Failed(format!("duplicating interrupt eventfd: {e}")))
        };
        match kind {
            IrqKind::Intx => {
                self.intx = fds.first().map(clone).transpose()?;
                self.intx_masked = false;
                if self.intx_level {
                    self.fire_intx();
                }
            }
            IrqKind::Msi | IrqKind::Msix => {
                if fds.is_empty() {
                    self.msi.clear();
                } else {
                    self.msi.resize_with(count as usize, || None);
                    for (i, fd) in fds.iter().enumerate() {
                        self.msi[start as usize + i] = Some(clone(fd)?);
                    }
                }
            }
        }
        Ok(())
    }

    /// True if any MSI vector is routed (MSI mode replaces INTx).
    pub fn msi_enabled(&self) -> bool {
        self.msi.iter().any(Option::is_some)
    }

    /// Signals MSI vector `v` if routed.
    pub fn msi_notify(&self, v: usize) {
        if let Some(Some(fd)) = self.msi.get(v) {
            signal(fd);
        }
    }

    fn fire_intx(&mut self) {
        if let (Some(fd), false) = (&self.intx, self.intx_masked) {
            signal(fd);
            self.intx_masked = true;
        }
    }

    /// Drives the INTx line.
    pub fn set_intx_level(&mut self, level: bool) {
        let rising = level && !self.intx_level;
        self.intx_level = level;
        if rising {
            self.fire_intx();
        }
    }

    /// The driver handled INTx; fires again if the line is still high.
    pub fn unmask_intx(&mut self) {
        self.intx_masked = false;
        if self.intx_level {
            self.fire_intx();
        }
    }
}
