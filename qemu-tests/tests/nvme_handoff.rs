//! A live NVMe session handed from one frontend process to another, and
//! kept alive across link cuts, against QEMU's nvme (backed by an image
//! file on the host) bound to vfio-pci in the guest and served by the
//! guest's ciod as `vnvme0`. One guest boot:
//!
//! 1. A child process (this test binary re-executed, running
//!    [`handoff_child_first_frontend`]) brings the controller up with the
//!    userspace driver (admin queue, identify, one I/O queue pair), writes
//!    a block, reads it back, ends the driver with `Nvme::suspend_state`
//!    (the controller left running) into a state file, suspends the
//!    session into a ticket file next to it and waits; the test kills it
//!    with SIGKILL.
//! 2. The test adopts the session from the ticket: the controller was not
//!    reset (CC.EN, CSTS.RDY, PCI command, AQA/ASQ/ACQ the state's), the
//!    adopted target memory holds the queues and data the child left, and
//!    the driver resumes from the state file (`Nvme::resume_from`) on the
//!    child's queues: Identify still answers on the child's admin queue,
//!    and the child's block reads back through the child's I/O queue.
//! 3. Block writes and reads by the driver through a proxy that resets the
//!    link four times and silently drops it once in the middle of
//!    commands (cut by a [`Device`] wrapper at the command's steps): every
//!    block reads back as written, the session resumes after each cut, and
//!    the driver never sets the controller up again. It shuts the
//!    controller down at the end.
//! 4. After QEMU quits, the image file holds every block where it was
//!    written, and a block nobody wrote is as the test made it.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_core::{
    Device, DeviceError, DeviceInfo, DmaRegion, EventFd, IrqKind, CONFIG_REGION, PAGE_SIZE,
};
use cio_frontend::drivers::nvme::{
    doorbell, nvm, reg, Cap, Completion, Nvme, NvmeState, Options, CQE_SIZE, SQE_SIZE,
};
use cio_frontend::{Client, ClientOptions, RemoteDevice, Ticket};
use cio_qemu_tests::{pattern, qmp_quit, rig, Guest, TempDir};
use cio_transports::{Endpoint, Psk};

#[allow(dead_code)] // not every helper of the proxy is used here
#[path = "../../frontend/tests/common/proxy.rs"]
mod proxy;
use proxy::{Cut, Proxy};

const SERIAL: &str = "cio-nvme-handoff-0";
const IMAGE: u64 = 8 << 20;
/// QEMU's nvme default logical block size.
const BLOCK: u64 = 512;
/// One page per transfer: 8 blocks, PRP1 only.
const XFER: usize = PAGE_SIZE as usize;
const XFER_BLOCKS: u32 = (XFER as u64 / BLOCK) as u32;

/// Where the child's driver maps its memory ([`Options::iova`]).
const IOVA: u64 = 0x20_0000;
/// Options::queue_entries the child asks for (QEMU's MQES allows more).
const QUEUE_ENTRIES: u16 = 32;

/// The child's block, and its seed.
const CHILD_LBA: u64 = 8;
const CHILD_SEED: u64 = 0xc41d;
/// The blocks of the loop across cuts: LOOP_LBA + XFER_BLOCKS * i.
const LOOP_LBA: u64 = 64;
const LOOPS: u64 = 24;
/// Nobody writes this one.
const UNTOUCHED_LBA: u64 = 1000;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for an interrupt before looking at the completion
/// queue anyway: longer than a silent cut takes to notice (4 keepalives)
/// and resume, so completions should all come by interrupt.
const IRQ_POLL: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(1);

const CHILD_TEST: &str = "handoff_child_first_frontend";
const ENV_EP: &str = "CIO_NVME_HANDOFF_EP";
const ENV_KEY: &str = "CIO_NVME_HANDOFF_KEY";
const ENV_TICKET: &str = "CIO_NVME_HANDOFF_TICKET";
const SUSPENDED: &str = "CIO-CHILD-SUSPENDED";

/// Where the child saves the driver's state: next to the ticket.
fn state_path(ticket: &Path) -> PathBuf {
    ticket.with_extension("nvme-state.json")
}

