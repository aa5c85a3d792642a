//! USB devices of a remote host, presented to this host's kernel through
//! `vhci-hcd` so they look like local USB devices.
//!
//! A source is either a cio backend (`HOST[:PORT]`, `unix:PATH`; the URB
//! stream travels in `UsbData` frames of an authenticated session, relayed
//! by this process) or a stock USB/IP server (`usbip://HOST[:PORT]`; the
//! kernel gets the TCP socket itself, as with `usbip attach`).
//!
//! The relay watches the link: it pings the backend when the device is
//! idle ([`ClientOptions::keepalive`]) and gives up when the backend stays
//! silent for four of those intervals.
//! Whichever side ends (detach here, link loss, backend gone), the relay
//! closes the other, so the vhci port is freed here and the device goes
//! back to its driver on the source.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cio_core::usbip::{
    decode_devlist, encode_import_request, get_device, op, OpHeader, UsbDevice, UsbSpeed,
    UsbipError, DEVICE_LEN, OP_HEADER_LEN, USBIP_PORT,
};
use cio_core::wire::{Message, MAX_USB_CHUNK};
use cio_core::FrameDecoder;
use cio_transports::{Conn, Endpoint};
use tracing::{debug, info, warn};

use crate::client::{handshake, read_frame, timed_out, ClientError, ClientOptions, Handshake};

/// Default vhci-hcd sysfs directory (all controllers' attributes live here).
pub const VHCI_DIR: &str = "/sys/devices/platform/vhci_hcd.0";
/// Where attached ports are recorded for `cio usb port`.
pub const STATE_DIR: &str = "/run/cio/usb";

/// USB errors on the frontend.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    /// A cio session failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The stock USB/IP server broke the protocol or refused.
    #[error(transparent)]
    Usbip(#[from] UsbipError),
    /// vhci-hcd is missing or refused.
    #[error("{0}")]
    Vhci(String),
    /// An OS call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> UsbError {
    let what = what.into();
    move |source| UsbError::Io { what, source }
}

/// Where USB devices come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbSource {
    /// A cio backend.
    Cio(Endpoint),
    /// A stock USB/IP server (`usbipd`, or ciod's `--usbip-listen`).
    Usbip(SocketAddr),
}

impl FromStr for UsbSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("usbip://") {
            Some(rest) => {
                let with_port = if rest
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                    && !rest.ends_with(']')
                {
                    rest.to_owned()
                } else {
                    format!("{rest}:{USBIP_PORT}")
                };
                let addr = with_port
                    .to_socket_addrs()
                    .map_err(|e| format!("{s}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("{s}: no address"))?;
                Ok(Self::Usbip(addr))
            }
            None => s
                .parse()
                .map(Self::Cio)
                .map_err(|e: cio_transports::Error| e.to_string()),
        }
    }
}

impl fmt::Display for UsbSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cio(e) => write!(f, "cio://{e}"),
            Self::Usbip(a) => write!(f, "usbip://{a}"),
        }
    }
}

fn cio_session(ep: &Endpoint, opts: &ClientOptions) -> Result<(Conn, Handshake), UsbError> {
    let conn = crate::client::dial(ep, opts)?;
    let hs = handshake(&conn, opts, false)?;
    Ok((conn, hs))
}

fn call(
    conn: &Conn,
    hs: &mut Handshake,
    msg: &Message,
    timeout: Duration,
) -> Result<Message, UsbError> {
    hs.out.push(msg, 0);
    hs.out
        .write_to(conn, Some(timeout))
        .map_err(|e| ClientError::Disconnected(e.to_string()))?;
    Ok(read_frame(conn, &mut hs.dec)?.msg)
}

fn unexpected(what: &str, m: &Message) -> UsbError {
    ClientError::Protocol(format!(
        "expected {what}, got message type {:#06x}",
        m.kind()
    ))
    .into()
}

