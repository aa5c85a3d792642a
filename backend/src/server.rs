//! The listening daemon: accepts connections and runs one session thread
//! each, until shut down.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use cio_core::Device;
use cio_transports::{Endpoint, Listener, Psk, ServerTls};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::os::fd::{AsFd, AsRawFd};
use tracing::{error, info, warn};

use crate::registry::Registry;
use crate::session::{Limits, LogGate, Session, Shared};
use crate::usb::UsbProvider;

/// What a server serves and how.
#[derive(Debug)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: Endpoint,
    /// Key clients must prove. Required unless `listen` is loopback or a
    /// Unix socket.
    pub psk: Option<Psk>,
    /// Devices to serve (names must be unique).
    pub devices: Vec<Box<dyn Device>>,
    /// Limits.
    pub limits: Limits,
    /// USB devices to export (default: none).
    pub usb: Arc<UsbProvider>,
    /// Plaintext or TLS.
    pub security: Security,
}

/// How a listener protects its connections.
#[derive(Debug, Clone, Default)]
pub enum Security {
    /// Plaintext, allowed only on loopback addresses and Unix sockets (the
    /// default).
    #[default]
    LocalPlaintext,
    /// TLS 1.3 on every connection.
    Tls(ServerTls),
    /// Plaintext on an address that reaches beyond this machine, asked for
    /// explicitly (`--insecure-plaintext`); a pre-shared key is required.
    InsecurePlaintext,
}

