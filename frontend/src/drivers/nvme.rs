//! A minimal NVMe driver: brings a controller up (CC/CSTS, admin queues),
//! identifies the controller and namespace 1, creates one I/O queue pair
//! whose completions arrive by MSI-X, and reads and writes blocks.
//!
//! Written against [`cio_core::Device`] like [`edu`](super::edu), so it runs
//! on a [`RemoteDevice`](crate::RemoteDevice) reaching a VFIO function on
//! another host. Only 4-byte register accesses are used (VFIO refuses 8-byte
//! ones): 64-bit registers are accessed as two halves, low first. All queue
//! memory lives in [`DmaRegion`]s, and every hand-over is explicit:
//! [`Device::sync_for_device`] before a doorbell for memory the controller
//! reads (submission entries, write data), [`Device::sync_for_cpu`] before
//! reading memory it wrote (completion entries, read and identify data).
//!
//! One command is in flight at a time; transfers are at most two pages
//! ([`MAX_TRANSFER`]), so PRP1 and PRP2 always suffice.
//!
//! A running controller can change hands without a reset:
//! [`Nvme::suspend_state`] ends the driver leaving the controller enabled,
//! its queues, interrupt routes and DMA mappings in place, and returns an
//! [`NvmeState`] (text, see [`NvmeState::to_text`]) that
//! [`Nvme::resume_from`] continues from, in another process if the device
//! is a [`RemoteDevice`](crate::RemoteDevice) whose session was handed on
//! with a ticket ([`Client::suspend`](crate::Client::suspend),
//! [`Client::adopt`](crate::Client::adopt)).
//!
//! ```no_run
//! # fn demo(dev: &mut dyn cio_core::Device) -> Result<(), cio_frontend::drivers::nvme::NvmeError> {
//! use cio_frontend::drivers::nvme::{Nvme, Options};
//! let mut nvme = Nvme::new(dev, Options::default())?;
//! println!("{} {}", nvme.controller().model, nvme.controller().serial);
//! let bs = nvme.namespace().block_size as usize;
//! nvme.write_blocks(8, &vec![0xa5; bs])?;
//! assert_eq!(nvme.read_blocks(8, 1)?, vec![0xa5; bs]);
//! nvme.shutdown()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_core::{
    Device, DeviceError, DmaDir, DmaError, DmaRegion, EventFd, IrqKind, CONFIG_REGION, PAGE_SIZE,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const BAR0: u32 = 0;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;
/// PCI class code of an NVMe controller (mass storage, NVM, NVMe).
pub const NVME_CLASS: u32 = 0x01_0802;

/// Controller register offsets in BAR0.
pub mod reg {
    /// Controller capabilities (64-bit).
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Controller configuration.
    pub const CC: u64 = 0x14;
    /// Controller status.
    pub const CSTS: u64 = 0x1c;
    /// Admin queue attributes.
    pub const AQA: u64 = 0x24;
    /// Admin submission queue base (64-bit).
    pub const ASQ: u64 = 0x28;
    /// Admin completion queue base (64-bit).
    pub const ACQ: u64 = 0x30;
    /// First doorbell (admin submission queue tail).
    pub const DOORBELLS: u64 = 0x1000;
}

const CC_EN: u32 = 1 << 0;
const CC_SHN_NORMAL: u32 = 1 << 14;
const CC_IOSQES_64: u32 = 6 << 16;
const CC_IOCQES_16: u32 = 4 << 20;
const CSTS_RDY: u32 = 1 << 0;
const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_DONE: u32 = 2 << 2;

/// Submission queue entry size.
pub const SQE_SIZE: usize = 64;
/// Completion queue entry size.
pub const CQE_SIZE: usize = 16;
/// Largest transfer of one command: two pages, so PRP1 and PRP2 suffice.
pub const MAX_TRANSFER: usize = 2 * PAGE_SIZE as usize;
/// IOVA space the driver maps, from [`Options::iova`]: submission queues
/// (2 pages), completion queues (2 pages), the data buffer (2 pages).
pub const DMA_SPAN: u64 = 6 * PAGE_SIZE;

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O submission queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O submission queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O completion queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O completion queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set features.
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes.
pub mod nvm {
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
}

const CNS_NAMESPACE: u32 = 0x00;
const CNS_CONTROLLER: u32 = 0x01;
const FEATURE_NUM_QUEUES: u32 = 0x07;
const NSID: u32 = 1;
const IO_QID: u16 = 1;

/// Driver errors.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The function is not an NVMe controller.
    #[error("not an nvme controller: {vendor:04x}:{device:04x} class {class:06x}")]
    NotNvme {
        /// PCI vendor id.
        vendor: u16,
        /// PCI device id.
        device: u16,
        /// PCI class code.
        class: u32,
    },
    /// A device access failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A DMA buffer operation failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// Creating or waiting on an interrupt eventfd failed.
    #[error("{op} an interrupt eventfd")]
    EventFd {
        /// What was being done.
        op: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The controller did not answer in time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What the driver waited for.
        what: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// A command completed with an error status.
    #[error("{op} failed: {status}")]
    Command {
        /// The command.
        op: &'static str,
        /// Its completion status.
        status: Status,
    },
    /// The controller reported a fatal status (CSTS.CFS).
    #[error("controller fatal status while {0}")]
    Fatal(&'static str),
    /// The controller lacks something this driver needs.
    #[error("unsupported controller: {0}")]
    Unsupported(String),
    /// The controller answered something inconsistent.
    #[error("bad answer to {op}: {what}")]
    BadAnswer {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
    /// A transfer the driver cannot or will not issue.
    #[error("{op} of {len} bytes: {why}")]
    Transfer {
        /// The operation.
        op: &'static str,
        /// Bytes asked for.
        len: usize,
        /// Why it was refused.
        why: String,
    },
    /// The blocks asked for are outside the namespace.
    #[error("{op} of {count} blocks at lba {lba} is past the namespace's {blocks} blocks")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// First block.
        lba: u64,
        /// Number of blocks.
        count: u64,
        /// Namespace size in blocks.
        blocks: u64,
    },
    /// The controller was shut down (or never finished coming up).
    #[error("{0}: the controller is shut down")]
    Shutdown(&'static str),
    /// A command that timed out has still not completed.
    #[error("{op}: command {cid} on queue {qid} is still in flight")]
    InFlight {
        /// The operation refused.
        op: &'static str,
        /// The queue.
        qid: u16,
        /// The command's identifier.
        cid: u16,
    },
    /// Encoding, decoding, reading or writing an [`NvmeState`] failed.
    #[error("{op}: {what}")]
    State {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        what: String,
    },
    /// The controller, or what the caller handed over, does not match the
    /// [`NvmeState`] to resume from. Nothing was written to the device.
    #[error("resuming from the saved state: {0}")]
    Resume(String),
}

/// The status field of a completion entry (without the phase bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    /// Status code type (0 generic, 1 command specific, 2 media, ...).
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// True for successful completion.
    pub fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }

    /// The specification's name for common codes.
    pub fn name(self) -> Option<&'static str> {
        Some(match (self.sct(), self.sc()) {
            (0, 0x00) => "successful completion",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x03) => "command id conflict",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x0b) => "invalid namespace or format",
            (0, 0x13) => "invalid prp offset",
            (0, 0x80) => "lba out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (1, 0x00) => "completion queue invalid",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x08) => "invalid interrupt vector",
            (1, 0x0c) => "invalid queue deletion",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x86) => "access denied",
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:#06x} (sct {}, sc {:#04x}",
            self.0,
            self.sct(),
            self.sc()
        )?;
        if let Some(n) = self.name() {
            write!(f, ": {n}")?;
        }
        if self.dnr() {
            f.write_str(", do not retry")?;
        }
        f.write_str(")")
    }
}

/// The fields of CAP this driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Largest queue size the controller supports (MQES + 1 entries).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }

    /// Worst-case time to become ready or not ready (CAP.TO, 500 ms units).
    pub fn ready_timeout(self) -> Duration {
        Duration::from_millis(((self.0 >> 24) & 0xff) * 500)
    }

    /// Doorbell stride in bytes (4 << CAP.DSTRD).
    pub fn doorbell_stride(self) -> u64 {
        4 << ((self.0 >> 32) & 0xf)
    }

    /// The controller supports the NVM command set (CAP.CSS bit 0).
    pub fn nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }

    /// Smallest memory page size, in bytes (4 KiB << CAP.MPSMIN).
    pub fn min_page_size(self) -> u64 {
        4096 << ((self.0 >> 48) & 0xf)
    }
}

/// Offset in BAR0 of queue `qid`'s submission tail doorbell, or with
/// `completion` its completion head doorbell.
pub fn doorbell(cap: Cap, qid: u16, completion: bool) -> u64 {
    reg::DOORBELLS + (2 * u64::from(qid) + u64::from(completion)) * cap.doorbell_stride()
}

/// One submission queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace id.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
}

impl Command {
    /// Identify with `cns` (1: controller, 0: namespace `nsid`) into `buf`.
    pub fn identify(cns: u32, nsid: u32, buf: u64) -> Self {
        Self {
            opcode: admin::IDENTIFY,
            nsid,
            prp1: buf,
            cdw: [cns, 0, 0, 0, 0, 0],
            ..Self::default()
        }
    }

    /// Set Features, Number of Queues: `sqs` and `cqs` I/O queues.
    pub fn set_queue_count(sqs: u16, cqs: u16) -> Self {
        let v = u32::from(sqs.saturating_sub(1)) | u32::from(cqs.saturating_sub(1)) << 16;
        Self {
            opcode: admin::SET_FEATURES,
            cdw: [FEATURE_NUM_QUEUES, v, 0, 0, 0, 0],
            ..Self::default()
        }
    }

