//! Plain USB/IP on TCP (port 3240 by default), so the stock `usbip` client
//! can list and attach what `ciod` exports.
//!
//! One thread accepts; each connection gets a thread that answers one
//! `OP_REQ_DEVLIST` or `OP_REQ_IMPORT`. After an import it relays the URB
//! stream between the TCP connection and the export until either side
//! closes; the export is then dropped, which restores the device. Plain
//! USB/IP has no authentication: listen on addresses only trusted peers
//! reach.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use cio_core::error_chain;
use cio_core::usbip::{
    encode_devlist, encode_import_reply, fixed_str, op, OpHeader, UsbipError, BUSID_LEN,
    OP_HEADER_LEN,
};
use tracing::{debug, info, warn};

use super::{lock, UsbProvider};

/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Relays a stream both ways until either side ends; returns the bytes
/// moved (a to b, b to a). Both sockets are shut down on return.
pub fn relay(a: &TcpStream, b: &UnixStream) -> io::Result<(u64, u64)> {
    fn pump(mut from: impl Read, mut to: impl Write) -> u64 {
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0;
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return total;
                    }
                    total += n as u64;
                }
            }
        }
    }
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let back = std::thread::Builder::new()
        .name("cio-usbip-relay".into())
        .spawn(move || {
            let n = pump(&b2, &a2);
            let _ = a2.shutdown(Shutdown::Both);
            let _ = b2.shutdown(Shutdown::Both);
            n
        })?;
    let fwd = pump(a, b);
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
    let rev = back.join().unwrap_or(0);
    Ok((fwd, rev))
}

/// A bound plain USB/IP server.
#[derive(Debug)]
pub struct UsbipServer {
    listener: TcpListener,
    addr: SocketAddr,
    provider: Arc<UsbProvider>,
}

/// A running [`UsbipServer`]; dropping it stops it and ends every import.
#[derive(Debug)]
pub struct UsbipHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<(u64, TcpStream)>>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl UsbipServer {
    /// Binds `addr`.
    pub fn bind(addr: SocketAddr, provider: Arc<UsbProvider>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            io::Error::new(e.kind(), format!("listening for USB/IP on {addr}: {e}"))
        })?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            addr,
            provider,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts accepting on a background thread.
    pub fn spawn(self) -> io::Result<UsbipHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let workers = Arc::new(Mutex::new(Vec::new()));
        let (s, c, w) = (stop.clone(), conns.clone(), workers.clone());
        let addr = self.addr;
        if !addr.ip().is_loopback() {
            warn!(%addr, "plain USB/IP has no authentication: anyone who reaches {addr} can attach the exported USB devices");
        }
        info!(%addr, "serving plain USB/IP");
        let accept = std::thread::Builder::new()
            .name("cio-usbip-accept".into())
            .spawn(move || self.accept_loop(s, c, w))?;
        Ok(UsbipHandle {
            addr,
            stop,
            conns,
            workers,
            accept: Some(accept),
        })
    }

    fn accept_loop(
        self,
        stop: Arc<AtomicBool>,
        conns: Arc<Mutex<Vec<(u64, TcpStream)>>>,
        workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) {
        let ids = AtomicU64::new(1);
        for conn in self.listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    warn!("accepting a USB/IP connection: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let id = ids.fetch_add(1, Ordering::Relaxed);
            if let Ok(c) = conn.try_clone() {
                lock(&conns).push((id, c));
            }
            let provider = Arc::clone(&self.provider);
            let conns = Arc::clone(&conns);
            let spawned = std::thread::Builder::new()
                .name("cio-usbip-conn".into())
                .spawn(move || {
                    let peer = conn
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|_| "?".into());
                    if let Err(e) = serve(&conn, &provider, &peer) {
                        warn!(%peer, "USB/IP request failed: {}", error_chain(&e));
                    }
                    lock(&conns).retain(|(i, _)| *i != id);
                });
            match spawned {
                Ok(t) => {
                    let mut w = lock(&workers);
                    w.retain(|t| !t.is_finished());
                    w.push(t);
                }
                Err(e) => warn!("spawning a USB/IP connection thread: {e}"),
            }
        }
    }
}

impl UsbipHandle {
    /// The address served.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends every import (restoring its device) and waits.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = accept.join();
        for (_, c) in lock(&self.conns).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        for t in lock(&self.workers).drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for UsbipHandle {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn serve(conn: &TcpStream, provider: &Arc<UsbProvider>, peer: &str) -> io::Result<()> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = [0u8; OP_HEADER_LEN];
    let mut r = conn;
    match r.read_exact(&mut head) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        other => other?,
    }
    let bad = |e: UsbipError| io::Error::new(io::ErrorKind::InvalidData, e);
    let h = OpHeader::decode(&head).map_err(bad)?;
    let mut out = BytesMut::new();
    match h.code {
        op::REQ_DEVLIST => {
            let devices = provider.list();
            debug!(peer, "USB/IP device list: {} devices", devices.len());
            encode_devlist(&devices, &mut out);
            (&*conn).write_all(&out)
        }
        op::REQ_IMPORT => {
            let mut busid = [0u8; BUSID_LEN];
            r.read_exact(&mut busid)?;
            let busid = fixed_str(&busid).map_err(bad)?;
            let export = match provider.import(&busid, peer) {
                Ok(e) => e,
                Err(e) => {
                    encode_import_reply(None, &mut out);
                    (&*conn).write_all(&out)?;
                    return Err(io::Error::other(format!(
                        "import of {busid:?}: {}",
                        error_chain(&e)
                    )));
                }
            };
            encode_import_reply(Some(&export.device), &mut out);
            (&*conn).write_all(&out)?;
            conn.set_read_timeout(None)?;
            let _ = conn.set_nodelay(true);
            info!(peer, busid, "USB/IP import started");
            let stream = export.stream().expect("a relayed export has a stream");
            let (rx, tx) = relay(conn, stream)?;
            info!(peer, busid, rx, tx, "USB/IP import ended");
            Ok(())
        }
        other => Err(bad(UsbipError::Op(other))),
    }
}