impl Security {
    /// Whether a listener on `listen` may be protected this way (with or
    /// without a pre-shared key): the rule `bind` applies.
    pub fn check(&self, listen: &Endpoint, psk: bool) -> Result<(), ServerError> {
        let local = listen.is_local_only()?;
        if let Endpoint::Rdma(_) = listen {
            return match self {
                Self::InsecurePlaintext if psk => Ok(()),
                _ => Err(ServerError::Config(format!(
                    "{listen}: an RDMA link is plaintext (TLS runs over TCP only): listen there with --insecure-plaintext and --psk-file, on a fabric you trust"
                ))),
            };
        }
        match self {
            Self::LocalPlaintext if !local => Err(ServerError::NeedsTls(listen.to_string())),
            Self::InsecurePlaintext if !psk && !local => {
                Err(ServerError::NeedsKey(listen.to_string()))
            }
            Self::Tls(_) if matches!(listen, Endpoint::Unix(_)) => Err(ServerError::Config(
                "TLS runs over TCP only; a unix: socket needs no encryption".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Loads what the configuration names: TLS with the identity at
    /// `identity` (and the clients in `clients`, or any client key when a
    /// pre-shared key is configured and no file is given), else plaintext,
    /// insecure beyond loopback only when `insecure` says so.
    pub fn load(
        identity: Option<&std::path::Path>,
        clients: Option<&std::path::Path>,
        insecure: bool,
        psk: bool,
    ) -> Result<Self, String> {
        let Some(identity) = identity else {
            if clients.is_some() {
                return Err("authorized_clients is set but no identity: TLS needs the backend's identity (make one with `ciod keygen FILE`)".into());
            }
            return Ok(if insecure {
                Self::InsecurePlaintext
            } else {
                Self::LocalPlaintext
            });
        };
        if insecure {
            return Err("an identity (TLS) and insecure_plaintext exclude each other".into());
        }
        let id = cio_transports::Identity::load(identity).map_err(|e| cio_core::error_chain(&e))?;
        let allowed = match clients {
            Some(p) => {
                cio_transports::AuthorizedClients::load(p).map_err(|e| cio_core::error_chain(&e))?
            }
            None => Default::default(),
        };
        if allowed.is_empty() && !psk {
            return Err("TLS is configured but no client could connect: list client keys in authorized_clients (their `cio keygen` fingerprints), or set psk_file to let any client key in that proves the key".into());
        }
        let any = allowed.is_empty() && psk;
        Ok(Self::Tls(
            ServerTls::new(&id, allowed, any).map_err(|e| cio_core::error_chain(&e))?,
        ))
    }
}

/// Server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Listening beyond this machine without a key.
    #[error("refusing to listen on {0} in plaintext without a pre-shared key: anyone who can reach it could drive the devices (use TLS with --identity, or --psk-file, or listen on 127.0.0.1 or a unix: socket)")]
    NeedsKey(String),
    /// Listening beyond this machine without TLS.
    #[error("refusing to listen on {0} without TLS: device registers and DMA would cross the network in the clear (give --identity, made with `ciod keygen`; or --insecure-plaintext with --psk-file on a network you trust; or listen on 127.0.0.1 or a unix: socket)")]
    NeedsTls(String),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A transport failed.
    #[error(transparent)]
    Transport(#[from] cio_transports::Error),
    /// An OS call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A bound server, not yet accepting.
#[derive(Debug)]
pub struct Server {
    listener: Listener,
    endpoint: Endpoint,
    shared: Arc<Shared>,
}

/// A snapshot of a running server's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Sessions running.
    pub sessions: usize,
    /// Sessions accepted since start.
    pub sessions_total: u64,
    /// Devices open.
    pub open_devices: usize,
    /// Bytes of shadow DMA memory mapped.
    pub shadow_bytes: u64,
    /// Interrupt eventfds registered.
    pub irq_fds: usize,
    /// Sessions ended by a protocol error.
    pub protocol_errors: u64,
    /// Connections in their handshake now.
    pub handshaking: usize,
    /// Authenticated sessions now (parked ones included).
    pub authenticated: usize,
    /// Sessions parked now: link lost, waiting for a resume.
    pub parked: usize,
    /// Connections that took a session over since start.
    pub resumes: u64,
    /// Bytes queued to send, all sessions together.
    pub queued_bytes: usize,
}

impl Server {
    /// Checks the configuration and binds the listener.
    pub fn bind(cfg: ServerConfig) -> Result<Self, ServerError> {
        cfg.security.check(&cfg.listen, cfg.psk.is_some())?;
        let registry = Registry::new(cfg.devices).map_err(ServerError::Config)?;
        let mut shared = Shared::new(registry, cfg.usb, cfg.psk, cfg.limits);
        if let Security::Tls(t) = cfg.security {
            shared.tls = Some(t);
        }
        let listener = Listener::bind(&cfg.listen)?;
        let endpoint = listener
            .local_endpoint()
            .map_err(|source| ServerError::Io {
                what: "reading the bound address",
                source,
            })?;
        Ok(Self {
            listener,
            endpoint,
            shared: Arc::new(shared),
        })
    }

    /// Sets what releasing device `name` does when the device cannot be
    /// reset to its power-on state (see [`Release`](crate::registry::Release)).
    pub fn set_release(
        &self,
        name: &str,
        release: crate::registry::Release,
    ) -> Result<(), ServerError> {
        self.shared
            .registry
            .set_release(name, release)
            .map_err(ServerError::Config)
    }

    /// Sets who may use which device.
    pub fn set_access(&self, access: crate::access::Access) {
        self.shared.set_access(access);
    }

    /// The address actually listened on.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Starts accepting on a background thread.
    pub fn spawn(self) -> Result<ServerHandle, ServerError> {
        let io_err = |what| move |source| ServerError::Io { what, source };
        let poll = Poll::new().map_err(io_err("creating the poll"))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKE).map_err(io_err("creating a waker"))?);
        poll.registry()
            .register(
                &mut SourceFd(&self.listener.as_fd().as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )
            .map_err(io_err("polling the listener"))?;
        let endpoint = self.endpoint.clone();
        let shared = Arc::clone(&self.shared);
        match &self.shared.tls {
            Some(t) => {
                info!(%endpoint, key = %t.fingerprint(), psk = self.shared.psk.is_some(), "listening with TLS")
            }
            None => info!(%endpoint, psk = self.shared.psk.is_some(), "listening in plaintext"),
        }
        let thread = std::thread::Builder::new()
            .name("ciod-accept".into())
            .spawn(move || self.accept_loop(poll))
            .map_err(io_err("spawning the accept thread"))?;
        Ok(ServerHandle {
            endpoint,
            shared,
            waker,
            thread: Some(thread),
        })
    }

    fn accept_loop(self, mut poll: Poll) {
        let mut events = Events::with_capacity(16);
        let mut sessions: Vec<(Weak<Waker>, JoinHandle<()>)> = Vec::new();
        'outer: loop {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("poll failed, stopping: {e}");
                break;
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    break 'outer;
                }
            }
            sessions.retain(|(_, t)| !t.is_finished());
            loop {
                let conn = match self.listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // One connection failed before it was ours (an RDMA
                    // request whose peer gave up); the next may be fine.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                        if let Some(held) = self.shared.refusals.pass() {
                            warn!("{e}{}", LogGate::held(held));
                        }
                        continue;
                    }
                    Err(e) => {
                        // Out of fds or similar: back off instead of spinning.
                        error!("accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                };
                match Session::new(conn, Arc::clone(&self.shared)) {
                    Ok((mut session, waker)) => {
                        if let Err(why) = session.admit() {
                            if let Some(held) = self.shared.refusals.pass() {
                                warn!("refusing a connection: {why}{}", LogGate::held(held));
                            }
                            session.refuse(why);
                            continue;
                        }
                        match std::thread::Builder::new()
                            .name("ciod-session".into())
                            .spawn(move || session.run())
                        {
                            Ok(t) => sessions.push((waker, t)),
                            Err(e) => error!("spawning a session thread: {e}"),
                        }
                    }
                    Err(e) => error!("setting up a session: {e}"),
                }
            }
        }
        self.shared.stopping.store(true, Ordering::Relaxed);
        for (w, _) in &sessions {
            if let Some(w) = w.upgrade() {
                let _ = w.wake();
            }
        }
        for (_, t) in sessions {
            let _ = t.join();
        }
        info!(endpoint = %self.endpoint, "stopped");
    }
}

