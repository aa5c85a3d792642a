//! [`RemoteDevice`]: a device on a backend, driven as if it were local.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cio_core::wire::{IrqAction, Message, FEATURE_BULK, FEATURE_POSTED_DMA, MAX_BULK};
use cio_core::{Device, DeviceError, DeviceInfo, DmaRegion, EventFd, IrqKind};

use crate::client::{lock, ClientError, Post, Shared, Target};

/// Bulk reads in flight at a time, of [`MAX_BULK`] bytes each.
const BULK_WINDOW: usize = 8;

/// Copies the bytes of a `ReadData` reply into `into`, which it must fill.
fn read_data(reply: Message, into: &mut [u8]) -> Result<(), DeviceError> {
    match reply {
        Message::ReadData { data } if data.len() == into.len() => {
            into.copy_from_slice(&data);
            Ok(())
        }
        m => Err(ClientError::Protocol(format!(
            "expected {} bytes of ReadData, got message {:#06x}",
            into.len(),
            m.kind()
        ))
        .into()),
    }
}

/// A device served by a `ciod`, implementing [`Device`].
///
/// Accesses are checked locally against the device's description before
/// anything is sent. Writes are posted; reads, DMA map/unmap, interrupt
/// setup, reset and [`flush`](Device::flush) wait for the backend.
///
/// DMA: map a [`DmaRegion`] (target memory) and the backend keeps a shadow
/// of it. Pages the driver changed are pushed before every later operation
/// on the device (device-readable mappings); pages the device changed are
/// pulled before every reply and interrupt (device-writable mappings). So a
/// driver that writes a buffer, rings a doorbell and waits for the
/// interrupt sees the device's results without any explicit sync call.
#[derive(Debug)]
pub struct RemoteDevice {
    shared: Arc<Shared>,
    handle: u32,
    /// Its description (`target.info`), mappings and interrupt routes.
    target: Arc<Target>,
    /// Registers whose writes start device work (from the hw profile):
    /// those writes are sent at once instead of being batched.
    doorbells: Vec<(u32, u64)>,
}

