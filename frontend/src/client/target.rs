//! What the frontend keeps per open device, whichever connection carries
//! the session: its DMA mappings (target memory) and where its interrupts go.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use cio_core::{DmaSpace, EventFd, IrqKind};

/// Per open device: its DMA mappings and interrupt routes.
#[derive(Debug, Default)]
pub(crate) struct Target {
    pub(crate) dma: Mutex<DmaSpace>,
    pub(crate) irqs: Mutex<HashMap<(IrqKind, u32), EventFd>>,
    pub(crate) irq_count: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
