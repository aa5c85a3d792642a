//! A live NVMe session handed from one frontend process to another, and
//! kept alive across link cuts, against QEMU's nvme (backed by an image
//! file on the host) bound to vfio-pci in the guest and served by the
//! guest's ciod as `vnvme0`. One guest boot:
//!
//! 1. A child process (this test binary re-executed, running
//!    [`handoff_child_first_frontend`]) brings the controller up with the
//!    userspace driver (admin queue, identify, one I/O queue pair), writes
//!    a block, reads it back, suspends the session into a ticket file and
//!    waits; the test kills it with SIGKILL.
//! 2. The test adopts the session from the ticket: the controller was not
//!    reset (CC.EN, CSTS.RDY, PCI command), the adopted target memory holds
//!    the queues and data the child left, Identify still answers on the
//!    child's admin queue, and the child's block reads back through the
//!    child's I/O queue (commands written by hand: the driver cannot attach
//!    to a running controller).
//! 3. Block writes and reads through a proxy that resets the link four
//!    times and silently drops it once in the middle of commands: every
//!    block reads back as written, and the session resumes after each cut.
//! 4. After QEMU quits, the image file holds every block where it was
//!    written, and a block nobody wrote is as the test made it.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cio_core::{Device, DmaRegion, EventFd, IrqKind, CONFIG_REGION, PAGE_SIZE};
use cio_frontend::drivers::nvme::{
    doorbell, nvm, prp, reg, Cap, Command, Completion, ControllerId, NamespaceInfo, Nvme, Options,
    CQE_SIZE, SQE_SIZE,
};
use cio_frontend::{Client, ClientOptions, RemoteDevice, Ticket};
use cio_qemu_tests::{rig, Guest};
use cio_transports::{sys, Endpoint, Psk};

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

/// Where the driver maps its memory ([`Options::iova`]), and its layout
/// (the driver's internals, which an adopter has to know today): the
/// submission rings (admin at page 0, I/O at page 1), the completion rings
/// likewise, the data buffer (two pages).
const IOVA: u64 = 0x20_0000;
const SQ_IOVA: u64 = IOVA;
const CQ_IOVA: u64 = IOVA + 2 * PAGE_SIZE;
const DATA_IOVA: u64 = IOVA + 4 * PAGE_SIZE;
/// Options::queue_entries the child asks for.
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

/// A directory removed when the test ends, however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn loop_data(i: u64) -> Vec<u8> {
    pattern(0x100 + i, XFER)
}

/// Asks QEMU to quit through its QMP socket (a clean exit: its block
/// layer flushes the image) and waits for its answer.
fn qmp_quit(sock: &Path) {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("qmp {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("QMP"), "qmp greeting: {line}");
    let mut w = s;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("return"), "qmp capabilities: {line}");
    w.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
    line.clear();
    let _ = r.read_line(&mut line);
}

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
/// brings the controller up, writes and reads back one block, suspends
/// the session into the ticket file, prints what the adopter needs to
/// know, and waits to be killed.
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
    let ep: Endpoint = ep.parse().unwrap();
    let client = Client::connect(&ep, client_opts(&key)).unwrap();
    assert!(client.resumable(), "the guest's ciod keeps sessions");
    let mut dev = client.open("vnvme0").unwrap();
    let t = Instant::now();
    let mut nvme = Nvme::new(
        &mut dev,
        Options {
            iova: IOVA,
            queue_entries: QUEUE_ENTRIES,
            command_timeout: Duration::from_secs(30),
            irq_poll_interval: Duration::from_secs(5),
            ..Options::default()
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
    // The driver's queue size: what it asked for, capped by one page of
    // entries and CAP.MQES.
    let entries = u32::from(QUEUE_ENTRIES)
        .clamp(2, (PAGE_SIZE as usize / SQE_SIZE) as u32)
        .min(nvme.cap().max_queue_entries());

    let ticket = client
        .suspend()
        .unwrap_or_else(|e| panic!("suspending: {e}"));
    // Written under another name and renamed: the parent never sees half.
    let tmp = format!("{ticket_path}.tmp");
    ticket.save(Path::new(&tmp)).unwrap();
    std::fs::rename(&tmp, &ticket_path).unwrap();
    eprintln!(
        "child: bring-up {up:?}, {stats:?}, session {:#x}",
        ticket.session
    );
    println!(
        "{SUSPENDED} commands={} io=2 entries={entries} by_interrupt={}",
        stats.commands, stats.by_interrupt
    );
    std::io::stdout().flush().unwrap();
    // Keep everything (the driver would shut the controller down when
    // dropped) until the SIGKILL; leave without dropping anything if it
    // never comes.
    std::thread::sleep(Duration::from_secs(300));
    eprintln!("{CHILD_TEST}: never killed, leaving");
    std::process::exit(3);
}

/// Where a command is when the test may cut the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Data in target memory, not yet pushed (writes), or the read buffer
    /// poisoned and not yet pushed (reads).
    Staged,
    /// The submission doorbell is written.
    Rung,
    /// The completion interrupt arrived; the entry not yet pulled.
    Signalled,
}

