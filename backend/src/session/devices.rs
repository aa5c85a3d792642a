//! What a PCI session owns: the devices it opened (each a [`Lease`] with
//! its shadow DMA space), where their interrupts are routed, and the
//! requests that act on them.
//!
//! Nothing here touches a socket. Frames go out through an [`Outbox`] and
//! interrupt eventfds are handed to an [`IrqWatch`] to be polled, so the
//! owned state can outlive the connection that currently carries it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use cio_core::wire::{ErrorCode, IrqAction, Message, MAX_DMA_CHUNK};
use cio_core::{
    Device, DeviceError, DmaDir, DmaError, DmaRegion, DmaSpace, EventFd, IrqKind, ResetMethod,
    CONFIG_REGION,
};
use cio_transports::OutQueue;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::{ReqError, Shared};
use crate::registry::{Lease, OpenError, Release};

/// Where a session's outgoing frames go.
pub(crate) trait Outbox {
    /// Queues `msg` answering `reply_to` (0 for none).
    fn push(&mut self, msg: &Message, reply_to: u64);
    /// Queues `len` bytes of `region` from `offset` as `DmaData`.
    fn push_dma_region(&mut self, handle: u32, region: &Arc<DmaRegion>, offset: u64, len: usize);
}

impl Outbox for OutQueue {
    fn push(&mut self, msg: &Message, reply_to: u64) {
        OutQueue::push(self, msg, reply_to);
    }

    fn push_dma_region(&mut self, handle: u32, region: &Arc<DmaRegion>, offset: u64, len: usize) {
        OutQueue::push_dma_region(self, handle, region, offset, len);
    }
}

/// Who polls interrupt eventfds for a session: slot `n` is reported back
/// as `Devices::on_irq(n)`.
pub(crate) trait IrqWatch {
    /// Starts watching `fd` as slot `slot`.
    fn watch(&self, slot: usize, fd: &EventFd) -> io::Result<()>;
    /// Stops watching `fd`.
    fn unwatch(&self, fd: &EventFd);
}

/// First poll token of interrupt slots.
pub(crate) const IRQ_BASE: usize = 2;

impl IrqWatch for mio::Registry {
    fn watch(&self, slot: usize, fd: &EventFd) -> io::Result<()> {
        self.register(
            &mut SourceFd(&fd.as_raw_fd()),
            Token(IRQ_BASE + slot),
            Interest::READABLE,
        )
    }

    fn unwatch(&self, fd: &EventFd) {
        let _ = self.deregister(&mut SourceFd(&fd.as_raw_fd()));
    }
}

/// PCI command register, and the bits `quiesce` changes in it.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// What can be cleared on a device that cannot be reset: bus mastering off
/// (no DMA from the next user's memory until it asks), INTx disabled.
fn quiesce(dev: &mut dyn Device) -> Result<(), DeviceError> {
    let mut cmd = [0u8; 2];
    dev.read(CONFIG_REGION, PCI_COMMAND, &mut cmd)?;
    let v = (u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER) | PCI_COMMAND_INTX_DISABLE;
    dev.write(CONFIG_REGION, PCI_COMMAND, &v.to_le_bytes())
}

fn dev_err(code: ErrorCode) -> impl Fn(DeviceError) -> ReqError {
    move |e| (code, cio_core::error_chain(&e))
}

fn not_open(handle: u32) -> ReqError {
    (
        ErrorCode::BAD_HANDLE,
        format!("handle {handle} is not open in this session"),
    )
}

fn dma_err(e: DmaError) -> ReqError {
    (ErrorCode::DMA, e.to_string())
}

struct OpenDevice {
    lease: Lease,
    dma: DmaSpace,
}

struct IrqSlot {
    handle: u32,
    kind: IrqKind,
    vector: u32,
    fd: EventFd,
}

/// The devices a session holds open, with their interrupt routes and DMA
/// shadows.
pub(crate) struct Devices {
    session: u64,
    /// The session id as logs show it.
    hex: String,
    /// Protocol version of the session (what `Opened` may say).
    version: u16,
    shared: Arc<Shared>,
    handles: BTreeMap<u32, OpenDevice>,
    next_handle: u32,
    irqs: Vec<Option<IrqSlot>>,
    /// Where read replies are read into. Each reply is split off it, and
    /// its memory is taken back for the next once the reply is sent (and,
    /// in a resumable session, acknowledged): a bulk read then neither
    /// allocates nor faults in fresh pages.
    replies: BytesMut,
}