/// Renames `tmp` to `path` once written: the parent never sees half.
fn publish(tmp: &Path, path: &Path) {
    std::fs::rename(tmp, path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// The driver's options: the child's layout, timeouts that outlast a cut.
fn driver_opts() -> Options {
    Options {
        iova: IOVA,
        queue_entries: QUEUE_ENTRIES,
        command_timeout: COMMAND_TIMEOUT,
        irq_poll_interval: IRQ_POLL,
        ..Options::default()
    }
}

/// A child process killed when the test ends, however it ends.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loop_data(i: u64) -> Vec<u8> {
    pattern(0x100 + i, XFER)
}

/// Asks QEMU to quit through its QMP socket (a clean exit: its block
/// layer flushes the image) and waits for its answer.
fn client_opts(key: &str) -> ClientOptions {
    ClientOptions {
        psk: Some(Psk::new(key.as_bytes().to_vec()).unwrap()),
        reply_timeout: Duration::from_secs(30),
        keepalive: KEEPALIVE,
        resume_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

/// The first frontend, run as a child process by
/// [`nvme_session_handed_to_another_process_and_resumed_across_cuts`]:
/// brings the controller up, writes and reads back one block, ends the
/// driver leaving the controller running into the state file, suspends the
/// session into the ticket file, prints its counters, and waits to be
/// killed.
#[test]
#[ignore = "the first frontend of nvme_session_handed_to_another_process_and_resumed_across_cuts, which runs it as a child process"]
fn handoff_child_first_frontend() {
    let (Ok(ep), Ok(key), Ok(ticket_path)) = (
        std::env::var(ENV_EP),
        std::env::var(ENV_KEY),
        std::env::var(ENV_TICKET),
    ) else {
        eprintln!("{CHILD_TEST}: not started by the handoff test, nothing to do");
        return;
    };
    let ticket_path = PathBuf::from(ticket_path);
    let ep: Endpoint = ep.parse().unwrap();
    let client = Client::connect(&ep, client_opts(&key)).unwrap();
    assert!(client.resumable(), "the guest's ciod keeps sessions");
    let mut dev = client.open("vnvme0").unwrap();
    let t = Instant::now();
    let mut nvme = Nvme::new(
        &mut dev,
        Options {
            command_timeout: Duration::from_secs(30),
            irq_poll_interval: Duration::from_secs(5),
            ..driver_opts()
        },
    )
    .unwrap_or_else(|e| panic!("bringing the controller up: {e}"));
    let up = t.elapsed();
    assert_eq!(nvme.controller().serial, SERIAL);
    assert_eq!(u64::from(nvme.namespace().block_size), BLOCK);
    assert!(nvme.uses_interrupts(), "the function offers MSI-X");
    let data = pattern(CHILD_SEED, XFER);
    nvme.write_blocks(CHILD_LBA, &data).unwrap();
    assert!(nvme.read_blocks(CHILD_LBA, XFER_BLOCKS).unwrap() == data);
    let stats = nvme.stats();
    let state = nvme
        .suspend_state()
        .unwrap_or_else(|e| panic!("suspending the driver: {e}"));

    let ticket = client
        .suspend()
        .unwrap_or_else(|e| panic!("suspending: {e}"));
    let path = state_path(&ticket_path);
    let tmp = path.with_extension("tmp");
    state.save(&tmp).unwrap();
    publish(&tmp, &path);
    let tmp = ticket_path.with_extension("tmp");
    ticket.save(&tmp).unwrap();
    publish(&tmp, &ticket_path);
    eprintln!(
        "child: bring-up {up:?}, {stats:?}, session {:#x}",
        ticket.session
    );
    println!(
        "{SUSPENDED} commands={} by_interrupt={}",
        stats.commands, stats.by_interrupt
    );
    std::io::stdout().flush().unwrap();
    // The driver is gone, the controller runs on; keep the session's
    // client and device until the SIGKILL, and leave without dropping them
    // if it never comes.
    std::thread::sleep(Duration::from_secs(300));
    eprintln!("{CHILD_TEST}: never killed, leaving");
    std::process::exit(3);
}

/// Where a command of the driver is when the test may cut the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Its first push is due: the write's data, or the read's submission
    /// entry, in target memory and not yet synced for the device.
    Staged,
    /// The submission doorbell is written.
    Rung,
    /// The completion interrupt arrived; the entry not yet pulled.
    Signalled,
}

/// The adopted device as the driver sees it: every call goes through to
/// the [`RemoteDevice`], and the link is cut when the armed command reaches
/// the armed [`Step`]. Also counts every call that would set the
/// controller up again.
struct Stepper<'a> {
    dev: &'a mut RemoteDevice,
    proxy: &'a Proxy,
    /// The I/O queue's submission doorbell and completion ring.
    sq_doorbell: u64,
    io_cq: (u64, u64),
    armed: Option<(Step, Cut)>,
    /// Interrupt events when the doorbell rang.
    irqs_at_doorbell: Option<u64>,
    /// The cut that happened, with the links the proxy had accepted before.
    fired: Option<(Cut, usize)>,
    /// Writes to registers below the doorbells (CC, AQA, ASQ, ACQ, ...),
    /// and set_irqs, dma_map, dma_unmap, reset calls.
    setup_calls: Vec<String>,
}

impl Stepper<'_> {
    fn arm(&mut self, at: Option<(Step, Cut)>) {
        self.armed = at;
        self.irqs_at_doorbell = None;
        self.fired = None;
    }

    fn step(&mut self, step: Step) {
        let Some((at, how)) = self.armed else { return };
        if at != step {
            return;
        }
        self.armed = None;
        wait_one_live(self.proxy, Duration::from_secs(30));
        let before = self.proxy.accepted();
        assert_eq!(self.proxy.cut(how), 1, "one link cut");
        self.fired = Some((how, before));
    }
}