/// One queue pair's ring positions, as the driver left them.
#[derive(Debug)]
struct Ring {
    qid: u16,
    entries: u16,
    /// Offset of both rings in their regions.
    off: u64,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    next_cid: u16,
}

impl Ring {
    /// After `done` commands, each completed and its completion consumed.
    fn after(qid: u16, entries: u16, done: u64) -> Self {
        let pos = (done % u64::from(entries)) as u16;
        Self {
            qid,
            entries,
            off: u64::from(qid) * PAGE_SIZE,
            sq_tail: pos,
            sq_head: pos,
            cq_head: pos,
            phase: (done / u64::from(entries)) % 2 == 0,
            next_cid: done as u16,
        }
    }
}

/// The adopter's side of the controller: commands by hand on the queues
/// the child created, in the target memory adoption brought over.
struct Adopted<'a> {
    dev: &'a mut RemoteDevice,
    cap: Cap,
    sq: Arc<DmaRegion>,
    cq: Arc<DmaRegion>,
    data: Arc<DmaRegion>,
    admin: Ring,
    io: Ring,
    /// The I/O queue's MSI-X vector, on the adopter's eventfd.
    irq: EventFd,
    by_interrupt: u64,
    by_poll: u64,
}

impl Adopted<'_> {
    /// Submits `cmd` on the admin (polled) or I/O queue (by interrupt,
    /// looking anyway every [`IRQ_POLL`]) and waits for its completion.
    fn run(
        &mut self,
        admin: bool,
        op: &str,
        mut cmd: Command,
        hook: &mut dyn FnMut(Step),
    ) -> Completion {
        let q = if admin { &mut self.admin } else { &mut self.io };
        let next = (q.sq_tail + 1) % q.entries;
        assert_ne!(next, q.sq_head, "{op}: submission queue full");
        if !admin {
            // Forget signals of earlier completions.
            let _ = self.irq.read();
        }
        cmd.cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        let off = q.off + u64::from(q.sq_tail) * SQE_SIZE as u64;
        self.sq.write(off, &cmd.encode()).unwrap();
        self.dev
            .sync_for_device(SQ_IOVA + off, SQE_SIZE as u64)
            .unwrap_or_else(|e| panic!("{op}: pushing the entry: {e}"));
        q.sq_tail = next;
        self.dev
            .write32(0, doorbell(self.cap, q.qid, false), u32::from(next))
            .unwrap_or_else(|e| panic!("{op}: doorbell: {e}"));
        hook(Step::Rung);

        let at = q.off + u64::from(q.cq_head) * CQE_SIZE as u64;
        let start = Instant::now();
        let c = loop {
            let left = COMMAND_TIMEOUT.saturating_sub(start.elapsed());
            let mut woken = false;
            if admin {
                std::thread::sleep(Duration::from_millis(2).min(left));
            } else {
                let ready = sys::poll_readable(&[&self.irq], Some(left.min(IRQ_POLL))).unwrap();
                if ready[0] {
                    let _ = self.irq.read();
                    woken = true;
                    hook(Step::Signalled);
                }
            }
            self.dev
                .sync_for_cpu(CQ_IOVA + at, CQE_SIZE as u64)
                .unwrap_or_else(|e| panic!("{op}: pulling the completion: {e}"));
            let mut b = [0u8; CQE_SIZE];
            self.cq.read(at, &mut b).unwrap();
            let c = Completion::decode(&b);
            if c.phase == q.phase {
                if woken {
                    self.by_interrupt += 1;
                } else if !admin {
                    self.by_poll += 1;
                }
                break c;
            }
            assert!(
                start.elapsed() < COMMAND_TIMEOUT,
                "{op}: no completion within {COMMAND_TIMEOUT:?}"
            );
        };
        q.cq_head = (q.cq_head + 1) % q.entries;
        if q.cq_head == 0 {
            q.phase = !q.phase;
        }
        self.dev
            .write32(0, doorbell(self.cap, q.qid, true), u32::from(q.cq_head))
            .unwrap_or_else(|e| panic!("{op}: completion doorbell: {e}"));
        assert_eq!(
            (c.sq_id, c.cid),
            (q.qid, cmd.cid),
            "{op}: completion of another command: {c:?}"
        );
        assert!(c.status.is_success(), "{op}: {}", c.status);
        assert!(c.sq_head < q.entries, "{op}: {c:?}");
        q.sq_head = c.sq_head;
        c
    }

    /// Identify (controller with cns 1, namespace 1 with cns 0) on the
    /// admin queue, into data page 0.
    fn identify(&mut self, cns: u32) -> Vec<u8> {
        let nsid = u32::from(cns == 0);
        self.run(
            true,
            "identify",
            Command::identify(cns, nsid, DATA_IOVA),
            &mut |_| {},
        );
        self.dev.sync_for_cpu(DATA_IOVA, 4096).unwrap();
        let mut b = vec![0u8; 4096];
        self.data.read(0, &mut b).unwrap();
        b
    }

    /// Writes one transfer at `lba` from data page 0.
    fn write(&mut self, lba: u64, block: &[u8], hook: &mut dyn FnMut(Step)) {
        assert_eq!(block.len(), XFER);
        self.data.write(0, block).unwrap();
        hook(Step::Staged);
        self.dev.sync_for_device(DATA_IOVA, XFER as u64).unwrap();
        let cmd = Command::rw(true, 1, lba, XFER_BLOCKS, prp(DATA_IOVA, XFER).unwrap());
        self.run(false, "write", cmd, hook);
    }

    /// Reads one transfer at `lba` into data page 1, poisoned first so
    /// that stale memory cannot pass for the data.
    fn read(&mut self, lba: u64, hook: &mut dyn FnMut(Step)) -> Vec<u8> {
        let page = DATA_IOVA + PAGE_SIZE;
        self.data.write(PAGE_SIZE, &[0xdb; XFER]).unwrap();
        hook(Step::Staged);
        self.dev.sync_for_device(page, XFER as u64).unwrap();
        let cmd = Command::rw(false, 1, lba, XFER_BLOCKS, prp(page, XFER).unwrap());
        self.run(false, "read", cmd, hook);
        self.dev.sync_for_cpu(page, XFER as u64).unwrap();
        let mut b = vec![0u8; XFER];
        self.data.read(PAGE_SIZE, &mut b).unwrap();
        b
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
    let drive = format!("if=none,id=nvm,file={},format=raw", img.display());
    let device = format!("nvme,serial={SERIAL},drive=nvm");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let mut g = Guest::boot_with(
        &rig,
        &["-drive", &drive, "-device", &device, "-qmp", &qmp_arg],
        "",
    );
    g.wait_for("CIO-READY", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let booted = total.elapsed();
    let vfio = g.lines_with("CIO-VFIO vnvme0");
    assert_eq!(vfio.len(), 1, "nvme bound to vfio-pci: {vfio:?}");

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
    let state = loop {
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
    let commands = field(&state, "commands");
    let io_done = field(&state, "io");
    let entries = field(&state, "entries") as u16;
    let admin_done = commands - io_done;
    assert!(
        io_done < u64::from(entries) && admin_done < u64::from(entries),
        "{state}"
    );

    // 2. Adopted by this process.
    let ticket = Ticket::load(&ticket_path).unwrap();
    assert!(!ticket.expired());
    let names: Vec<_> = ticket.devices().map(|(_, n)| n.to_owned()).collect();
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
    let n = u32::from(entries) - 1;
    assert_eq!(aqa, n << 16 | n, "AQA: the child's admin queue size");
    let asq = dev.read32(0, reg::ASQ).unwrap();
    assert_eq!(u64::from(asq), SQ_IOVA, "ASQ: the child's admin queue");
    let cap = Cap(u64::from(dev.read32(0, reg::CAP + 4).unwrap()) << 32
        | u64::from(dev.read32(0, reg::CAP).unwrap()));

    // The child's target memory, brought over from the backend's shadow.
    let region = |iova| {
        dev.dma_region(iova)
            .unwrap_or_else(|| panic!("no adopted mapping at {iova:#x}"))
    };
    let (sq, cq, data) = (region(SQ_IOVA), region(CQ_IOVA), region(DATA_IOVA));
    let irq = dev
        .irq_eventfd(IrqKind::Msix, 1)
        .expect("the I/O queue's MSI-X vector is routed");
    let cqe = |ring: u64, i: u64| {
        let mut b = [0u8; CQE_SIZE];
        cq.read(ring * PAGE_SIZE + i * CQE_SIZE as u64, &mut b)
            .unwrap();
        Completion::decode(&b)
    };
    for (qid, done) in [(0u16, admin_done), (1, io_done)] {
        for i in 0..done {
            let c = cqe(u64::from(qid), i);
            assert!(
                c.phase && c.sq_id == qid && c.cid == i as u16 && c.status.is_success(),
                "queue {qid} completion {i} as the controller wrote it: {c:?}"
            );
        }
        assert!(!cqe(u64::from(qid), done).phase, "queue {qid}: no more");
    }
    let mut sqe = [0u8; SQE_SIZE];
    for (i, op) in [(0u64, nvm::WRITE), (1, nvm::READ)] {
        sq.read(PAGE_SIZE + i * SQE_SIZE as u64, &mut sqe).unwrap();
        let lba = u64::from_le_bytes(sqe[40..48].try_into().unwrap());
        assert_eq!((sqe[0], lba), (op, CHILD_LBA), "the child's I/O entry {i}");
    }
    let mut page = vec![0u8; XFER];
    data.read(0, &mut page).unwrap();
    assert!(
        page == pattern(CHILD_SEED, XFER),
        "the data buffer holds the child's block"
    );

    let mut a = Adopted {
        cap,
        sq,
        cq,
        data,
        admin: Ring::after(0, entries, admin_done),
        io: Ring::after(1, entries, io_done),
        irq,
        by_interrupt: 0,
        by_poll: 0,
        dev: &mut dev,
    };
    // Identify still answers, on the child's admin queue.
    let ctrl = ControllerId::parse(&a.identify(1)).unwrap();
    assert_eq!(ctrl.serial, SERIAL);
    assert_eq!(ctrl.model, "QEMU NVMe Ctrl");
    let ns = NamespaceInfo::parse(&a.identify(0)).unwrap();
    assert_eq!(
        (ns.blocks, u64::from(ns.block_size)),
        (IMAGE / BLOCK, BLOCK)
    );
    // The child's block, through the child's I/O queue.
    let t = Instant::now();
    let back = a.read(CHILD_LBA, &mut |_| {});
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
        let mut cut_at: Option<(Cut, usize)> = None;
        for write in [true, false] {
            let mut hook = |step: Step| {
                let Some(&(_, _, _, how)) = plan
                    .iter()
                    .find(|&&(at, w, s, _)| at == i && w == write && s == step)
                else {
                    return;
                };
                wait_one_live(&proxy, Duration::from_secs(30));
                let before = proxy.accepted();
                assert_eq!(proxy.cut(how), 1, "one link cut");
                cut_at = Some((how, before));
            };
            if write {
                a.write(lba, &block, &mut hook);
            } else {
                let back = a.read(lba, &mut hook);
                assert!(
                    back == block,
                    "lba {lba} (iteration {i}): read back differs"
                );
            }
        }
        if let Some((how, before)) = cut_at {
            // The command finished, so the session resumed on a new link.
            let now = proxy.accepted();
            assert!(now > before, "iteration {i}: no new link after {how:?}");
            cuts.push((i, how, now - before));
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
    eprintln!(
        "cuts (iteration, how, new links): {cuts:?}; {resumes} resumes; completions by interrupt {}, by poll {}",
        a.by_interrupt, a.by_poll
    );
    assert!(resumes >= plan.len(), "a resume per cut: {resumes}");
    assert_eq!(
        a.by_interrupt + a.by_poll,
        1 + 2 * LOOPS,
        "every I/O completion seen"
    );
    assert!(a.by_interrupt > 0, "completions by MSI-X");

    // A normal shutdown (CC.SHN), then the session ends.
    let cc = a.dev.read32(0, reg::CC).unwrap();
    a.dev
        .write32(0, reg::CC, (cc & !(3 << 14)) | 1 << 14)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    while a.dev.read32(0, reg::CSTS).unwrap() & 0xc != 0x8 {
        assert!(Instant::now() < end, "shutdown did not complete");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(a);
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
         first read {first_read:?}, {LOOPS} writes + reads across {} cuts {io_loop:?}, total {:?}",
        cuts.len(),
        total.elapsed()
    );
}