/// The result of offering a message to [`Devices::handle`].
pub(crate) enum Handled {
    /// Answered (or, if posted, executed).
    Done,
    /// Not a device request: the caller deals with it.
    NotMine(Message),
}

impl Devices {
    /// Nothing open yet.
    pub(crate) fn new(session: u64, shared: Arc<Shared>) -> Self {
        Self {
            session,
            hex: format!("{session:#x}"),
            version: 1,
            shared,
            handles: BTreeMap::new(),
            next_handle: 1,
            irqs: Vec::new(),
            replies: BytesMut::new(),
        }
    }

    /// The protocol version the handshake chose.
    pub(crate) fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The protocol version of the session (1 until the handshake ends).
    pub(crate) fn version(&self) -> u16 {
        self.version
    }

    /// Number of open devices.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// True when no device is open.
    pub(crate) fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Where a pushed `DmaData` payload of `len` bytes at `iova` goes, for
    /// receiving it straight into the shadow.
    pub(crate) fn shadow_for(
        &self,
        handle: u32,
        iova: u64,
        len: usize,
    ) -> Option<(Arc<DmaRegion>, u64)> {
        let d = self.handles.get(&handle)?;
        let (region, off) = d.dma.resolve(iova, len as u64).ok()?;
        region
            .dir()
            .device_reads()
            .then(|| (Arc::clone(region), off))
    }

    /// Executes a device request, queueing its answer (posted requests
    /// are answered only when they fail).
    pub(crate) fn handle(
        &mut self,
        seq: u64,
        msg: Message,
        out: &mut dyn Outbox,
        watch: &dyn IrqWatch,
    ) -> Handled {
        let answer: Result<Message, ReqError> = match msg {
            Message::RegionWrite {
                handle,
                region,
                offset,
                data,
            } => {
                let r = self.write(handle, region, offset, &data, false);
                self.posted(seq, r, out);
                return Handled::Done;
            }
            Message::RegionWriteBulk {
                handle,
                region,
                offset,
                data,
            } => {
                let r = self.write(handle, region, offset, &data, true);
                self.posted(seq, r, out);
                return Handled::Done;
            }
            Message::DmaData { handle, iova, data } => {
                let r = self.apply_dma(handle, iova, &data);
                self.posted(seq, r, out);
                return Handled::Done;
            }
            Message::DmaMap {
                handle,
                iova,
                len,
                dir,
                posted: true,
            } => {
                let r = self.dma_map(handle, iova, len, dir);
                self.posted(seq, r, out);
                return Handled::Done;
            }
            Message::DmaUnmap {
                handle,
                iova,
                posted: true,
            } => {
                let r = self.dma_unmap(handle, iova, None);
                self.posted(seq, r, out);
                return Handled::Done;
            }
            Message::Open { name } => self.open(&name),
            Message::Close { handle } => self.close(handle, watch).map(|()| Message::Ok),
            Message::RegionRead {
                handle,
                region,
                offset,
                len,
            } => self.read(handle, region, offset, len, false),
            Message::RegionReadBulk {
                handle,
                region,
                offset,
                len,
            } => self.read(handle, region, offset, len, true),
            Message::SetIrqs {
                handle,
                kind,
                start,
                count,
                action,
            } => self
                .set_irqs(handle, kind, start, count, action, watch)
                .map(|()| Message::Ok),
            Message::DmaMap {
                handle,
                iova,
                len,
                dir,
                posted: false,
            } => self.dma_map(handle, iova, len, dir).map(|()| Message::Ok),
            Message::DmaUnmap {
                handle,
                iova,
                posted: false,
            } => self
                .dma_unmap(handle, iova, Some(&mut *out))
                .map(|()| Message::Ok),
            Message::SyncForCpu { handle, iova, len } => match self.open_dev(handle) {
                Ok(_) => {
                    self.pull_dirty(Some((handle, iova, len)), out);
                    Ok(Message::Ok)
                }
                Err(e) => Err(e),
            },
            Message::Reset { handle } => self.open_dev(handle).and_then(|d| {
                d.lease
                    .device()
                    .reset()
                    .map(|()| Message::Ok)
                    .map_err(dev_err(ErrorCode::DEVICE))
            }),
            other => return Handled::NotMine(other),
        };
        let reply = answer.unwrap_or_else(|(code, message)| {
            debug!(session = %self.hex, "request {seq} failed: {message}");
            Message::Error { code, message }
        });
        self.reply(seq, &reply, out);
        Handled::Done
    }

