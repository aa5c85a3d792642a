//! The interrupt relay: for a client whose guest memory the server reaches
//! only by messages, a device interrupt must not reach the client before
//! the data the device wrote ahead of it is in guest memory.
//!
//! Once the client maps memory without an fd, the device signals eventfds
//! of the relay instead of the client's. The relay's thread sleeps on them
//! (epoll); when one fires it sends the device's pending writes as
//! DMA_WRITEs ([`Port::flush`]), waits until the client has answered them
//! (the client writes guest memory before it answers), and only then
//! signals the client's eventfd. Every few milliseconds it also sends
//! pending writes that no interrupt announced (a driver that polls memory).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use cio_core::{EventFd, IrqKind};
use cio_transports::sys::Epoll;
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::port::Port;

/// How long the relay waits for the client to answer its DMA_WRITEs before
/// it delivers the interrupt anyway (and says so).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often pending device writes are sent without an interrupt.
const POLL: Duration = Duration::from_millis(5);

const STOP: u64 = u64::MAX;

/// One relayed vector: the device signals `device`, the relay `client`.
#[derive(Debug)]
struct Route {
    device: EventFd,
    client: EventFd,
}

#[derive(Debug)]
struct Shared {
    epoll: Epoll,
    routes: Mutex<HashMap<u64, Route>>,
}

impl Shared {
    fn routes(&self) -> MutexGuard<'_, HashMap<u64, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running relay; dropping it stops its thread.
#[derive(Debug)]
pub(super) struct Relay {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn token(kind: IrqKind, vector: usize) -> u64 {
    (kind as u64) << 32 | vector as u64
}

impl Relay {
    /// Starts the relay's thread, sending through `port`.
    pub(super) fn start(port: Arc<Port>) -> io::Result<Relay> {
        let shared = Arc::new(Shared {
            epoll: Epoll::new()?,
            routes: Mutex::new(HashMap::new()),
        });
        let stop = EventFd::new(EFD_NONBLOCK)?;
        shared.epoll.add(stop.as_raw_fd(), STOP, true)?;
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vfio-user-irq".into())
                .spawn(move || run(&shared, &port))?
        };
        Ok(Relay {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Relays the vectors of `kind` to `table` (the client's eventfds from
    /// vector 0) and returns the eventfds to give the device instead.
    pub(super) fn route(&self, kind: IrqKind, table: &[EventFd]) -> io::Result<Vec<EventFd>> {
        let mut routes = self.shared.routes();
        let old: Vec<u64> = routes
            .keys()
            .copied()
            .filter(|t| t >> 32 == kind as u64)
            .collect();
        for t in old {
            if let Some(r) = routes.remove(&t) {
                let _ = self.shared.epoll.delete(r.device.as_raw_fd());
            }
        }
        let mut device_side = Vec::with_capacity(table.len());
        for (i, client) in table.iter().enumerate() {
            let device = EventFd::new(EFD_NONBLOCK)?;
            let t = token(kind, i);
            self.shared.epoll.add(device.as_raw_fd(), t, true)?;
            device_side.push(device.try_clone()?);
            let client = client.try_clone()?;
            routes.insert(t, Route { device, client });
        }
        debug!(%kind, vectors = table.len(), "vfio-user: interrupts relayed");
        Ok(device_side)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, port: &Port) {
    loop {
        let mut fired = Vec::new();
        let mut stop = false;
        if let Err(e) = shared.epoll.wait(Some(POLL), |t| {
            if t == STOP {
                stop = true;
            } else {
                fired.push(t);
            }
        }) {
            warn!("vfio-user: interrupt relay stops: {e}");
            return;
        }
        if stop {
            return;
        }
        if fired.is_empty() {
            let _outside = port.outside_fetch();
            port.flush_posted();
            continue;
        }
        // Only vectors that really fired (a read of a vector another wait
        // already took finds nothing).
        let clients: Vec<EventFd> = {
            let routes = shared.routes();
            fired
                .iter()
                .filter_map(|t| routes.get(t))
                .filter(|r| r.device.read().is_ok())
                .filter_map(|r| r.client.try_clone().ok())
                .collect()
        };
        if clients.is_empty() {
            continue;
        }
        let ids = {
            let _outside = port.outside_fetch();
            port.flush()
        };
        if let Err(why) = port.wait(&ids, WRITE_TIMEOUT) {
            warn!(
                "vfio-user: device data ahead of an interrupt not written to guest memory: {why}"
            );
        }
        for c in clients {
            if let Err(e) = c.write(1) {
                warn!("vfio-user: signalling the client's eventfd: {e}");
            }
            port.delivered();
        }
    }
}