    /// Create I/O Completion Queue `qid` of `entries` at `base` (physically
    /// contiguous), raising MSI-X `vector` if `irq`.
    pub fn create_cq(qid: u16, entries: u16, base: u64, vector: u16, irq: bool) -> Self {
        Self {
            opcode: admin::CREATE_CQ,
            prp1: base,
            cdw: [
                u32::from(entries.saturating_sub(1)) << 16 | u32::from(qid),
                u32::from(vector) << 16 | u32::from(irq) << 1 | 1,
                0,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// Create I/O Submission Queue `qid` of `entries` at `base` (physically
    /// contiguous), completing on `cqid`.
    pub fn create_sq(qid: u16, entries: u16, base: u64, cqid: u16) -> Self {
        Self {
            opcode: admin::CREATE_SQ,
            prp1: base,
            cdw: [
                u32::from(entries.saturating_sub(1)) << 16 | u32::from(qid),
                u32::from(cqid) << 16 | 1,
                0,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// Delete I/O Submission (or, with `completion`, Completion) Queue `qid`.
    pub fn delete_queue(qid: u16, completion: bool) -> Self {
        Self {
            opcode: if completion {
                admin::DELETE_CQ
            } else {
                admin::DELETE_SQ
            },
            cdw: [u32::from(qid), 0, 0, 0, 0, 0],
            ..Self::default()
        }
    }

    /// NVM Read (or, with `write`, Write) of `blocks` (1..=65536) at `lba`.
    pub fn rw(write: bool, nsid: u32, lba: u64, blocks: u32, prp: (u64, u64)) -> Self {
        Self {
            opcode: if write { nvm::WRITE } else { nvm::READ },
            nsid,
            prp1: prp.0,
            prp2: prp.1,
            cdw: [
                lba as u32,
                (lba >> 32) as u32,
                blocks.saturating_sub(1) & 0xffff,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// The 64-byte entry as the controller reads it (little-endian).
    pub fn encode(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        b[0] = self.opcode;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, d) in self.cdw.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
}

/// One completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command-specific result (dword 0).
    pub result: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag.
    pub phase: bool,
    /// Status field.
    pub status: Status,
}

impl Completion {
    /// Decodes a 16-byte entry.
    pub fn decode(b: &[u8; CQE_SIZE]) -> Self {
        let dw =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (dw2, dw3) = (dw(2), dw(3));
        Self {
            result: dw(0),
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            phase: dw3 & (1 << 16) != 0,
            status: Status((dw3 >> 17) as u16),
        }
    }
}

/// PRP1 and PRP2 for a transfer of `len` bytes at `iova`: PRP2 is 0 when
/// the transfer stays in PRP1's page, the next page when it ends there.
/// Longer transfers would need a PRP list, which this driver does not build.
pub fn prp(iova: u64, len: usize) -> Result<(u64, u64), NvmeError> {
    let refuse = |why: String| NvmeError::Transfer {
        op: "prp setup",
        len,
        why,
    };
    if len == 0 {
        return Err(refuse("empty transfer".into()));
    }
    if iova % 4 != 0 {
        return Err(refuse(format!("{iova:#x} is not dword aligned")));
    }
    let first = PAGE_SIZE - iova % PAGE_SIZE;
    let len = len as u64;
    if len <= first {
        Ok((iova, 0))
    } else if len - first <= PAGE_SIZE {
        Ok((iova, iova - iova % PAGE_SIZE + PAGE_SIZE))
    } else {
        Err(refuse(
            "spans more than two pages; this driver builds no prp lists".into(),
        ))
    }
}

/// An ASCII field of an identify structure: trailing spaces and NULs go.
fn ascii_field(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .trim_start()
        .to_owned()
}

/// What Identify Controller says, in part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerId {
    /// PCI vendor id.
    pub vendor: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size, in minimum pages as a power of two
    /// (0: no limit).
    pub mdts: u8,
    /// Number of namespaces.
    pub namespaces: u32,
}

impl ControllerId {
    /// Parses the 4096-byte Identify Controller data.
    pub fn parse(b: &[u8]) -> Result<Self, NvmeError> {
        if b.len() < 4096 {
            return Err(NvmeError::BadAnswer {
                op: "identify controller",
                what: format!("{} bytes of data", b.len()),
            });
        }
        Ok(Self {
            vendor: u16::from_le_bytes([b[0], b[1]]),
            serial: ascii_field(&b[4..24]),
            model: ascii_field(&b[24..64]),
            firmware: ascii_field(&b[64..72]),
            mdts: b[77],
            namespaces: u32::from_le_bytes([b[516], b[517], b[518], b[519]]),
        })
    }
}

/// What Identify Namespace says, in part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block size in bytes, from the format FLBAS selects.
    pub block_size: u32,
    /// The selected LBA format's index.
    pub format: u8,
}

impl NamespaceInfo {
    /// Parses the 4096-byte Identify Namespace data.
    pub fn parse(b: &[u8]) -> Result<Self, NvmeError> {
        let bad = |what: String| NvmeError::BadAnswer {
            op: "identify namespace",
            what,
        };
        if b.len() < 4096 {
            return Err(bad(format!("{} bytes of data", b.len())));
        }
        let blocks = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let formats = u32::from(b[25]) + 1;
        // FLBAS bits 3:0, and bits 6:5 as the upper bits past 16 formats.
        let flbas = b[26];
        let format = (flbas & 0xf) | ((flbas >> 5) & 0x3) << 4;
        if u32::from(format) >= formats.min(64) {
            return Err(bad(format!(
                "format {format} selected, {formats} formats offered"
            )));
        }
        let at = 128 + 4 * usize::from(format);
        let lbads = b[at + 2];
        if !(9..=16).contains(&lbads) {
            return Err(bad(format!(
                "lba format {format} has 2^{lbads}-byte blocks"
            )));
        }
        if blocks == 0 {
            return Err(bad("namespace has no blocks".into()));
        }
        Ok(Self {
            blocks,
            block_size: 1 << lbads,
            format,
        })
    }

    /// Namespace size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }
}

/// How to drive the controller. [`Nvme::resume_from`] uses only the
/// timeouts: the rest is the saved state's.
#[derive(Debug, Clone)]
pub struct Options {
    /// First IOVA of the [`DMA_SPAN`] bytes the driver maps.
    pub iova: u64,
    /// Entries per queue (capped by CAP.MQES and one page of entries).
    pub queue_entries: u16,
    /// Longest wait for one command.
    pub command_timeout: Duration,
    /// Wait for I/O completions by MSI-X interrupt (else poll).
    pub interrupts: bool,
    /// How long to wait for an interrupt before looking at the completion
    /// queue anyway (the poll fallback).
    pub irq_poll_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            iova: 0x20_0000,
            queue_entries: 32,
            command_timeout: Duration::from_secs(10),
            interrupts: true,
            irq_poll_interval: Duration::from_millis(100),
        }
    }
}

/// One queue pair's ring state.
#[derive(Debug)]
struct Queue {
    qid: u16,
    entries: u16,
    /// Offset of the submission ring in the submission region.
    sq_off: u64,
    /// Offset of the completion ring in the completion region.
    cq_off: u64,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    next_cid: u16,
    /// A submitted command whose completion was not consumed (it timed
    /// out, or waiting for it failed).
    in_flight: Option<u16>,
}

impl Queue {
    fn new(qid: u16, entries: u16, page: u64) -> Self {
        Self {
            qid,
            entries,
            sq_off: page * PAGE_SIZE,
            cq_off: page * PAGE_SIZE,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            next_cid: 0,
            in_flight: None,
        }
    }

    fn state(&self, sq: &DmaRegion, cq: &DmaRegion) -> QueueState {
        QueueState {
            qid: self.qid,
            entries: self.entries,
            sq_iova: sq.iova() + self.sq_off,
            cq_iova: cq.iova() + self.cq_off,
            sq_tail: self.sq_tail,
            sq_head: self.sq_head,
            cq_head: self.cq_head,
            phase: self.phase,
            next_cid: self.next_cid,
        }
    }

    fn from_state(s: &QueueState, sq: &DmaRegion, cq: &DmaRegion) -> Self {
        Self {
            qid: s.qid,
            entries: s.entries,
            sq_off: s.sq_iova - sq.iova(),
            cq_off: s.cq_iova - cq.iova(),
            sq_tail: s.sq_tail,
            sq_head: s.sq_head,
            cq_head: s.cq_head,
            phase: s.phase,
            next_cid: s.next_cid,
            in_flight: None,
        }
    }

    /// Offset of the completion entry at the head in the completion region.
    fn cq_at(&self) -> u64 {
        self.cq_off + u64::from(self.cq_head) * CQE_SIZE as u64
    }
}

/// The version of [`NvmeState`]'s text this driver writes and reads.
pub const STATE_FORMAT: u32 = 1;

/// Where one DMA region of the driver is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One queue pair as the driver left it, every command completed and its
/// completion consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Queue identifier (0: admin).
    pub qid: u16,
    /// Entries of each ring.
    pub entries: u16,
    /// IOVA of the submission ring.
    pub sq_iova: u64,
    /// IOVA of the completion ring.
    pub cq_iova: u64,
    /// Submission tail: the next entry the driver fills (the doorbell's
    /// last value).
    pub sq_tail: u16,
    /// Submission head, as the last completion reported it.
    pub sq_head: u16,
    /// Completion head: the next entry the controller writes (the
    /// doorbell's last value).
    pub cq_head: u16,
    /// The phase tag a new completion at the head carries.
    pub phase: bool,
    /// The next command identifier.
    pub next_cid: u16,
}

/// Everything needed to continue driving a controller that
/// [`Nvme::suspend_state`] left running: its registers' identity, where the
/// queues and buffers are, each queue's positions, the interrupt set-up and
/// what Identify said. [`to_text`](Self::to_text) and
/// [`from_text`](Self::from_text) carry it as JSON (next to a handoff
/// ticket, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeState {
    /// [`STATE_FORMAT`] of the writer.
    pub format: u32,
    /// CAP, as read at bring-up.
    pub cap: u64,
    /// VS, as read at bring-up.
    pub version: u32,
    /// Doorbell stride in bytes (from CAP.DSTRD).
    pub doorbell_stride: u64,
    /// The submission rings' region (the controller reads it).
    pub sq: RegionState,
    /// The completion rings' region (the controller writes it).
    pub cq: RegionState,
    /// The data buffer (both directions).
    pub data: RegionState,
    /// The admin queue pair (AQA, ASQ, ACQ).
    pub admin: QueueState,
    /// The I/O queue pair.
    pub io: QueueState,
    /// I/O completions raise an MSI-X interrupt.
    pub interrupts: bool,
    /// The I/O completion queue's MSI-X vector (when `interrupts`).
    pub io_vector: u16,
    /// Largest transfer of one command in bytes (MDTS and this driver's
    /// limit).
    pub max_transfer: u64,
    /// Identify Controller's answer.
    pub controller: ControllerId,
    /// Identify Namespace 1's answer.
    pub namespace: NamespaceInfo,
}

fn state_err(op: &'static str) -> impl FnOnce(String) -> NvmeError {
    move |what| NvmeError::State { op, what }
}

impl NvmeState {
    /// The state as pretty JSON, ending in a newline.
    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).expect("an nvme state serialises") + "\n"
    }

    /// Parses [`to_text`](Self::to_text)'s output and checks it is
    /// consistent.
    pub fn from_text(text: &str) -> Result<Self, NvmeError> {
        let op = "parsing nvme state";
        let s: Self = serde_json::from_str(text).map_err(|e| state_err(op)(e.to_string()))?;
        s.validate().map_err(state_err(op))?;
        Ok(s)
    }

    /// Writes [`to_text`](Self::to_text) to `path`.
    pub fn save(&self, path: &Path) -> Result<(), NvmeError> {
        std::fs::write(path, self.to_text())
            .map_err(|e| state_err("writing nvme state")(format!("{}: {e}", path.display())))
    }

    /// Reads a state [`save`](Self::save) wrote.
    pub fn load(path: &Path) -> Result<Self, NvmeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| state_err("reading nvme state")(format!("{}: {e}", path.display())))?;
        Self::from_text(&text)
    }

    /// Picks what [`Nvme::resume_from`] needs from the device's owner:
    /// `region(iova)` gives the target memory mapped at an IOVA, `irq(v)`
    /// an eventfd MSI-X vector `v` signals. For a
    /// [`RemoteDevice`](crate::RemoteDevice) adopted from a ticket these are
    /// its `dma_region` and `irq_eventfd`.
    pub fn resources(
        &self,
        mut region: impl FnMut(u64) -> Option<Arc<DmaRegion>>,
        irq: impl FnOnce(u32) -> Option<EventFd>,
    ) -> Result<Resources, NvmeError> {
        let mut find = |r: RegionState, what: &str| {
            region(r.iova).ok_or_else(|| {
                NvmeError::Resume(format!("no target memory at {:#x} for the {what}", r.iova))
            })
        };
        let sq = find(self.sq, "submission queues")?;
        let cq = find(self.cq, "completion queues")?;
        let data = find(self.data, "data buffer")?;
        let io_irq = if self.interrupts {
            Some(irq(u32::from(self.io_vector)).ok_or_else(|| {
                NvmeError::Resume(format!(
                    "no eventfd for msi-x vector {} of the i/o queue",
                    self.io_vector
                ))
            })?)
        } else {
            None
        };
        Ok(Resources {
            sq,
            cq,
            data,
            io_irq,
        })
    }

    /// Checks that the state describes something this driver can drive.
    fn validate(&self) -> Result<(), String> {
        if self.format != STATE_FORMAT {
            return Err(format!(
                "format {} (this driver reads {STATE_FORMAT})",
                self.format
            ));
        }
        let cap = Cap(self.cap);
        if self.doorbell_stride != cap.doorbell_stride() {
            return Err(format!(
                "doorbell stride {} but cap {:#x} says {}",
                self.doorbell_stride,
                self.cap,
                cap.doorbell_stride()
            ));
        }
        for (name, r) in [("sq", self.sq), ("cq", self.cq), ("data", self.data)] {
            if r.len == 0 || r.iova % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
                return Err(format!(
                    "{name} region {:#x}+{:#x} is not whole pages",
                    r.iova, r.len
                ));
            }
            if r.iova.checked_add(r.len).is_none() {
                return Err(format!("{name} region {:#x}+{:#x} wraps", r.iova, r.len));
            }
        }
        for (name, q, qid_ok) in [
            ("admin", self.admin, self.admin.qid == 0),
            ("i/o", self.io, self.io.qid != 0),
        ] {
            let rings = [
                (self.sq, q.sq_iova, SQE_SIZE, "submission"),
                (self.cq, q.cq_iova, CQE_SIZE, "completion"),
            ];
            if !qid_ok {
                return Err(format!("{name} queue has id {}", q.qid));
            }
            if q.entries < 2 || u64::from(q.entries) > u64::from(Cap(self.cap).max_queue_entries())
            {
                return Err(format!("{name} queue of {} entries", q.entries));
            }
            if q.sq_tail >= q.entries || q.sq_head >= q.entries || q.cq_head >= q.entries {
                return Err(format!(
                    "{name} queue positions (tail {}, head {}, completion head {}) past {} entries",
                    q.sq_tail, q.sq_head, q.cq_head, q.entries
                ));
            }
            for (r, at, size, ring) in rings {
                let len = u64::from(q.entries) * size as u64;
                if at % PAGE_SIZE != 0 || at < r.iova || at + len > r.iova + r.len {
                    return Err(format!(
                        "{name} {ring} ring at {at:#x} ({len} bytes) is not page-aligned in its region"
                    ));
                }
            }
        }
        if self.admin.sq_iova == self.io.sq_iova || self.admin.cq_iova == self.io.cq_iova {
            return Err("the admin and i/o queues share a ring".into());
        }
        let max = self.max_transfer;
        if max == 0 || max > MAX_TRANSFER as u64 || max > self.data.len || self.data.len < 4096 {
            return Err(format!(
                "transfers of {max} bytes with a {}-byte data buffer",
                self.data.len
            ));
        }
        let bs = self.namespace.block_size;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) || self.namespace.blocks == 0 {
            return Err(format!(
                "namespace of {} blocks of {bs} bytes",
                self.namespace.blocks
            ));
        }
        Ok(())
    }
}