impl Device for Stepper<'_> {
    fn info(&self) -> &DeviceInfo {
        self.dev.info()
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.dev.read(region, offset, data)
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if region == 0 && offset < reg::DOORBELLS {
            self.setup_calls
                .push(format!("write of register {offset:#x}"));
        }
        self.dev.write(region, offset, data)?;
        if (region, offset) == (0, self.sq_doorbell) {
            self.irqs_at_doorbell = Some(self.dev.irq_events());
            self.step(Step::Rung);
        }
        Ok(())
    }

    fn set_irqs(&mut self, kind: IrqKind, start: u32, fds: &[EventFd]) -> Result<(), DeviceError> {
        self.setup_calls
            .push(format!("set_irqs({kind:?}, {start}, {})", fds.len()));
        self.dev.set_irqs(kind, start, fds)
    }

    fn unmask_intx(&mut self) -> Result<(), DeviceError> {
        self.dev.unmask_intx()
    }

    fn dma_map(&mut self, region: Arc<DmaRegion>) -> Result<(), DeviceError> {
        self.setup_calls
            .push(format!("dma_map({:#x})", region.iova()));
        self.dev.dma_map(region)
    }

    fn dma_unmap(&mut self, iova: u64) -> Result<Arc<DmaRegion>, DeviceError> {
        self.setup_calls.push(format!("dma_unmap({iova:#x})"));
        self.dev.dma_unmap(iova)
    }

    fn sync_for_device(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        self.step(Step::Staged);
        self.dev.sync_for_device(iova, len)
    }

    fn sync_for_cpu(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        let (cq, cq_len) = self.io_cq;
        if (cq..cq + cq_len).contains(&iova) {
            // The driver looks at its completion entry: after the
            // interrupt if one arrived since the doorbell.
            if self
                .irqs_at_doorbell
                .is_some_and(|n| self.dev.irq_events() > n)
            {
                self.step(Step::Signalled);
            }
        }
        self.dev.sync_for_cpu(iova, len)
    }

    fn prepare_dma(&mut self) -> Result<(), DeviceError> {
        self.dev.prepare_dma()
    }

    fn collect_dma(&mut self) -> Result<(), DeviceError> {
        self.dev.collect_dma()
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        self.dev.flush()
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.setup_calls.push("reset".into());
        self.dev.reset()
    }
}

