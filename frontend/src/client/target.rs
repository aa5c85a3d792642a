//! What the frontend keeps per open device, whichever connection carries
//! the session: its DMA mappings (target memory) and where its interrupts go.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use cio_core::{DeviceInfo, DmaSpace, EventFd, IrqKind};

/// Per open device: its description, DMA mappings and interrupt routes.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) info: DeviceInfo,
    pub(crate) dma: Mutex<DmaSpace>,
    pub(crate) irqs: Mutex<HashMap<(IrqKind, u32), EventFd>>,
    pub(crate) irq_count: AtomicU64,
}

impl Target {
    /// Nothing mapped or routed yet.
    pub(crate) fn new(info: DeviceInfo) -> Self {
        Self {
            info,
            dma: Mutex::default(),
            irqs: Mutex::default(),
            irq_count: AtomicU64::new(0),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