fn stock_connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UsbError> {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(io_err(format!("connecting to usbip://{addr}")))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io_err("socket"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(io_err("socket"))?;
    Ok(s)
}

fn stock_reply(s: &mut TcpStream, code: u16) -> Result<(), UsbError> {
    let mut h = [0u8; OP_HEADER_LEN];
    s.read_exact(&mut h)
        .map_err(io_err("reading the USB/IP reply"))?;
    let h = OpHeader::decode(&h)?;
    if h.code != code {
        return Err(UsbipError::Op(h.code).into());
    }
    if h.status != 0 {
        return Err(UsbipError::Refused(h.status).into());
    }
    Ok(())
}

/// The devices `source` exports.
pub fn list(source: &UsbSource, opts: &ClientOptions) -> Result<Vec<UsbDevice>, UsbError> {
    match source {
        UsbSource::Cio(ep) => {
            let (conn, mut hs) = cio_session(ep, opts)?;
            let reply = call(&conn, &mut hs, &Message::UsbList, opts.reply_timeout)?;
            hs.out.push(&Message::Goodbye, 0);
            let _ = hs.out.write_to(&conn, Some(Duration::from_secs(1)));
            match reply {
                Message::UsbDeviceList { devices } => Ok(devices),
                m => Err(unexpected("UsbDeviceList", &m)),
            }
        }
        UsbSource::Usbip(addr) => {
            let mut s = stock_connect(*addr, opts.reply_timeout)?;
            let mut req = BytesMut::new();
            OpHeader {
                code: op::REQ_DEVLIST,
                status: 0,
            }
            .encode(&mut req);
            s.write_all(&req)
                .map_err(io_err("sending the USB/IP request"))?;
            stock_reply(&mut s, op::REP_DEVLIST)?;
            let mut body = Vec::new();
            s.take(16 << 20)
                .read_to_end(&mut body)
                .map_err(io_err("reading the USB/IP device list"))?;
            Ok(decode_devlist(&body)?)
        }
    }
}

/// An imported device whose URB stream is ready to hand to the kernel.
#[derive(Debug)]
pub struct Imported {
    /// The device.
    pub device: UsbDevice,
    /// Where it came from.
    pub source: UsbSource,
    link: Link,
    keepalive: Duration,
}

enum Link {
    Cio {
        conn: Conn,
        hs: Box<Handshake>,
    },
    /// A direct cio import: plain USB/IP follows on the connection.
    Direct(Conn),
    Stock(TcpStream),
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cio { .. } => "Link::Cio",
            Self::Direct(_) => "Link::Direct",
            Self::Stock(_) => "Link::Stock",
        })
    }
}

/// TCP keepalive for sockets the kernel owns: a vanished peer is noticed
/// after about 25 s.
const KA_IDLE: Duration = Duration::from_secs(10);
const KA_INTERVAL: Duration = Duration::from_secs(5);
const KA_RETRIES: u32 = 3;

fn kernel_keepalive(conn: &Conn) {
    if let Err(e) = conn.set_keepalive(KA_IDLE, KA_INTERVAL, KA_RETRIES) {
        warn!("TCP keepalive: {e}");
    }
}

/// Imports `busid` from `source`. A `direct` cio import skips the relay:
/// after the authenticated handshake both kernels talk plain USB/IP on the
/// session's own connection (fastest; cio no longer watches the link, TCP
/// keepalive does). Stock USB/IP sources are always direct.
pub fn import(
    source: &UsbSource,
    busid: &str,
    opts: &ClientOptions,
    direct: bool,
) -> Result<Imported, UsbError> {
    match source {
        UsbSource::Cio(ep) => {
            let (conn, mut hs) = cio_session(ep, opts)?;
            if direct && !conn.is_plain_socket() {
                let why = if conn.is_tls() {
                    "--direct hands the connection to the kernel, which cannot encrypt it: on a TLS link use the relayed attach (the default), or a plaintext link (loopback, or --insecure-plaintext) for --direct"
                } else {
                    "--direct hands the connection to the kernel, which speaks USB/IP on TCP only: on an RDMA link use the relayed attach (the default)"
                };
                return Err(ClientError::Protocol(why.into()).into());
            }
            let msg = Message::UsbImport {
                busid: busid.into(),
                direct,
            };
            let device = match call(&conn, &mut hs, &msg, opts.reply_timeout)? {
                Message::UsbImported { device } => device,
                m => return Err(unexpected("UsbImported", &m)),
            };
            let link = if direct {
                if hs.dec.has_partial() {
                    return Err(ClientError::Protocol(
                        "bytes after the direct import reply".into(),
                    )
                    .into());
                }
                kernel_keepalive(&conn);
                Link::Direct(conn)
            } else {
                Link::Cio {
                    conn,
                    hs: Box::new(hs),
                }
            };
            Ok(Imported {
                device,
                source: source.clone(),
                link,
                keepalive: opts.keepalive,
            })
        }
        UsbSource::Usbip(addr) => {
            let mut s = stock_connect(*addr, opts.reply_timeout)?;
            let mut req = BytesMut::new();
            encode_import_request(busid, &mut req);
            s.write_all(&req)
                .map_err(io_err("sending the USB/IP import"))?;
            stock_reply(&mut s, op::REP_IMPORT)?;
            let mut rec = [0u8; DEVICE_LEN];
            s.read_exact(&mut rec)
                .map_err(io_err("reading the imported device"))?;
            let (device, _) = get_device(&mut &rec[..])?;
            if device.busid != busid {
                return Err(UsbipError::Invalid("bus id in the import reply").into());
            }
            s.set_read_timeout(None).map_err(io_err("socket"))?;
            s.set_write_timeout(None).map_err(io_err("socket"))?;
            if let Err(e) = cio_transports::set_tcp_keepalive(&s, KA_IDLE, KA_INTERVAL, KA_RETRIES)
            {
                warn!("TCP keepalive: {e}");
            }
            Ok(Imported {
                device,
                source: source.clone(),
                link: Link::Stock(s),
                keepalive: opts.keepalive,
            })
        }
    }
}

