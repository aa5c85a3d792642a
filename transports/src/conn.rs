//! Connections and listeners over TCP and Unix sockets, and in-process
//! pairs for tests. All are plain file descriptors, so the backend polls
//! them with mio and the frontend with poll(2).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;

use crate::{sys, Endpoint, Error};

/// A connected byte stream.
#[derive(Debug)]
pub enum Conn {
    /// TCP (TCP_NODELAY is always set).
    Tcp(TcpStream),
    /// Unix stream socket (also used for in-process pairs).
    Unix(UnixStream),
}

impl Conn {
    /// Connects to `ep`, trying each resolved address for at most `timeout`.
    pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Self, Error> {
        let conn = match ep {
            Endpoint::Tcp(_) => {
                let mut last = None;
                let mut stream = None;
                for addr in ep.resolve()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match stream {
                    Some(s) => Self::Tcp(s),
                    None => {
                        return Err(Error::Connect {
                            endpoint: ep.to_string(),
                            source: last.unwrap_or_else(|| io::Error::other("no address")),
                        })
                    }
                }
            }
            Endpoint::Unix(p) => {
                Self::Unix(UnixStream::connect(p).map_err(|source| Error::Connect {
                    endpoint: ep.to_string(),
                    source,
                })?)
            }
        };
        conn.tune().map_err(|source| Error::Connect {
            endpoint: ep.to_string(),
            source,
        })?;
        Ok(conn)
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
        }
    }

    /// Bounds blocking reads; `None` waits forever.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Bounds blocking writes; `None` waits forever.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Turns on TCP keepalive (probes after `idle` without traffic, every
    /// `interval`, `retries` times) so a peer that vanished without a word
    /// is noticed even by a kernel that owns the socket. No-op on Unix
    /// sockets.
    pub fn set_keepalive(
        &self,
        idle: Duration,
        interval: Duration,
        retries: u32,
    ) -> io::Result<()> {
        if let Self::Tcp(s) = self {
            set_tcp_keepalive(s, idle, interval, retries)?;
        }
        Ok(())
    }

    /// Shuts both directions down (the peer sees end of stream).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// The peer's IP address (TCP only).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Self::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Self::Unix(_) => None,
        }
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Self::Unix(_) => "unix".into(),
        }
    }

    /// Receives into `buf`'s spare capacity; see [`sys::recv_into`].
    pub fn recv_into(
        &self,
        buf: &mut BytesMut,
        want: usize,
        nonblocking: bool,
    ) -> io::Result<usize> {
        sys::recv_into(self.as_fd(), buf, want, nonblocking)
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
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
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write_vectored(bufs),
            Conn::Unix(s) => (&*s).write_vectored(bufs),
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
        };
        // A deep accept queue: under a flood of connections a client's SYN
        // waits there instead of being dropped (and retried a second later).
        // Listening again on a listening socket only changes its backlog.
        match &l {
            Self::Tcp(s) => socket2::SockRef::from(s).listen(BACKLOG),
            Self::Unix(s, _) => socket2::SockRef::from(s).listen(BACKLOG),
        }
        .map_err(err)?;
        match &l {
            Self::Tcp(s) => s.set_nonblocking(true),
            Self::Unix(s, _) => s.set_nonblocking(true),
        }
        .map_err(err)?;
        Ok(l)
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Self::Tcp(s) => Endpoint::from(s.local_addr()?),
            Self::Unix(_, p) => Endpoint::Unix(p.clone()),
        })
    }

    /// Accepts one pending connection (blocking mode, TCP_NODELAY set);
    /// `WouldBlock` when none is pending.
    pub fn accept(&self) -> io::Result<Conn> {
        let c = match self {
            Self::Tcp(s) => Conn::Tcp(s.accept()?.0),
            Self::Unix(s, _) => Conn::Unix(s.accept()?.0),
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
