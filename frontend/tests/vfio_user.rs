//! The vfio-user server driven by a small test client (the codec plus a Unix
//! socket, fds by SCM_RIGHTS), no QEMU: an emulated edu in-process, the
//! same edu over a real cio session, guest memory shared by fd or reached by
//! the server's DMA_READ/DMA_WRITE, and malformed requests.

mod common;

use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cio_backend::models::Edu;
use cio_core::Device;
use cio_frontend::vfio_user::wire::{self, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use cio_frontend::vfio_user::{
    Body, Capabilities, Codec, DmaData, DmaMap, DmaUnmap, IrqAction, IrqData, Message,
    RegionAccess, RegionData, Reply, Request, Served, Server, ServerConfig, SetIrqs, Version,
    WriteOne,
};
use cio_hw_profiles::edu;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Tests count this process's fds, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const EINVAL: u32 = 22;
const E2BIG: u32 = 7;
const EEXIST: u32 = 17;

const BAR0: u32 = 0;
const CONFIG: u32 = 7;

fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "cio-vfio-user-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Serves `clients` connections one after another on a fresh socket.
fn start(dev: Box<dyn Device>, clients: usize) -> (PathBuf, JoinHandle<Vec<Served>>) {
    start_with(dev, clients, ServerConfig::default())
}

fn start_with(
    mut dev: Box<dyn Device>,
    clients: usize,
    config: ServerConfig,
) -> (PathBuf, JoinHandle<Vec<Served>>) {
    let path = socket_path();
    let server = Server::bind(&path, config).unwrap();
    let h = std::thread::spawn(move || {
        (0..clients)
            .map(|_| server.serve_next(dev.as_mut()).unwrap_or_default())
            .collect()
    });
    (path, h)
}

struct TestClient {
    sock: UnixStream,
    codec: Codec,
    id: u16,
    /// Whole messages sends go out under (the responder sends too).
    send_lock: Arc<Mutex<()>>,
    /// With guest memory reached by messages, the responder thread reads
    /// the socket: it answers the server's DMA requests and passes the
    /// rest here.
    responder: Option<(mpsc::Receiver<Vec<u8>>, JoinHandle<()>)>,
}

/// Sends one whole message on `sock`, fds with its first bytes.
fn send_on(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    (&*sock).write_all(&bytes[n..]).unwrap();
}

/// Reads one whole message; `None` at the end of the stream.
fn read_frame(sock: &UnixStream, codec: &Codec) -> Option<Vec<u8>> {
    let mut hdr = [0u8; wire::HEADER_SIZE];
    (&*sock).read_exact(&mut hdr).ok()?;
    let h = wire::Header::parse(&hdr, codec.limits.max_msg_size).unwrap();
    let mut frame = hdr.to_vec();
    frame.resize(h.size as usize, 0);
    (&*sock)
        .read_exact(&mut frame[wire::HEADER_SIZE..])
        .unwrap();
    Some(frame)
}

/// Guest memory that is not shared by fd: the client answers the server's
/// DMA_READ/DMA_WRITE from it, as QEMU does for RAM it does not share.
struct MsgRam {
    iova: u64,
    mem: Mutex<Vec<u8>>,
    /// DMA_READs and DMA_WRITEs answered.
    reads: AtomicU32,
    writes: AtomicU32,
    /// DMA_READs are answered with this errno (0: with the bytes).
    refuse: AtomicU32,
    /// DMA_READs are not answered at all.
    silent: std::sync::atomic::AtomicBool,
    /// While `Some`, DMA_READs are kept here (id, request) unanswered,
    /// for [`TestClient::release_reads`].
    held: Mutex<Option<Vec<(u16, Request)>>>,
}

impl MsgRam {
    fn new(iova: u64, len: usize) -> Arc<Self> {
        Arc::new(MsgRam {
            iova,
            mem: Mutex::new(vec![0; len]),
            reads: AtomicU32::new(0),
            writes: AtomicU32::new(0),
            refuse: AtomicU32::new(0),
            silent: false.into(),
            held: Mutex::new(None),
        })
    }

    /// Keeps the DMA_READs that come from now on unanswered.
    fn hold_reads(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.mem.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let o = offset as usize;
        self.mem.lock().unwrap()[o..o + len].to_vec()
    }

    /// The answer to one of the server's requests (`None`: no answer).
    fn answer(&self, req: Request) -> Option<Result<Reply, u32>> {
        let mut mem = self.mem.lock().unwrap();
        let range = |address: u64, count: usize| {
            let o = address.checked_sub(self.iova)? as usize;
            (o + count <= mem.len()).then_some(o..o + count)
        };
        Some(match req {
            Request::DmaRead(a) => {
                if self.silent.load(Ordering::Relaxed) {
                    return None;
                }
                self.reads.fetch_add(1, Ordering::Relaxed);
                match (
                    range(a.address, a.count as usize),
                    self.refuse.load(Ordering::Relaxed),
                ) {
                    (Some(r), 0) => Ok(Reply::DmaRead(DmaData {
                        address: a.address,
                        data: mem[r].to_vec(),
                    })),
                    (_, 0) => Err(14),
                    (_, errno) => Err(errno),
                }
            }
            Request::DmaWrite(d) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                match range(d.address, d.data.len()) {
                    Some(r) => {
                        mem[r].copy_from_slice(&d.data);
                        Ok(Reply::DmaWrite(None))
                    }
                    None => Err(14),
                }
            }
            r => panic!("the server sent {r:?}"),
        })
    }
}