/// Hub type of a vhci port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hub {
    /// USB 2 root hub (low, full and high speed devices).
    High,
    /// USB 3 root hub (SuperSpeed devices).
    Super,
}

/// One line of vhci-hcd's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhciPort {
    /// Hub type.
    pub hub: Hub,
    /// Port number (the number `attach` and `detach` take).
    pub port: u32,
    /// `VDEV_ST_*`: 4 free, 5 not assigned, 6 in use, 7 error.
    pub status: u32,
    /// Speed of the attached device.
    pub speed: UsbSpeed,
    /// devid of the attached device.
    pub devid: u32,
    /// Bus id the device got here.
    pub local_busid: String,
}

const VDEV_ST_NULL: u32 = 4;

impl VhciPort {
    /// True if nothing is attached.
    pub fn is_free(&self) -> bool {
        self.status == VDEV_ST_NULL
    }
}

/// Parses one status file (header line first).
pub fn parse_status(text: &str) -> Vec<VhciPort> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 7 {
                return None;
            }
            let hub = match f[0] {
                "hs" => Hub::High,
                "ss" => Hub::Super,
                _ => return None,
            };
            Some(VhciPort {
                hub,
                port: f[1].parse().ok()?,
                status: f[2].parse().ok()?,
                speed: UsbSpeed::from_u32(f[3].parse().ok()?),
                devid: u32::from_str_radix(f[4], 16).ok()?,
                local_busid: f[6].to_owned(),
            })
        })
        .collect()
}

/// This host's vhci-hcd.
#[derive(Debug, Clone)]
pub struct Vhci {
    dir: PathBuf,
}

impl Default for Vhci {
    fn default() -> Self {
        Self::at(VHCI_DIR)
    }
}

impl Vhci {
    /// vhci-hcd's attributes in another directory (tests).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn check(&self) -> Result<(), UsbError> {
        if self.dir.join("attach").exists() {
            Ok(())
        } else {
            Err(UsbError::Vhci(format!(
                "{} has no attach file: load the vhci-hcd module (modprobe vhci-hcd) and run as root",
                self.dir.display()
            )))
        }
    }

    /// Every port of every controller.
    pub fn ports(&self) -> Result<Vec<VhciPort>, UsbError> {
        self.check()?;
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(io_err(format!("reading {}", self.dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n == "status" || n.starts_with("status.")
            })
            .map(|e| e.path())
            .collect();
        files.sort();
        let mut ports = Vec::new();
        for f in files {
            let text =
                fs::read_to_string(&f).map_err(io_err(format!("reading {}", f.display())))?;
            ports.extend(parse_status(&text));
        }
        ports.sort_by_key(|p| p.port);
        Ok(ports)
    }

    /// A free port of the hub a device of `speed` needs.
    pub fn free_port(&self, speed: UsbSpeed) -> Result<u32, UsbError> {
        let hub = if speed.is_superspeed() {
            Hub::Super
        } else {
            Hub::High
        };
        self.ports()?
            .into_iter()
            .find(|p| p.hub == hub && p.is_free())
            .map(|p| p.port)
            .ok_or_else(|| {
                UsbError::Vhci(format!(
                    "no free {hub:?}-speed vhci port (see cio usb port)"
                ))
            })
    }

    /// Hands the kernel `stream` as the device `devid` on `port`.
    pub fn attach(
        &self,
        port: u32,
        stream: &impl AsRawFd,
        devid: u32,
        speed: UsbSpeed,
    ) -> Result<(), UsbError> {
        let line = format!("{port} {} {devid} {}", stream.as_raw_fd(), speed as u32);
        fs::write(self.dir.join("attach"), &line)
            .map_err(io_err(format!("attaching to vhci port {port} ({line:?})")))
    }

    /// Detaches whatever is on `port`.
    pub fn detach(&self, port: u32) -> Result<(), UsbError> {
        self.check()?;
        fs::write(self.dir.join("detach"), port.to_string())
            .map_err(io_err(format!("detaching vhci port {port}")))?;
        let _ = fs::remove_file(Path::new(STATE_DIR).join(format!("port{port}")));
        Ok(())
    }
}