/// What [`Nvme::resume_from`] drives the controller with: the target memory
/// of the state's three regions, and the I/O queue's interrupt eventfd.
/// [`NvmeState::resources`] collects them.
#[derive(Debug)]
pub struct Resources {
    /// The submission rings' region ([`NvmeState::sq`]).
    pub sq: Arc<DmaRegion>,
    /// The completion rings' region ([`NvmeState::cq`]).
    pub cq: Arc<DmaRegion>,
    /// The data buffer ([`NvmeState::data`]).
    pub data: Arc<DmaRegion>,
    /// Signalled by the I/O queue's MSI-X vector ([`NvmeState::io_vector`]);
    /// required when the state uses interrupts, refused otherwise.
    pub io_irq: Option<EventFd>,
}

/// [`Nvme::suspend_state`] refused: the error, and the driver back,
/// unchanged (dropping it shuts the controller down as usual).
pub struct SuspendError<'a, D: Device + ?Sized> {
    /// Why it refused.
    pub error: NvmeError,
    /// The driver, still in charge of the controller (boxed: it is large).
    pub driver: Box<Nvme<'a, D>>,
}

impl<D: Device + ?Sized> fmt::Debug for SuspendError<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SuspendError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<D: Device + ?Sized> fmt::Display for SuspendError<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<D: Device + ?Sized> std::error::Error for SuspendError<'_, D> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl<D: Device + ?Sized> From<SuspendError<'_, D>> for NvmeError {
    fn from(e: SuspendError<'_, D>) -> Self {
        e.error
    }
}

/// Counters of what the driver did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands completed (admin and I/O).
    pub commands: u64,
    /// Completions found after an interrupt.
    pub by_interrupt: u64,
    /// Completions found by polling (admin, or the fallback).
    pub by_poll: u64,
}

/// Drives one NVMe controller through any [`Device`].
#[derive(Debug)]
pub struct Nvme<'a, D: Device + ?Sized> {
    dev: &'a mut D,
    opts: Options,
    cap: Cap,
    version: u32,
    sq: Arc<DmaRegion>,
    cq: Arc<DmaRegion>,
    data: Arc<DmaRegion>,
    admin: Queue,
    io: Option<Queue>,
    /// MSI-X eventfds (the I/O queue's last; set with `set_irqs` at
    /// bring-up, or the I/O vector's alone after a resume), if enabled.
    irqs: Vec<EventFd>,
    io_vector: u16,
    ctrl: ControllerId,
    ns: NamespaceInfo,
    stats: Stats,
    /// The controller is enabled and ours to shut down.
    up: bool,
    /// The three regions are mapped and ours to unmap.
    mapped: bool,
}

fn eventfd_err(op: &'static str) -> impl FnOnce(std::io::Error) -> NvmeError {
    move |source| NvmeError::EventFd { op, source }
}

/// Reads a 64-bit register as two 4-byte halves, low first.
fn read_reg64<D: Device + ?Sized>(dev: &mut D, offset: u64) -> Result<u64, DeviceError> {
    let lo = dev.read32(BAR0, offset)?;
    let hi = dev.read32(BAR0, offset + 4)?;
    Ok(u64::from(hi) << 32 | u64::from(lo))
}

impl<'a, D: Device + ?Sized> Nvme<'a, D> {
    /// Brings the controller up: checks the class, enables memory decoding
    /// and bus mastering, resets the controller, sets up the admin queues,
    /// enables it, identifies controller and namespace 1 and creates one
    /// I/O queue pair. Maps [`DMA_SPAN`] bytes at `opts.iova`.
    pub fn new(dev: &'a mut D, opts: Options) -> Result<Self, NvmeError> {
        let info = dev.info();
        if info.class != NVME_CLASS {
            return Err(NvmeError::NotNvme {
                vendor: info.vendor,
                device: info.device,
                class: info.class,
            });
        }
        let mut cmd = [0u8; 2];
        dev.read(CONFIG_REGION, PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        dev.write(CONFIG_REGION, PCI_COMMAND, &cmd.to_le_bytes())?;

        let cap = Cap(read_reg64(dev, reg::CAP)?);
        let version = dev.read32(BAR0, reg::VS)?;
        if !cap.nvm_command_set() {
            return Err(NvmeError::Unsupported(format!(
                "no nvm command set (cap {:#018x})",
                cap.0
            )));
        }
        if cap.min_page_size() > PAGE_SIZE {
            return Err(NvmeError::Unsupported(format!(
                "smallest memory page is {} bytes",
                cap.min_page_size()
            )));
        }
        let per_page = (PAGE_SIZE as usize / SQE_SIZE) as u32;
        let entries = u32::from(opts.queue_entries)
            .clamp(2, per_page)
            .min(cap.max_queue_entries()) as u16;
        if entries < 2 {
            return Err(NvmeError::Unsupported(format!(
                "queues of {} entries",
                cap.max_queue_entries()
            )));
        }

        let region = |n: u64, dir| DmaRegion::new(opts.iova + n * PAGE_SIZE, 2 * PAGE_SIZE, dir);
        let sq = Arc::new(region(0, DmaDir::ToDevice)?);
        let cq = Arc::new(region(2, DmaDir::FromDevice)?);
        let data = Arc::new(region(4, DmaDir::Bidirectional)?);
        let mut mapped = Vec::new();
        for r in [&sq, &cq, &data] {
            if let Err(e) = dev.dma_map(Arc::clone(r)) {
                for iova in mapped {
                    let _ = dev.dma_unmap(iova);
                }
                return Err(e.into());
            }
            mapped.push(r.iova());
        }
        let mut nvme = Self {
            dev,
            opts,
            cap,
            version,
            sq,
            cq,
            data,
            admin: Queue::new(0, entries, 0),
            io: None,
            irqs: Vec::new(),
            io_vector: 0,
            ctrl: ControllerId {
                vendor: 0,
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                mdts: 0,
                namespaces: 0,
            },
            ns: NamespaceInfo {
                blocks: 0,
                block_size: 512,
                format: 0,
            },
            stats: Stats::default(),
            up: false,
            mapped: true,
        };
        // On failure, Drop unmaps and turns off what was turned on.
        nvme.bring_up(entries)?;
        Ok(nvme)
    }

    /// Continues driving a controller another driver left running with
    /// [`suspend_state`](Self::suspend_state): no reset, no write to CC or
    /// the admin queue registers, no `set_irqs`, nothing mapped. `res` is
    /// the target memory of the state's regions (already mapped on `dev`)
    /// and the I/O vector's eventfd (already routed); see
    /// [`NvmeState::resources`]. Of `opts`, only the timeouts apply: the
    /// layout, queue sizes and interrupt set-up are the state's.
    ///
    /// Checks first, and writes nothing if any check fails: the function is
    /// NVMe with memory decoding and bus mastering on, CAP is the state's,
    /// CC.EN and CSTS.RDY are set, CSTS.CFS and shutdown status clear, AQA,
    /// ASQ and ACQ are the state's admin queue, the regions are the
    /// state's, and the completion entry at each queue's head still has
    /// the stale phase (no completion the state does not know of). Then
    /// it writes each completion head doorbell again with the state's
    /// value (harmless, and a lost last write is made good).
    ///
    /// Stats start from zero.
    pub fn resume_from(
        dev: &'a mut D,
        state: NvmeState,
        opts: Options,
        res: Resources,
    ) -> Result<Self, NvmeError> {
        let bad = |what: String| NvmeError::Resume(what);
        state
            .validate()
            .map_err(|e| bad(format!("bad state: {e}")))?;
        let info = dev.info();
        if info.class != NVME_CLASS {
            return Err(NvmeError::NotNvme {
                vendor: info.vendor,
                device: info.device,
                class: info.class,
            });
        }
        if state.interrupts && u32::from(state.io_vector) >= dev.info().irq_count(IrqKind::Msix) {
            return Err(bad(format!(
                "msi-x vector {} but the function has {}",
                state.io_vector,
                dev.info().irq_count(IrqKind::Msix)
            )));
        }
        for (r, s, what, reads, writes) in [
            (&res.sq, state.sq, "submission", true, false),
            (&res.cq, state.cq, "completion", false, true),
            (&res.data, state.data, "data", true, true),
        ] {
            if (r.iova(), r.len()) != (s.iova, s.len) {
                return Err(bad(format!(
                    "{what} memory is {:#x}+{:#x}, the state's {:#x}+{:#x}",
                    r.iova(),
                    r.len(),
                    s.iova,
                    s.len
                )));
            }
            if (reads && !r.dir().device_reads()) || (writes && !r.dir().device_writes()) {
                return Err(bad(format!(
                    "{what} memory at {:#x} is mapped {:?}",
                    s.iova,
                    r.dir()
                )));
            }
        }
        match (&res.io_irq, state.interrupts) {
            (None, true) => {
                return Err(bad(format!(
                    "no eventfd for msi-x vector {}",
                    state.io_vector
                )))
            }
            (Some(_), false) => {
                return Err(bad(
                    "an eventfd, but the i/o queue raises no interrupts".into()
                ))
            }
            _ => {}
        }

        let mut cmd = [0u8; 2];
        dev.read(CONFIG_REGION, PCI_COMMAND, &mut cmd)?;
        let cmd = u16::from_le_bytes(cmd);
        let want = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        if cmd & want != want {
            return Err(bad(format!(
                "pci command {cmd:#06x}: memory decoding or bus mastering is off"
            )));
        }
        let cap = read_reg64(dev, reg::CAP)?;
        if cap != state.cap {
            return Err(bad(format!(
                "cap {cap:#018x}, the state's {:#018x}: another controller",
                state.cap
            )));
        }
        let cc = dev.read32(BAR0, reg::CC)?;
        let csts = dev.read32(BAR0, reg::CSTS)?;
        if cc & CC_EN == 0
            || cc & (3 << 14) != 0
            || cc & (0xff << 16) != CC_IOCQES_16 | CC_IOSQES_64
        {
            return Err(bad(format!(
                "cc {cc:#010x}: not enabled, shutting down, or other entry sizes"
            )));
        }
        if csts == u32::MAX || csts & CSTS_RDY == 0 || csts & (CSTS_CFS | CSTS_SHST_MASK) != 0 {
            return Err(bad(format!(
                "csts {csts:#010x}: not ready, fatal status or shut down"
            )));
        }
        let n = u32::from(state.admin.entries - 1);
        let aqa = dev.read32(BAR0, reg::AQA)?;
        let asq = read_reg64(dev, reg::ASQ)?;
        let acq = read_reg64(dev, reg::ACQ)?;
        if aqa & 0x0fff_0fff != n << 16 | n
            || asq & !0xfff != state.admin.sq_iova
            || acq & !0xfff != state.admin.cq_iova
        {
            return Err(bad(format!(
                "admin queue aqa {aqa:#x} asq {asq:#x} acq {acq:#x}, the state's {:#x} {:#x} {:#x}",
                n << 16 | n,
                state.admin.sq_iova,
                state.admin.cq_iova
            )));
        }
        let admin = Queue::from_state(&state.admin, &res.sq, &res.cq);
        let io = Queue::from_state(&state.io, &res.sq, &res.cq);
        for q in [&admin, &io] {
            let at = q.cq_at();
            dev.sync_for_cpu(res.cq.iova() + at, CQE_SIZE as u64)?;
            let mut b = [0u8; CQE_SIZE];
            res.cq.read(at, &mut b)?;
            let c = Completion::decode(&b);
            if c.phase == q.phase {
                return Err(bad(format!(
                    "queue {} has a completion at head {} the state does not know of (command {})",
                    q.qid, q.cq_head, c.cid
                )));
            }
        }
        let cap = Cap(cap);
        for q in [&admin, &io] {
            dev.write32(BAR0, doorbell(cap, q.qid, true), u32::from(q.cq_head))?;
        }
        Ok(Self {
            dev,
            opts,
            cap,
            version: state.version,
            sq: res.sq,
            cq: res.cq,
            data: res.data,
            admin,
            io: Some(io),
            irqs: res.io_irq.into_iter().collect(),
            io_vector: state.io_vector,
            ctrl: state.controller,
            ns: state.namespace,
            stats: Stats::default(),
            up: true,
            mapped: true,
        })
    }

    /// Ends the driver leaving the controller running for another driver
    /// ([`resume_from`](Self::resume_from)): enabled, its admin and I/O
    /// queues in place, interrupts routed, DMA mapped. Consumes any late
    /// completion of a command that timed out, and sends the posted writes
    /// ([`Device::flush`]) so that their errors show here.
    ///
    /// Refuses, handing the driver back untouched in the error, if the
    /// controller is shut down or a command is still in flight.
    pub fn suspend_state(mut self) -> Result<NvmeState, SuspendError<'a, D>> {
        if let Err(error) = self.quiesce() {
            return Err(SuspendError {
                error,
                driver: Box::new(self),
            });
        }
        let io = self.io.take().expect("quiesce checked the i/o queue");
        let state = NvmeState {
            format: STATE_FORMAT,
            cap: self.cap.0,
            version: self.version,
            doorbell_stride: self.cap.doorbell_stride(),
            sq: RegionState {
                iova: self.sq.iova(),
                len: self.sq.len(),
            },
            cq: RegionState {
                iova: self.cq.iova(),
                len: self.cq.len(),
            },
            data: RegionState {
                iova: self.data.iova(),
                len: self.data.len(),
            },
            admin: self.admin.state(&self.sq, &self.cq),
            io: io.state(&self.sq, &self.cq),
            interrupts: !self.irqs.is_empty(),
            io_vector: self.io_vector,
            max_transfer: self.max_transfer() as u64,
            controller: self.ctrl.clone(),
            namespace: self.ns,
        };
        // Handed on: the controller, its queues, interrupt routes and
        // mappings are no longer this driver's to undo, so Drop finds
        // nothing to shut down. (Its own eventfds and region references
        // go; the device keeps what it was given.)
        self.up = false;
        self.mapped = false;
        self.irqs.clear();
        Ok(state)
    }

