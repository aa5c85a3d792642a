//! A TCP proxy between a client and a server that can cut every link it
//! carries: with a reset (RST both ways), or silently (it keeps the
//! connections open and drops every byte, as a dead router would).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cio_transports::{sys, Endpoint};

/// How a link is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Both ends get a reset.
    Reset,
    /// Nothing gets through any more, and nobody is told.
    Silent,
}

const LIVE: u8 = 0;
const RESET: u8 = 1;
const SILENT: u8 = 2;
/// Reset, and both sockets closed.
const GONE: u8 = 3;

struct State {
    stop: AtomicBool,
    /// Connections accepted and then closed at once (the link is down).
    refuse: AtomicBool,
    /// Live links: their state and a handle on each socket (to wake the
    /// forwarding threads when a link is cut).
    links: Mutex<Vec<(Arc<AtomicU8>, TcpStream, TcpStream)>>,
    accepted: AtomicUsize,
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub fn start(target: &Endpoint) -> Self {
        let target: SocketAddr = target.resolve().expect("a TCP endpoint")[0];
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            stop: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
        });
        let st = Arc::clone(&state);
        let accept = std::thread::spawn(move || {
            let mut pairs = Vec::new();
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if st.refuse.load(Ordering::Relaxed) {
                            continue; // closed at once
                        }
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        st.accepted.fetch_add(1, Ordering::Relaxed);
                        let flag = Arc::new(AtomicU8::new(LIVE));
                        let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else {
                            continue;
                        };
                        st.links.lock().unwrap().push((Arc::clone(&flag), c, s));
                        let st = Arc::clone(&st);
                        pairs.push(std::thread::spawn(move || {
                            forward(client, server, &flag, &st)
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        let _ = sys::poll_readable(&[&listener], Some(Duration::from_millis(10)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
                pairs.retain(|t: &JoinHandle<()>| !t.is_finished());
            }
            for t in pairs {
                let _ = t.join();
            }
        });
        Self {
            addr,
            state,
            threads: vec![accept],
        }
    }

    /// Where clients connect.
    pub fn endpoint(&self) -> Endpoint {
        self.addr.to_string().parse().unwrap()
    }

    /// Cuts every live link; returns how many. A reset has been sent to
    /// both ends when it returns.
    pub fn cut(&self, how: Cut) -> usize {
        let links = std::mem::take(&mut *self.state.links.lock().unwrap());
        let code = match how {
            Cut::Reset => RESET,
            Cut::Silent => SILENT,
        };
        let mut cut = Vec::new();
        for (l, c, s) in links {
            if l.compare_exchange(LIVE, code, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if how == Cut::Reset {
                // Sends nothing; wakes the threads polling these sockets.
                for x in [&c, &s] {
                    reset(x);
                    let _ = x.shutdown(std::net::Shutdown::Read);
                }
            }
            cut.push(l);
        }
        if how == Cut::Reset {
            let end = std::time::Instant::now() + Duration::from_secs(1);
            while cut.iter().any(|l| l.load(Ordering::Acquire) != GONE)
                && std::time::Instant::now() < end
            {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        cut.len()
    }

    /// While set, new connections are closed as soon as they arrive.
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::Relaxed);
    }

    /// Links forwarding now (not cut, neither side closed).
    pub fn live(&self) -> usize {
        let links = self.state.links.lock().unwrap();
        links
            .iter()
            .filter(|(l, _, _)| l.load(Ordering::Acquire) == LIVE)
            .count()
    }

    /// Waits up to 5 s until `n` links forward.
    pub fn wait_live(&self, n: usize) {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while self.live() != n {
            assert!(
                std::time::Instant::now() < end,
                "{} live links, expected {n}",
                self.live()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Moves bytes both ways (a thread each) until a side closes, the link
/// is cut or the proxy stops. Every wait is bounded, so a cut takes effect
/// within 10 ms.
fn forward(client: TcpStream, server: TcpStream, flag: &Arc<AtomicU8>, st: &Arc<State>) {
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_millis(10)));
    }
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (f, s) = (Arc::clone(flag), Arc::clone(st));
    let back = std::thread::spawn(move || one_way(s2, c2, &f, &s));
    one_way(client, server, flag, st);
    let _ = back.join();
    flag.store(GONE, Ordering::Release);
}

fn one_way(mut from: TcpStream, mut to: TcpStream, flag: &AtomicU8, st: &State) {
    let mut buf = vec![0u8; 64 * 1024];
    let cut = || st.stop.load(Ordering::Relaxed) || flag.load(Ordering::Acquire) == RESET;
    loop {
        if cut() {
            reset(&from);
            reset(&to);
            return; // the last of the dup'd fds to close sends the resets
        }
        match sys::poll_readable(&[&from], Some(Duration::from_millis(10))) {
            Ok(r) if r[0] => {}
            Ok(_) => continue,
            Err(_) => return,
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if !cut() {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        while !data.is_empty() && flag.load(Ordering::Acquire) == LIVE {
            if cut() {
                break;
            }
            match to.write(data) {
                Ok(0) => return,
                Ok(k) => data = &data[k..],
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
        // Silent: what was read is dropped on the floor.
    }
}