    /// Reports a failed posted frame asynchronously; the session goes on.
    fn posted(&mut self, seq: u64, r: Result<(), ReqError>, out: &mut dyn Outbox) {
        if let Err((code, message)) = r {
            debug!(
                session = %self.hex,
                "posted frame {seq} failed: {message}"
            );
            self.reply(seq, &Message::Error { code, message }, out);
        }
    }

    /// Queues a completion, after the device-written DMA data it orders behind.
    pub(crate) fn reply(&mut self, seq: u64, msg: &Message, out: &mut dyn Outbox) {
        self.pull_dirty(None, out);
        out.push(msg, seq);
    }

    /// A region read: one access, or with `bulk` the accesses the device
    /// accepts (`RegionReadBulk`).
    fn read(
        &mut self,
        handle: u32,
        region: u32,
        offset: u64,
        len: u32,
        bulk: bool,
    ) -> Result<Message, ReqError> {
        let dev = self
            .handles
            .get_mut(&handle)
            .ok_or_else(|| not_open(handle))?
            .lease
            .device();
        dev.prepare_dma().map_err(dev_err(ErrorCode::DMA))?;
        // At most MAX_BULK: the frame's decoding checked.
        let len = len as usize;
        let r = if bulk {
            dev.read_bulk_into(region, offset, len, &mut self.replies)
        } else {
            self.replies.resize(len, 0);
            dev.read(region, offset, &mut self.replies)
        };
        let data = self.replies.split().freeze();
        r.map(|()| Message::ReadData { data })
            .map_err(dev_err(ErrorCode::ACCESS))
    }

    /// A posted region write: one access, or with `bulk` the accesses the
    /// device accepts (`RegionWriteBulk`).
    fn write(
        &mut self,
        handle: u32,
        region: u32,
        offset: u64,
        data: &[u8],
        bulk: bool,
    ) -> Result<(), ReqError> {
        let dev = self.open_dev(handle)?.lease.device();
        dev.prepare_dma().map_err(dev_err(ErrorCode::DMA))?;
        let r = if bulk {
            dev.write_bulk(region, offset, data)
        } else {
            dev.write(region, offset, data)
        };
        r.map_err(dev_err(ErrorCode::ACCESS))
    }

    fn open_dev(&mut self, handle: u32) -> Result<&mut OpenDevice, ReqError> {
        self.handles
            .get_mut(&handle)
            .ok_or_else(|| not_open(handle))
    }

    fn open(&mut self, name: &str) -> Result<Message, ReqError> {
        let max = self.shared.limits.max_handles;
        if self.handles.len() >= max {
            return Err((
                ErrorCode::LIMIT,
                format!("a session may hold at most {max} devices open"),
            ));
        }
        let mut lease = self.shared.registry.open(name, self.session).map_err(|e| {
            let code = match e {
                OpenError::NotFound(_) => ErrorCode::NO_DEVICE,
                OpenError::Busy { .. } => ErrorCode::BUSY,
            };
            (code, e.to_string())
        })?;
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut info = lease.device().info().clone();
        if self.version < 2 {
            info.reset = ResetMethod::Unknown; // not in protocol 1's Opened
        }
        info!(session = %self.hex, device = name, handle, "opened");
        self.handles.insert(
            handle,
            OpenDevice {
                lease,
                dma: DmaSpace::new(),
            },
        );
        Ok(Message::Opened { handle, info })
    }

    fn close(&mut self, handle: u32, watch: &dyn IrqWatch) -> Result<(), ReqError> {
        self.open_dev(handle)?;
        self.release(handle, watch);
        Ok(())
    }

