//! Connections and listeners over TCP (plain or TLS), Unix sockets and
//! RDMA, and in-process pairs for tests. Each has one file descriptor, so
//! the backend polls them with mio and the frontend with poll(2); a TLS or
//! RDMA connection may also hold received bytes ([`Conn::buffered`]), a TLS
//! one encrypted bytes not yet sent ([`Conn::flush_pending`]), which the
//! pollers ask about. An RDMA connection's fd only ever becomes readable
//! (its sends wait for credits, which arrive as completions): wait for room
//! to send with [`Conn::wait_writable`], never with POLLOUT.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;

use crate::rdma::{RdmaListener, RdmaStream};
use crate::tls::{ClientTls, ServerTls, TlsStream};
use crate::{sys, Endpoint, Error, Fingerprint};

/// A connected byte stream.
#[derive(Debug)]
pub enum Conn {
    /// TCP (TCP_NODELAY is always set).
    Tcp(TcpStream),
    /// Unix stream socket (also used for in-process pairs).
    Unix(UnixStream),
    /// TLS 1.3 over TCP.
    Tls(Box<TlsStream>),
    /// RDMA (see [`crate::rdma`]).
    Rdma(Box<RdmaStream>),
}

impl Conn {
    /// Connects to `ep`, trying each resolved address for at most `timeout`.
    pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Self, Error> {
        let conn = match ep {
            Endpoint::Tcp(_) => Self::Tcp(first_reachable(ep, |a| {
                TcpStream::connect_timeout(&a, timeout)
            })?),
            Endpoint::Unix(p) => {
                Self::Unix(UnixStream::connect(p).map_err(|source| Error::Connect {
                    endpoint: ep.to_string(),
                    source,
                })?)
            }
            Endpoint::Rdma(_) => Self::Rdma(Box::new(first_reachable(ep, |a| {
                RdmaStream::connect(a, timeout)
            })?)),
        };
        conn.tune().map_err(|source| Error::Connect {
            endpoint: ep.to_string(),
            source,
        })?;
        Ok(conn)
    }

    /// Connects to `ep` and runs the TLS handshake, both within `timeout`.
    /// TLS runs over TCP only.
    pub fn connect_tls(ep: &Endpoint, timeout: Duration, tls: &ClientTls) -> Result<Self, Error> {
        let why = match ep {
            Endpoint::Unix(_) => Some("TLS runs over TCP only; a unix: socket needs no encryption"),
            Endpoint::Rdma(_) => Some(
                "TLS runs over TCP only; an rdma: link is plaintext, authenticated by a pre-shared key (--psk-file)",
            ),
            Endpoint::Tcp(_) => None,
        };
        if let Some(why) = why {
            return Err(Error::Tls {
                endpoint: ep.to_string(),
                why: why.into(),
                transient: false,
            });
        }
        let start = std::time::Instant::now();
        let Self::Tcp(sock) = Self::connect(ep, timeout)? else {
            unreachable!("a TCP endpoint gives a TCP connection")
        };
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        Ok(Self::Tls(Box::new(TlsStream::client(sock, tls, ep, left)?)))
    }

    /// Wraps an accepted TCP connection in the server side of TLS; the
    /// handshake runs as the connection is read.
    pub fn into_tls_server(self, tls: &ServerTls) -> io::Result<Self> {
        match self {
            Self::Tcp(s) => Ok(Self::Tls(Box::new(TlsStream::server(s, tls)?))),
            other => Ok(other),
        }
    }

    /// True for a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// True for a plain kernel socket (TCP or Unix), which a kernel driver
    /// can take over (a direct USB import): not TLS, not RDMA.
    pub fn is_plain_socket(&self) -> bool {
        matches!(self, Self::Tcp(_) | Self::Unix(_))
    }

    /// The peer's key fingerprint (TLS, once the handshake is done).
    pub fn peer_key(&self) -> Option<Fingerprint> {
        match self {
            Self::Tls(t) => t.peer_key(),
            _ => None,
        }
    }

    /// Keying material unique to this TLS session, which a pre-shared
    /// key's proofs are bound to (`None` on plain connections).
    pub fn binding(&self) -> Option<[u8; 32]> {
        match self {
            Self::Tls(t) => t.binding(),
            _ => None,
        }
    }

    /// True if received bytes wait inside the connection (TLS, RDMA): read
    /// before polling the socket.
    pub fn buffered(&self) -> bool {
        match self {
            Self::Tls(t) => t.buffered(),
            Self::Rdma(r) => r.buffered(),
            _ => false,
        }
    }

    /// Waits up to `t` for room to send; true if there is (or the
    /// connection failed, which the next send reports).
    pub fn wait_writable(&self, t: Duration) -> io::Result<bool> {
        match self {
            Self::Rdma(r) => r.wait_writable(t),
            _ => sys::poll_writable(self.as_fd(), t),
        }
    }

