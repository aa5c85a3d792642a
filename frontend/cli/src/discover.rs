//! `cio discover`: the backends that announce themselves by mDNS/DNS-SD
//! (`_cio._tcp`) on the networks of this machine (and on loopback), and
//! their devices, listed with the usual link options.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cio_backend::announce::SERVICE;
use cio_frontend::Client;
use cio_transports::Endpoint;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
use serde_json::{json, Value};

use crate::keys::LinkArgs;

/// One backend found.
#[derive(Debug)]
struct Found {
    name: String,
    endpoint: Endpoint,
    tls: bool,
    key: String,
    devices: String,
}

/// Browses for `wait`, then prints what answered (and, with `list`, the
/// devices of each).
pub fn run(wait: Duration, as_json: bool, list: bool, link: &LinkArgs) -> Result<(), String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    daemon
        .enable_interface(IfKind::LoopbackV4)
        .map_err(|e| format!("mDNS: {e}"))?;
    let rx = daemon.browse(SERVICE).map_err(|e| format!("mDNS: {e}"))?;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let end = Instant::now() + wait;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let Ok(ev) = rx.recv_timeout(left.min(Duration::from_millis(200))) else {
            continue;
        };
        if let ServiceEvent::ServiceResolved(info) = ev {
            let mut addrs: Vec<std::net::IpAddr> = info
                .get_addresses()
                .iter()
                .map(|a| a.to_ip_addr())
                .collect();
            addrs.sort_by_key(|a| !a.is_ipv4());
            let Some(ip) = addrs.first() else { continue };
            let prop = |k: &str| info.get_property_val_str(k).unwrap_or("?").to_string();
            found.insert(
                info.get_fullname().to_string(),
                Found {
                    name: info
                        .get_fullname()
                        .trim_end_matches(SERVICE)
                        .trim_end_matches('.')
                        .to_string(),
                    endpoint: Endpoint::from(std::net::SocketAddr::new(*ip, info.get_port())),
                    tls: prop("tls") == "1",
                    key: prop("key"),
                    devices: prop("devices"),
                },
            );
        }
    }
    let _ = daemon.shutdown();
    let listed = |f: &Found| -> Result<Vec<String>, String> {
        let c = Client::connect(&f.endpoint, link.options(&f.endpoint)?)
            .map_err(|e| cio_core::error_chain(&e))?;
        Ok(c.list()
            .map_err(|e| cio_core::error_chain(&e))?
            .into_iter()
            .map(|d| d.name)
            .collect())
    };
    if as_json {
        let backends: Vec<Value> = found
            .values()
            .map(|f| {
                let (names, error) = match list.then(|| listed(f)) {
                    Some(Ok(n)) => (json!(n), Value::Null),
                    Some(Err(e)) => (Value::Null, json!(e)),
                    None => (Value::Null, Value::Null),
                };
                json!({
                    "name": f.name,
                    "address": f.endpoint.to_string().trim_start_matches("tcp:"),
                    "tls": f.tls,
                    "key": f.key,
                    "devices": f.devices.parse::<u64>().ok(),
                    "listed": names,
                    "error": error,
                })
            })
            .collect();
        outln!("{}", json!({ "backends": backends }));
        return Ok(());
    }
    if found.is_empty() {
        outln!("no cio backend answered within {:.0}s", wait.as_secs_f64());
        return Ok(());
    }
    for f in found.values() {
        let addr = f.endpoint.to_string();
        let security = if f.tls {
            format!("TLS, key {}", f.key)
        } else {
            "plaintext".into()
        };
        outln!(
            "{}  {}  ({security}; {} devices)",
            f.name,
            addr.trim_start_matches("tcp:"),
            f.devices
        );
        if list {
            match listed(f) {
                Ok(names) => outln!("    devices: {}", names.join(", ")),
                Err(e) => outln!("    cannot list its devices: {e}"),
            }
        }
    }
    Ok(())
}