    /// Disables interrupts, unmaps DMA and resets the device, then returns
    /// it to the registry.
    fn release(&mut self, handle: u32, watch: &dyn IrqWatch) {
        for kind in [IrqKind::Intx, IrqKind::Msi, IrqKind::Msix] {
            self.drop_irqs(handle, kind, watch);
        }
        let Some(mut d) = self.handles.remove(&handle) else {
            return;
        };
        let name = d.lease.device().info().name.clone();
        for region in d.dma.clear() {
            if let Err(e) = d.lease.device().dma_unmap(region.iova()) {
                warn!(session = %self.hex, device = %name, "unmapping {:#x}: {e}", region.iova());
            }
            self.shared
                .counters
                .shadow_bytes
                .fetch_sub(region.len(), Ordering::Relaxed);
        }
        let method = d.lease.device().info().reset;
        if method != ResetMethod::None {
            if let Err(e) = d.lease.device().reset() {
                warn!(session = %self.hex, device = %name, "reset on release failed: {e}");
            }
        }
        if !method.clears_state() {
            let (policy, first) = d.lease.release_policy();
            if policy == Release::Clear {
                if let Err(e) = quiesce(d.lease.device()) {
                    warn!(session = %self.hex, device = %name, "clearing on release: {e}");
                }
            }
            let what = match policy {
                Release::Clear => "hand it on with bus mastering off and INTx disabled",
                Release::AsIs => "hand it on as the last session left it",
            };
            if first {
                warn!(device = %name, reset = %method, release = %policy, "no reset clears this device's state: releases {what}");
            }
        }
        info!(session = %self.hex, device = %name, handle, "released");
    }

    /// Releases every open device.
    pub(crate) fn release_all(&mut self, watch: &dyn IrqWatch) {
        let handles: Vec<u32> = self.handles.keys().copied().collect();
        for h in handles {
            self.release(h, watch);
        }
    }

    fn drop_irqs(&mut self, handle: u32, kind: IrqKind, watch: &dyn IrqWatch) {
        let mut any = false;
        for slot in self.irqs.iter_mut() {
            if slot
                .as_ref()
                .is_some_and(|s| s.handle == handle && s.kind == kind)
            {
                let s = slot.take().expect("checked");
                watch.unwatch(&s.fd);
                self.shared.counters.irq_fds.fetch_sub(1, Ordering::Relaxed);
                any = true;
            }
        }
        if any {
            if let Some(d) = self.handles.get_mut(&handle) {
                if let Err(e) = d.lease.device().set_irqs(kind, 0, &[]) {
                    warn!(session = %self.hex, "disabling {kind}: {e}");
                }
            }
        }
    }