    /// Sends, without waiting, bytes a non-blocking TLS write left
    /// encrypted inside the connection; true when none are left (always on
    /// plain connections).
    pub fn flush_pending(&self) -> io::Result<bool> {
        match self {
            Self::Tls(t) => t.flush_pending(),
            _ => Ok(true),
        }
    }

    /// Sends from `data` without waiting, whatever the connection's mode.
    pub fn send_nonblocking(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tls(t) => t.send(&[IoSlice::new(data)], true),
            Self::Rdma(r) => r.send(&[IoSlice::new(data)], true),
            _ => sys::send_nonblocking(self.as_fd(), data),
        }
    }

    /// Receives into `buf`; with `nonblocking`, without waiting. `Ok(0)` is
    /// end of stream.
    pub fn recv_slice(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        match self {
            Self::Tls(t) => t.recv_slice(buf, nonblocking),
            Self::Rdma(r) => r.recv_slice(buf, nonblocking),
            _ => sys::recv_slice(self.as_fd(), buf, nonblocking),
        }
    }

    /// Two connected ends in this process (a Unix socketpair).
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Self::Unix(a), Self::Unix(b)))
    }

    fn tune(&self) -> io::Result<()> {
        if let Self::Tcp(s) = self {
            s.set_nodelay(true)?;
        }
        Ok(())
    }

    /// Switches blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(on),
            Self::Unix(s) => s.set_nonblocking(on),
            Self::Tls(t) => {
                t.mode().set_nonblocking(on);
                Ok(())
            }
            Self::Rdma(r) => {
                r.mode().set_nonblocking(on);
                Ok(())
            }
        }
    }

    /// Bounds blocking reads; `None` waits forever.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tls(s) => {
                s.mode().set_read_timeout(t);
                Ok(())
            }
            Self::Rdma(s) => {
                s.mode().set_read_timeout(t);
                Ok(())
            }
        }
    }

    /// Bounds blocking writes; `None` waits forever.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
            Self::Tls(s) => {
                s.mode().set_write_timeout(t);
                Ok(())
            }
            Self::Rdma(s) => {
                s.mode().set_write_timeout(t);
                Ok(())
            }
        }
    }

    /// Turns on TCP keepalive (probes after `idle` without traffic, every
    /// `interval`, `retries` times) so a peer that vanished without a word
    /// is noticed even by a kernel that owns the socket. No-op on Unix
    /// sockets, and on RDMA (whose NIC retries each send and fails it when
    /// the peer stops answering; the session's pings make sends happen).
    pub fn set_keepalive(
        &self,
        idle: Duration,
        interval: Duration,
        retries: u32,
    ) -> io::Result<()> {
        match self {
            Self::Tcp(s) => set_tcp_keepalive(s, idle, interval, retries),
            Self::Tls(t) => set_tcp_keepalive(t.socket(), idle, interval, retries),
            Self::Unix(_) | Self::Rdma(_) => Ok(()),
        }
    }

    /// Shuts both directions down (the peer sees end of stream; a TLS peer
    /// a close_notify first).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tls(t) => t.shutdown(),
            Self::Rdma(r) => r.shutdown(),
        }
    }

    /// The peer's IP address (TCP only).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Self::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Self::Tls(t) => t.socket().peer_addr().ok().map(|a| a.ip()),
            Self::Unix(_) | Self::Rdma(_) => None,
        }
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Self::Tls(t) => t
                .socket()
                .peer_addr()
                .map_or_else(|_| "tls:?".into(), |a| format!("tls:{a}")),
            Self::Unix(_) => "unix".into(),
            Self::Rdma(r) => r.peer().to_string(),
        }
    }

    /// Receives into `buf`'s spare capacity; see [`sys::recv_into`].
    pub fn recv_into(
        &self,
        buf: &mut BytesMut,
        want: usize,
        nonblocking: bool,
    ) -> io::Result<usize> {
        match self {
            Self::Tls(t) => t.recv_into(buf, want, nonblocking),
            Self::Rdma(r) => r.recv_into(buf, want, nonblocking),
            _ => sys::recv_into(self.as_fd(), buf, want, nonblocking),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
            Self::Tls(t) => t.socket().as_fd(),
            Self::Rdma(r) => r.as_fd(),
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
            Conn::Tls(t) => (&**t).read(buf),
            Conn::Rdma(r) => r.recv_slice(buf, false),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Never raises SIGPIPE (see [`sys::send_vectored`]).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tls(t) => (&**t).write_vectored(bufs),
            Conn::Rdma(r) => r.send(bufs, false),
            _ => sys::send_vectored(self.as_fd(), bufs, false),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket. A Unix listener removes its socket file when dropped.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with the path to remove on drop.
    Unix(UnixListener, PathBuf),
    /// RDMA.
    Rdma(RdmaListener),
}

/// Connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`).
const BACKLOG: i32 = 1024;

impl Listener {
    /// Binds `ep`. The listener is non-blocking, ready for a poll loop.
    /// A stale Unix socket file (nothing accepting on it) is replaced.
    pub fn bind(ep: &Endpoint) -> Result<Self, Error> {
        let err = |source| Error::Bind {
            endpoint: ep.to_string(),
            source,
        };
        let l = match ep {
            Endpoint::Tcp(_) => {
                let addrs = ep.resolve()?;
                Self::Tcp(TcpListener::bind(&addrs[..]).map_err(err)?)
            }
            Endpoint::Unix(p) => {
                if p.exists() && UnixStream::connect(p).is_err() {
                    use std::os::unix::fs::FileTypeExt;
                    if std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                        std::fs::remove_file(p).map_err(err)?;
                    }
                }
                Self::Unix(UnixListener::bind(p).map_err(err)?, p.clone())
            }
            Endpoint::Rdma(_) => {
                let addr = ep.resolve()?[0];
                // The connection manager's listener is non-blocking already.
                return Ok(Self::Rdma(RdmaListener::bind(addr).map_err(err)?));
            }
        };
        // A deep accept queue: under a flood of connections a client's SYN
        // waits there instead of being dropped (and retried a second later).
        // Listening again on a listening socket only changes its backlog.
        match &l {
            Self::Tcp(s) => socket2::SockRef::from(s).listen(BACKLOG),
            Self::Unix(s, _) => socket2::SockRef::from(s).listen(BACKLOG),
            Self::Rdma(_) => Ok(()),
        }
        .map_err(err)?;
        match &l {
            Self::Tcp(s) => s.set_nonblocking(true),
            Self::Unix(s, _) => s.set_nonblocking(true),
            Self::Rdma(_) => Ok(()),
        }
        .map_err(err)?;
        Ok(l)
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Self::Tcp(s) => Endpoint::from(s.local_addr()?),
            Self::Unix(_, p) => Endpoint::Unix(p.clone()),
            Self::Rdma(r) => Endpoint::Rdma(r.local_addr().to_string()),
        })
    }

    /// Accepts one pending connection (blocking mode, TCP_NODELAY set);
    /// `WouldBlock` when none is pending.
    pub fn accept(&self) -> io::Result<Conn> {
        let c = match self {
            Self::Tcp(s) => Conn::Tcp(s.accept()?.0),
            Self::Unix(s, _) => Conn::Unix(s.accept()?.0),
            Self::Rdma(r) => Conn::Rdma(Box::new(r.accept()?)),
        };
        c.set_nonblocking(false)?;
        c.tune()?;
        Ok(c)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s, _) => s.as_fd(),
            Self::Rdma(r) => r.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Connects to the first of `ep`'s resolved addresses that answers; the
