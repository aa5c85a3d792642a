//! Who gets in: connections still in their handshake have slots of their
//! own, separate from the session slots, so that unauthenticated or silent
//! connections cannot fill the session table.
//!
//! - At most `Limits::max_handshakes` connections are in their handshake at
//!   once. When a new one arrives and every slot is taken, the *oldest* is
//!   evicted (as a SYN cache does): a flood of idle connections cannot keep
//!   a client that completes its handshake promptly from getting in.
//! - At most `Limits::max_handshakes_per_peer` of them come from one IP
//!   address; more are refused at once.
//! - Sessions count against `Limits::max_sessions` once authenticated.
//!
//! Refusals are logged at most once a second ([`LogGate`]), with a count of
//! the ones not logged.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mio::Waker;

/// A connection in its handshake, as the admission table knows it.
#[derive(Debug)]
struct Entry {
    session: u64,
    peer: Option<IpAddr>,
    waker: Weak<Waker>,
    evict: Arc<AtomicBool>,
}

/// The handshake slots of a server.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Oldest first.
    entries: VecDeque<Entry>,
    per_peer: HashMap<IpAddr, usize>,
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections in their handshake now.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Gives session `session` (from `peer`) a handshake slot, evicting the
    /// oldest holder when all `max` are taken. Refused when `peer` already
    /// holds `per_peer` of them.
    pub(crate) fn enter(
        &self,
        session: u64,
        peer: Option<IpAddr>,
        waker: Weak<Waker>,
        evict: Arc<AtomicBool>,
        max: usize,
        per_peer: usize,
    ) -> Result<(), String> {
        let mut t = self.lock();
        if let Some(ip) = peer {
            let n = t.per_peer.get(&ip).copied().unwrap_or(0);
            if n >= per_peer {
                return Err(format!(
                    "{ip} already has {n} connections in their handshake (limit max_handshakes_per_peer = {per_peer})"
                ));
            }
        }
        if t.entries.len() >= max.max(1) {
            if let Some(old) = t.entries.pop_front() {
                t.forget_peer(old.peer);
                old.evict.store(true, Ordering::Release);
                if let Some(w) = old.waker.upgrade() {
                    let _ = w.wake();
                }
            }
        }
        if let Some(ip) = peer {
            *t.per_peer.entry(ip).or_default() += 1;
        }
        t.entries.push_back(Entry {
            session,
            peer,
            waker,
            evict,
        });
        Ok(())
    }

    /// Session `session` finished its handshake (or ended): its slot is free.
    pub(crate) fn leave(&self, session: u64) {
        let mut t = self.lock();
        if let Some(i) = t.entries.iter().position(|e| e.session == session) {
            let e = t.entries.remove(i).expect("found above");
            t.forget_peer(e.peer);
        }
    }
}

impl Table {
    fn forget_peer(&mut self, peer: Option<IpAddr>) {
        let Some(ip) = peer else { return };
        if let Some(n) = self.per_peer.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&ip);
            }
        }
    }
}

/// Lets a kind of log line through at most once a second, and says how
/// many were held back in between.
#[derive(Debug)]
pub struct LogGate {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Default for LogGate {
    fn default() -> Self {
        Self {
            state: Mutex::new((None, 0)),
        }
    }
}

impl LogGate {
    /// What to append to a line let through after `held` were held back.
    pub fn held(held: u64) -> String {
        if held == 0 {
            String::new()
        } else {
            format!(" ({held} similar not logged)")
        }
    }

    /// `Some(n)` if a line may be logged now (`n` lines were held back
    /// since the last one), `None` to stay quiet.
    pub fn pass(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.0
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            s.1 += 1;
            return None;
        }
        let held = s.1;
        *s = (Some(now), 0);
        Some(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        a: &Admission,
        id: u64,
        ip: &str,
        max: usize,
    ) -> (Result<(), String>, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        let r = a.enter(id, ip.parse().ok(), Weak::new(), Arc::clone(&flag), max, 2);
        (r, flag)
    }

    #[test]
    fn the_oldest_is_evicted_and_one_peer_cannot_take_every_slot() {
        let a = Admission::default();
        let (r1, f1) = entry(&a, 1, "127.0.0.2", 3);
        let (r2, _) = entry(&a, 2, "127.0.0.2", 3);
        assert!(r1.is_ok() && r2.is_ok());
        // A third from the same address is refused, naming the limit.
        let (r3, _) = entry(&a, 3, "127.0.0.2", 3);
        assert!(r3.unwrap_err().contains("max_handshakes_per_peer"));
        let (r4, _) = entry(&a, 4, "127.0.0.3", 3);
        assert!(r4.is_ok());
        assert_eq!(a.len(), 3);
        // Full: the next one evicts the oldest (1), which frees its peer's count.
        let (r5, f5) = entry(&a, 5, "127.0.0.4", 3);
        assert!(r5.is_ok() && f1.load(Ordering::Relaxed));
        assert_eq!(a.len(), 3);
        let (r6, _) = entry(&a, 6, "127.0.0.2", 3);
        assert!(r6.is_ok(), "127.0.0.2 holds one slot again");
        a.leave(5);
        a.leave(5);
        assert!(!f5.load(Ordering::Relaxed));
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn the_gate_lets_one_line_a_second_through_and_counts_the_rest() {
        let g = LogGate::default();
        assert_eq!(g.pass(), Some(0));
        assert_eq!(g.pass(), None);
        assert_eq!(g.pass(), None);
        *g.state.lock().unwrap() = (Some(Instant::now() - Duration::from_secs(2)), 2);
        assert_eq!(g.pass(), Some(2));
    }
}