    fn set_irqs(
        &mut self,
        handle: u32,
        kind: IrqKind,
        start: u32,
        count: u32,
        action: IrqAction,
        watch: &dyn IrqWatch,
    ) -> Result<(), ReqError> {
        let available = self.open_dev(handle)?.lease.device().info().irq_count(kind);
        match action {
            IrqAction::Disable => {
                self.drop_irqs(handle, kind, watch);
                Ok(())
            }
            IrqAction::Unmask => {
                if kind != IrqKind::Intx {
                    return Err((
                        ErrorCode::IRQ,
                        format!("only INTx can be unmasked, not {kind}"),
                    ));
                }
                self.open_dev(handle)?
                    .lease
                    .device()
                    .unmask_intx()
                    .map_err(dev_err(ErrorCode::IRQ))
            }
            IrqAction::Enable => {
                let end = start
                    .checked_add(count)
                    .filter(|e| count > 0 && *e <= available);
                if end.is_none() {
                    return Err((
                        ErrorCode::IRQ,
                        format!(
                            "device has {available} {kind} vectors; cannot enable {count} from {start}"
                        ),
                    ));
                }
                self.drop_irqs(handle, kind, watch);
                let fds = (0..count)
                    .map(|_| EventFd::new(EFD_NONBLOCK))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|e| (ErrorCode::IRQ, format!("creating eventfds: {e}")))?;
                self.open_dev(handle)?
                    .lease
                    .device()
                    .set_irqs(kind, start, &fds)
                    .map_err(dev_err(ErrorCode::IRQ))?;
                for (i, fd) in fds.into_iter().enumerate() {
                    let idx = match self.irqs.iter().position(Option::is_none) {
                        Some(i) => i,
                        None => {
                            self.irqs.push(None);
                            self.irqs.len() - 1
                        }
                    };
                    if let Err(e) = watch.watch(idx, &fd) {
                        self.drop_irqs(handle, kind, watch);
                        return Err((ErrorCode::IRQ, format!("polling eventfd: {e}")));
                    }
                    self.shared.counters.irq_fds.fetch_add(1, Ordering::Relaxed);
                    self.irqs[idx] = Some(IrqSlot {
                        handle,
                        kind,
                        vector: start + i as u32,
                        fd,
                    });
                }
                Ok(())
            }
        }
    }

    /// Interrupt slot `idx` fired: queues an `Irq` frame behind the DMA
    /// data the device wrote before raising it.
    pub(crate) fn on_irq(&mut self, idx: usize, out: &mut dyn Outbox) {
        let Some(Some(slot)) = self.irqs.get(idx) else {
            return;
        };
        // Non-blocking read: resets the counter; several raises since the
        // last read coalesce into one event, as with MSI.
        if slot.fd.read().is_err() {
            return;
        }
        let msg = Message::Irq {
            handle: slot.handle,
            kind: slot.kind,
            vector: slot.vector,
        };
        self.pull_dirty(None, out);
        out.push(&msg, 0);
    }

    fn dma_map(&mut self, handle: u32, iova: u64, len: u64, dir: DmaDir) -> Result<(), ReqError> {
        let limits = self.shared.limits.clone();
        let shared = Arc::clone(&self.shared);
        let session_bytes: u64 = self.handles.values().map(|d| d.dma.mapped_bytes()).sum();
        let d = self.open_dev(handle)?;
        if d.dma.regions().len() >= limits.max_mappings {
            return Err((
                ErrorCode::LIMIT,
                format!("at most {} dma mappings per device", limits.max_mappings),
            ));
        }
        if session_bytes.saturating_add(len) > limits.max_mapped_bytes {
            return Err((
                ErrorCode::LIMIT,
                format!(
                    "mapping {len:#x} bytes would exceed the session's {:#x}-byte dma limit (max_mapped_bytes)",
                    limits.max_mapped_bytes
                ),
            ));
        }
        d.dma.check_free(iova, len).map_err(dma_err)?;
        // Reserve the bytes in the daemon's total first, so that sessions
        // mapping at the same time cannot pass it together.
        let total = &shared.counters.shadow_bytes;
        if total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                t.checked_add(len).filter(|n| *n <= limits.max_mapped_total)
            })
            .is_err()
        {
            return Err((
                ErrorCode::LIMIT,
                format!(
                    "mapping {len:#x} bytes would exceed the server's {:#x}-byte dma limit for all sessions together (max_mapped_total)",
                    limits.max_mapped_total
                ),
            ));
        }
        let mapped = DmaRegion::new(iova, len, dir)
            .map_err(dma_err)
            .and_then(|r| {
                let region = Arc::new(r);
                d.lease
                    .device()
                    .dma_map(Arc::clone(&region))
                    .map_err(dev_err(ErrorCode::DMA))?;
                d.dma.insert(region).map_err(dma_err)
            });
        if mapped.is_err() {
            total.fetch_sub(len, Ordering::Relaxed);
        }
        mapped
    }

    /// Removes a mapping; with `out`, the device's last writes to it are
    /// sent first (a posted unmap drops them, see `Message::DmaUnmap`).
    fn dma_unmap(
        &mut self,
        handle: u32,
        iova: u64,
        out: Option<&mut dyn Outbox>,
    ) -> Result<(), ReqError> {
        let d = self.open_dev(handle)?;
        let len = d.dma.get(iova).map(|r| r.len()).ok_or_else(|| {
            (
                ErrorCode::DMA,
                format!("no dma mapping starts at {iova:#x}"),
            )
        })?;
        if let Some(out) = out {
            // The device's last writes reach the target before the mapping goes.
            self.pull_dirty(Some((handle, iova, len)), out);
        }
        let d = self.open_dev(handle)?;
        d.lease
            .device()
            .dma_unmap(iova)
            .map_err(dev_err(ErrorCode::DMA))?;
        d.dma.remove(iova).map_err(dma_err)?;
        self.shared
            .counters
            .shadow_bytes
            .fetch_sub(len, Ordering::Relaxed);
        Ok(())
    }

    /// Target memory pushed by the client: copy it into the shadow.
    fn apply_dma(&mut self, handle: u32, iova: u64, data: &[u8]) -> Result<(), ReqError> {
        let d = self.open_dev(handle)?;
        let (region, off) = d.dma.resolve(iova, data.len() as u64).map_err(dma_err)?;
        if !region.dir().device_reads() {
            return Err((
                ErrorCode::DMA,
                format!(
                    "mapping at {:#x} is device-write-only; target data cannot be pushed into it",
                    region.iova()
                ),
            ));
        }
        region.apply(off, data).map_err(dma_err)
    }

    /// Queues the whole content of every mapping (the pages ever written): for
    /// a frontend that adopted the session with fresh, zeroed target memory.
    pub(crate) fn send_all(&mut self, out: &mut dyn Outbox) {
        for (&handle, d) in self.handles.iter_mut() {
            if d.dma.regions().is_empty() {
                continue;
            }
            if let Err(e) = d.lease.device().collect_dma() {
                warn!(
                    session = %self.hex,
                    handle, "collecting device-written DMA data: {e}"
                );
            }
            for region in d.dma.regions() {
                // Sent below in any case.
                let _ = region.take_dirty_runs(0, region.len(), MAX_DMA_CHUNK);
                for (run, n) in region.written_runs(MAX_DMA_CHUNK) {
                    out.push_dma_region(handle, region, run, n);
                }
            }
        }
    }

    /// Queues `DmaData` for every shadow page the device wrote since the last
    /// pull, in device-writable mappings (of one range, or everywhere).
    pub(crate) fn pull_dirty(&mut self, only: Option<(u32, u64, u64)>, out: &mut dyn Outbox) {
        for (&handle, d) in self.handles.iter_mut() {
            if only.is_some_and(|(h, _, _)| h != handle) || d.dma.regions().is_empty() {
                continue;
            }
            if let Err(e) = d.lease.device().collect_dma() {
                warn!(
                    session = %self.hex,
                    handle, "collecting device-written DMA data: {e}"
                );
            }
        }
        for (&handle, d) in &self.handles {
            if only.is_some_and(|(h, _, _)| h != handle) {
                continue;
            }
            for region in d.dma.regions() {
                if !region.dir().device_writes() || region.dirty_pages() == 0 {
                    continue;
                }
                let Some((off, len)) = only.map_or(Some((0, region.len())), |(_, iova, len)| {
                    region.clip(iova, len)
                }) else {
                    continue;
                };
                for (run, n) in region.take_dirty_runs(off, len, MAX_DMA_CHUNK) {
                    out.push_dma_region(handle, region, run, n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use bytes::Bytes;

    use super::*;
    use crate::models::edu::{self, reg};
    use crate::models::Edu;
    use crate::registry::Registry;
    use crate::session::Limits;
    use crate::usb::UsbProvider;

    /// Records frames instead of sending them.
    #[derive(Default)]
    struct Frames(Vec<(Message, u64)>);

    impl Outbox for Frames {
        fn push(&mut self, msg: &Message, reply_to: u64) {
            self.0.push((msg.clone(), reply_to));
        }
        fn push_dma_region(&mut self, handle: u32, region: &Arc<DmaRegion>, off: u64, len: usize) {
            let mut data = vec![0; len];
            region.read(off, &mut data).unwrap();
            let iova = region.iova() + off;
            let data = Bytes::from(data);
            self.0.push((Message::DmaData { handle, iova, data }, 0));
        }
    }

    /// Records which slots are watched.
    #[derive(Default)]
    struct Watched(RefCell<Vec<usize>>);

    impl IrqWatch for Watched {
        fn watch(&self, slot: usize, _fd: &EventFd) -> io::Result<()> {
            self.0.borrow_mut().push(slot);
            Ok(())
        }
        fn unwatch(&self, _fd: &EventFd) {
            self.0.borrow_mut().pop();
        }
    }

    /// What sessions share, serving `dev` alone.
    fn shared_with(dev: Box<dyn Device>) -> Arc<Shared> {
        Arc::new(Shared::new(
            Registry::new(vec![dev]).unwrap(),
            Arc::new(UsbProvider::new(Vec::new(), Vec::new())),
            None,
            Limits::default(),
        ))
    }

    fn shared() -> Arc<Shared> {
        shared_with(Box::new(Edu::new("edu0")))
    }

    fn request(d: &mut Devices, seq: u64, msg: Message, w: &Watched) -> Vec<(Message, u64)> {
        let mut out = Frames::default();
        assert!(matches!(d.handle(seq, msg, &mut out, w), Handled::Done));
        out.0
    }

    /// Opens `name` as request `seq`; its handle.
    fn open(d: &mut Devices, seq: u64, name: &str, w: &Watched) -> u32 {
        let got = request(d, seq, Message::Open { name: name.into() }, w);
        let [(Message::Opened { handle, .. }, s)] = got[..] else {
            panic!("{got:?}")
        };
        assert_eq!(s, seq);
        handle
    }

    #[test]
    fn requests_interrupts_and_release_without_a_socket() {
        let shared = shared();
        let (mut d, w) = (Devices::new(7, Arc::clone(&shared)), Watched::default());
        let handle = open(&mut d, 1, "edu0", &w);
        assert_eq!(shared.registry.open_count(), 1);
        // A posted write is answered only if it fails.
        let data = Bytes::copy_from_slice(&5u32.to_le_bytes());
        let write = Message::RegionWrite {
            handle,
            region: 0,
            offset: reg::FACTORIAL,
            data,
        };
        assert!(request(&mut d, 2, write, &w).is_empty());
        let read = |offset| Message::RegionRead {
            handle,
            region: 0,
            offset,
            len: 4,
        };
        let got = request(&mut d, 3, read(reg::FACTORIAL), &w);
        assert!(
            matches!(&got[..], [(Message::ReadData { data }, 3)] if data[..] == 120u32.to_le_bytes()),
            "{got:?}"
        );
        // Interrupt routes are handed to the watcher, and a raise becomes a frame.
        let enable = Message::SetIrqs {
            handle,
            kind: IrqKind::Msi,
            start: 0,
            count: 1,
            action: IrqAction::Enable,
        };
        assert!(matches!(
            &request(&mut d, 4, enable, &w)[..],
            [(Message::Ok, 4)]
        ));
        assert_eq!(*w.0.borrow(), [0]);
        let raise = Message::RegionWrite {
            handle,
            region: 0,
            offset: reg::IRQ_RAISE,
            data: Bytes::copy_from_slice(&edu::FACT_IRQ.to_le_bytes()),
        };
        assert!(request(&mut d, 5, raise, &w).is_empty());
        let mut out = Frames::default();
        d.on_irq(0, &mut out);
        assert!(
            matches!(
                &out.0[..],
                [(
                    Message::Irq {
                        kind: IrqKind::Msi,
                        vector: 0,
                        ..
                    },
                    0
                )]
            ),
            "{:?}",
            out.0
        );
        // A bad handle is an error reply, not the end of anything.
        let got = request(&mut d, 6, Message::Reset { handle: 99 }, &w);
        assert!(matches!(
            &got[..],
            [(
                Message::Error {
                    code: ErrorCode::BAD_HANDLE,
                    ..
                },
                6
            )]
        ));
        d.release_all(&w);
        assert!(w.0.borrow().is_empty(), "release stops watching");
        assert_eq!(shared.registry.open_count(), 0);
        assert_eq!(shared.counters.irq_fds.load(Ordering::Relaxed), 0);
    }

    /// An edu that says it has no reset (as QEMU's real one), counting
    /// reset calls.
    struct NoReset {
        edu: Edu,
        info: cio_core::DeviceInfo,
        resets: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Device for NoReset {
        fn info(&self) -> &cio_core::DeviceInfo {
            &self.info
        }
        fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            self.edu.read(region, offset, data)
        }
        fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
            self.edu.write(region, offset, data)
        }
        fn set_irqs(
            &mut self,
            kind: IrqKind,
            start: u32,
            fds: &[EventFd],
        ) -> Result<(), DeviceError> {
            self.edu.set_irqs(kind, start, fds)
        }
        fn unmask_intx(&mut self) -> Result<(), DeviceError> {
            self.edu.unmask_intx()
        }
        fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
            self.edu.dma_map(region)
        }
        fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
            self.edu.dma_unmap(iova)
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            self.resets.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn command(d: &mut Devices, handle: u32, w: &Watched) -> u16 {
        let read = Message::RegionRead {
            handle,
            region: CONFIG_REGION,
            offset: PCI_COMMAND,
            len: 2,
        };
        match &request(d, 9, read, w)[..] {
            [(Message::ReadData { data }, _)] => u16::from_le_bytes([data[0], data[1]]),
            other => panic!("{other:?}"),
        }
    }

    /// Bulk read replies share one buffer, taken back only once a reply is
    /// gone: a reply still held keeps its bytes while later reads reuse
    /// the memory of those dropped, and a failed read leaves nothing behind.
    #[test]
    fn bulk_read_replies_keep_their_bytes_while_the_buffer_is_reused() {
        let mem = crate::models::Memory::new("mem0", 1 << 20).unwrap();
        let (mut d, w) = (
            Devices::new(7, shared_with(Box::new(mem))),
            Watched::default(),
        );
        let handle = open(&mut d, 1, "mem0", &w);
        let fill = |byte: u8| Message::RegionWriteBulk {
            handle,
            region: 0,
            offset: 0,
            data: Bytes::from(vec![byte; 64 << 10]),
        };
        let read = |offset, len| Message::RegionReadBulk {
            handle,
            region: 0,
            offset,
            len,
        };
        let data = |got: Vec<(Message, u64)>| match &got[..] {
            [(Message::ReadData { data }, _)] => data.clone(),
            _ => panic!("{got:?}"),
        };
        let mut seq = 2;
        let mut next = || {
            seq += 1;
            seq
        };
        assert!(request(&mut d, next(), fill(0xa1), &w).is_empty());
        let kept = data(request(&mut d, next(), read(0, 64 << 10), &w));
        for byte in [0xb2, 0xc3] {
            assert!(request(&mut d, next(), fill(byte), &w).is_empty());
            // Read and dropped at once: its memory is the next one's.
            let got = data(request(&mut d, next(), read(0, 64 << 10), &w));
            assert!(got.iter().all(|&b| b == byte), "{byte:#x}");
        }
        assert!(kept.iter().all(|&b| b == 0xa1));
        // Past the BAR's end: an error, and the next reply is whole.
        let got = request(&mut d, next(), read((1 << 20) - 8, 16), &w);
        assert!(matches!(got[..], [(Message::Error { .. }, _)]), "{got:?}");
        let got = data(request(&mut d, next(), read(8, 8), &w));
        assert_eq!(&got[..], &[0xc3; 8]);
    }

    #[test]
    fn a_device_without_reset_is_cleared_or_handed_on_as_configured() {
        let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let edu = Edu::new("edu0");
        let mut info = edu.info().clone();
        info.reset = ResetMethod::None;
        let dev = NoReset {
            edu,
            info,
            resets: Arc::clone(&resets),
        };
        let shared = shared_with(Box::new(dev));
        let w = Watched::default();
        for (policy, version) in [(Release::Clear, 2), (Release::AsIs, 1)] {
            shared.registry.set_release("edu0", policy).unwrap();
            let mut d = Devices::new(1, Arc::clone(&shared));
            d.set_version(version);
            let got = request(
                &mut d,
                1,
                Message::Open {
                    name: "edu0".into(),
                },
                &w,
            );
            let [(Message::Opened { handle, ref info }, 1)] = got[..] else {
                panic!("{got:?}")
            };
            // Protocol 1 cannot say how the device resets.
            let said = if version < 2 {
                ResetMethod::Unknown
            } else {
                ResetMethod::None
            };
            assert_eq!(info.reset, said);
            let on = Message::RegionWrite {
                handle,
                region: CONFIG_REGION,
                offset: PCI_COMMAND,
                data: Bytes::copy_from_slice(&0x0006u16.to_le_bytes()),
            };
            assert!(request(&mut d, 2, on, &w).is_empty());
            assert_eq!(command(&mut d, handle, &w) & 0x6, 0x6);
            d.release_all(&w);
            let mut d = Devices::new(2, Arc::clone(&shared));
            let handle = open(&mut d, 1, "edu0", &w);
            let cmd = command(&mut d, handle, &w);
            match policy {
                Release::Clear => {
                    assert_eq!(cmd & PCI_COMMAND_MASTER, 0, "bus mastering off");
                    assert_ne!(cmd & PCI_COMMAND_INTX_DISABLE, 0, "INTx disabled");
                    assert_ne!(cmd & 0x2, 0, "memory decoding left alone");
                }
                Release::AsIs => assert_eq!(cmd & 0x6, 0x6, "handed on as it was"),
            }
            d.release_all(&w);
        }
        assert_eq!(resets.load(Ordering::Relaxed), 0, "no reset attempted");
    }
}