impl RemoteDevice {
    pub(crate) fn new(shared: Arc<Shared>, handle: u32, target: Arc<Target>) -> Self {
        let info = &target.info;
        let doorbells = cio_hw_profiles::Profile::builtin_for(info.vendor, info.device)
            .map(|p| {
                p.bars
                    .iter()
                    .flat_map(|b| {
                        b.registers
                            .iter()
                            .filter(|r| r.doorbell)
                            .map(|r| (b.index, r.offset))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            shared,
            handle,
            target,
            doorbells,
        }
    }

    /// The backend's handle for this device.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// The target memory mapped at `iova` (an adopter's, made from a
    /// ticket, or one mapped with [`Device::dma_map`]).
    pub fn dma_region(&self, iova: u64) -> Option<Arc<DmaRegion>> {
        lock(&self.target.dma).get(iova).cloned()
    }

    /// An eventfd signalled when `vector` of `kind` fires: a duplicate of
    /// the one the interrupt is routed to.
    pub fn irq_eventfd(&self, kind: IrqKind, vector: u32) -> Option<EventFd> {
        lock(&self.target.irqs)
            .get(&(kind, vector))
            .and_then(|fd| fd.try_clone().ok())
    }

    /// Interrupt events received so far for this device.
    pub fn irq_events(&self) -> u64 {
        self.target.irq_count.load(Ordering::Relaxed)
    }

    fn call(&self, msg: &Message) -> Result<Message, DeviceError> {
        Ok(self
            .shared
            .inner
            .call(Some((self.handle, &self.target)), msg)?)
    }

    /// The backend takes bulk requests (older ones get single accesses).
    fn bulk(&self) -> bool {
        self.shared.inner.features & FEATURE_BULK != 0
    }

    /// Whether the backend takes posted `DmaMap`/`DmaUnmap`.
    fn posted_dma(&self) -> bool {
        self.shared.inner.features & FEATURE_POSTED_DMA != 0
    }

    /// Maps `region` at the backend (waiting for its `Ok` unless `posted`).
    fn map(&mut self, region: Arc<DmaRegion>, posted: bool) -> Result<(), DeviceError> {
        lock(&self.target.dma).check_free(region.iova(), region.len())?;
        self.send(
            &Message::DmaMap {
                handle: self.handle,
                iova: region.iova(),
                len: region.len(),
                dir: region.dir(),
                posted,
            },
            posted,
        )?;
        Ok(lock(&self.target.dma).insert(region)?)
    }

    /// Unmaps at the backend (waiting for its `Ok`, after the device's last
    /// writes, unless `posted`).
    fn unmap(&mut self, iova: u64, posted: bool) -> Result<Arc<DmaRegion>, DeviceError> {
        if lock(&self.target.dma).get(iova).is_none() {
            return Err(cio_core::DmaError::NotMapped(iova).into());
        }
        self.send(
            &Message::DmaUnmap {
                handle: self.handle,
                iova,
                posted,
            },
            posted,
        )?;
        Ok(lock(&self.target.dma).remove(iova)?)
    }

    /// Sends a posted request, or a request and waits for its `Ok`.
    fn send(&self, msg: &Message, posted: bool) -> Result<(), DeviceError> {
        match posted {
            true => Ok(self.shared.inner.post(msg)?),
            false => self.expect_ok(msg),
        }
    }

    fn expect_ok(&self, msg: &Message) -> Result<(), DeviceError> {
        match self.call(msg)? {
            Message::Ok => Ok(()),
            m => Err(ClientError::Protocol(format!("expected Ok, got {:#06x}", m.kind())).into()),
        }
    }
}

impl Device for RemoteDevice {
    fn info(&self) -> &DeviceInfo {
        &self.target.info
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.target
            .info
            .check_access(region, offset, data.len(), false)?;
        let msg = Message::RegionRead {
            handle: self.handle,
            region,
            offset,
            len: data.len() as u32,
        };
        read_data(self.call(&msg)?, data)
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.target
            .info
            .check_access(region, offset, data.len(), true)?;
        let kind = if self.doorbells.contains(&(region, offset)) {
            Post::Doorbell
        } else {
            Post::Batched
        };
        Ok(self
            .shared
            .inner
            .post_write(self.handle, &self.target, region, offset, data, kind)?)
    }

    fn read_bulk(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if !self.bulk() {
            return cio_core::device::read_split(self, region, offset, data);
        }
        self.target
            .info
            .check_bulk(region, offset, data.len(), false)?;
        // A window of requests in flight: their round trips overlap, and
        // the backend queues at most the window's replies.
        let mut at = offset;
        for window in data.chunks_mut(MAX_BULK * BULK_WINDOW) {
            let msgs: Vec<Message> = window
                .chunks(MAX_BULK)
                .enumerate()
                .map(|(i, chunk)| Message::RegionReadBulk {
                    handle: self.handle,
                    region,
                    offset: at + (i * MAX_BULK) as u64,
                    len: chunk.len() as u32,
                })
                .collect();
            at += window.len() as u64;
            let replies = self
                .shared
                .inner
                .call_all(Some((self.handle, &self.target)), &msgs)?;
            for (chunk, reply) in window.chunks_mut(MAX_BULK).zip(replies) {
                read_data(reply, chunk)?;
            }
        }
        Ok(())
    }

    fn write_bulk(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if !self.bulk() {
            return cio_core::device::write_split(self, region, offset, data);
        }
        self.target
            .info
            .check_bulk(region, offset, data.len(), true)?;
        for (i, chunk) in data.chunks(MAX_BULK).enumerate() {
            let at = offset + (i * MAX_BULK) as u64;
            self.shared.inner.post_write(
                self.handle,
                &self.target,
                region,
                at,
                chunk,
                Post::Bulk,
            )?;
        }
        Ok(())
    }

    fn wait_irq(&mut self, fd: &EventFd, timeout: Duration) -> Result<u64, DeviceError> {
        Ok(self.shared.inner.wait_irq(fd, timeout)?)
    }

    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        let count = fds.len() as u32;
        let action = if fds.is_empty() {
            IrqAction::Disable
        } else {
            IrqAction::Enable
        };
        let end = start.saturating_add(count);
        let n = self.target.info.irq_count(kind);
        if n == 0 || end > n {
            return Err(DeviceError::NoIrq { kind, start, end });
        }
        let clones = fds
            .iter()
            .map(|f| {
                f.try_clone()
                    .map_err(|e| DeviceError::Failed(format!("duplicating eventfd: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.expect_ok(&Message::SetIrqs {
            handle: self.handle,
            kind,
            start,
            count,
            action,
        })?;
        let mut irqs = lock(&self.target.irqs);
        irqs.retain(|(k, _), _| *k != kind);
        for (i, fd) in clones.into_iter().enumerate() {
            irqs.insert((kind, start + i as u32), fd);
        }
        Ok(())
    }

    fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        self.expect_ok(&Message::SetIrqs {
            handle: self.handle,
            kind: IrqKind::Intx,
            start: 0,
            count: 1,
            action: IrqAction::Unmask,
        })
    }

    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        self.map(region, false)
    }

    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        self.unmap(iova, false)
    }

    fn dma_map_posted(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        self.map(region, self.posted_dma())
    }

    fn dma_unmap_posted(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        self.unmap(iova, self.posted_dma())
    }

    fn dma_is_copied(&self) -> bool {
        true
    }

    fn sync_for_device(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        Ok(self
            .shared
            .inner
            .sync_for_device(self.handle, &self.target, (iova, len))?)
    }

    fn sync_for_cpu(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        self.expect_ok(&Message::SyncForCpu {
            handle: self.handle,
            iova,
            len,
        })
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        match self.call(&Message::Ping {
            payload: Bytes::new(),
        })? {
            Message::Pong { .. } => Ok(()),
            m => Err(ClientError::Protocol(format!("expected Pong, got {:#06x}", m.kind())).into()),
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.expect_ok(&Message::Reset {
            handle: self.handle,
        })
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        // Best effort: the backend releases the device anyway when the
        // session ends.
        let _ = self.shared.inner.call(
            None,
            &Message::Close {
                handle: self.handle,
            },
        );
        lock(&self.shared.inner.targets).remove(&self.handle);
    }
}