/// What the child printed after suspending: `key=value` words.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Waits up to `limit` until the proxy forwards exactly one link.
fn wait_one_live(p: &Proxy, limit: Duration) {
    let end = Instant::now() + limit;
    while p.live() != 1 {
        assert!(
            Instant::now() < end,
            "{} live links after {limit:?}, expected 1",
            p.live()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn nvme_session_handed_to_another_process_and_resumed_across_cuts() {
    let Some(rig) = rig() else { return };
    let total = Instant::now();
    let dir =
        TempDir(std::env::temp_dir().join(format!("cio-nvme-handoff-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let img = dir.0.join("nvme.img");
    // Nonzero everywhere, so a block the test never wrote is told apart
    // from one that reads back zeros.
    let fill = pattern(0xfeed, IMAGE as usize);
    std::fs::write(&img, &fill).unwrap();
    let qmp = dir.0.join("qmp.sock");
    let mut g = Guest::boot_nvme(&rig, SERIAL, &img, &qmp, "");
    let booted = total.elapsed();

    // Every link of both frontends goes through the proxy.
    let guest_ep: Endpoint = format!("127.0.0.1:{}", g.port).parse().unwrap();
    let proxy = Proxy::start(&guest_ep);

    // 1. The first frontend, in its own process.
    let ticket_path = dir.0.join("ticket.json");
    let t = Instant::now();
    let mut kid = Kid(Process::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            CHILD_TEST,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_EP, proxy.endpoint().to_string())
        .env(ENV_KEY, &g.key)
        .env(ENV_TICKET, &ticket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-running the test binary as the first frontend"));
    let (tx, rx) = mpsc::channel();
    let out = kid.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("child: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(240);
    let line = loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            // (after whatever libtest printed on that line)
            Ok(l) if l.contains(SUSPENDED) => break l[l.find(SUSPENDED).unwrap()..].to_owned(),
            Ok(_) => {}
            Err(e) => panic!(
                "the first frontend did not suspend ({e}); it exited with {:?}",
                kid.0.try_wait()
            ),
        }
    };
    let first = t.elapsed();
    assert_eq!(kid.0.try_wait().unwrap(), None, "the child waits");
    kid.0.kill().unwrap();
    let status = kid.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    let commands = field(&line, "commands");
    let child_by_interrupt = field(&line, "by_interrupt");

    // The driver's state, next to the ticket: the child's queues as it
    // left them (identify twice, number of queues, two creations; a write
    // and a read), nothing in flight.
    let state = NvmeState::load(&state_path(&ticket_path))
        .unwrap_or_else(|e| panic!("the child's driver state: {e}"));
    eprintln!("driver state: {state:?}");
    assert_eq!(state.controller.serial, SERIAL);
    assert_eq!(
        (
            state.namespace.blocks,
            u64::from(state.namespace.block_size)
        ),
        (IMAGE / BLOCK, BLOCK)
    );
    assert_eq!(state.sq.iova, IOVA, "mapped at the child's Options::iova");
    assert!(state.interrupts, "the child's I/O queue raises MSI-X");
    let io_done = 2u64;
    let admin_done = commands - io_done;
    for (q, done) in [(state.admin, admin_done), (state.io, io_done)] {
        assert_eq!(q.entries, QUEUE_ENTRIES, "queue {}", q.qid);
        assert!(done < u64::from(q.entries), "{line}");
        assert_eq!(
            (q.sq_tail, q.sq_head, q.cq_head, q.phase, q.next_cid),
            (done as u16, done as u16, done as u16, true, done as u16),
            "queue {} after {done} commands",
            q.qid
        );
    }
    assert!(child_by_interrupt >= 1, "{line}");

    // 2. Adopted by this process.
    let ticket = Ticket::load(&ticket_path).unwrap();
    assert!(!ticket.expired());
    let names: Vec<_> = ticket
        .devices()
        .iter()
        .map(|d| d.info.name.clone())
        .collect();
    assert_eq!(names, ["vnvme0"]);
    let t = Instant::now();
    let (client, mut devs) =
        Client::adopt(&ticket, client_opts(&g.key)).unwrap_or_else(|e| panic!("adopting: {e}"));
    let adopt = t.elapsed();
    assert!(client.resumable());
    assert_eq!(client.session(), ticket.session);
    let mut dev = devs.pop().unwrap();
    assert!(devs.is_empty());

    // Nothing was reset: the controller is enabled and ready, memory
    // decoding and bus mastering are on, the admin queue is the child's.
    let cc = dev.read32(0, reg::CC).unwrap();
    let csts = dev.read32(0, reg::CSTS).unwrap();
    eprintln!("after adoption: CC {cc:#x}, CSTS {csts:#x}");
    assert_eq!(cc & 1, 1, "CC.EN after adoption: {cc:#x}");
    assert_eq!(csts & 0b11, 1, "CSTS.RDY set, CFS clear: {csts:#x}");
    let mut cmd = [0u8; 2];
    dev.read(CONFIG_REGION, 0x04, &mut cmd).unwrap();
    assert_eq!(
        u16::from_le_bytes(cmd) & 0x6,
        0x6,
        "PCI memory + bus master"
    );
    let aqa = dev.read32(0, reg::AQA).unwrap();
    let n = u32::from(state.admin.entries) - 1;
    assert_eq!(aqa, n << 16 | n, "AQA: the child's admin queue size");
    let asq = dev.read32(0, reg::ASQ).unwrap();
    assert_eq!(
        u64::from(asq),
        state.admin.sq_iova,
        "ASQ: the child's admin queue"
    );
    let acq = dev.read32(0, reg::ACQ).unwrap();
    assert_eq!(
        u64::from(acq),
        state.admin.cq_iova,
        "ACQ: the child's admin queue"
    );
    let cap = Cap(u64::from(dev.read32(0, reg::CAP + 4).unwrap()) << 32
        | u64::from(dev.read32(0, reg::CAP).unwrap()));
    assert_eq!(cap.0, state.cap, "CAP: the child's controller");

    // The child's target memory, brought over from the backend's shadow.
    let res = state
        .resources(
            |iova| dev.dma_region(iova),
            |v| dev.irq_eventfd(IrqKind::Msix, v),
        )
        .unwrap_or_else(|e| panic!("the adopted memory and eventfd: {e}"));
    let cqe = |at: u64| {
        let mut b = [0u8; CQE_SIZE];
        res.cq.read(at - state.cq.iova, &mut b).unwrap();
        Completion::decode(&b)
    };
    for (q, done) in [(state.admin, admin_done), (state.io, io_done)] {
        for i in 0..done {
            let c = cqe(q.cq_iova + i * CQE_SIZE as u64);
            assert!(
                c.phase && c.sq_id == q.qid && c.cid == i as u16 && c.status.is_success(),
                "queue {} completion {i} as the controller wrote it: {c:?}",
                q.qid
            );
        }
        assert!(
            !cqe(q.cq_iova + done * CQE_SIZE as u64).phase,
            "queue {}: no more",
            q.qid
        );
    }
    let mut sqe = [0u8; SQE_SIZE];
    for (i, op) in [(0u64, nvm::WRITE), (1, nvm::READ)] {
        let at = state.io.sq_iova - state.sq.iova + i * SQE_SIZE as u64;
        res.sq.read(at, &mut sqe).unwrap();
        let lba = u64::from_le_bytes(sqe[40..48].try_into().unwrap());
        assert_eq!((sqe[0], lba), (op, CHILD_LBA), "the child's I/O entry {i}");
    }
    let mut page = vec![0u8; XFER];
    res.data.read(0, &mut page).unwrap();
    assert!(
        page == pattern(CHILD_SEED, XFER),
        "the data buffer holds the child's block (its last read)"
    );

    // The driver takes over the child's queues.
    let mut stepper = Stepper {
        dev: &mut dev,
        proxy: &proxy,
        sq_doorbell: doorbell(cap, state.io.qid, false),
        io_cq: (
            state.io.cq_iova,
            u64::from(state.io.entries) * CQE_SIZE as u64,
        ),
        armed: None,
        irqs_at_doorbell: None,
        fired: None,
        setup_calls: Vec::new(),
    };
    let t = Instant::now();
    let mut nvme = Nvme::resume_from(&mut stepper, state, driver_opts(), res)
        .unwrap_or_else(|e| panic!("resuming the driver: {e}"));
    let resume = t.elapsed();
    assert!(nvme.uses_interrupts());
    // Identify still answers, on the child's admin queue.
    let (ctrl, ns) = nvme
        .identify()
        .unwrap_or_else(|e| panic!("identify on the child's admin queue: {e}"));
    assert_eq!(ctrl.serial, SERIAL);
    assert_eq!(ctrl.model, "QEMU NVMe Ctrl");
    assert_eq!(
        (ns.blocks, u64::from(ns.block_size)),
        (IMAGE / BLOCK, BLOCK)
    );
    let before_io = nvme.stats();
    // The child's block, through the child's I/O queue.
    let t = Instant::now();
    let back = nvme
        .read_blocks(CHILD_LBA, XFER_BLOCKS)
        .unwrap_or_else(|e| panic!("reading the child's block: {e}"));
    assert!(
        back == pattern(CHILD_SEED, XFER),
        "the child's block read back by the adopter"
    );
    let first_read = t.elapsed();

    // 3. Writes and reads while the link is cut under them.
    let plan: [(u64, bool, Step, Cut); 5] = [
        (3, true, Step::Rung, Cut::Reset),
        (7, false, Step::Signalled, Cut::Reset),
        (11, true, Step::Staged, Cut::Reset),
        (15, false, Step::Rung, Cut::Silent),
        (20, true, Step::Signalled, Cut::Reset),
    ];
    let accepted_before = proxy.accepted();
    let session = client.session();
    let mut cuts = Vec::new();
    let t = Instant::now();
    for i in 0..LOOPS {
        let lba = LOOP_LBA + u64::from(XFER_BLOCKS) * i;
        let block = loop_data(i);
        for write in [true, false] {
            let at = plan
                .iter()
                .find(|&&(at, w, _, _)| at == i && w == write)
                .map(|&(_, _, step, how)| (step, how));
            nvme.device().arm(at);
            if write {
                nvme.write_blocks(lba, &block)
                    .unwrap_or_else(|e| panic!("writing lba {lba} (iteration {i}): {e}"));
            } else {
                let back = nvme
                    .read_blocks(lba, XFER_BLOCKS)
                    .unwrap_or_else(|e| panic!("reading lba {lba} (iteration {i}): {e}"));
                assert!(
                    back == block,
                    "lba {lba} (iteration {i}): read back differs"
                );
            }
            let fired = nvme.device().fired.take();
            if let Some((step, how)) = at {
                let Some((_, before)) = fired else {
                    panic!("iteration {i}: the {how:?} cut at {step:?} never came");
                };
                // The command finished, so the session resumed on a new link.
                let now = proxy.accepted();
                assert!(now > before, "iteration {i}: no new link after {how:?}");
                cuts.push((i, write, step, how, now - before));
            }
        }
        assert_eq!(client.session(), session);
    }
    let io_loop = t.elapsed();
    assert_eq!(
        cuts.len(),
        plan.len(),
        "every planned cut happened: {cuts:?}"
    );
    let resumes = proxy.accepted() - accepted_before;
    let s = nvme.stats();
    let (by_interrupt, by_poll) = (
        s.by_interrupt - before_io.by_interrupt,
        s.by_poll - before_io.by_poll,
    );
    eprintln!(
        "cuts (iteration, write, step, how, new links): {cuts:?}; {resumes} resumes; \
         completions by interrupt {by_interrupt}, by poll {by_poll}"
    );
    assert!(resumes >= plan.len(), "a resume per cut: {resumes}");
    assert_eq!(
        s.commands - before_io.commands,
        1 + 2 * LOOPS,
        "every I/O command completed"
    );
    assert_eq!(
        by_interrupt + by_poll,
        1 + 2 * LOOPS,
        "every I/O completion seen"
    );
    assert!(by_interrupt > 0, "completions by MSI-X");
    assert_eq!(
        nvme.device().setup_calls,
        Vec::<String>::new(),
        "the driver set nothing up again"
    );

    // A normal shutdown (queues deleted, interrupts off, CC.SHN, DMA
    // unmapped), then the session ends.
    nvme.shutdown()
        .unwrap_or_else(|e| panic!("shutting the controller down: {e}"));
    drop(nvme);
    drop(stepper);
    drop(dev);
    drop(client);
    drop(proxy);

    // 4. The image file holds what was written, where it was written.
    qmp_quit(&qmp);
    let status = g.wait_exit(Duration::from_secs(30));
    let mut f = std::fs::File::open(&img).unwrap();
    let mut at = |lba: u64| {
        let mut b = vec![0u8; XFER];
        f.seek(SeekFrom::Start(lba * BLOCK)).unwrap();
        f.read_exact(&mut b).unwrap();
        b
    };
    let child_block = at(CHILD_LBA) == pattern(CHILD_SEED, XFER);
    let loop_blocks: Vec<u64> = (0..LOOPS)
        .filter(|&i| at(LOOP_LBA + u64::from(XFER_BLOCKS) * i) != loop_data(i))
        .collect();
    let untouched = at(UNTOUCHED_LBA);
    let len = f.metadata().unwrap().len();
    drop(f);
    let status = status.unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "qemu quit with {status}");
    assert_eq!(len, IMAGE, "image size unchanged");
    assert!(child_block, "image file: the child's block");
    assert!(
        loop_blocks.is_empty(),
        "image file: loop blocks {loop_blocks:?} differ"
    );
    let u = (UNTOUCHED_LBA * BLOCK) as usize;
    assert!(
        untouched[..] == fill[u..u + XFER],
        "image file: a block nobody wrote changed"
    );
    eprintln!(
        "nvme handoff: boot {booted:?}, first frontend up to its ticket {first:?}, adopt {adopt:?}, \
         driver resumed {resume:?}, first read {first_read:?}, {LOOPS} writes + reads across {} cuts \
         {io_loop:?}, total {:?}",
        cuts.len(),
        total.elapsed()
    );
}