/// The encoded reply of `ram` to the server's request `id` (`None`: none).
fn answer_bytes(codec: &Codec, ram: &MsgRam, id: u16, req: Request) -> Option<Vec<u8>> {
    let command = req.command() as u16;
    let body = match ram.answer(req)? {
        Ok(r) => Body::Reply(r),
        Err(errno) => Body::ErrorReply { command, errno },
    };
    let reply = Message {
        id,
        no_reply: false,
        body,
    };
    Some(codec.encode(&reply).unwrap())
}

impl TestClient {
    fn connect(path: &PathBuf) -> Self {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        TestClient {
            sock,
            codec: Codec::default(),
            id: 0,
            send_lock: Arc::new(Mutex::new(())),
            responder: None,
        }
    }

    /// Answers the server's DMA requests from `ram` on a thread of its own
    /// from now on (QEMU answers them on its main loop, apart from the
    /// vCPU that waits for a reply).
    fn serve_dma(&mut self, ram: Arc<MsgRam>) {
        let sock = self.sock.try_clone().unwrap();
        sock.set_read_timeout(None).unwrap();
        let lock = Arc::clone(&self.send_lock);
        let codec = Codec::new(self.codec.limits, ServerConfig::default().dma_layout);
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            while let Some(frame) = read_frame(&sock, &codec) {
                let msg = codec.decode(&frame).unwrap();
                let Body::Request(req) = msg.body else {
                    if tx.send(frame).is_err() {
                        return;
                    }
                    continue;
                };
                if let (Request::DmaRead(_), Some(held)) = (&req, &mut *ram.held.lock().unwrap()) {
                    held.push((msg.id, req));
                    continue;
                }
                let Some(reply) = answer_bytes(&codec, &ram, msg.id, req) else {
                    continue;
                };
                let _g = lock.lock().unwrap();
                send_on(&sock, &reply, &[]);
            }
        });
        self.responder = Some((rx, thread));
    }

    /// Answers the DMA_READs `ram` held, in order, and answers the next
    /// ones as they come; returns how many were held.
    fn release_reads(&mut self, ram: &MsgRam) -> usize {
        let held = ram.held.lock().unwrap().take().unwrap_or_default();
        let n = held.len();
        for (id, req) in held {
            if let Some(reply) = answer_bytes(&self.codec, ram, id, req) {
                self.send_raw(&reply, &[]);
            }
        }
        n
    }

    fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let _g = self.send_lock.lock().unwrap();
        send_on(&self.sock, bytes, fds);
    }

    fn send(&mut self, req: Request, no_reply: bool, fds: &[RawFd]) -> u16 {
        self.id = self.id.wrapping_add(1);
        let msg = Message {
            id: self.id,
            no_reply,
            body: Body::Request(req),
        };
        let bytes = self.codec.encode(&msg).unwrap();
        self.send_raw(&bytes, fds);
        self.id
    }

    fn recv(&mut self) -> Message {
        let frame = match &self.responder {
            Some((rx, _)) => rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            None => read_frame(&self.sock, &self.codec).expect("the server closed"),
        };
        self.codec.decode(&frame).unwrap()
    }

    /// A request and its reply: the reply, or the errno of an error reply.
    fn call_fds(&mut self, req: Request, fds: &[RawFd]) -> Result<Reply, u32> {
        let id = self.send(req, false, fds);
        let m = self.recv();
        assert_eq!(m.id, id);
        match m.body {
            Body::Reply(r) => Ok(r),
            Body::ErrorReply { errno, .. } => Err(errno),
            Body::Request(r) => panic!("request from the server: {r:?}"),
        }
    }

    fn call(&mut self, req: Request) -> Result<Reply, u32> {
        self.call_fds(req, &[])
    }

    fn version(&mut self) -> Capabilities {
        let r = self.call(Request::Version(Version {
            major: 0,
            minor: 1,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(8),
                ..Capabilities::default()
            }),
        }));
        let Ok(Reply::Version(v)) = r else {
            panic!("{r:?}")
        };
        assert_eq!((v.major, v.minor), (0, 1));
        v.capabilities.unwrap()
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, u32> {
        match self.call(Request::RegionRead(RegionAccess {
            offset,
            region,
            count,
        }))? {
            Reply::RegionRead(d) => Ok(d.data),
            r => panic!("{r:?}"),
        }
    }

    fn read32(&mut self, region: u32, offset: u64) -> u32 {
        let d = self.read(region, offset, 4).unwrap();
        u32::from_le_bytes(d.try_into().unwrap())
    }

    fn write_req(region: u32, offset: u64, data: &[u8]) -> Request {
        Request::RegionWrite(RegionData {
            offset,
            region,
            data: data.to_vec(),
        })
    }

    fn post32(&mut self, region: u32, offset: u64, v: u32) {
        self.send(Self::write_req(region, offset, &v.to_le_bytes()), true, &[]);
    }

    fn post64(&mut self, region: u32, offset: u64, v: u64) {
        self.send(Self::write_req(region, offset, &v.to_le_bytes()), true, &[]);
    }

    fn set_irqs(&mut self, index: u32, fds: &[RawFd]) -> Result<Reply, u32> {
        self.call_fds(
            Request::DeviceSetIrqs(SetIrqs {
                argsz: 20,
                action: IrqAction::Trigger,
                data: IrqData::Eventfd,
                index,
                start: 0,
                count: fds.len() as u32,
            }),
            fds,
        )
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        // The responder's clone would keep the connection open.
        if let Some((_, thread)) = self.responder.take() {
            let _ = self.sock.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn wait_fired(efd: &EventFd) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if efd.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// The edu walk every device under test goes through.
fn drive_edu(c: &mut TestClient) {
    let caps = c.version();
    assert_eq!(caps.pgsizes, Some(4096));
    assert!(caps.max_msg_fds.unwrap() >= 1);
    assert!(caps.max_data_xfer_size.unwrap() >= 4096);
    assert!(caps.max_dma_maps.unwrap() >= 1);
    assert_eq!(caps.migration, None);

    let Ok(Reply::DeviceGetInfo(info)) = c.call(Request::DeviceGetInfo { argsz: 16 }) else {
        panic!()
    };
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    assert_eq!(info.flags, wire::DEVICE_FLAG_PCI | wire::DEVICE_FLAG_RESET);

    let Ok(Reply::DeviceGetRegionInfo(bar0)) = c.call(Request::DeviceGetRegionInfo {
        argsz: 32,
        index: BAR0,
    }) else {
        panic!()
    };
    assert_eq!(bar0.size, 1 << 20);
    assert_eq!(bar0.flags, wire::REGION_FLAG_READ | wire::REGION_FLAG_WRITE);
    let Ok(Reply::DeviceGetRegionInfo(cfg)) = c.call(Request::DeviceGetRegionInfo {
        argsz: 32,
        index: CONFIG,
    }) else {
        panic!()
    };
    assert!(cfg.size >= 256);
    let Ok(Reply::DeviceGetRegionInfo(bar1)) = c.call(Request::DeviceGetRegionInfo {
        argsz: 32,
        index: 1,
    }) else {
        panic!()
    };
    assert_eq!(bar1.size, 0);
    let Ok(Reply::DeviceGetIrqInfo(msi)) = c.call(Request::DeviceGetIrqInfo {
        argsz: 16,
        index: 1,
    }) else {
        panic!()
    };
    assert_eq!(msi.count, 1);
    assert_ne!(msi.flags & wire::IRQ_INFO_EVENTFD, 0);

    assert_eq!(c.read32(BAR0, 0), 0x010000ed);
    assert_eq!(c.read32(CONFIG, 0), 0x11e8_1234);
    // 6 bytes of config space: split into a 4-byte and a 2-byte access.
    assert_eq!(
        c.read(CONFIG, 0, 6).unwrap()[..4],
        0x11e8_1234u32.to_le_bytes()
    );
    assert_eq!(c.read(CONFIG, 2, 2).unwrap(), 0x11e8u16.to_le_bytes());

    c.post32(BAR0, 0x04, 0x1234_5678);
    assert_eq!(c.read32(BAR0, 0x04), !0x1234_5678);
    c.post32(BAR0, 0x08, 5);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.read32(BAR0, 0x20) & 1 != 0 {
        assert!(Instant::now() < deadline);
    }
    assert_eq!(c.read32(BAR0, 0x08), 120);
    // A replied write.
    let r = c.call(TestClient::write_req(BAR0, 0x08, &6u32.to_le_bytes()));
    assert!(
        matches!(r, Ok(Reply::RegionWrite(a)) if a.count == 4),
        "{r:?}"
    );
    while c.read32(BAR0, 0x20) & 1 != 0 {}
    assert_eq!(c.read32(BAR0, 0x08), 720);
    // REGION_WRITE_MULTI.
    let r = c.call(Request::RegionWriteMulti(vec![WriteOne {
        offset: 0x04,
        region: BAR0,
        data: 7u32.to_le_bytes().to_vec(),
    }]));
    assert!(
        matches!(r, Ok(Reply::RegionWriteMulti { wr_cnt: 1 })),
        "{r:?}"
    );
    assert_eq!(c.read32(BAR0, 0x04), !7);

    // MSI on an eventfd, raised through IRQ_RAISE.
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(c.set_irqs(1, &[efd.as_raw_fd()]), Ok(Reply::DeviceSetIrqs));
    c.post32(BAR0, 0x60, 1);
    assert!(wait_fired(&efd), "MSI did not reach the eventfd");
    assert_eq!(c.read32(BAR0, 0x24), 1);
    c.post32(BAR0, 0x64, 1);
    // 0 fds + trigger: disabled; a raise no longer fires.
    assert_eq!(c.set_irqs(1, &[]), Ok(Reply::DeviceSetIrqs));
    c.post32(BAR0, 0x60, 1);
    assert_eq!(c.read32(BAR0, 0x24), 1);
    assert!(efd.read().is_err());
    c.post32(BAR0, 0x64, 1);

    c.post32(BAR0, 0x04, 1);
    assert_eq!(c.read32(BAR0, 0x04), !1);
    assert_eq!(c.call(Request::DeviceReset), Ok(Reply::DeviceReset));
    // The power-on liveness value again.
    assert_eq!(c.read32(BAR0, 0x04), 0);
    assert_eq!(c.read32(BAR0, 0), 0x010000ed);
}

/// A file standing in for a VM's shared RAM (QEMU's memfd), removed when
/// dropped.
struct GuestRam {
    file: std::fs::File,
    path: PathBuf,
}

impl GuestRam {
    fn new(len: u64) -> Self {
        let path = socket_path().with_extension("ram");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        GuestRam { file, path }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.file.write_all_at(data, offset).unwrap();
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.file.read_exact_at(&mut v, offset).unwrap();
        v
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Starts an edu DMA and waits (by polling its command register, a read)
/// for it to finish.
fn edu_dma(c: &mut TestClient, src: u64, dst: u64, len: u32, cmd: u64) {
    c.post64(BAR0, edu::reg::DMA_SRC, src);
    c.post64(BAR0, edu::reg::DMA_DST, dst);
    c.post64(BAR0, edu::reg::DMA_COUNT, len.into());
    c.post64(BAR0, edu::reg::DMA_CMD, edu::DMA_RUN | cmd);
    if cmd & edu::DMA_IRQ_ENABLE != 0 {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.read32(BAR0, edu::reg::DMA_CMD) & edu::DMA_RUN as u32 != 0 {
        assert!(Instant::now() < deadline, "edu DMA did not finish");
    }
}

/// edu DMAs to and from guest memory shared by fd, which the "guest" (this
/// test) writes and reads behind the server's back, as a VM does.
fn dma_with_shared_guest_memory(c: &mut TestClient) {
    c.version();
    const RAM_OFFSET: u64 = 0x2000;
    const IOVA: u64 = 0x10_0000;
    let ram = GuestRam::new(0x10000);
    let map = Request::DmaMap(DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: RAM_OFFSET,
        address: IOVA,
        size: 0x4000,
    });
    assert_eq!(c.call_fds(map, &[ram.file.as_raw_fd()]), Ok(Reply::DmaMap));
    let gpa = |iova: u64| RAM_OFFSET + iova - IOVA;
    // Bus mastering on, as a guest driver does.
    let cmd = c.read(CONFIG, 4, 2).unwrap();
    let cmd = u16::from_le_bytes([cmd[0], cmd[1]]) | 0x4;
    c.call(TestClient::write_req(CONFIG, 4, &cmd.to_le_bytes()))
        .unwrap();

    // Guest → device → guest, twice: the second time the guest changed the
    // source in place, which only a comparison can notice.
    for seed in [1u8, 2] {
        let data = pattern(seed, 1000);
        ram.write(gpa(IOVA + 0x100), &data);
        edu_dma(c, IOVA + 0x100, edu::DMA_START, 1000, 0);
        edu_dma(c, edu::DMA_START, IOVA + 0x2000, 1000, edu::DMA_TO_RAM);
        assert_eq!(ram.read(gpa(IOVA + 0x2000), 1000), data, "round {seed}");
    }

    // With an interrupt: the data is in guest memory when the eventfd fires.
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(c.set_irqs(1, &[efd.as_raw_fd()]), Ok(Reply::DeviceSetIrqs));
    let data = pattern(3, 3000);
    ram.write(gpa(IOVA + 0x3000 - 1500), &data); // across a page boundary
    edu_dma(c, IOVA + 0x3000 - 1500, edu::DMA_START, 3000, 0);
    edu_dma(
        c,
        edu::DMA_START,
        IOVA + 0x800,
        3000,
        edu::DMA_TO_RAM | edu::DMA_IRQ_ENABLE,
    );
    assert!(wait_fired(&efd), "the DMA interrupt did not come");
    assert_eq!(ram.read(gpa(IOVA + 0x800), 3000), data);
    c.post32(BAR0, edu::reg::IRQ_ACK, edu::DMA_IRQ);
    assert_eq!(c.set_irqs(1, &[]), Ok(Reply::DeviceSetIrqs));

    // Unmapped, the range is the device's no more.
    let unmap = Request::DmaUnmap(DmaUnmap {
        argsz: 32,
        flags: 0,
        address: IOVA,
        size: 0x4000,
        bitmap: None,
    });
    assert!(matches!(c.call(unmap), Ok(Reply::DmaUnmap(_))));
    let before = ram.read(gpa(IOVA + 0x2000), 1000);
    edu_dma(
        c,
        edu::DMA_START,
        IOVA + 0x2000,
        1000,
        edu::DMA_TO_RAM | edu::DMA_IRQ_ENABLE,
    );
    // A remote edu reports the refused DMA as the error of the posted write
    // that started it, on the next read; an emulated one does not.
    let _ = c.read(BAR0, 0, 4);
    assert_eq!(c.read32(BAR0, 0), edu::ID);
    assert_eq!(ram.read(gpa(IOVA + 0x2000), 1000), before);

    // Bad maps with an fd: past the end of the memory, or neither
    // direction. Refused; the server keeps serving.
    for (flags, offset) in [(DMA_MAP_FLAG_READ, 0xe000), (0, 0)] {
        let map = Request::DmaMap(DmaMap {
            argsz: 32,
            flags,
            offset,
            address: IOVA,
            size: 0x4000,
        });
        assert_eq!(c.call_fds(map, &[ram.file.as_raw_fd()]), Err(EINVAL));
    }
    assert_eq!(c.read32(BAR0, 0), edu::ID);
}

fn bus_master_on(c: &mut TestClient) {
    let cmd = c.read(CONFIG, 4, 2).unwrap();
    let cmd = u16::from_le_bytes([cmd[0], cmd[1]]) | 0x4;
    c.call(TestClient::write_req(CONFIG, 4, &cmd.to_le_bytes()))
        .unwrap();
}

/// Maps `ram` without an fd: the server reaches it by DMA_READ/DMA_WRITE.
fn map_by_messages(c: &mut TestClient, ram: &MsgRam, size: u64) -> Result<Reply, u32> {
    c.call(Request::DmaMap(DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0,
        address: ram.iova,
        size,
    }))
}

/// Starts an edu DMA that raises MSI when done and waits for the interrupt
/// (a driver that polled the command register instead could see it before
/// the doorbell: a read never waits for guest memory to be fetched).
fn edu_dma_irq(c: &mut TestClient, efd: &EventFd, src: u64, dst: u64, len: u32, cmd: u64) {
    edu_dma(c, src, dst, len, cmd | edu::DMA_IRQ_ENABLE);
    assert!(wait_fired(efd), "the DMA interrupt did not come");
    c.post32(BAR0, edu::reg::IRQ_ACK, edu::DMA_IRQ);
}

const MSG_IOVA: u64 = 0x10_0000;
const MSG_SIZE: usize = 0x4000;

/// Negotiates, maps [`MSG_SIZE`] bytes of guest memory reached by messages
/// at [`MSG_IOVA`] (answered from the returned memory), turns bus
/// mastering on and routes MSI to the returned eventfd.
fn edu_on_messages(c: &mut TestClient) -> (Arc<MsgRam>, EventFd) {
    c.version();
    let ram = MsgRam::new(MSG_IOVA, MSG_SIZE);
    c.serve_dma(Arc::clone(&ram));
    assert_eq!(map_by_messages(c, &ram, MSG_SIZE as u64), Ok(Reply::DmaMap));
    bus_master_on(c);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(c.set_irqs(1, &[efd.as_raw_fd()]), Ok(Reply::DeviceSetIrqs));
    (ram, efd)
}

/// edu DMAs to and from guest memory that is not shared: the server
/// fetches what the device reads with DMA_READ before each doorbell, and
/// sends what it writes with DMA_WRITE before the interrupt that follows.
fn dma_through_messages(c: &mut TestClient) {
    let (ram, efd) = edu_on_messages(c);

    // Guest → device → guest, three times, the source across a page
    // boundary: changed in place the second time, zeros over older guest
    // bytes the third (only bytes compared in from the guest can tell).
    let src = 0x1000 - 1500;
    let dst = 0x2800;
    for (round, data) in [pattern(1, 3000), pattern(2, 3000), vec![0; 3000]]
        .into_iter()
        .enumerate()
    {
        ram.write(src, &data);
        ram.write(dst, &[0xaa; 3000]);
        edu_dma_irq(c, &efd, MSG_IOVA + src, edu::DMA_START, 3000, 0);
        edu_dma_irq(
            c,
            &efd,
            edu::DMA_START,
            MSG_IOVA + dst,
            3000,
            edu::DMA_TO_RAM,
        );
        // The interrupt came after the client answered the DMA_WRITEs.
        assert_eq!(ram.read(dst, 3000), data, "round {round}");
    }
    assert!(ram.reads.load(Ordering::Relaxed) > 0);
    assert!(ram.writes.load(Ordering::Relaxed) > 0);

    // A guest that refuses to be read: the device works on what it last
    // saw, the server keeps serving, and reads work again afterwards.
    ram.refuse.store(14, Ordering::Relaxed);
    ram.write(src, &pattern(4, 3000));
    edu_dma_irq(c, &efd, MSG_IOVA + src, edu::DMA_START, 3000, 0);
    assert_eq!(c.read32(BAR0, 0), edu::ID);
    ram.refuse.store(0, Ordering::Relaxed);
    edu_dma_irq(c, &efd, MSG_IOVA + src, edu::DMA_START, 3000, 0);
    edu_dma_irq(
        c,
        &efd,
        edu::DMA_START,
        MSG_IOVA + dst,
        3000,
        edu::DMA_TO_RAM,
    );
    assert_eq!(ram.read(dst, 3000), pattern(4, 3000));

    // A reply to nothing the server asked: logged and dropped.
    let stray = Message {
        id: 0x7777,
        no_reply: false,
        body: Body::Reply(Reply::DmaWrite(None)),
    };
    let bytes = c.codec.encode(&stray).unwrap();
    c.send_raw(&bytes, &[]);
    assert_eq!(c.read32(BAR0, 0), edu::ID);

    // Bad maps without an fd: overlapping, too large, unaligned.
    assert_eq!(map_by_messages(c, &ram, 0x1000), Err(EEXIST));
    let huge = MsgRam::new(1 << 40, 0);
    assert_eq!(map_by_messages(c, &huge, 2 << 40), Err(EINVAL));
    let odd = MsgRam::new(0x80_0800, 0);
    assert_eq!(map_by_messages(c, &odd, 0x1000), Err(EINVAL));

    // Unmapped, the range is the device's no more.
    let unmap = Request::DmaUnmap(DmaUnmap {
        argsz: 32,
        flags: 0,
        address: MSG_IOVA,
        size: MSG_SIZE as u64,
        bitmap: None,
    });
    assert!(matches!(c.call(unmap), Ok(Reply::DmaUnmap(_))));
    let writes = ram.writes.load(Ordering::Relaxed);
    edu_dma(
        c,
        edu::DMA_START,
        MSG_IOVA + dst,
        1000,
        edu::DMA_TO_RAM | edu::DMA_IRQ_ENABLE,
    );
    // A remote edu reports the refused DMA on the next read.
    let _ = c.read(BAR0, 0, 4);
    assert_eq!(c.read32(BAR0, 0), edu::ID);
    assert_eq!(ram.writes.load(Ordering::Relaxed), writes);
    assert_eq!(c.set_irqs(1, &[]), Ok(Reply::DeviceSetIrqs));
}

/// A DMA_MAP while the server waits for DMA_READs ahead of a doorbell
/// (QEMU maps on a vCPU that holds the lock its DMA answers need) is
/// answered at once, and the doorbell still waits for guest memory.
fn dma_map_during_a_fetch(c: &mut TestClient) {
    let (ram, efd) = edu_on_messages(c);

    let data = pattern(7, 2000);
    ram.write(0x100, &data);
    ram.hold_reads();
    edu_dma(
        c,
        MSG_IOVA + 0x100,
        edu::DMA_START,
        2000,
        edu::DMA_IRQ_ENABLE,
    );
    let other = MsgRam::new(0x40_0000, 0x1000);
    assert_eq!(map_by_messages(c, &other, 0x1000), Ok(Reply::DmaMap));
    std::thread::sleep(Duration::from_millis(300));
    assert!(efd.read().is_err(), "the DMA ran before guest memory came");
    assert!(c.release_reads(&ram) > 0, "no DMA_READ was held");
    assert!(wait_fired(&efd), "the DMA interrupt did not come");
    c.post32(BAR0, edu::reg::IRQ_ACK, edu::DMA_IRQ);
    edu_dma_irq(
        c,
        &efd,
        edu::DMA_START,
        MSG_IOVA + 0x2000,
        2000,
        edu::DMA_TO_RAM,
    );
    assert_eq!(ram.read(0x2000, 2000), data, "the device read stale memory");
}

/// Between requests the server looks at guest memory the device reads
/// and writes (rings, mapped for a second) again, ever less often while
/// nothing changes.
fn rings_watched_between_requests(c: &mut TestClient) {
    c.version();
    let ram = MsgRam::new(MSG_IOVA, MSG_SIZE);
    c.serve_dma(Arc::clone(&ram));
    assert_eq!(map_by_messages(c, &ram, MSG_SIZE as u64), Ok(Reply::DmaMap));
    // Young, it may be a streaming buffer: not looked at.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ram.reads.load(Ordering::Relaxed), 0);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(c.read32(BAR0, 0), edu::ID);
    std::thread::sleep(Duration::from_millis(400));
    let soon = ram.reads.load(Ordering::Relaxed);
    assert!(soon >= 3, "{soon} looks in the first 400 ms");
    std::thread::sleep(Duration::from_millis(2000));
    let later = ram.reads.load(Ordering::Relaxed) - soon;
    assert!(
        (1..=6).contains(&later),
        "{later} looks in the next 2 s (backing off to one a second)"
    );
    // A request brings the looks back to their first pace.
    assert_eq!(c.read32(BAR0, 0), edu::ID);
    let before = ram.reads.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    assert!(ram.reads.load(Ordering::Relaxed) - before >= 2);
}

/// Serves an emulated edu to one test client that `walk` drives.
fn on_emulated_edu(walk: fn(&mut TestClient)) -> Served {
    let (path, h) = start(Box::new(Edu::new("edu0")), 1);
    let mut c = TestClient::connect(&path);
    walk(&mut c);
    drop(c);
    h.join().unwrap().remove(0)
}

/// Serves the edu of a backend, opened over a cio session, to one test
/// client that `walk` drives; the backend is idle afterwards.
fn on_remote_edu(walk: fn(&mut TestClient)) -> Served {
    let s = common::server();
    let served = {
        let client = common::connect(s.endpoint());
        let dev = client.open("edu0").unwrap();
        let (path, h) = start(Box::new(dev), 1);
        let mut c = TestClient::connect(&path);
        walk(&mut c);
        drop(c);
        h.join().unwrap().remove(0)
    };
    common::assert_idle(&s);
    served
}

/// Vectors enabled without fds (QEMU's way of enabling MSI-X before the
/// guest assigns any) switch the device to MSI, raising into nothing; an
/// eventfd set afterwards for that vector gets the next raise.
fn unassigned_then_assigned_vector(c: &mut TestClient) {
    c.version();
    let unassigned = Request::DeviceSetIrqs(SetIrqs {
        argsz: 20,
        action: IrqAction::Trigger,
        data: IrqData::Eventfd,
        index: 1,
        start: 0,
        count: 1,
    });
    assert_eq!(c.call(unassigned), Ok(Reply::DeviceSetIrqs));
    // The device uses MSI now: its MSI enable bit is set.
    let ctl = c.read(CONFIG, 0x40 + 2, 2);
    let msi_on = ctl.map(|b| b[0] & 1 == 1);
    c.post32(BAR0, edu::reg::IRQ_RAISE, 1);
    c.post32(BAR0, edu::reg::IRQ_ACK, 1);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(c.set_irqs(1, &[efd.as_raw_fd()]), Ok(Reply::DeviceSetIrqs));
    assert!(efd.read().is_err(), "the unassigned raise went nowhere");
    c.post32(BAR0, edu::reg::IRQ_RAISE, 1);
    assert!(wait_fired(&efd), "MSI did not reach the eventfd set later");
    c.post32(BAR0, edu::reg::IRQ_ACK, 1);
    assert_eq!(msi_on, Ok(true), "MSI enabled by the fd-less SET_IRQS");
}

#[test]
fn vectors_enabled_without_fds_are_unassigned_until_set() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    on_emulated_edu(unassigned_then_assigned_vector);
    on_remote_edu(unassigned_then_assigned_vector);
}

#[test]
fn dma_reaches_shared_guest_memory_of_an_emulated_edu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    on_emulated_edu(dma_with_shared_guest_memory);
}

#[test]
fn dma_reaches_shared_guest_memory_of_a_remote_edu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    on_remote_edu(dma_with_shared_guest_memory);
}