    /// What [`suspend_state`](Self::suspend_state) needs: the controller up,
    /// no command in flight, posted writes delivered.
    fn quiesce(&mut self) -> Result<(), NvmeError> {
        let op = "suspending";
        if !self.up || self.io.is_none() {
            return Err(NvmeError::Shutdown(op));
        }
        self.on_queue(false, op, |n, q| n.reap(q, op))?;
        self.on_queue(true, op, |n, q| n.reap(q, op))?;
        self.dev.flush()?;
        Ok(())
    }

    fn bring_up(&mut self, entries: u16) -> Result<(), NvmeError> {
        self.disable()?;
        let n = u32::from(entries - 1);
        self.dev.write32(BAR0, reg::AQA, n << 16 | n)?;
        self.write_reg64(reg::ASQ, self.sq.iova())?;
        self.write_reg64(reg::ACQ, self.cq.iova())?;
        self.dev
            .write32(BAR0, reg::CC, CC_IOCQES_16 | CC_IOSQES_64 | CC_EN)?;
        self.wait_csts(CSTS_RDY, CSTS_RDY, "the controller to become ready")?;
        self.up = true;

        let (ctrl, ns) = self.identify()?;
        self.ctrl = ctrl;
        self.ns = ns;

        let granted = self.admin_cmd("set number of queues", Command::set_queue_count(1, 1))?;
        if granted.result & 0xffff == 0xffff || granted.result >> 16 == 0xffff {
            return Err(NvmeError::BadAnswer {
                op: "set number of queues",
                what: format!("result {:#x}", granted.result),
            });
        }

        let vectors = self.dev.info().irq_count(IrqKind::Msix);
        let irq = self.opts.interrupts && vectors > 0;
        if irq {
            self.io_vector = u16::from(vectors >= 2);
            let fds = (0..=self.io_vector)
                .map(|_| EventFd::new(EFD_NONBLOCK).map_err(eventfd_err("creating")))
                .collect::<Result<Vec<_>, _>>()?;
            self.dev.set_irqs(IrqKind::Msix, 0, &fds)?;
            self.irqs = fds;
        }
        let q = Queue::new(IO_QID, entries, 1);
        self.admin_cmd(
            "create i/o completion queue",
            Command::create_cq(
                IO_QID,
                entries,
                self.cq.iova() + q.cq_off,
                self.io_vector,
                irq,
            ),
        )?;
        let sq_base = self.sq.iova() + q.sq_off;
        self.io = Some(q);
        let r = self.admin_cmd(
            "create i/o submission queue",
            Command::create_sq(IO_QID, entries, sq_base, IO_QID),
        );
        if let Err(e) = r {
            let _ = self.admin_cmd(
                "delete i/o completion queue",
                Command::delete_queue(IO_QID, true),
            );
            self.io = None;
            return Err(e);
        }
        Ok(())
    }

    /// Runs Identify Controller and Identify Namespace 1 on the admin
    /// queue and returns their answers (what [`controller`](Self::controller)
    /// and [`namespace`](Self::namespace) return stays as at bring-up).
    pub fn identify(&mut self) -> Result<(ControllerId, NamespaceInfo), NvmeError> {
        let buf = self.data.iova();
        self.admin_cmd(
            "identify controller",
            Command::identify(CNS_CONTROLLER, 0, buf),
        )?;
        let ctrl = ControllerId::parse(&self.read_data(4096)?)?;
        if ctrl.namespaces < NSID {
            return Err(NvmeError::Unsupported("no namespace 1".into()));
        }
        self.admin_cmd(
            "identify namespace",
            Command::identify(CNS_NAMESPACE, NSID, buf),
        )?;
        let ns = NamespaceInfo::parse(&self.read_data(4096)?)?;
        Ok((ctrl, ns))
    }