/// Where `port`'s device came from, as recorded at attach.
pub fn port_record(port: u32) -> Option<String> {
    fs::read_to_string(Path::new(STATE_DIR).join(format!("port{port}"))).ok()
}

fn record_port(port: u32, text: &str) {
    let dir = Path::new(STATE_DIR);
    if let Err(e) =
        fs::create_dir_all(dir).and_then(|()| fs::write(dir.join(format!("port{port}")), text))
    {
        warn!("recording port {port} in {STATE_DIR}: {e}");
    }
}

/// An imported device attached to a vhci port.
#[derive(Debug)]
pub struct Attached {
    /// The vhci port.
    pub port: u32,
    /// The device.
    pub device: UsbDevice,
    /// Where it came from.
    pub source: UsbSource,
    relay: Option<(Conn, Handshake, UnixStream)>,
    keepalive: Duration,
}

/// How a relay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// The device was detached here (vhci closed its end).
    Detached,
    /// The backend ended the import or the link was lost.
    Lost(String),
}

impl Imported {
    /// The URB stream itself, for a userspace USB/IP client instead of the
    /// kernel (tests, userspace drivers). A cio import is relayed by a
    /// background thread that ends with the stream.
    pub fn into_stream(
        self,
    ) -> Result<(UrbStream, Option<std::thread::JoinHandle<RelayEnd>>), UsbError> {
        match self.link {
            Link::Stock(tcp) => Ok((UrbStream::Tcp(tcp), None)),
            Link::Direct(Conn::Tcp(tcp)) => Ok((UrbStream::Tcp(tcp), None)),
            Link::Direct(Conn::Unix(s)) => Ok((UrbStream::Unix(s), None)),
            Link::Direct(Conn::Tls(_) | Conn::Rdma(_)) => {
                unreachable!("direct imports need a plain socket")
            }
            Link::Cio { conn, hs } => {
                let (ours, theirs) =
                    cio_transports::relay_pair().map_err(io_err("creating a socket pair"))?;
                let keepalive = self.keepalive;
                let t = std::thread::Builder::new()
                    .name("cio-usb-relay".into())
                    .spawn(move || relay(conn, *hs, ours, keepalive))
                    .map_err(io_err("starting the relay"))?;
                Ok((UrbStream::Unix(theirs), Some(t)))
            }
        }
    }

