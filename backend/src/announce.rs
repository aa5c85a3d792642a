//! DNS-SD over multicast DNS: `ciod` announces itself as `_cio._tcp` so
//! that `cio discover` finds it on the local network. TXT records: `v`
//! (protocol version), `tls` (1 or 0), `key` (the backend's fingerprint, or
//! `none`), `devices` (how many it serves). A listener on a loopback
//! address is announced on loopback only; one on another address (or all
//! addresses) on every interface.

use std::net::IpAddr;

use cio_transports::{Endpoint, Fingerprint};
use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

/// The DNS-SD service type.
pub const SERVICE: &str = "_cio._tcp.local.";

/// A running announcement; dropping it withdraws it.
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

/// What is announced.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// Where the backend listens (TCP).
    pub endpoint: Endpoint,
    /// The backend's TLS key, if it uses TLS.
    pub key: Option<Fingerprint>,
    /// Devices it serves (PCI and USB).
    pub devices: usize,
}

impl Announcer {
    /// Starts announcing; `Ok(None)` for a listener mDNS cannot describe (a
    /// Unix socket).
    pub fn start(a: &Announcement) -> Result<Option<Self>, String> {
        let Endpoint::Tcp(_) = &a.endpoint else {
            return Ok(None);
        };
        let addr = *a
            .endpoint
            .resolve()
            .map_err(|e| e.to_string())?
            .first()
            .ok_or("no address")?;
        let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
        let host = hostname();
        let loopback = addr.ip().is_loopback();
        if loopback {
            daemon
                .disable_interface(IfKind::All)
                .and_then(|()| daemon.enable_interface(IfKind::LoopbackV4))
                .map_err(|e| format!("mDNS: {e}"))?;
        }
        let key = a.key.map_or_else(|| "none".to_string(), |k| k.to_string());
        let devices = a.devices.to_string();
        let tls = if a.key.is_some() { "1" } else { "0" };
        let props = [
            ("v", "2"),
            ("tls", tls),
            ("key", key.as_str()),
            ("devices", devices.as_str()),
        ];
        let instance = format!("{host}-{}", addr.port());
        let ip: Vec<IpAddr> = if addr.ip().is_unspecified() {
            Vec::new()
        } else {
            vec![addr.ip()]
        };
        let mut info = ServiceInfo::new(
            SERVICE,
            &instance,
            &format!("{host}.local."),
            &ip[..],
            addr.port(),
            &props[..],
        )
        .map_err(|e| format!("mDNS: {e}"))?;
        if ip.is_empty() {
            info = info.enable_addr_auto();
        }
        let fullname = info.get_fullname().to_string();
        daemon.register(info).map_err(|e| format!("mDNS: {e}"))?;
        Ok(Some(Self { daemon, fullname }))
    }

    /// The announced instance's full DNS-SD name.
    pub fn fullname(&self) -> &str {
        &self.fullname
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if h.is_empty() {
        "ciod".into()
    } else {
        h
    }
}
