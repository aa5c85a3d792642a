//! What the pump thread sleeps on: its stop and kick eventfds and the
//! connection. A caller that reads the connection itself (waiting for its
//! reply) mutes the connection in the pump's set for as long as it reads,
//! so that a reply wakes only the thread that waits for it, not the pump
//! as well (two wake-ups per reply, and the pump fighting the caller for
//! the receive lock).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use cio_core::EventFd;
use cio_transports::{sys::Epoll, Conn};

use super::target::lock;

const STOP: u64 = 0;
const KICK: u64 = 1;
const CONN: u64 = 2;

/// The pump's epoll set; see the module documentation.
#[derive(Debug)]
pub(crate) struct Watch {
    set: Epoll,
    st: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The connection in the set: its fd and generation.
    conn: Option<(RawFd, u64)>,
    /// Callers reading the connection right now (usually one).
    readers: usize,
}

impl Watch {
    pub(crate) fn new(stop: &EventFd, kick: &EventFd) -> io::Result<Self> {
        let set = Epoll::new()?;
        set.add(stop.as_raw_fd(), STOP, true)?;
        set.add(kick.as_raw_fd(), KICK, true)?;
        Ok(Self {
            set,
            st: Mutex::new(State::default()),
        })
    }

    /// A caller reads the connection itself until the guard is dropped.
    pub(crate) fn reading(&self) -> Reading<'_> {
        self.enter();
        Reading(self)
    }

    /// A caller starts reading the connection itself: the first mutes it.
    fn enter(&self) {
        let mut st = lock(&self.st);
        st.readers += 1;
        if st.readers == 1 {
            self.watch_conn(&st, false);
        }
    }

    /// A caller stopped reading: the last unmutes the connection (whatever
    /// arrived meanwhile wakes the pump at once).
    fn leave(&self) {
        let mut st = lock(&self.st);
        st.readers -= 1;
        if st.readers == 0 {
            self.watch_conn(&st, true);
        }
    }

    /// Callers reading the connection right now.
    pub(crate) fn readers(&self) -> usize {
        lock(&self.st).readers
    }

    fn watch_conn(&self, st: &State, readable: bool) {
        if let Some((fd, _)) = st.conn {
            // Fails only if the connection was replaced and closed: the
            // pump adds the new one before it waits again.
            let _ = self.set.modify(fd, CONN, readable);
        }
    }

    /// The pump's wait, until `timeout`: on stop, kick and `conn` (of
    /// `generation`, replacing an older connection in the set), the last
    /// muted while callers read it. Which of the three are ready.
    pub(crate) fn wait(
        &self,
        conn: &Conn,
        generation: u64,
        timeout: Option<Duration>,
    ) -> io::Result<[bool; 3]> {
        {
            let mut st = lock(&self.st);
            if st.conn.map(|(_, g)| g) != Some(generation) {
                if let Some((old, _)) = st.conn.take() {
                    // Already gone if the old connection was closed.
                    let _ = self.set.delete(old);
                }
                let fd = conn.as_raw_fd();
                self.set.add(fd, CONN, st.readers == 0)?;
                st.conn = Some((fd, generation));
            }
        }
        let mut ready = [false; 3];
        self.set.wait(timeout, |token| {
            if let Some(r) = ready.get_mut(token as usize) {
                *r = true;
            }
        })?;
        Ok(ready)
    }
}

/// A caller reading the connection (see [`Watch::reading`]).
pub(crate) struct Reading<'a>(&'a Watch);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}