#[test]
fn dma_reaches_unshared_guest_memory_of_an_emulated_edu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fds = open_fds();
    on_emulated_edu(dma_through_messages);
    assert_eq!(open_fds(), fds, "fds leaked");
}

#[test]
fn dma_reaches_unshared_guest_memory_of_a_remote_edu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    on_remote_edu(dma_through_messages);
}

#[test]
fn a_dma_map_during_a_fetch_is_answered_and_the_doorbell_waits() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    on_emulated_edu(dma_map_during_a_fetch);
    on_remote_edu(dma_map_during_a_fetch);
}

#[test]
fn rings_reached_by_messages_are_watched_between_requests() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    on_emulated_edu(rings_watched_between_requests);
}

/// A client that never answers a DMA_READ is dropped after the server's
/// `dma_timeout`, and the next client is served.
#[test]
fn a_client_that_never_answers_dma_is_dropped() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let config = ServerConfig {
        dma_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let (path, h) = start_with(Box::new(Edu::new("edu0")), 2, config);
    let mut c = TestClient::connect(&path);
    c.version();
    let ram = MsgRam::new(MSG_IOVA, MSG_SIZE);
    ram.silent.store(true, Ordering::Relaxed);
    c.serve_dma(Arc::clone(&ram));
    assert_eq!(
        map_by_messages(&mut c, &ram, MSG_SIZE as u64),
        Ok(Reply::DmaMap)
    );
    let started = Instant::now();
    c.post32(BAR0, edu::reg::IRQ_RAISE, 1);
    // The connection ends: the responder sees the end of the stream.
    let (rx, thread) = c.responder.take().unwrap();
    thread.join().unwrap();
    drop(rx);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    drop(c);
    let mut c = TestClient::connect(&path);
    c.version();
    assert_eq!(c.read32(BAR0, 0), edu::ID);
    drop(c);
    h.join().unwrap();
}