/// error is the last address's.
fn first_reachable<T>(
    ep: &Endpoint,
    mut connect: impl FnMut(std::net::SocketAddr) -> io::Result<T>,
) -> Result<T, Error> {
    let mut last = None;
    for addr in ep.resolve()? {
        match connect(addr) {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Connect {
        endpoint: ep.to_string(),
        source: last.unwrap_or_else(|| io::Error::other("no address")),
    })
}

/// TCP keepalive on any TCP socket; see [`Conn::set_keepalive`].
pub fn set_tcp_keepalive(
    s: &std::net::TcpStream,
    idle: Duration,
    interval: Duration,
    retries: u32,
) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(retries);
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

/// Send buffer of [`relay_pair`] sockets.
pub const RELAY_BUFFER: usize = 4 << 20;

/// A connected Unix stream pair for relaying a bulk stream between a kernel
/// driver and this process: each end's send buffer is [`RELAY_BUFFER`] (as
/// far as the process may raise it), so a megabyte transfer wakes the
/// reader once instead of once per default-sized buffer.
pub fn relay_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        crate::sys::set_send_buffer(s.as_fd(), RELAY_BUFFER)?;
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the `rdma` feature an RDMA endpoint fails at once, saying how
    /// to get a build that has it; with it, on a machine without an RDMA
    /// device (this host), it says what is missing.
    #[test]
    fn an_rdma_endpoint_without_rdma_says_why() {
        let ep: Endpoint = "rdma:127.0.0.1:9".parse().unwrap();
        let e = Conn::connect(&ep, Duration::from_secs(2)).unwrap_err();
        let Error::Connect { source, .. } = &e else {
            panic!("{e:?}")
        };
        let why = source.to_string();
        if cfg!(feature = "rdma") {
            assert!(why.contains("RDMA"), "{why}");
        } else {
            assert!(why.contains("--features rdma"), "{why}");
        }
        let l = Listener::bind(&ep).unwrap_err();
        assert!(matches!(l, Error::Bind { .. }), "{l:?}");
    }
}