    /// Attaches the device to a free vhci port of the right speed.
    pub fn attach(self, vhci: &Vhci) -> Result<Attached, UsbError> {
        let dev = &self.device;
        let (kernel_end, relay) = match self.link {
            Link::Cio { conn, hs } => {
                let (ours, theirs) =
                    cio_transports::relay_pair().map_err(io_err("creating a socket pair"))?;
                (OwnedFd::from(theirs), Some((conn, *hs, ours)))
            }
            Link::Stock(tcp) => (OwnedFd::from(tcp), None),
            Link::Direct(Conn::Tcp(s)) => (OwnedFd::from(s), None),
            Link::Direct(Conn::Unix(s)) => (OwnedFd::from(s), None),
            Link::Direct(Conn::Tls(_) | Conn::Rdma(_)) => {
                unreachable!("direct imports need a plain socket")
            }
        };
        // Another attach may take the port between the look and the write:
        // try the next free one a few times.
        let mut last = None;
        for _ in 0..4 {
            let port = vhci.free_port(dev.speed)?;
            match vhci.attach(port, &kernel_end, dev.devid(), dev.speed) {
                Ok(()) => {
                    drop(kernel_end); // the kernel holds its own reference
                    record_port(
                        port,
                        &format!(
                            "{}/{} {:04x}:{:04x} pid {}\n",
                            self.source,
                            dev.busid,
                            dev.vendor,
                            dev.product,
                            std::process::id()
                        ),
                    );
                    info!(port, busid = %dev.busid, source = %self.source, "attached");
                    return Ok(Attached {
                        port,
                        device: self.device,
                        source: self.source,
                        relay,
                        keepalive: self.keepalive,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }
}

/// The URB stream of an imported device, for a userspace USB/IP client.
#[derive(Debug)]
pub enum UrbStream {
    /// A Unix stream: relayed from a cio session by a background thread,
    /// or a direct import over a Unix socket.
    Unix(UnixStream),
    /// Straight from a stock USB/IP server.
    Tcp(TcpStream),
}

impl UrbStream {
    /// Ends the import (the relay, if any, closes the session).
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Bounds blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for UrbStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for UrbStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Attached {
    /// True if this process must keep running to carry the device (cio
    /// sources); stock USB/IP sources are carried by the kernel alone.
    pub fn needs_relay(&self) -> bool {
        self.relay.is_some()
    }

    /// Relays the URB stream until the device is detached or the link is
    /// lost; either way both ends are closed when it returns.
    pub fn relay(mut self) -> RelayEnd {
        let Some((conn, hs, stream)) = self.relay.take() else {
            return RelayEnd::Detached;
        };
        let end = relay(conn, hs, stream, self.keepalive);
        let _ = fs::remove_file(Path::new(STATE_DIR).join(format!("port{}", self.port)));
        end
    }
}

/// Moves the URB stream between `stream` (vhci) and the session.
fn relay(conn: Conn, hs: Handshake, stream: UnixStream, keepalive: Duration) -> RelayEnd {
    let Handshake { out, dec, .. } = hs;
    let link_timeout = keepalive * 4;
    let conn = Arc::new(conn);
    let out = Arc::new(Mutex::new(out));
    let send = {
        let (conn, out) = (Arc::clone(&conn), Arc::clone(&out));
        move |m: &Message| -> io::Result<()> {
            let mut q = out.lock().unwrap_or_else(|e| e.into_inner());
            q.push(m, 0);
            q.write_to(&conn, Some(link_timeout)).map(|_| ())
        }
    };
    let _ = conn.set_read_timeout(Some(link_timeout));
    let _ = conn.set_write_timeout(Some(link_timeout));
    let Ok(down_stream) = stream.try_clone() else {
        return RelayEnd::Lost("cloning the vhci stream".into());
    };
    // Each side shuts both streams when it ends, which ends the other side
    // too; what ended first is what happened.
    let first: Arc<Mutex<Option<RelayEnd>>> = Arc::default();
    let record = {
        let first = Arc::clone(&first);
        move |end: RelayEnd| {
            first
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(end)
                .clone()
        }
    };
    // Backend to kernel, on its own thread.
    let down = {
        let conn = Arc::clone(&conn);
        let send = send.clone();
        let record = record.clone();
        std::thread::Builder::new()
            .name("cio-usb-down".into())
            .spawn(move || {
                record(downstream(&conn, dec, &down_stream, &send, link_timeout));
                let _ = down_stream.shutdown(Shutdown::Both);
                let _ = conn.shutdown();
            })
    };
    let down = match down {
        Ok(t) => t,
        Err(e) => return RelayEnd::Lost(format!("starting the relay: {e}")),
    };
    // Kernel to backend, here.
    let _ = stream.set_read_timeout(Some(keepalive));
    let mut rx = BytesMut::new();
    let up_end = loop {
        match cio_transports::sys::recv_into(stream.as_fd(), &mut rx, MAX_USB_CHUNK, false) {
            Ok(0) => {
                if record(RelayEnd::Detached) == RelayEnd::Detached {
                    let _ = send(&Message::Goodbye);
                }
                break RelayEnd::Detached;
            }
            Ok(_) => {
                let data = rx.split().freeze();
                if let Err(e) = send(&Message::UsbData { data }) {
                    break RelayEnd::Lost(format!("sending to the backend: {e}"));
                }
            }
            Err(e) if timed_out(&e) => {
                if let Err(e) = send(&Message::Ping {
                    payload: Bytes::new(),
                }) {
                    break RelayEnd::Lost(format!("pinging the backend: {e}"));
                }
            }
            // The down side shut the stream: its reason wins.
            Err(e) => break RelayEnd::Lost(format!("vhci stream: {e}")),
        }
    };
    let end = record(up_end);
    let _ = stream.shutdown(Shutdown::Both);
    let _ = conn.shutdown();
    let _ = down.join();
    end
}

fn downstream(
    conn: &Conn,
    mut dec: FrameDecoder,
    mut stream: &UnixStream,
    send: &impl Fn(&Message) -> io::Result<()>,
    link_timeout: Duration,
) -> RelayEnd {
    loop {
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return RelayEnd::Lost(format!("protocol violation by the backend: {e}")),
            };
            match frame.msg {
                Message::UsbData { data } => {
                    if stream.write_all(&data).is_err() {
                        // vhci closed its end: the device was detached.
                        return RelayEnd::Detached;
                    }
                }
                Message::Ping { payload } => {
                    let _ = send(&Message::Pong { payload });
                }
                Message::Pong { .. } => {}
                Message::Goodbye => return RelayEnd::Lost("the backend ended the import".into()),
                Message::Error { code, message } => {
                    return RelayEnd::Lost(format!("backend: {message} ({})", code.name()))
                }
                m => {
                    return RelayEnd::Lost(format!(
                    "protocol violation by the backend: message type {:#06x} during a USB import",
                    m.kind()
                ))
                }
            }
        }
        match conn.recv_into(dec.buffer(), MAX_USB_CHUNK + 64, false) {
            Ok(0) => return RelayEnd::Lost("the backend closed the connection".into()),
            Ok(_) => {}
            Err(e) if timed_out(&e) => {
                return RelayEnd::Lost(format!(
                    "no word from the backend for {:?}: link lost",
                    link_timeout
                ))
            }
            Err(e) => {
                debug!("receive from the backend: {e}");
                return RelayEnd::Lost(format!("link lost: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "hub port sta spd dev      sockfd local_busid
hs  0000 006 003 00010002 000003 3-1
hs  0001 004 000 00000000 000000 0-0
ss  0015 004 000 00000000 000000 0-0
ss  0016 006 005 00020003 000004 4-1
";

    #[test]
    fn vhci_status_parses_and_free_ports_follow_the_speed() {
        let p = parse_status(STATUS);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].local_busid, "3-1");
        assert_eq!(p[0].devid, 0x0001_0002);
        assert_eq!(p[0].speed, UsbSpeed::High);
        assert!(!p[0].is_free() && p[1].is_free());
        assert_eq!(p[3].hub, Hub::Super);
        let dir = std::env::temp_dir().join(format!("cio-vhci-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("attach"), "").unwrap();
        fs::write(dir.join("status"), STATUS).unwrap();
        let v = Vhci::at(&dir);
        assert_eq!(v.free_port(UsbSpeed::High).unwrap(), 1);
        assert_eq!(v.free_port(UsbSpeed::Super).unwrap(), 15);
        fs::write(
            dir.join("status.1"),
            "hub port\nss  0045 004 000 00000000 000000 0-0\n",
        )
        .unwrap();
        assert_eq!(v.ports().unwrap().len(), 5);
        fs::write(
            dir.join("status"),
            STATUS.replace("ss  0015 004", "ss  0015 006"),
        )
        .unwrap();
        assert_eq!(v.free_port(UsbSpeed::Super).unwrap(), 45);
        fs::remove_dir_all(&dir).unwrap();
        let missing = Vhci::at("/nonexistent-vhci").ports().unwrap_err();
        assert!(
            missing.to_string().contains("modprobe vhci-hcd"),
            "{missing}"
        );
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            "usbip://127.0.0.1".parse::<UsbSource>().unwrap(),
            UsbSource::Usbip("127.0.0.1:3240".parse().unwrap())
        );
        assert_eq!(
            "usbip://127.0.0.1:3241".parse::<UsbSource>().unwrap(),
            UsbSource::Usbip("127.0.0.1:3241".parse().unwrap())
        );
        assert!(matches!(
            "127.0.0.1".parse::<UsbSource>().unwrap(),
            UsbSource::Cio(_)
        ));
        assert!("usbip://".parse::<UsbSource>().is_err());
    }
}