const LISTENER: Token = Token(0);
const WAKE: Token = crate::session::WAKE;

/// A running server. Dropping it shuts the server down.
#[derive(Debug)]
pub struct ServerHandle {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Where it listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Replaces the access rules (a config reload): new lists and opens
    /// follow them at once; devices already open stay open.
    pub fn set_access(&self, access: crate::access::Access) {
        self.shared.set_access(access);
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            sessions: c.sessions.load(Ordering::Relaxed),
            sessions_total: c.sessions_total.load(Ordering::Relaxed),
            open_devices: self.shared.registry.open_count(),
            shadow_bytes: c.shadow_bytes.load(Ordering::Relaxed),
            irq_fds: c.irq_fds.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            handshaking: self.shared.handshaking(),
            authenticated: c.authenticated.load(Ordering::Relaxed),
            resumes: c.resumes.load(Ordering::Relaxed),
            queued_bytes: c.queued_bytes.load(Ordering::Relaxed),
        }
    }

    /// Waits until `pred` holds for the stats, for at most `timeout`
    /// (sessions wind down on their own threads). Returns the last stats.
    pub fn wait_stats(
        &self,
        timeout: Duration,
        pred: impl Fn(&Stats) -> bool,
    ) -> Result<Stats, Stats> {
        let end = std::time::Instant::now() + timeout;
        loop {
            let s = self.stats();
            if pred(&s) {
                return Ok(s);
            }
            if std::time::Instant::now() >= end {
                return Err(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops accepting, ends every session (their devices are reset and
    /// their DMA unmapped) and waits for all of it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.waker.wake();
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rdma_listener_needs_insecure_plaintext_and_a_key() {
        let ep: Endpoint = "rdma:10.0.0.1:7451".parse().unwrap();
        for (security, psk) in [
            (Security::LocalPlaintext, true),
            (Security::InsecurePlaintext, false),
        ] {
            let e = security.check(&ep, psk).unwrap_err().to_string();
            assert!(e.contains("--insecure-plaintext and --psk-file"), "{e}");
        }
        Security::InsecurePlaintext.check(&ep, true).unwrap();
    }
}
