//! Helpers shared by the integration tests: an in-process `ciod` on a real
//! loopback TCP port, and clients for it.
#![allow(dead_code)]

use std::time::Duration;

use cio_backend::models::{Edu, Memory};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_frontend::{Client, ClientOptions};
use cio_transports::{Endpoint, Psk};

pub const KEY: &[u8] = b"test-key-0123456789abcdef";

/// A server on 127.0.0.1 with an ephemeral port serving edu0 and mem0.
pub fn server() -> ServerHandle {
    server_with(None, Limits::default())
}

pub fn server_with(psk: Option<Psk>, limits: Limits) -> ServerHandle {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk,
        devices: vec![
            Box::new(Edu::new("edu0")),
            Box::new(Memory::new("mem0", 1 << 20).unwrap()),
        ],
        limits,
    };
    Server::bind(cfg).unwrap().spawn().unwrap()
}

pub fn connect(ep: &Endpoint) -> Client {
    Client::connect(ep, opts()).unwrap()
}

pub fn opts() -> ClientOptions {
    ClientOptions {
        reply_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

/// Waits until the server has no sessions, devices, shadow memory or irq
/// fds left, and fails the test with the counters if it does not happen.
pub fn assert_idle(s: &ServerHandle) {
    let r = s.wait_stats(Duration::from_secs(5), |st| {
        st.sessions == 0 && st.open_devices == 0 && st.shadow_bytes == 0 && st.irq_fds == 0
    });
    assert!(
        r.is_ok(),
        "server did not release everything: {:?}",
        r.unwrap_err()
    );
}
