//! The only `unsafe` of the RDMA transport: registered buffers, work
//! requests that point into them, and the completion-channel calls sideway
//! does not wrap.

use std::io;
use std::ptr::null_mut;
use std::sync::Arc;

use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

/// `count` buffers of `size` bytes each in one registered memory region.
/// The NIC writes a receive buffer and reads a send buffer while its work
/// request is posted; the owner touches a slot only when it is not.
pub(crate) struct Slots {
    // Declared first: deregistered before the memory is freed.
    mr: Arc<MemoryRegion>,
    buf: Box<[u8]>,
    size: usize,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("count", &(self.buf.len() / self.size))
            .field("size", &self.size)
            .finish()
    }
}

impl Slots {
    /// Allocates and registers the buffers with `access` (at least local
    /// write: the NIC receives into them).
    pub(crate) fn new(
        pd: &Arc<ProtectionDomain>,
        count: usize,
        size: usize,
        access: AccessFlags,
    ) -> io::Result<Self> {
        let mut buf = vec![0u8; count * size].into_boxed_slice();
        // SAFETY: `buf` is a live allocation of `count * size` bytes that
        // never moves (a boxed slice) and is freed only after `mr`, which is
        // dropped first (field order), so the NIC never sees freed memory.
        let mr =
            unsafe { pd.reg_mr(buf.as_mut_ptr() as usize, buf.len(), access) }.map_err(|e| {
                io::Error::other(format!(
                    "registering {} KiB of buffers: {e}",
                    buf.len() >> 10
                ))
            })?;
        Ok(Self { mr, buf, size })
    }

    /// How many slots there are.
    pub(crate) fn count(&self) -> usize {
        self.buf.len() / self.size
    }

    /// Bytes in one slot.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Slot `i`.
    pub(crate) fn slot(&self, i: usize) -> &[u8] {
        &self.buf[i * self.size..(i + 1) * self.size]
    }

    /// Slot `i`, to fill before it is sent.
    pub(crate) fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.size..(i + 1) * self.size]
    }

    /// Where the peer writes into the buffers: their address and remote
    /// key (meaningful only with remote write access).
    pub(crate) fn remote(&self) -> (u64, u32) {
        (self.addr(0), self.mr.rkey())
    }

    fn addr(&self, i: usize) -> u64 {
        self.buf.as_ptr() as u64 + (i * self.size) as u64
    }
}

/// Posts slot `i` of `slots` as a receive buffer with id `wr_id`.
pub(crate) fn post_recv(
    qp: &mut BasicQueuePair,
    slots: &Slots,
    i: usize,
    wr_id: u64,
) -> io::Result<()> {
    let mut g = qp.start_post_recv();
    // SAFETY: the slot lies inside the registered region `slots` owns, which
    // outlives the QP's use of it (the QP is dropped before the slots); the
    // caller does not touch the slot until its completion.
    unsafe {
        g.construct_wr(wr_id)
            .setup_sge(slots.mr.lkey(), slots.addr(i), slots.size as u32)
    };
    g.post()
        .map_err(|e| io::Error::other(format!("posting a receive buffer: {e}")))
}

/// Posts a signaled SEND with immediate value `imm` (credits, carried in
/// network byte order) and the first `len` bytes of slot `i`, or no payload.
pub(crate) fn post_send(
    qp: &mut BasicQueuePair,
    wr_id: u64,
    imm: u32,
    payload: Option<(&Slots, usize, usize)>,
) -> io::Result<()> {
    let mut g = qp.start_post_send();
    let wr = g
        .construct_wr(wr_id, WorkRequestFlags::Signaled)
        .setup_send_imm(imm.to_be());
    match payload {
        // SAFETY: as in `post_recv`: the slot is inside the registered
        // region, which outlives the QP, and is left alone until the send
        // completes.
        Some((slots, i, len)) => unsafe {
            wr.setup_sge(slots.mr.lkey(), slots.addr(i), len as u32)
        },
        // SAFETY: an empty scatter list refers to no memory.
        None => unsafe { wr.setup_sge_list(&[]) },
    }
    g.post()
        .map_err(|e| io::Error::other(format!("posting a send: {e}")))
}

/// Posts a signaled RDMA WRITE of the first `len` bytes of slot `i` to the
/// peer's registered memory at `remote_addr` (key `rkey`).
pub(crate) fn post_write(
    qp: &mut BasicQueuePair,
    wr_id: u64,
    (slots, i, len): (&Slots, usize, usize),
    rkey: u32,
    remote_addr: u64,
) -> io::Result<()> {
    let mut g = qp.start_post_send();
    let wr = g
        .construct_wr(wr_id, WorkRequestFlags::Signaled)
        .setup_write(rkey, remote_addr);
    // SAFETY: as in `post_recv`: the slot is inside the registered region,
    // which outlives the QP, and is left alone until the write completes.
    // The remote range is the peer's to check (its NIC refuses a write
    // outside the region the key names).
    unsafe { wr.setup_sge(slots.mr.lkey(), slots.addr(i), len as u32) };
    g.post()
        .map_err(|e| io::Error::other(format!("posting an RDMA write: {e}")))
}

/// Asks for an event on the completion channel at the next completion.
pub(crate) fn arm(cq: &BasicCompletionQueue) -> io::Result<()> {
    // SAFETY: the CQ is alive for the call (borrowed); req_notify_cq only
    // sets its notification state.
    let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(cq.cq().as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Takes and acknowledges the event waiting on the (non-blocking)
/// completion channel, if there is one; true if there was. At most one
/// waits: the queue is armed again only after its event is taken.
pub(crate) fn take_cq_event(chan: &CompletionChannel) -> io::Result<bool> {
    let mut cq = null_mut();
    let mut ctx = null_mut();
    // SAFETY: the channel is alive (borrowed); on success the library
    // writes the CQ the event belongs to into `cq`.
    let rc = unsafe {
        rdma_mummy_sys::ibv_get_cq_event(chan.comp_channel().as_ptr(), &mut cq, &mut ctx)
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: `cq` is the live CQ the event was reported for (its only CQ
    // is owned by the connection, which outlives this call).
    unsafe { rdma_mummy_sys::ibv_ack_cq_events(cq, 1) };
    Ok(true)
}
