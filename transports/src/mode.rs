//! The blocking mode and timeouts of a connection that is not a plain
//! socket (TLS, RDMA): what a socket's kernel keeps and applies, kept here
//! and applied by the stream's own waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Non-blocking mode and the read and write timeouts.
#[derive(Debug, Default)]
pub(crate) struct Mode {
    nonblocking: AtomicBool,
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
}

impl Mode {
    pub(crate) fn set_nonblocking(&self, on: bool) {
        self.nonblocking.store(on, Ordering::Relaxed);
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) {
        self.timeouts.lock().unwrap_or_else(|e| e.into_inner()).0 = t;
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) {
        self.timeouts.lock().unwrap_or_else(|e| e.into_inner()).1 = t;
    }

    /// Whether a call must not wait: the caller asked so (`asked`), or the
    /// connection is in non-blocking mode.
    pub(crate) fn nonblocking(&self, asked: bool) -> bool {
        asked || self.nonblocking.load(Ordering::Relaxed)
    }

    /// When a read (or, with `write`, a write) starting now gives up.
    pub(crate) fn deadline(&self, write: bool) -> Option<Instant> {
        let t = self.timeouts.lock().unwrap_or_else(|e| e.into_inner());
        let t = if write { t.1 } else { t.0 };
        t.map(|t| Instant::now() + t)
    }
}