#[test]
fn serves_an_emulated_edu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let served = on_emulated_edu(drive_edu);
    assert_eq!(served.errors, 0, "{served:?}");
}

#[test]
fn serves_a_remote_edu_over_a_cio_session() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let served = on_remote_edu(drive_edu);
    assert_eq!(served.errors, 0, "{served:?}");
}

#[test]
fn requests_before_version_are_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (path, h) = start(Box::new(Edu::new("edu0")), 1);
    let mut c = TestClient::connect(&path);
    assert_eq!(c.call(Request::DeviceReset), Err(EINVAL));
    c.version();
    assert_eq!(c.call(Request::DeviceReset), Ok(Reply::DeviceReset));
    drop(c);
    h.join().unwrap();
}

#[test]
fn bad_requests_get_errors_and_the_server_keeps_serving() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Three connections: the main one, one that ends inside a header, one
    // whose header says it is smaller than a header.
    let (path, h) = start(Box::new(Edu::new("edu0")), 3);
    let mut c = TestClient::connect(&path);
    c.version();

    // Size over the limit: E2BIG, the body is skipped.
    let max = c.codec.limits.max_msg_size;
    let big = wire::Header {
        id: 100,
        command: 8, // DEVICE_RESET
        size: (max + 8) as u32,
        flags: 0,
        error: 0,
    };
    let mut bytes = big.to_bytes().to_vec();
    bytes.resize(max + 8, 0xaa);
    c.send_raw(&bytes, &[]);
    let m = c.recv();
    assert_eq!(m.id, 100);
    assert!(
        matches!(m.body, Body::ErrorReply { errno: E2BIG, .. }),
        "{m:?}"
    );
    assert_eq!(c.read32(BAR0, 0), 0x010000ed);

    // Unknown command.
    let unknown = wire::Header {
        id: 101,
        command: 999,
        size: 20,
        flags: 0,
        error: 0,
    };
    let mut bytes = unknown.to_bytes().to_vec();
    bytes.extend_from_slice(&[0; 4]);
    c.send_raw(&bytes, &[]);
    let m = c.recv();
    assert_eq!(m.id, 101);
    assert!(
        matches!(m.body, Body::ErrorReply { errno: EINVAL, .. }),
        "{m:?}"
    );

    // A payload too short for its command.
    let short = wire::Header {
        id: 102,
        command: 5, // DEVICE_GET_REGION_INFO
        size: 20,
        flags: 0,
        error: 0,
    };
    let mut bytes = short.to_bytes().to_vec();
    bytes.extend_from_slice(&[0; 4]);
    c.send_raw(&bytes, &[]);
    assert!(matches!(
        c.recv().body,
        Body::ErrorReply { errno: EINVAL, .. }
    ));

    // Reads beyond a region, of a width the region lacks, of a missing region.
    assert_eq!(c.read(BAR0, (1 << 20) - 2, 4), Err(EINVAL));
    assert_eq!(c.read(BAR0, u64::MAX - 1, 4), Err(EINVAL));
    assert_eq!(c.read(BAR0, 0, 2), Err(EINVAL));
    assert_eq!(c.read(3, 0, 4), Err(EINVAL));
    assert_eq!(
        c.call(Request::DeviceGetRegionInfo {
            argsz: 32,
            index: 9
        }),
        Err(EINVAL)
    );

    // fds: too many, and on a command that takes none; all closed.
    let efds: Vec<EventFd> = (0..20)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    let before = open_fds();
    assert_eq!(c.set_irqs(1, &raw), Err(EINVAL), "more than max_msg_fds");
    assert_eq!(open_fds(), before);
    assert_eq!(c.set_irqs(1, &raw[..2]), Err(EINVAL), "more than MSI has");
    assert_eq!(open_fds(), before);
    assert_eq!(
        c.call_fds(Request::DeviceGetInfo { argsz: 16 }, &raw[..1]),
        Err(EINVAL)
    );
    assert_eq!(open_fds(), before);
    // A posted write with an fd: no reply, fd closed, next request served.
    c.send(
        TestClient::write_req(BAR0, 4, &[1, 0, 0, 0]),
        true,
        &raw[..1],
    );
    assert_eq!(c.read32(BAR0, 4), 0, "the refused write did not happen");
    assert_eq!(open_fds(), before);
    // A DMA_MAP whose fd is not memory (an eventfd has no size) is refused.
    let map = |address, size| {
        Request::DmaMap(DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            address,
            size,
        })
    };
    assert_eq!(c.call_fds(map(0x10000, 0x1000), &raw[..1]), Err(EINVAL));
    assert_eq!(open_fds(), before);

    // DMA ranges without fds: recorded, overlaps refused, unmapped.
    assert_eq!(c.call(map(0x10000, 0x4000)), Ok(Reply::DmaMap));
    assert_eq!(c.call(map(0x12000, 0x4000)), Err(EEXIST));
    assert_eq!(c.call(map(0x0f000, 0x2000)), Err(EEXIST));
    assert_eq!(c.call(map(0x0f000, 0x1000)), Ok(Reply::DmaMap));
    assert_eq!(c.call(map(0x14000, 0x1000)), Ok(Reply::DmaMap));
    assert_eq!(c.call(map(0x20000, 0)), Err(EINVAL));
    assert_eq!(c.call(map(0x20001, 0x1000)), Err(EINVAL));
    let unmap = |address, size| {
        Request::DmaUnmap(DmaUnmap {
            argsz: 24,
            flags: 0,
            address,
            size,
            bitmap: None,
        })
    };
    assert_eq!(
        c.call(unmap(0x11000, 0x1000)),
        Err(EINVAL),
        "splits a range"
    );
    assert!(matches!(
        c.call(unmap(0x10000, 0x4000)),
        Ok(Reply::DmaUnmap(_))
    ));
    assert_eq!(c.call(map(0x12000, 0x2000)), Ok(Reply::DmaMap));
    // A second VERSION.
    assert!(c.call(Request::Version(Version::default())).is_err());
    // Still serving.
    assert_eq!(c.read32(BAR0, 0), 0x010000ed);
    drop(c);

    // A connection that ends inside a header is closed...
    let mut t = TestClient::connect(&path);
    t.send_raw(&[1, 0, 1, 0, 16], &[]);
    t.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    t.sock.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // ... so is one whose header claims less than a header.
    let mut t = TestClient::connect(&path);
    let tiny = wire::Header {
        id: 1,
        command: 1,
        size: 8,
        flags: 0,
        error: 0,
    };
    t.send_raw(&tiny.to_bytes(), &[]);
    let mut rest = Vec::new();
    t.sock.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let served = h.join().unwrap();
    assert!(served[0].errors >= 15, "{served:?}");
    // The served device is still fine for the next client.
    drop(efds);
}