    /// Clears CC.EN and waits for CSTS.RDY to drop.
    fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.dev.read32(BAR0, reg::CC)?;
        if cc & CC_EN != 0 {
            self.dev.write32(BAR0, reg::CC, cc & !CC_EN)?;
        }
        self.up = false;
        self.wait_csts(CSTS_RDY, 0, "the controller to become not ready")
    }

    /// Waits until `CSTS & mask == want`, for at most CAP.TO (at least
    /// 500 ms, and at least the command timeout: remote reads are slow).
    fn wait_csts(&mut self, mask: u32, want: u32, what: &'static str) -> Result<(), NvmeError> {
        let limit = self
            .cap
            .ready_timeout()
            .max(Duration::from_millis(500))
            .max(self.opts.command_timeout);
        let start = Instant::now();
        let mut nap = Duration::from_micros(50);
        loop {
            let csts = self.dev.read32(BAR0, reg::CSTS)?;
            if csts == u32::MAX {
                return Err(NvmeError::BadAnswer {
                    op: "reading csts",
                    what: "all ones: the controller is gone".into(),
                });
            }
            if csts & mask == want {
                return Ok(());
            }
            // A fatal status stops enabling; a disable may still clear it.
            if csts & CSTS_CFS != 0 && want != 0 {
                return Err(NvmeError::Fatal(what));
            }
            if start.elapsed() >= limit {
                return Err(NvmeError::Timeout {
                    what,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(10));
        }
    }

    /// Writes a 64-bit register as two 4-byte halves, low first.
    fn write_reg64(&mut self, offset: u64, value: u64) -> Result<(), NvmeError> {
        self.dev.write32(BAR0, offset, value as u32)?;
        self.dev.write32(BAR0, offset + 4, (value >> 32) as u32)?;
        Ok(())
    }

    /// `len` bytes of the data buffer, after the device wrote them.
    fn read_data(&mut self, len: usize) -> Result<Vec<u8>, NvmeError> {
        self.dev.sync_for_cpu(self.data.iova(), len as u64)?;
        let mut v = vec![0u8; len];
        self.data.read(0, &mut v)?;
        Ok(v)
    }

    /// Runs `f` with the admin queue (or with `io` the I/O queue) taken out
    /// of the driver.
    fn on_queue<T>(
        &mut self,
        io: bool,
        op: &'static str,
        f: impl FnOnce(&mut Self, &mut Queue) -> Result<T, NvmeError>,
    ) -> Result<T, NvmeError> {
        let mut q = if io {
            self.io.take().ok_or(NvmeError::Shutdown(op))?
        } else {
            std::mem::replace(&mut self.admin, Queue::new(0, 0, 0))
        };
        let r = f(self, &mut q);
        if io {
            self.io = Some(q);
        } else {
            self.admin = q;
        }
        r
    }

    fn admin_cmd(&mut self, op: &'static str, cmd: Command) -> Result<Completion, NvmeError> {
        self.on_queue(false, op, |n, q| n.run(q, op, cmd, None))
    }

    fn io_cmd(&mut self, op: &'static str, cmd: Command) -> Result<Completion, NvmeError> {
        let fd = self.irqs.len().checked_sub(1);
        self.on_queue(true, op, |n, q| n.run(q, op, cmd, fd))
    }

    /// Submits `cmd` on `q` and waits for its completion: by interrupt on
    /// `self.irqs[irq]` (looking anyway every poll interval), or by polling.
    fn run(
        &mut self,
        q: &mut Queue,
        op: &'static str,
        mut cmd: Command,
        irq: Option<usize>,
    ) -> Result<Completion, NvmeError> {
        if !self.up {
            return Err(NvmeError::Shutdown(op));
        }
        self.reap(q, op)?;
        let next_tail = (q.sq_tail + 1) % q.entries;
        if next_tail == q.sq_head {
            return Err(NvmeError::BadAnswer {
                op,
                what: "submission queue full: the controller consumes no entries".into(),
            });
        }
        if let Some(fd) = irq.and_then(|i| self.irqs.get(i)) {
            // Forget signals of earlier completions (a shared vector).
            let _ = fd.read();
        }
        cmd.cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        let off = q.sq_off + u64::from(q.sq_tail) * SQE_SIZE as u64;
        self.sq.write(off, &cmd.encode())?;
        self.dev
            .sync_for_device(self.sq.iova() + off, SQE_SIZE as u64)?;
        q.sq_tail = next_tail;
        q.in_flight = Some(cmd.cid);
        self.dev
            .write32(BAR0, doorbell(self.cap, q.qid, false), u32::from(q.sq_tail))?;

        let c = self.wait_completion(q, op, irq)?;
        self.consume(q, &c)?;
        self.stats.commands += 1;
        if c.sq_id != q.qid || c.cid != cmd.cid || c.sq_head >= q.entries {
            return Err(NvmeError::BadAnswer {
                op,
                what: format!(
                    "completion for queue {} command {} (head {}), expected queue {} command {}",
                    c.sq_id, c.cid, c.sq_head, q.qid, cmd.cid
                ),
            });
        }
        if !c.status.is_success() {
            return Err(NvmeError::Command {
                op,
                status: c.status,
            });
        }
        Ok(c)
    }

    /// Takes the completion at `q`'s head: advances the head (flipping the
    /// phase at the end of the ring) and tells the controller.
    fn consume(&mut self, q: &mut Queue, c: &Completion) -> Result<(), NvmeError> {
        q.in_flight = None;
        q.cq_head = (q.cq_head + 1) % q.entries;
        if q.cq_head == 0 {
            q.phase = !q.phase;
        }
        if c.sq_head < q.entries {
            q.sq_head = c.sq_head;
        }
        self.dev
            .write32(BAR0, doorbell(self.cap, q.qid, true), u32::from(q.cq_head))?;
        Ok(())
    }

    /// The completion entry at `q`'s head, if its phase tag says it is new.
    fn peek(&mut self, q: &Queue) -> Result<Option<Completion>, NvmeError> {
        let at = q.cq_at();
        self.dev
            .sync_for_cpu(self.cq.iova() + at, CQE_SIZE as u64)?;
        let mut b = [0u8; CQE_SIZE];
        self.cq.read(at, &mut b)?;
        let c = Completion::decode(&b);
        Ok((c.phase == q.phase).then_some(c))
    }

    /// If a command on `q` timed out earlier, consumes its completion if it
    /// has arrived since (its status is dropped: its caller had the
    /// timeout); refuses `op` if it has not.
    fn reap(&mut self, q: &mut Queue, op: &'static str) -> Result<(), NvmeError> {
        let Some(cid) = q.in_flight else {
            return Ok(());
        };
        match self.peek(q)? {
            Some(c) => self.consume(q, &c),
            None => Err(NvmeError::InFlight {
                op,
                qid: q.qid,
                cid,
            }),
        }
    }

    /// The completion entry at `q`'s head once its phase tag flips.
    fn wait_completion(
        &mut self,
        q: &Queue,
        op: &'static str,
        irq: Option<usize>,
    ) -> Result<Completion, NvmeError> {
        let start = Instant::now();
        let limit = self.opts.command_timeout;
        let mut nap = Duration::from_micros(20);
        loop {
            let left = limit.saturating_sub(start.elapsed());
            let mut woken = false;
            match irq.and_then(|i| self.irqs.get(i)) {
                Some(fd) => {
                    let wait = left.min(self.opts.irq_poll_interval);
                    // On a remote device this thread reads the connection
                    // meanwhile: the interrupt wakes it directly.
                    woken = self.dev.wait_irq(fd, wait)? > 0;
                }
                None => {
                    std::thread::sleep(nap.min(left));
                    nap = (nap * 2).min(Duration::from_millis(5));
                }
            }
            if let Some(c) = self.peek(q)? {
                if woken {
                    self.stats.by_interrupt += 1;
                } else {
                    self.stats.by_poll += 1;
                }
                return Ok(c);
            }
            if start.elapsed() >= limit {
                return Err(NvmeError::Timeout {
                    what: op,
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// The underlying device.
    pub fn device(&mut self) -> &mut D {
        self.dev
    }

    /// CAP, as read at bring-up.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// The version register (VS).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Identify Controller's answer.
    pub fn controller(&self) -> &ControllerId {
        &self.ctrl
    }

    /// Identify Namespace 1's answer.
    pub fn namespace(&self) -> &NamespaceInfo {
        &self.ns
    }

    /// What the driver did so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// True if I/O completions are signalled by MSI-X.
    pub fn uses_interrupts(&self) -> bool {
        !self.irqs.is_empty()
    }

    /// Largest transfer of one command in bytes: [`MAX_TRANSFER`], or less
    /// if the controller's MDTS says so.
    pub fn max_transfer(&self) -> usize {
        let mut max = MAX_TRANSFER as u64;
        if self.ctrl.mdts != 0 {
            let mdts = self
                .cap
                .min_page_size()
                .checked_shl(u32::from(self.ctrl.mdts))
                .unwrap_or(u64::MAX);
            max = max.min(mdts);
        }
        max as usize
    }

    fn check_range(&self, op: &'static str, lba: u64, len: usize) -> Result<u32, NvmeError> {
        let bs = self.ns.block_size as usize;
        let refuse = |why: String| NvmeError::Transfer { op, len, why };
        if len == 0 || len % bs != 0 {
            return Err(refuse(format!("not a whole number of {bs}-byte blocks")));
        }
        if len > self.max_transfer() {
            return Err(refuse(format!(
                "over this driver's {}-byte limit per command",
                self.max_transfer()
            )));
        }
        let count = (len / bs) as u64;
        if lba
            .checked_add(count)
            .is_none_or(|end| end > self.ns.blocks)
        {
            return Err(NvmeError::OutOfRange {
                op,
                lba,
                count,
                blocks: self.ns.blocks,
            });
        }
        Ok(count as u32)
    }

    /// Reads `count` blocks at `lba` of namespace 1.
    pub fn read_blocks(&mut self, lba: u64, count: u32) -> Result<Vec<u8>, NvmeError> {
        let op = "read";
        let len = (count as usize).saturating_mul(self.ns.block_size as usize);
        let blocks = self.check_range(op, lba, len)?;
        let cmd = Command::rw(false, NSID, lba, blocks, prp(self.data.iova(), len)?);
        self.io_cmd(op, cmd)?;
        self.read_data(len)
    }

    /// Writes `data` (whole blocks) at `lba` of namespace 1.
    pub fn write_blocks(&mut self, lba: u64, data: &[u8]) -> Result<(), NvmeError> {
        let op = "write";
        let blocks = self.check_range(op, lba, data.len())?;
        self.data.write(0, data)?;
        self.dev
            .sync_for_device(self.data.iova(), data.len() as u64)?;
        let cmd = Command::rw(true, NSID, lba, blocks, prp(self.data.iova(), data.len())?);
        self.io_cmd(op, cmd)?;
        Ok(())
    }

    /// Deletes the I/O queues, disables interrupts, shuts the controller
    /// down (CC.SHN, waiting for CSTS.SHST), disables it and unmaps the DMA
    /// memory. Every step is tried; the first error is returned. Later
    /// calls (and Drop) do nothing more.
    pub fn shutdown(&mut self) -> Result<(), NvmeError> {
        let mut first: Option<NvmeError> = None;
        let mut note = |r: Result<(), NvmeError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(qid) = self.io.as_ref().filter(|_| self.up).map(|q| q.qid) {
            note(
                self.admin_cmd(
                    "delete i/o submission queue",
                    Command::delete_queue(qid, false),
                )
                .map(drop),
            );
            note(
                self.admin_cmd(
                    "delete i/o completion queue",
                    Command::delete_queue(qid, true),
                )
                .map(drop),
            );
        }
        self.io = None;
        if !self.irqs.is_empty() {
            note(self.dev.set_irqs(IrqKind::Msix, 0, &[]).map_err(Into::into));
            self.irqs.clear();
        }
        if self.up {
            let r = self.dev.read32(BAR0, reg::CC).map_err(Into::into);
            note(r.and_then(|cc| {
                self.dev
                    .write32(BAR0, reg::CC, (cc & !(3 << 14)) | CC_SHN_NORMAL)?;
                self.wait_csts(CSTS_SHST_MASK, CSTS_SHST_DONE, "shutdown to complete")
            }));
            note(self.disable());
        }
        self.up = false;
        if std::mem::take(&mut self.mapped) {
            for iova in [self.sq.iova(), self.cq.iova(), self.data.iova()] {
                // Unmapped by someone else meanwhile: nothing to report.
                match self.dev.dma_unmap(iova) {
                    Err(DeviceError::Dma(DmaError::NotMapped(_))) => {}
                    r => note(r.map(drop).map_err(Into::into)),
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl<D: Device + ?Sized> Drop for Nvme<'_, D> {
    /// Shuts down what is still the driver's: everything, unless
    /// [`Nvme::shutdown`] or [`Nvme::suspend_state`] already ended it.
    fn drop(&mut self) {
        if !self.up && self.io.is_none() && self.irqs.is_empty() && !self.mapped {
            return;
        }
        // Best effort and quick: the backend resets the device on release.
        self.opts.command_timeout = self.opts.command_timeout.min(Duration::from_secs(2));
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_and_message() {
        let s = Status(0x4000 | 0x0100 | 0x01);
        assert_eq!((s.sct(), s.sc(), s.dnr()), (1, 1, true));
        assert!(!s.is_success());
        assert_eq!(
            s.to_string(),
            "status 0x4101 (sct 1, sc 0x01: invalid queue identifier, do not retry)"
        );
        assert!(Status(0).is_success());
        assert_eq!(Status(0x3ff).to_string(), "status 0x03ff (sct 3, sc 0xff)");
    }

    #[test]
    fn command_error_names_the_operation() {
        let e = NvmeError::Command {
            op: "write",
            status: Status(0x80),
        };
        assert_eq!(
            e.to_string(),
            "write failed: status 0x0080 (sct 0, sc 0x80: lba out of range)"
        );
    }

    #[test]
    fn cap_fields() {
        // QEMU's nvme: MQES 0x7ff, CQR, TO 0xf, DSTRD 0, CSS NVM, MPSMAX 4.
        let cap = Cap(0x0040_0020_0f01_07ff);
        assert_eq!(cap.max_queue_entries(), 0x800);
        assert_eq!(cap.ready_timeout(), Duration::from_millis(7500));
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.min_page_size(), 4096);
        let wide = Cap(2 << 32 | 1 << 48);
        assert_eq!(wide.doorbell_stride(), 16);
        assert_eq!(wide.min_page_size(), 8192);
        assert!(!wide.nvm_command_set());
    }

    #[test]
    fn doorbells_follow_the_stride() {
        let cap = Cap(0);
        assert_eq!(doorbell(cap, 0, false), 0x1000);
        assert_eq!(doorbell(cap, 0, true), 0x1004);
        assert_eq!(doorbell(cap, 1, false), 0x1008);
        assert_eq!(doorbell(cap, 1, true), 0x100c);
        let cap = Cap(1 << 32);
        assert_eq!(doorbell(cap, 1, true), 0x1000 + 3 * 8);
    }

    #[test]
    fn command_encoding() {
        let mut c = Command::rw(true, 1, 0x1_2345_6789, 8, (0x20_4000, 0x20_5000));
        c.cid = 0xbeef;
        let b = c.encode();
        assert_eq!(b[0], nvm::WRITE);
        assert_eq!(&b[2..4], &[0xef, 0xbe]);
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..24], &[0; 16]);
        assert_eq!(&b[24..32], &0x20_4000u64.to_le_bytes());
        assert_eq!(&b[32..40], &0x20_5000u64.to_le_bytes());
        assert_eq!(&b[40..44], &0x2345_6789u32.to_le_bytes());
        assert_eq!(&b[44..48], &1u32.to_le_bytes());
        assert_eq!(&b[48..52], &7u32.to_le_bytes(), "NLB is zero-based");

        let cq = Command::create_cq(1, 32, 0x20_3000, 1, true);
        assert_eq!(cq.opcode, 0x05);
        assert_eq!(cq.cdw[0], 31 << 16 | 1);
        assert_eq!(cq.cdw[1], 1 << 16 | 0b11, "vector 1, IEN, PC");
        assert_eq!(Command::create_cq(1, 2, 0, 0, false).cdw[1], 1);
        let sq = Command::create_sq(1, 32, 0x20_1000, 1);
        assert_eq!(
            (sq.opcode, sq.cdw[0], sq.cdw[1]),
            (0x01, 31 << 16 | 1, 1 << 16 | 1)
        );
        assert_eq!(Command::delete_queue(1, false).opcode, 0x00);
        assert_eq!(Command::delete_queue(1, true).opcode, 0x04);
        let id = Command::identify(0, 1, 0x20_4000);
        assert_eq!((id.opcode, id.nsid, id.cdw[0]), (0x06, 1, 0));
        assert_eq!(Command::set_queue_count(1, 1).cdw[..2], [7, 0]);
    }

    #[test]
    fn completion_decoding() {
        let mut b = [0u8; CQE_SIZE];
        b[0..4].copy_from_slice(&0x1234u32.to_le_bytes());
        b[8..12].copy_from_slice(&(3u32 << 16 | 17).to_le_bytes());
        let status = 0x4002u32; // DNR, invalid field
        b[12..16].copy_from_slice(&(status << 17 | 1 << 16 | 42).to_le_bytes());
        let c = Completion::decode(&b);
        assert_eq!(c.result, 0x1234);
        assert_eq!((c.sq_id, c.sq_head, c.cid), (3, 17, 42));
        assert!(c.phase);
        assert_eq!(c.status, Status(0x4002));
        assert_eq!(c.status.name(), Some("invalid field in command"));
        assert!(!Completion::decode(&[0; CQE_SIZE]).phase);
    }

    #[test]
    fn prp_entries() {
        assert_eq!(prp(0x4000, 512).unwrap(), (0x4000, 0));
        assert_eq!(prp(0x4000, 4096).unwrap(), (0x4000, 0));
        assert_eq!(prp(0x4000, 4097).unwrap(), (0x4000, 0x5000));
        assert_eq!(prp(0x4000, 8192).unwrap(), (0x4000, 0x5000));
        assert_eq!(prp(0x4e00, 1024).unwrap(), (0x4e00, 0x5000));
        assert_eq!(prp(0x4e00, 4608).unwrap(), (0x4e00, 0x5000));
        assert!(prp(0x4e00, 4609)
            .unwrap_err()
            .to_string()
            .contains("prp lists"));
        assert!(prp(0x4000, 8193).is_err());
        assert!(prp(0x4000, 0).is_err());
        assert!(prp(0x4001, 16).is_err());
    }

    fn put(b: &mut [u8], at: usize, s: &[u8]) {
        b[at..at + s.len()].copy_from_slice(s);
    }

    #[test]
    fn identify_controller_strings_are_trimmed() {
        let mut b = vec![0u8; 4096];
        put(&mut b, 0, &0x1b36u16.to_le_bytes());
        put(&mut b, 4, b"cio-nvme-1          ");
        put(&mut b, 24, format!("{:<40}", "QEMU NVMe Ctrl").as_bytes());
        put(&mut b, 64, b"7.2.0\0\0\0");
        b[77] = 7;
        put(&mut b, 516, &256u32.to_le_bytes());
        let c = ControllerId::parse(&b).unwrap();
        assert_eq!(c.vendor, 0x1b36);
        assert_eq!(c.serial, "cio-nvme-1");
        assert_eq!(c.model, "QEMU NVMe Ctrl");
        assert_eq!(c.firmware, "7.2.0");
        assert_eq!((c.mdts, c.namespaces), (7, 256));
        assert!(ControllerId::parse(&b[..100]).is_err());
    }

    #[test]
    fn identify_namespace_uses_the_selected_format() {
        let mut b = vec![0u8; 4096];
        put(&mut b, 0, &2048u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // the second
        b[128 + 2] = 9;
        b[132 + 2] = 12;
        let ns = NamespaceInfo::parse(&b).unwrap();
        assert_eq!((ns.blocks, ns.block_size, ns.format), (2048, 4096, 1));
        assert_eq!(ns.bytes(), 8 << 20);
        b[26] = 2; // not offered
        assert!(NamespaceInfo::parse(&b).is_err());
        b[26] = 0;
        b[128 + 2] = 3; // nonsense block size
        let e = NamespaceInfo::parse(&b).unwrap_err().to_string();
        assert!(e.starts_with("bad answer to identify namespace"), "{e}");
    }

    /// An in-process NVMe controller, just enough for the driver: registers,
    /// admin and one I/O queue pair, identify, read/write on a RAM disk.
    /// It DMAs straight into the mapped regions (so syncs are no-ops).
    mod fake {
        use super::*;
        use cio_core::device::{REGION_READ, REGION_WRITE, WIDTH_4};
        use cio_core::{DeviceInfo, IrqInfo, RegionInfo, RegionKind};

        pub const BLOCK: usize = 512;
        pub const BLOCKS: u64 = 64;

        /// (base, entries, tail, phase, vector if interrupts).
        type FakeCq = (u64, u16, u16, bool, Option<u16>);

        #[derive(Debug)]
        pub struct Fake {
            info: DeviceInfo,
            pub config_command: u16,
            cc: u32,
            csts: u32,
            aqa: u32,
            asq: u64,
            acq: u64,
            maps: Vec<Arc<DmaRegion>>,
            irqs: Vec<EventFd>,
            /// (base, entries, head) per submission queue id.
            sqs: [Option<(u64, u16, u16)>; 2],
            cqs: [Option<FakeCq>; 2],
            pub disk: Vec<u8>,
            /// Fail the next I/O command with this status.
            pub fail_next_io: Option<u16>,
            /// Never complete commands.
            pub mute: bool,
            pub log: Vec<String>,
            /// Register writes of any kind (doorbells included).
            pub writes: usize,
            /// Writes of CC, and of AQA/ASQ/ACQ.
            pub cc_writes: usize,
            pub admin_reg_writes: usize,
            /// Calls of set_irqs, dma_map, dma_unmap and reset.
            pub set_irqs_calls: usize,
            pub dma_maps: usize,
            pub dma_unmaps: usize,
            pub resets: usize,
        }

        impl Fake {
            pub fn new(msix: u32) -> Self {
                let mut irqs = vec![];
                if msix > 0 {
                    irqs.push(IrqInfo {
                        kind: IrqKind::Msix,
                        count: msix,
                    });
                }
                Self {
                    info: DeviceInfo {
                        name: "fake-nvme".into(),
                        vendor: 0x1b36,
                        device: 0x0010,
                        subsystem_vendor: 0,
                        subsystem_device: 0,
                        class: NVME_CLASS,
                        revision: 2,
                        regions: vec![
                            RegionInfo {
                                index: 0,
                                kind: RegionKind::Mmio,
                                size: 0x4000,
                                flags: REGION_READ | REGION_WRITE,
                                widths: WIDTH_4,
                            },
                            RegionInfo {
                                index: CONFIG_REGION,
                                kind: RegionKind::Config,
                                size: 256,
                                flags: REGION_READ | REGION_WRITE,
                                widths: 0b111,
                            },
                        ],
                        irqs,
                        reset: cio_core::ResetMethod::Full,
                    },
                    config_command: 0,
                    cc: 0,
                    csts: 0,
                    aqa: 0,
                    asq: 0,
                    acq: 0,
                    maps: vec![],
                    irqs: vec![],
                    sqs: [None, None],
                    cqs: [None, None],
                    disk: vec![0; BLOCK * BLOCKS as usize],
                    fail_next_io: None,
                    mute: false,
                    log: vec![],
                    writes: 0,
                    cc_writes: 0,
                    admin_reg_writes: 0,
                    set_irqs_calls: 0,
                    dma_maps: 0,
                    dma_unmaps: 0,
                    resets: 0,
                }
            }

            fn dma(&self, iova: u64, len: usize) -> (&Arc<DmaRegion>, u64) {
                let r = self
                    .maps
                    .iter()
                    .find(|r| r.iova() <= iova && iova + len as u64 <= r.iova() + r.len())
                    .unwrap_or_else(|| panic!("dma to unmapped {iova:#x}+{len}"));
                (r, iova - r.iova())
            }

            fn dma_read(&self, iova: u64, buf: &mut [u8]) {
                let (r, off) = self.dma(iova, buf.len());
                assert!(r.dir().device_reads(), "device read of {iova:#x}");
                r.read(off, buf).unwrap();
            }

            fn dma_write(&self, iova: u64, data: &[u8]) {
                let (r, off) = self.dma(iova, data.len());
                assert!(r.dir().device_writes(), "device write of {iova:#x}");
                r.write(off, data).unwrap();
            }

            /// Reads `len` bytes of a PRP1/PRP2 transfer.
            fn prp_range(prp1: u64, prp2: u64, len: usize) -> Vec<(u64, usize)> {
                let first = (PAGE_SIZE - prp1 % PAGE_SIZE) as usize;
                if len <= first {
                    vec![(prp1, len)]
                } else {
                    assert!(len - first <= PAGE_SIZE as usize, "prp list needed");
                    vec![(prp1, first), (prp2, len - first)]
                }
            }

            fn reg_write(&mut self, off: u64, v: u32) {
                if (reg::AQA..reg::ACQ + 8).contains(&off) {
                    self.admin_reg_writes += 1;
                }
                match off {
                    reg::CC => {
                        self.cc_writes += 1;
                        let was = self.cc;
                        self.cc = v;
                        if v & CC_EN != 0 && was & CC_EN == 0 {
                            assert!(self.asq != 0 && self.acq != 0 && self.aqa != 0);
                            assert_eq!(v & (0xff << 16), CC_IOCQES_16 | CC_IOSQES_64);
                            let n = (self.aqa & 0xfff) as u16 + 1;
                            self.sqs[0] = Some((self.asq, n, 0));
                            let m = ((self.aqa >> 16) & 0xfff) as u16 + 1;
                            self.cqs[0] = Some((self.acq, m, 0, true, Some(0)));
                            self.csts = CSTS_RDY;
                        } else if v & CC_EN == 0 {
                            self.sqs = [None, None];
                            self.cqs = [None, None];
                            self.csts &= !CSTS_RDY;
                        }
                        if v & (3 << 14) == CC_SHN_NORMAL {
                            self.csts |= CSTS_SHST_DONE;
                        }
                    }
                    reg::AQA => self.aqa = v,
                    o if o == reg::ASQ => self.asq = self.asq & !0xffff_ffff | u64::from(v),
                    o if o == reg::ASQ + 4 => {
                        self.asq = self.asq & 0xffff_ffff | u64::from(v) << 32
                    }
                    o if o == reg::ACQ => self.acq = self.acq & !0xffff_ffff | u64::from(v),
                    o if o == reg::ACQ + 4 => {
                        self.acq = self.acq & 0xffff_ffff | u64::from(v) << 32
                    }
                    o if o >= reg::DOORBELLS => {
                        let i = (o - reg::DOORBELLS) / 4;
                        let (qid, cq) = ((i / 2) as usize, i % 2 == 1);
                        if !cq {
                            self.process(qid, v as u16);
                        }
                    }
                    o => panic!("write of {v:#x} to register {o:#x}"),
                }
            }

            fn process(&mut self, qid: usize, tail: u16) {
                if self.mute {
                    return;
                }
                let (base, n, mut head) = self.sqs[qid].expect("doorbell of a live queue");
                while head != tail {
                    let mut e = [0u8; SQE_SIZE];
                    self.dma_read(base + u64::from(head) * SQE_SIZE as u64, &mut e);
                    head = (head + 1) % n;
                    self.sqs[qid] = Some((base, n, head));
                    let (status, result) = self.execute(qid, &e);
                    let cid = u16::from_le_bytes([e[2], e[3]]);
                    self.complete(qid, head, cid, status, result);
                }
            }

            fn complete(&mut self, qid: usize, sq_head: u16, cid: u16, status: u16, result: u32) {
                let (base, n, tail, phase, vector) = self.cqs[qid].expect("cq of the sq");
                let mut c = [0u8; CQE_SIZE];
                c[0..4].copy_from_slice(&result.to_le_bytes());
                c[8..12].copy_from_slice(&(u32::from(sq_head) | (qid as u32) << 16).to_le_bytes());
                let dw3 = u32::from(cid) | u32::from(phase) << 16 | u32::from(status) << 17;
                c[12..16].copy_from_slice(&dw3.to_le_bytes());
                self.dma_write(base + u64::from(tail) * CQE_SIZE as u64, &c);
                let tail = (tail + 1) % n;
                let phase = if tail == 0 { !phase } else { phase };
                self.cqs[qid] = Some((base, n, tail, phase, vector));
                if let Some(fd) = vector.and_then(|v| self.irqs.get(usize::from(v))) {
                    fd.write(1).unwrap();
                }
            }

            fn execute(&mut self, qid: usize, e: &[u8; SQE_SIZE]) -> (u16, u32) {
                let dw = |i: usize| u32::from_le_bytes(e[4 * i..4 * i + 4].try_into().unwrap());
                let qw = |i: usize| u64::from(dw(i)) | u64::from(dw(i + 1)) << 32;
                let (op, nsid, prp1, prp2) = (e[0], dw(1), qw(6), qw(8));
                self.log.push(format!("q{qid} op {op:#04x}"));
                if qid == 0 {
                    match op {
                        admin::IDENTIFY => {
                            let mut b = vec![0u8; 4096];
                            match dw(10) {
                                CNS_CONTROLLER => {
                                    b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                                    b[4..24].copy_from_slice(b"fake-serial         ");
                                    b[24..64].copy_from_slice(&[b' '; 40]);
                                    b[24..33].copy_from_slice(b"Fake NVMe");
                                    b[64..72].copy_from_slice(b"1.0     ");
                                    b[77] = 1; // 8 KiB
                                    b[516] = 1;
                                }
                                CNS_NAMESPACE if nsid == 1 => {
                                    b[0..8].copy_from_slice(&BLOCKS.to_le_bytes());
                                    b[128 + 2] = 9;
                                }
                                _ => return (0x0b, 0),
                            }
                            self.dma_write(prp1, &b);
                            (0, 0)
                        }
                        admin::SET_FEATURES => (0, 0x0003_0003),
                        admin::CREATE_CQ => {
                            let (id, n) = ((dw(10) & 0xffff) as usize, (dw(10) >> 16) as u16 + 1);
                            if id != 1 || self.cqs[1].is_some() {
                                return (0x101, 0);
                            }
                            let ien = dw(11) & 2 != 0;
                            let vector = (dw(11) >> 16) as u16;
                            if ien && u32::from(vector) >= self.info.irq_count(IrqKind::Msix) {
                                return (0x108, 0);
                            }
                            self.cqs[1] = Some((prp1, n, 0, true, ien.then_some(vector)));
                            (0, 0)
                        }
                        admin::CREATE_SQ => {
                            let (id, n) = ((dw(10) & 0xffff) as usize, (dw(10) >> 16) as u16 + 1);
                            if id != 1 || self.cqs[1].is_none() || dw(11) >> 16 != 1 {
                                return (0x101, 0);
                            }
                            self.sqs[1] = Some((prp1, n, 0));
                            (0, 0)
                        }
                        admin::DELETE_SQ => {
                            self.sqs[1] = None;
                            (0, 0)
                        }
                        admin::DELETE_CQ => {
                            if self.sqs[1].is_some() {
                                return (0x10c, 0);
                            }
                            self.cqs[1] = None;
                            (0, 0)
                        }
                        _ => (0x01, 0),
                    }
                } else {
                    if let Some(s) = self.fail_next_io.take() {
                        return (s, 0);
                    }
                    let lba = qw(10);
                    let len = ((dw(12) & 0xffff) as usize + 1) * BLOCK;
                    if nsid != 1 || lba + (len / BLOCK) as u64 > BLOCKS {
                        return (0x80, 0);
                    }
                    let mut at = lba as usize * BLOCK;
                    for (iova, n) in Self::prp_range(prp1, prp2, len) {
                        if op == nvm::WRITE {
                            let mut b = vec![0u8; n];
                            self.dma_read(iova, &mut b);
                            self.disk[at..at + n].copy_from_slice(&b);
                        } else {
                            let b = self.disk[at..at + n].to_vec();
                            self.dma_write(iova, &b);
                        }
                        at += n;
                    }
                    (0, 0)
                }
            }
        }

        impl Device for Fake {
            fn info(&self) -> &DeviceInfo {
                &self.info
            }

            fn read(
                &mut self,
                region: u32,
                offset: u64,
                data: &mut [u8],
            ) -> Result<(), DeviceError> {
                self.info.check_access(region, offset, data.len(), false)?;
                let v: u32 = match (region, offset) {
                    (CONFIG_REGION, PCI_COMMAND) => u32::from(self.config_command),
                    (CONFIG_REGION, _) => 0,
                    (_, reg::CAP) => 0x0f01_001f, // MQES 31, TO 7.5 s
                    (_, o) if o == reg::CAP + 4 => 0x0000_0020, // CSS NVM
                    (_, reg::VS) => 0x0001_0400,
                    (_, reg::CC) => self.cc,
                    (_, reg::CSTS) => self.csts,
                    (_, reg::AQA) => self.aqa,
                    (_, o) if o == reg::ASQ => self.asq as u32,
                    (_, o) if o == reg::ASQ + 4 => (self.asq >> 32) as u32,
                    (_, o) if o == reg::ACQ => self.acq as u32,
                    (_, o) if o == reg::ACQ + 4 => (self.acq >> 32) as u32,
                    _ => 0,
                };
                data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
                Ok(())
            }

            fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
                self.info.check_access(region, offset, data.len(), true)?;
                self.writes += 1;
                if region == CONFIG_REGION {
                    assert_eq!((offset, data.len()), (PCI_COMMAND, 2));
                    self.config_command = u16::from_le_bytes([data[0], data[1]]);
                    return Ok(());
                }
                self.reg_write(offset, u32::from_le_bytes(data.try_into().unwrap()));
                Ok(())
            }

            fn set_irqs(
                &mut self,
                kind: IrqKind,
                start: u32,
                fds: &[EventFd],
            ) -> Result<(), DeviceError> {
                assert_eq!((kind, start), (IrqKind::Msix, 0));
                self.set_irqs_calls += 1;
                self.irqs = fds.iter().map(|f| f.try_clone().unwrap()).collect();
                Ok(())
            }

            fn unmask_intx(&mut self) -> Result<(), DeviceError> {
                Ok(())
            }

            fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
                self.dma_maps += 1;
                self.maps.push(region);
                Ok(())
            }

            fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
                self.dma_unmaps += 1;
                let i = self
                    .maps
                    .iter()
                    .position(|r| r.iova() == iova)
                    .ok_or(DmaError::NotMapped(iova))?;
                Ok(self.maps.remove(i))
            }

            fn reset(&mut self) -> Result<(), DeviceError> {
                self.resets += 1;
                Ok(())
            }
        }

        impl Fake {
            pub fn set_class(&mut self, class: u32) {
                self.info.class = class;
            }

            pub fn mapped(&self) -> usize {
                self.maps.len()
            }

            /// The mapping at `iova`, as a device's owner would look it up.
            pub fn region(&self, iova: u64) -> Option<Arc<DmaRegion>> {
                self.maps.iter().find(|r| r.iova() == iova).cloned()
            }

            /// A duplicate of the eventfd MSI-X `vector` signals.
            pub fn irq(&self, vector: u32) -> Option<EventFd> {
                self.irqs
                    .get(vector as usize)
                    .map(|f| f.try_clone().unwrap())
            }

            /// Everything that would undo or redo the controller's set-up.
            pub fn setup_writes(&self) -> [usize; 6] {
                [
                    self.cc_writes,
                    self.admin_reg_writes,
                    self.set_irqs_calls,
                    self.dma_maps,
                    self.dma_unmaps,
                    self.resets,
                ]
            }

            pub fn irqs_enabled(&self) -> usize {
                self.irqs.len()
            }

            pub fn io_queues(&self) -> (bool, bool) {
                (self.sqs[1].is_some(), self.cqs[1].is_some())
            }

            pub fn shut_down(&self) -> bool {
                self.csts & CSTS_SHST_MASK == CSTS_SHST_DONE || self.cc & CC_EN == 0
            }
        }
    }

    fn opts() -> Options {
        Options {
            command_timeout: Duration::from_secs(5),
            ..Options::default()
        }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn brings_up_identifies_and_moves_blocks_by_interrupt() {
        let mut dev = fake::Fake::new(2);
        let mut nvme = Nvme::new(&mut dev, opts()).unwrap();
        assert_eq!(nvme.controller().serial, "fake-serial");
        assert_eq!(nvme.controller().model, "Fake NVMe");
        assert_eq!(nvme.controller().firmware, "1.0");
        assert_eq!(nvme.namespace().blocks, fake::BLOCKS);
        assert_eq!(nvme.namespace().block_size, 512);
        assert_eq!(nvme.max_transfer(), 8192);
        assert!(nvme.uses_interrupts());

        let a = pattern(1, 8192);
        nvme.write_blocks(3, &a).unwrap();
        let b = pattern(2, 512);
        nvme.write_blocks(40, &b).unwrap();
        assert_eq!(nvme.read_blocks(3, 16).unwrap(), a);
        assert_eq!(nvme.read_blocks(40, 1).unwrap(), b);
        // Around the 32-entry rings more than once: the phase flips.
        for i in 0..70u64 {
            let d = pattern(i + 10, 512);
            nvme.write_blocks(i % fake::BLOCKS, &d).unwrap();
            assert_eq!(nvme.read_blocks(i % fake::BLOCKS, 1).unwrap(), d);
        }
        let s = nvme.stats();
        assert_eq!(
            s.by_interrupt, 144,
            "every I/O completion by interrupt: {s:?}"
        );
        nvme.shutdown().unwrap();
        drop(nvme);

        // The last write of the loop (i = 69) went to block 5.
        assert_eq!(dev.disk[5 * 512..6 * 512], pattern(79, 512));
        assert_eq!(dev.config_command & 0x6, 0x6, "memory and bus master on");
        assert_eq!(dev.mapped(), 0, "all dma unmapped");
        assert_eq!(dev.irqs_enabled(), 0);
        assert_eq!(dev.io_queues(), (false, false));
        assert!(dev.shut_down());
    }

    #[test]
    fn polls_without_msix_and_uses_vector_zero_with_one() {
        let mut dev = fake::Fake::new(0);
        let mut nvme = Nvme::new(&mut dev, opts()).unwrap();
        assert!(!nvme.uses_interrupts());
        nvme.write_blocks(0, &[7; 512]).unwrap();
        assert_eq!(nvme.read_blocks(0, 1).unwrap(), vec![7; 512]);
        assert_eq!(nvme.stats().by_interrupt, 0);
        drop(nvme);

        let mut dev = fake::Fake::new(1);
        let mut nvme = Nvme::new(&mut dev, opts()).unwrap();
        nvme.write_blocks(0, &[9; 1024]).unwrap();
        assert_eq!(nvme.stats().by_interrupt, 1);
        drop(nvme);
        assert_eq!(dev.mapped(), 0, "drop cleans up");
        assert_eq!(dev.io_queues(), (false, false));
    }

    #[test]
    fn refuses_bad_transfers_before_the_device_sees_them() {
        let mut dev = fake::Fake::new(2);
        let mut nvme = Nvme::new(&mut dev, opts()).unwrap();
        let e = nvme.write_blocks(0, &[0; 100]).unwrap_err();
        assert!(
            e.to_string().contains("whole number of 512-byte blocks"),
            "{e}"
        );
        let e = nvme.read_blocks(0, 17).unwrap_err();
        assert!(e.to_string().contains("8192-byte limit"), "{e}");
        let e = nvme.read_blocks(fake::BLOCKS - 1, 2).unwrap_err();
        assert!(matches!(e, NvmeError::OutOfRange { count: 2, .. }), "{e}");
        assert!(nvme.read_blocks(0, 0).is_err());
        let before = nvme.stats().commands;
        assert!(nvme.read_blocks(u64::MAX, 1).is_err());
        assert_eq!(nvme.stats().commands, before);
    }

    #[test]
    fn error_status_is_reported_and_the_queue_stays_usable() {
        let mut dev = fake::Fake::new(2);
        let mut nvme = Nvme::new(&mut dev, opts()).unwrap();
        nvme.device().fail_next_io = Some(0x4281); // DNR, media: unrecovered read
        let e = nvme.read_blocks(1, 1).unwrap_err();
        assert!(matches!(e, NvmeError::Command { op: "read", status } if status.sct() == 2));
        assert!(e.to_string().starts_with("read failed: "), "{e}");
        assert!(e.to_string().contains("unrecovered read error"), "{e}");
        nvme.write_blocks(1, &[1; 512]).unwrap();
        assert_eq!(nvme.read_blocks(1, 1).unwrap(), vec![1; 512]);
    }

    #[test]
    fn a_silent_controller_times_out() {
        let mut dev = fake::Fake::new(2);
        let mut nvme = Nvme::new(
            &mut dev,
            Options {
                command_timeout: Duration::from_millis(300),
                irq_poll_interval: Duration::from_millis(50),
                ..Options::default()
            },
        )
        .unwrap();
        nvme.device().mute = true;
        let start = Instant::now();
        let e = nvme.read_blocks(0, 1).unwrap_err();
        assert!(matches!(e, NvmeError::Timeout { what: "read", .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn refuses_a_function_that_is_not_nvme() {
        let mut dev = fake::Fake::new(2);
        dev.set_class(0x00ff_0000);
        let e = Nvme::new(&mut dev, opts()).unwrap_err();
        assert!(
            matches!(
                e,
                NvmeError::NotNvme {
                    class: 0x00ff_0000,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(dev.config_command, 0, "nothing touched");
        assert_eq!(dev.mapped(), 0);
    }

    /// Brings a fake controller up, does `ios` writes and reads, and
    /// suspends the driver.
    fn suspended(dev: &mut fake::Fake, ios: u64) -> NvmeState {
        let mut nvme = Nvme::new(dev, opts()).unwrap();
        for i in 0..ios {
            nvme.write_blocks(i, &pattern(i, 512)).unwrap();
            assert_eq!(nvme.read_blocks(i, 1).unwrap(), pattern(i, 512));
        }
        nvme.suspend_state().unwrap()
    }

    #[test]
    fn state_round_trips_as_text_and_bad_text_is_refused() {
        let mut dev = fake::Fake::new(2);
        let state = suspended(&mut dev, 3);
        let text = state.to_text();
        assert_eq!(NvmeState::from_text(&text).unwrap(), state);
        assert!(text.contains("\"sq_tail\": 6"), "{text}");
        assert_eq!(state.controller.serial, "fake-serial");
        assert_eq!((state.namespace.blocks, state.max_transfer), (64, 8192));
        assert_eq!((state.interrupts, state.io_vector), (true, 1));
        let q = state.io;
        assert_eq!(
            (q.qid, q.entries, q.sq_tail, q.sq_head, q.cq_head, q.phase, q.next_cid),
            (1, 32, 6, 6, 6, true, 6)
        );
        assert_eq!((state.admin.sq_tail, state.admin.next_cid), (5, 5));
        assert_eq!(state.sq.iova + PAGE_SIZE, state.io.sq_iova);

        let path = std::env::temp_dir().join(format!("cio-nvme-state-{}", std::process::id()));
        state.save(&path).unwrap();
        let back = NvmeState::load(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(back.unwrap(), state);
        let e = NvmeState::load(&path).unwrap_err().to_string();
        assert!(e.starts_with("reading nvme state: "), "{e}");

        let e = NvmeState::from_text("{").unwrap_err().to_string();
        assert!(e.starts_with("parsing nvme state: "), "{e}");
        for (bad, why) in [
            (text.replace("\"format\": 1", "\"format\": 2"), "format 2"),
            (
                text.replace("\"cq_head\": 6", "\"cq_head\": 32"),
                "past 32 entries",
            ),
            (
                text.replace("\"doorbell_stride\": 4", "\"doorbell_stride\": 8"),
                "doorbell stride",
            ),
            (
                text.replace("\"max_transfer\": 8192", "\"max_transfer\": 16384"),
                "transfers of 16384",
            ),
        ] {
            assert_ne!(bad, text, "{why}");
            let e = NvmeState::from_text(&bad).unwrap_err().to_string();
            assert!(
                e.starts_with("parsing nvme state: ") && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn suspends_and_resumes_on_the_running_controller() {
        let mut dev = fake::Fake::new(2);
        let state = suspended(&mut dev, 10);
        // Nothing undone: still enabled, queues, interrupts and mappings on.
        assert_eq!(dev.mapped(), 3);
        assert_eq!(dev.irqs_enabled(), 2);
        assert_eq!(dev.io_queues(), (true, true));
        assert!(!dev.shut_down());
        let setup = dev.setup_writes();
        assert_eq!(
            setup,
            [1, 5, 1, 3, 0, 0],
            "cc (enable), aqa/asq/acq, irqs, maps"
        );

        let state = NvmeState::from_text(&state.to_text()).unwrap();
        let res = state
            .resources(|iova| dev.region(iova), |v| dev.irq(v))
            .unwrap();
        let mut nvme = Nvme::resume_from(&mut dev, state, opts(), res).unwrap();
        assert!(nvme.uses_interrupts());
        assert_eq!(nvme.controller().serial, "fake-serial");
        assert_eq!(nvme.namespace().blocks, fake::BLOCKS);
        assert_eq!(nvme.max_transfer(), 8192);
        // The admin queue goes on where it was.
        let (ctrl, ns) = nvme.identify().unwrap();
        assert_eq!(
            (ctrl.model.as_str(), ns.blocks),
            ("Fake NVMe", fake::BLOCKS)
        );
        for i in 0..10 {
            assert_eq!(nvme.read_blocks(i, 1).unwrap(), pattern(i, 512));
        }
        // 20 I/O commands before, 10 + 80 after: around the 32-entry
        // rings more than twice, the phase flipping each time.
        for i in 0..40u64 {
            let d = pattern(i + 100, 1024);
            let lba = (i * 2) % fake::BLOCKS;
            nvme.write_blocks(lba, &d).unwrap();
            assert_eq!(nvme.read_blocks(lba, 2).unwrap(), d);
        }
        let s = nvme.stats();
        assert_eq!((s.commands, s.by_interrupt), (92, 90), "{s:?}");
        assert_eq!(
            nvme.device().setup_writes(),
            setup,
            "no reset, cc, admin queue or interrupt set-up"
        );
        nvme.shutdown().unwrap();
        drop(nvme);
        assert_eq!(dev.mapped(), 0, "all dma unmapped");
        assert_eq!(dev.irqs_enabled(), 0);
        assert_eq!(dev.io_queues(), (false, false));
        assert!(dev.shut_down());
    }

    #[test]
    fn resume_refuses_what_does_not_match_and_writes_nothing() {
        let mut dev = fake::Fake::new(2);
        let state = suspended(&mut dev, 2);
        let res = |dev: &fake::Fake, s: &NvmeState| {
            s.resources(|iova| dev.region(iova), |v| dev.irq(v))
                .unwrap()
        };
        let mut stale = state.clone();
        stale.io.cq_head -= 1;
        stale.io.sq_tail -= 1;
        let mut other = state.clone();
        other.cap ^= 1 << 56;
        let mut polled = state.clone();
        polled.interrupts = false;
        let mut wrong_sq = res(&dev, &state);
        wrong_sq.sq = Arc::clone(&wrong_sq.data);
        let mut no_irq = res(&dev, &state);
        no_irq.io_irq = None;
        let cases = [
            (stale.clone(), res(&dev, &stale), "a completion at head 3"),
            (other.clone(), res(&dev, &other), "another controller"),
            (state.clone(), wrong_sq, "submission memory is 0x204000"),
            (state.clone(), no_irq, "no eventfd for msi-x vector 1"),
            (polled.clone(), res(&dev, &state), "raises no interrupts"),
        ];
        let writes = dev.writes;
        for (s, r, why) in cases {
            let e = Nvme::resume_from(&mut dev, s, opts(), r).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, NvmeError::Resume(_)), "{e:?}");
            assert!(
                msg.starts_with("resuming from the saved state: ") && msg.contains(why),
                "{msg}"
            );
            assert_eq!(dev.writes, writes, "nothing written: {msg}");
        }
        assert_eq!(dev.mapped(), 3, "nothing unmapped");
        let r = res(&dev, &state);
        let mut nvme = Nvme::resume_from(&mut dev, state, opts(), r).unwrap();
        assert_eq!(nvme.read_blocks(1, 1).unwrap(), pattern(1, 512));
    }

    #[test]
    fn suspend_refuses_with_a_command_in_flight_and_hands_the_driver_back() {
        let mut dev = fake::Fake::new(2);
        {
            let mut nvme = Nvme::new(
                &mut dev,
                Options {
                    command_timeout: Duration::from_millis(200),
                    irq_poll_interval: Duration::from_millis(50),
                    ..Options::default()
                },
            )
            .unwrap();
            nvme.write_blocks(0, &[3; 512]).unwrap();
            nvme.device().mute = true;
            let e = nvme.read_blocks(0, 1).unwrap_err();
            assert!(matches!(e, NvmeError::Timeout { what: "read", .. }), "{e}");
            // Nothing more goes on the queue while the command is out.
            let e = nvme.read_blocks(0, 1).unwrap_err();
            assert_eq!(
                e.to_string(),
                "read: command 1 on queue 1 is still in flight"
            );
            let refused = nvme.suspend_state().unwrap_err();
            assert_eq!(
                refused.to_string(),
                "suspending: command 1 on queue 1 is still in flight"
            );
            let mut nvme = refused.driver;
            // The controller gets to it late (the fake takes entries up to
            // the tail on a doorbell): the late completion is consumed.
            nvme.device().mute = false;
            let tail_doorbell = doorbell(nvme.cap(), IO_QID, false);
            nvme.device().write32(BAR0, tail_doorbell, 2).unwrap();
            assert_eq!(nvme.read_blocks(0, 1).unwrap(), vec![3; 512]);

            nvme.device().mute = true;
            assert!(nvme.write_blocks(1, &[4; 512]).is_err());
            let e = (*nvme).suspend_state().unwrap_err();
            assert!(
                matches!(e.error, NvmeError::InFlight { qid: 1, cid: 3, .. }),
                "{e}"
            );
            let e: NvmeError = e.into();
            assert!(e.to_string().starts_with("suspending: "), "{e}");
        }
        // The driver went down with the error: the usual shutdown.
        assert!(dev.shut_down());
        assert_eq!(dev.mapped(), 0);
        assert_eq!(dev.io_queues(), (false, false));
    }

    #[test]
    fn suspend_after_shutdown_is_refused() {
        let mut dev = fake::Fake::new(0);
        let mut nvme = Nvme::new(&mut dev, opts()).unwrap();
        nvme.shutdown().unwrap();
        let e = nvme.suspend_state().unwrap_err();
        assert!(matches!(e.error, NvmeError::Shutdown("suspending")), "{e}");
        drop(e);
        assert_eq!(dev.mapped(), 0);
    }
}
