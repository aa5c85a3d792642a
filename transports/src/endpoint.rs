//! Where to connect or listen: `HOST:PORT`, `tcp:HOST:PORT`, `unix:PATH` or
//! `rdma:HOST:PORT`.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use crate::Error;

/// TCP port `ciod` listens on when none is given.
pub const DEFAULT_PORT: u16 = 7451;

/// A transport address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP, as `host:port` (resolved when used).
    Tcp(String),
    /// A Unix stream socket path.
    Unix(PathBuf),
    /// RDMA (reliable connected, set up by the RDMA connection manager), as
    /// `host:port` of an RDMA device's IP interface.
    Rdma(String),
}

impl Endpoint {
    /// Resolves a TCP endpoint to socket addresses.
    pub fn resolve(&self) -> Result<Vec<SocketAddr>, Error> {
        match self {
            Self::Tcp(hp) | Self::Rdma(hp) => {
                let addrs: Vec<SocketAddr> = hp
                    .to_socket_addrs()
                    .map_err(|source| Error::Resolve {
                        endpoint: self.to_string(),
                        source,
                    })?
                    .collect();
                if addrs.is_empty() {
                    return Err(Error::Resolve {
                        endpoint: self.to_string(),
                        source: std::io::Error::other("no addresses"),
                    });
                }
                Ok(addrs)
            }
            Self::Unix(_) => Ok(Vec::new()),
        }
    }

    /// True if only this machine can reach it: a Unix socket, or TCP whose
    /// every resolved address is loopback. RDMA never is (an RDMA device
    /// has no loopback interface).
    pub fn is_local_only(&self) -> Result<bool, Error> {
        match self {
            Self::Unix(_) => Ok(true),
            Self::Tcp(_) => Ok(self.resolve()?.iter().all(|a| a.ip().is_loopback())),
            Self::Rdma(_) => Ok(false),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(hp) => write!(f, "tcp:{hp}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Rdma(hp) => write!(f, "rdma:{hp}"),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a.to_string())
    }
}

impl FromStr for Endpoint {
    type Err = Error;

    /// Parses `unix:PATH`, `tcp:HOST:PORT`, `HOST:PORT`, `[V6]:PORT`, a bare
    /// `HOST` (port [`DEFAULT_PORT`]), or any of the TCP forms after
    /// `rdma:`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::BadEndpoint(format!("{s:?}: {why}"));
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(hp) = s.strip_prefix("rdma:") {
            return match hp.parse::<Self>() {
                Ok(Self::Tcp(hp)) if !hp.is_empty() && !s.starts_with("rdma:tcp:") => {
                    Ok(Self::Rdma(hp))
                }
                Ok(_) => Err(bad("expected rdma:HOST:PORT")),
                Err(e) => Err(e),
            };
        }
        let hp = s.strip_prefix("tcp:").unwrap_or(s);
        if hp.is_empty() {
            return Err(bad("empty address"));
        }
        // A bare IPv6 address, or a host without a port.
        if hp.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
            return Ok(Self::Tcp(format!("[{hp}]:{DEFAULT_PORT}")));
        }
        let (host, port) = match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h, p),
            Some(_) => return Err(bad("missing host")),
            None => return Ok(Self::Tcp(format!("{hp}:{DEFAULT_PORT}"))),
        };
        port.parse::<u16>()
            .map_err(|_| bad("port is not a number from 0 to 65535"))?;
        Ok(Self::Tcp(format!("{host}:{port}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let e = |s: &str| s.parse::<Endpoint>().unwrap();
        assert_eq!(e("unix:/tmp/x"), Endpoint::Unix("/tmp/x".into()));
        assert_eq!(e("tcp:127.0.0.1:9"), Endpoint::Tcp("127.0.0.1:9".into()));
        assert_eq!(e("localhost:9"), Endpoint::Tcp("localhost:9".into()));
        assert_eq!(
            e("10.0.0.1"),
            Endpoint::Tcp(format!("10.0.0.1:{DEFAULT_PORT}"))
        );
        assert_eq!(e("::1"), Endpoint::Tcp(format!("[::1]:{DEFAULT_PORT}")));
        assert_eq!(e("[::1]:5"), Endpoint::Tcp("[::1]:5".into()));
        assert_eq!(e("rdma:10.0.0.2:9"), Endpoint::Rdma("10.0.0.2:9".into()));
        assert_eq!(
            e("rdma:10.0.0.2"),
            Endpoint::Rdma(format!("10.0.0.2:{DEFAULT_PORT}"))
        );
        assert_eq!(e("rdma:10.0.0.2:9").to_string(), "rdma:10.0.0.2:9");
    }

    #[test]
    fn rejects_nonsense() {
        for s in [
            "",
            "unix:",
            "tcp:",
            ":80",
            "host:port",
            "host:70000",
            "rdma:",
            "rdma:unix:/x",
            "rdma:tcp:h:1",
            "rdma:h:x",
        ] {
            assert!(s.parse::<Endpoint>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(e("127.0.0.1:1").is_local_only().unwrap());
        assert!(e("unix:/x").is_local_only().unwrap());
        assert!(!e("0.0.0.0:1").is_local_only().unwrap());
        assert!(!e("rdma:127.0.0.1:1").is_local_only().unwrap());

        fn e(s: &str) -> Endpoint {
            s.parse().unwrap()
        }
    }
}