#[test]
fn a_second_client_waits_for_the_first() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (path, h) = start(Box::new(Edu::new("edu0")), 2);
    let mut a = TestClient::connect(&path);
    a.version();
    let mut b = TestClient::connect(&path);
    b.send(
        Request::Version(Version {
            major: 0,
            minor: 1,
            capabilities: None,
        }),
        false,
        &[],
    );
    b.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        b.sock.read(&mut byte).is_err(),
        "second client served early"
    );
    assert_eq!(a.read32(BAR0, 0), 0x010000ed);
    drop(a);
    b.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(matches!(b.recv().body, Body::Reply(Reply::Version(_))));
    assert_eq!(b.read32(BAR0, 0), 0x010000ed);
    drop(b);
    h.join().unwrap();
    // The socket file goes with the server.
    assert!(!path.exists());
}

/// The socket to the VMM outlives cio link trouble: the cio link under a
/// vfio-user server is cut (reset, then silently) while a client writes
/// and reads through it; every posted write arrives (edu's liveness
/// register answers the inverse of the last one) and each request is
/// answered, slower across a cut but well within QEMU's reply timeout.
#[test]
fn a_cut_cio_link_is_resumed_under_the_vfio_user_socket() {
    use common::proxy::{Cut, Proxy};
    let limits = cio_backend::Limits {
        resume_grace: Duration::from_secs(20),
        link_timeout: Duration::from_secs(2),
        ..cio_backend::Limits::default()
    };
    let s = common::server_with(None, limits);
    let proxy = Proxy::start(s.endpoint());
    let opts = cio_frontend::ClientOptions {
        reply_timeout: Duration::from_secs(20),
        keepalive: Duration::from_millis(50),
        resume_timeout: Duration::from_secs(15),
        ..cio_frontend::ClientOptions::default()
    };
    let client = cio_frontend::Client::connect(&proxy.endpoint(), opts).unwrap();
    assert!(client.resumable());
    let dev = client.open("edu0").unwrap();
    let (path, h) = start(Box::new(dev), 1);
    let mut c = TestClient::connect(&path);
    c.version();
    let mut slowest = Duration::ZERO;
    for round in 0..60u32 {
        let v = 0x1000_0000 | round;
        c.post32(BAR0, 4, v);
        if round % 20 == 10 {
            // After the write left, before the read: the write is among
            // what the resumed link replays (or was applied already).
            let how = if round == 10 { Cut::Reset } else { Cut::Silent };
            assert_eq!(proxy.cut(how), 1, "one link to cut");
        }
        let t = Instant::now();
        assert_eq!(
            c.read32(BAR0, 4),
            !v,
            "round {round}: the posted write arrived"
        );
        slowest = slowest.max(t.elapsed());
        assert_eq!(c.read32(BAR0, 0), edu::ID);
    }
    eprintln!("slowest reply across the cuts: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(10),
        "the slowest reply ({slowest:?}) stays well under QEMU's x-msg-timeout"
    );
    assert!(
        s.stats().resumes >= 2,
        "both cuts were resumed: {:?}",
        s.stats()
    );
    assert!(proxy.accepted() >= 3, "a new connection after each cut");
    drop(c);
    h.join().unwrap();
    drop(client);
    common::assert_idle(&s);
}
