//! TLS 1.3 on a TCP connection (rustls), with identities pinned by
//! fingerprint instead of certificate authorities.
//!
//! - [`ServerTls`]: a backend's identity and the clients it lets in (or, with
//!   a pre-shared key configured, any client key: the key's proof, bound to
//!   the TLS session, then authenticates the client);
//! - [`ClientTls`]: a frontend's identity and the backend key it expects (or
//!   any key when a pre-shared key is configured, for the same reason);
//! - [`TlsStream`]: the connection, used through [`crate::Conn`] exactly
//!   like a plain socket. The socket itself is always non-blocking; blocking
//!   reads and writes wait in poll(2) with the rustls state unlocked, so one
//!   thread may wait for a reply while another sends.
//!
//! What a caller must know: decrypted bytes can wait inside the stream
//! while the socket has nothing to read ([`crate::Conn::buffered`]), and
//! encrypted bytes can wait to be sent after a non-blocking write
//! ([`crate::Conn::flush_pending`]); the send queue and the frontend's pump
//! take care of both.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use cio_core::wire::{ErrorCode, Message};
use cio_core::FrameDecoder;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName};
use rustls::{Connection, SignatureScheme};

use crate::mode::Mode;
use crate::{sys, AuthorizedClients, Endpoint, Error, Fingerprint, Identity};

/// Label of the keying material a pre-shared key's proofs are bound to
/// (RFC 5705 / RFC 8446 exporter).
pub const BINDING_LABEL: &[u8] = b"EXPORTER-cio-psk-binding";

/// Plaintext encrypted per write call at most, so a large write never
/// leaves more than this waiting inside the stream.
const WRITE_CHUNK: usize = 128 * 1024;

/// ring's provider with AES-128-GCM preferred: the fastest suite here
/// (AES instructions), as strong as the link needs; AES-256-GCM and
/// ChaCha20-Poly1305 stay allowed.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The fingerprint of the key the peer presented, once it has.
fn peer_fingerprint(conn: &Connection) -> Option<Fingerprint> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Fingerprint::of(c))
}

/// The TLS side of a backend.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    clients: Arc<RwLock<AuthorizedClients>>,
    fingerprint: Fingerprint,
}

impl ServerTls {
    /// A backend presenting `identity`, letting in the clients listed in
    /// `clients` or, with `any_client` (a pre-shared key is configured and
    /// authenticates clients), any client key.
    pub fn new(
        identity: &Identity,
        clients: AuthorizedClients,
        any_client: bool,
    ) -> Result<Self, Error> {
        let clients = Arc::new(RwLock::new(clients));
        let provider = provider();
        let verifier = Arc::new(ClientKeys {
            clients: Arc::clone(&clients),
            any_client,
            algs: provider.signature_verification_algorithms,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .map_err(tls_config)?;
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
            clients,
            fingerprint: identity.fingerprint(),
        })
    }

    /// Replaces the authorized clients (config reload); connections already
    /// made are not affected.
    pub fn set_clients(&self, clients: AuthorizedClients) {
        *self.clients.write().unwrap_or_else(|e| e.into_inner()) = clients;
    }

    /// The name an authorized client goes by.
    pub fn client_name(&self, fp: &Fingerprint) -> Option<String> {
        let c = self.clients.read().unwrap_or_else(|e| e.into_inner());
        c.name(fp).map(str::to_string)
    }

    /// The backend's own fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The rustls configuration connections use (for a baseline that
    /// drives rustls directly, as `cio bench` does).
    pub fn rustls_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.config)
    }
}

/// Which backend key a client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Exactly this key.
    Key(Fingerprint),
    /// Any key: only with a pre-shared key, whose proof (bound to the TLS
    /// session) then authenticates the backend.
    AnyWithPsk,
}

/// The TLS side of a frontend.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The client's own identity.
    pub identity: Identity,
    /// The backend key it accepts.
    pub pin: Pin,
}

impl ClientTls {
    /// The rustls configuration a connection uses (for a baseline that
    /// drives rustls directly, as `cio bench` does).
    pub fn rustls_config(&self) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        self.config(Arc::new(OnceLock::new()))
    }

    /// The configuration, its verifier recording the key the backend
    /// presents in `seen`.
    fn config(
        &self,
        seen: Arc<OnceLock<Fingerprint>>,
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let provider = provider();
        let verifier = Arc::new(BackendKey {
            pin: self.pin,
            seen,
            algs: provider.signature_verification_algorithms,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                vec![self.identity.cert.clone()],
                self.identity.key.clone_key(),
            )?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

fn tls_config(e: rustls::Error) -> Error {
    Error::Identity(format!("TLS configuration: {e}"))
}

/// The signature checks both verifiers share (each has `algs`): the peer's
/// handshake signature against the key in its certificate (the certificate
/// itself is trusted by fingerprint, not by signature); TLS 1.2 is never
/// offered.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

#[derive(Debug)]
struct ClientKeys {
    clients: Arc<RwLock<AuthorizedClients>>,
    any_client: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientKeys {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        let c = self.clients.read().unwrap_or_else(|e| e.into_inner());
        if self.any_client || c.name(&fp).is_some() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    handshake_signatures!();
}

#[derive(Debug)]
struct BackendKey {
    pin: Pin,
    /// The key the backend presented, for the error message.
    seen: Arc<OnceLock<Fingerprint>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for BackendKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        let _ = self.seen.set(fp);
        match self.pin {
            Pin::Key(want) if want != fp => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    handshake_signatures!();
}

/// Bytes kept of what the peer sent first, to tell a peer that does not
/// speak TLS from one that breaks it.
const FIRST_BYTES: usize = 512;

/// Encrypted bytes received from the socket at most per system call
/// (rustls itself would read 4 KiB at a time).
const RAW_CHUNK: usize = 64 * 1024;

struct State {
    conn: Connection,
    /// Decrypted bytes not yet taken.
    plaintext: usize,
    /// The peer closed its side (cleanly or not).
    closed: bool,
    /// The first bytes the peer sent.
    first: Vec<u8>,
    /// Received bytes not yet given to rustls: `raw[raw_at..raw_len]`.
    raw: Box<[u8]>,
    raw_at: usize,
    raw_len: usize,
    /// The last receive was short: the socket had nothing more then.
    drained: bool,
}

impl State {
    fn raw_left(&self) -> bool {
        self.raw_at < self.raw_len
    }
}

/// A TLS connection over TCP; see the module documentation.
pub struct TlsStream {
    sock: TcpStream,
    state: Mutex<State>,
    mode: Mode,
    /// This end's own fingerprint (for error messages).
    own: Fingerprint,
    /// Client side: what the backend presented.
    seen: Arc<OnceLock<Fingerprint>>,
    /// Server side: a frame to answer a plaintext client with.
    refusal: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

/// Sends for rustls without waiting and without SIGPIPE.
struct SockWrite<'a>(&'a TcpStream);

impl Write for SockWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send_nonblocking(self.0.as_fd(), buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sys::send_vectored(self.0.as_fd(), bufs, true)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one read of the socket brought.
enum Pulled {
    Data,
    Closed,
    Nothing,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl TlsStream {
    /// Runs the client handshake on `sock` within `timeout`.
    pub(crate) fn client(
        sock: TcpStream,
        tls: &ClientTls,
        endpoint: &Endpoint,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let seen = Arc::new(OnceLock::new());
        let fail = |why: String| Error::Tls {
            endpoint: endpoint.to_string(),
            why,
            transient: false,
        };
        let config = tls
            .config(Arc::clone(&seen))
            .map_err(|e| fail(e.to_string()))?;
        let name = ServerName::try_from("cio").expect("a valid name");
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| fail(e.to_string()))?;
        let s = Self::wrap(
            sock,
            Connection::Client(conn),
            tls.identity.fingerprint(),
            seen,
            None,
        )
        .map_err(|e| fail(e.to_string()))?;
        s.handshake(Instant::now() + timeout)
            .map_err(|e| Error::Tls {
                endpoint: endpoint.to_string(),
                why: e.to_string(),
                transient: e.kind() != io::ErrorKind::InvalidData,
            })?;
        Ok(s)
    }

    /// Starts the server side on an accepted `sock`; the handshake runs as
    /// the session reads (no wait here).
    pub(crate) fn server(sock: TcpStream, tls: &ServerTls) -> io::Result<Self> {
        let conn = rustls::ServerConnection::new(Arc::clone(&tls.config))
            .map_err(|e| invalid(e.to_string()))?;
        let mut refusal = bytes::BytesMut::new();
        Message::Error {
            code: ErrorCode::TLS_REQUIRED,
            message: "this backend speaks TLS only: connect with TLS (cio --tls and an identity from `cio keygen`)".into(),
        }
        .encode(1, 0, &mut refusal);
        Self::wrap(
            sock,
            Connection::Server(conn),
            tls.fingerprint,
            Arc::new(OnceLock::new()),
            Some(refusal.to_vec()),
        )
    }

    fn wrap(
        sock: TcpStream,
        mut conn: Connection,
        own: Fingerprint,
        seen: Arc<OnceLock<Fingerprint>>,
        refusal: Option<Vec<u8>>,
    ) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        conn.set_buffer_limit(Some(2 * WRITE_CHUNK));
        Ok(Self {
            sock,
            state: Mutex::new(State {
                conn,
                plaintext: 0,
                closed: false,
                first: Vec::new(),
                raw: vec![0u8; RAW_CHUNK].into_boxed_slice(),
                raw_at: 0,
                raw_len: 0,
                drained: false,
            }),
            mode: Mode::default(),
            own,
            seen,
            refusal,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TCP socket underneath.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The peer's fingerprint, once the handshake has got that far.
    pub fn peer_key(&self) -> Option<Fingerprint> {
        peer_fingerprint(&self.lock().conn)
    }

    /// Keying material both ends derive from this session (RFC 8446 7.5),
    /// `None` before the handshake is complete.
    pub fn binding(&self) -> Option<[u8; 32]> {
        let st = self.lock();
        if st.conn.is_handshaking() {
            return None;
        }
        st.conn
            .export_keying_material([0u8; 32], BINDING_LABEL, None)
            .ok()
    }

    /// Its blocking mode and timeouts.
    pub(crate) fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Waits for the socket (readable, or writable with `write`) until
    /// `deadline`; `WouldBlock` when it passes, as a socket timeout does.
    fn wait(&self, write: bool, deadline: Option<Instant>) -> io::Result<()> {
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(l) if !l.is_zero() => Some(l),
                _ => return Err(io::ErrorKind::WouldBlock.into()),
            },
            None => None,
        };
        let ready = if write {
            sys::poll_writable(self.sock.as_fd(), left.unwrap_or(Duration::from_secs(3600)))?
        } else {
            sys::poll_readable(&[&self.sock], left)?[0]
        };
        if ready || deadline.is_none() {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Sends what rustls has encrypted, without waiting; true when nothing
    /// is left.
    fn flush_locked(&self, st: &mut State) -> io::Result<bool> {
        while st.conn.wants_write() {
            match st.conn.write_tls(&mut SockWrite(&self.sock)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads the socket once, without waiting (unless received bytes are
    /// still waiting for rustls), and decrypts what came, until rustls holds
    /// a full buffer of plaintext.
    fn pull(&self, st: &mut State) -> io::Result<Pulled> {
        let mut eof = false;
        if !st.raw_left() {
            let n = match sys::recv_slice(self.sock.as_fd(), &mut st.raw, true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pulled::Nothing),
                Err(e) => return Err(e),
            };
            let before = st.first.len();
            if before < FIRST_BYTES {
                let take = n.min(FIRST_BYTES - before);
                st.first.extend_from_slice(&st.raw[..take]);
            }
            (st.raw_at, st.raw_len) = (0, n);
            st.drained = n < st.raw.len();
            if n == 0 {
                eof = true;
                st.closed = true;
                // Tells rustls the stream ended.
                let _ = st.conn.read_tls(&mut &[][..]);
            }
            if before < 2 && st.first.len() >= 2 && !(st.first[0] == 0x16 && st.first[1] == 0x03) {
                if let Some(r) = &self.refusal {
                    let _ = sys::send_nonblocking(self.sock.as_fd(), r);
                    return Err(invalid(
                        "a plaintext client connected to this TLS listener (refused with TLS_REQUIRED)"
                            .into(),
                    ));
                }
            }
        }
        loop {
            if st.raw_left() {
                let mut rest = &st.raw[st.raw_at..st.raw_len];
                match st.conn.read_tls(&mut rest) {
                    // Closed by the peer's close_notify: the rest is ignored.
                    Ok(0) => st.raw_at = st.raw_len,
                    Ok(n) => st.raw_at += n,
                    // rustls holds all the plaintext it takes: the caller
                    // must take some first.
                    Err(_) if st.plaintext > 0 => break,
                    Err(e) => return Err(e),
                }
            }
            match st.conn.process_new_packets() {
                Ok(io) => st.plaintext = io.plaintext_bytes_to_read(),
                Err(e) => {
                    let _ = self.flush_locked(st);
                    return Err(invalid(self.explain(st, &e)));
                }
            }
            if !st.raw_left() || st.plaintext >= RAW_CHUNK / 4 {
                break;
            }
        }
        if st.conn.wants_write() {
            self.flush_locked(st)?;
        }
        Ok(if eof { Pulled::Closed } else { Pulled::Data })
    }

    /// A rustls error in words a user can act on.
    fn explain(&self, st: &State, e: &rustls::Error) -> String {
        let client = matches!(st.conn, Connection::Client(_));
        let refused_key = matches!(
            e,
            rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::AccessDenied
                    | AlertDescription::CertificateRequired
                    | AlertDescription::UnknownCA
            )
        );
        let tls_record =
            st.first.len() >= 2 && (0x14..=0x17).contains(&st.first[0]) && st.first[1] == 0x03;
        if client && !st.first.is_empty() && !tls_record {
            let mut dec = FrameDecoder::new();
            dec.buffer().extend_from_slice(&st.first);
            let said = match dec.next_frame() {
                Ok(Some(f)) => match f.msg {
                    Message::Error { message, .. } => format!(" (it said: {message})"),
                    _ => String::new(),
                },
                _ => String::new(),
            };
            return format!("the backend does not speak TLS: it listens in plaintext{said}");
        }
        match (client, e) {
            (true, rustls::Error::InvalidCertificate(_)) => match self.seen.get() {
                Some(fp) => format!("the backend presented key {fp}, which is not the key trusted for it"),
                None => format!("the backend's certificate is unusable: {e}"),
            },
            (true, _) if refused_key => format!(
                "the backend refused this client's key {} (it is not in the backend's authorized clients)",
                self.own
            ),
            (false, rustls::Error::InvalidCertificate(_)) => {
                let fp = peer_fingerprint(&st.conn).map_or_else(|| "?".into(), |f| f.to_string());
                format!("client key {fp} is not authorized")
            }
            (false, rustls::Error::NoCertificatesPresented) => {
                "the client presented no key (TLS clients need an identity)".into()
            }
            (false, _) if refused_key => "the client refused this backend's key".into(),
            _ => format!("TLS: {e}"),
        }
    }

    /// Drives the handshake to its end (client side, blocking).
    fn handshake(&self, deadline: Instant) -> io::Result<()> {
        loop {
            let write = {
                let mut st = self.lock();
                let flushed = self.flush_locked(&mut st)?;
                if !st.conn.is_handshaking() && flushed {
                    return Ok(());
                }
                if flushed {
                    match self.pull(&mut st)? {
                        Pulled::Data => continue,
                        Pulled::Closed => {
                            return Err(invalid(if st.first.is_empty() {
                                "the backend closed the connection during the TLS handshake".into()
                            } else {
                                self.explain(&st, &rustls::Error::HandshakeNotComplete)
                            }))
                        }
                        Pulled::Nothing => false,
                    }
                } else {
                    true
                }
            };
            self.wait(write, Some(deadline)).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake timed out")
                } else {
                    e
                }
            })?;
        }
    }

    /// Receives up to `want` decrypted bytes, handing them to `put` (which
    /// must take exactly the count it is given from the reader); returns
    /// how many. Fewer than `want` only when the socket is drained (or at
    /// end of stream, 0). Non-blocking unless the stream is in blocking
    /// mode and `nonblocking` is false.
    fn recv_with(
        &self,
        want: usize,
        nonblocking: bool,
        put: &mut dyn FnMut(&mut dyn Read, usize) -> io::Result<()>,
    ) -> io::Result<usize> {
        let nonblocking = self.mode.nonblocking(nonblocking);
        let deadline = self.mode.deadline(false);
        let mut got = 0;
        loop {
            {
                let mut st = self.lock();
                loop {
                    if st.plaintext > 0 {
                        let n = st.plaintext.min(want - got);
                        put(&mut st.conn.reader(), n)?;
                        st.plaintext -= n;
                        got += n;
                        if got == want {
                            return Ok(got);
                        }
                        continue;
                    }
                    if st.closed && !st.raw_left() {
                        return Ok(got);
                    }
                    // A short receive drained the socket a moment ago: as
                    // for a plain socket, no receive just to learn EAGAIN.
                    if got > 0 && st.drained && !st.raw_left() {
                        return Ok(got);
                    }
                    match self.pull(&mut st)? {
                        Pulled::Data | Pulled::Closed => {}
                        Pulled::Nothing if got > 0 => return Ok(got),
                        Pulled::Nothing => break,
                    }
                }
            }
            if nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.wait(false, deadline)?;
        }
    }

    /// Receives into `buf`.
    pub(crate) fn recv_slice(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        let mut at = 0;
        self.recv_with(buf.len(), nonblocking, &mut |r, n| {
            r.read_exact(&mut buf[at..at + n])?;
            at += n;
            Ok(())
        })
    }

    /// Receives up to `want` bytes onto the end of `buf`.
    pub(crate) fn recv_into(
        &self,
        buf: &mut bytes::BytesMut,
        want: usize,
        nonblocking: bool,
    ) -> io::Result<usize> {
        self.recv_with(want, nonblocking, &mut |r, n| {
            let at = buf.len();
            buf.resize(at + n, 0);
            r.read_exact(&mut buf[at..])
        })
    }

    /// True if received bytes wait inside the stream (decrypted or not).
    pub(crate) fn buffered(&self) -> bool {
        let st = self.lock();
        st.plaintext > 0 || st.raw_left()
    }

    /// Encrypts and sends from `bufs` (at most [`WRITE_CHUNK`] bytes); see
    /// [`crate::Conn::flush_pending`] for what a non-blocking write leaves.
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>], nonblocking: bool) -> io::Result<usize> {
        let nonblocking = self.mode.nonblocking(nonblocking);
        let deadline = self.mode.deadline(true);
        loop {
            let accepted = {
                let mut st = self.lock();
                if self.flush_locked(&mut st)? {
                    let mut n = 0;
                    for b in bufs {
                        let room = WRITE_CHUNK - n;
                        let took = st.conn.writer().write(&b[..b.len().min(room)])?;
                        n += took;
                        if took < b.len() || n == WRITE_CHUNK {
                            break;
                        }
                    }
                    let flushed = self.flush_locked(&mut st)?;
                    if flushed || nonblocking {
                        return Ok(n);
                    }
                    Some(n)
                } else {
                    None
                }
            };
            if nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.wait(true, deadline).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(io::ErrorKind::TimedOut, "the peer took no data in time")
                } else {
                    e
                }
            })?;
            if let Some(n) = accepted {
                // Blocking: the accepted bytes must be on the wire before
                // returning.
                while !self.flush_pending()? {
                    self.wait(true, deadline)?;
                }
                return Ok(n);
            }
        }
    }

    /// Sends encrypted bytes a non-blocking write left behind; true when
    /// none are left.
    pub(crate) fn flush_pending(&self) -> io::Result<bool> {
        let mut st = self.lock();
        self.flush_locked(&mut st)
    }

    /// Says goodbye (close_notify) without waiting, then shuts the socket.
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        {
            let mut st = self.lock();
            st.conn.send_close_notify();
            let _ = self.flush_locked(&mut st);
        }
        self.sock.shutdown(std::net::Shutdown::Both)
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(&[IoSlice::new(buf)], false)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send(bufs, false)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_slice(buf, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Conn, Listener};

    /// A TLS pair over loopback: (client, server), the handshake done.
    fn pair() -> (Conn, Conn) {
        let (a, b) = (
            Identity::generate("a").unwrap(),
            Identity::generate("b").unwrap(),
        );
        let mut clients = AuthorizedClients::default();
        clients.insert(a.fingerprint(), "a");
        let server = ServerTls::new(&b, clients, false).unwrap();
        let l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = l.local_endpoint().unwrap();
        let t = std::thread::spawn(move || {
            let tls = ClientTls {
                identity: a,
                pin: Pin::Key(b.fingerprint()),
            };
            let c = Conn::connect_tls(&ep, Duration::from_secs(5), &tls).unwrap();
            (&c).write_all(b"!").unwrap();
            c
        });
        let start = Instant::now();
        let s = loop {
            match l.accept() {
                Ok(c) => break c.into_tls_server(&server).unwrap(),
                Err(_) if start.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        // The server's handshake runs as it reads.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut one = [0u8];
        assert_eq!(s.recv_slice(&mut one, false).unwrap(), 1);
        let c = t.join().unwrap();
        (c, s)
    }

    fn pattern(i: usize) -> u8 {
        (i ^ (i >> 7) ^ (i >> 13)) as u8
    }

    #[test]
    fn bulk_both_ways_with_non_blocking_writes_and_odd_reads() {
        let (c, s) = pair();
        const LEN: usize = 6 << 20;
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let c = Arc::new(c);
        let s = Arc::new(s);
        // Each end sends LEN bytes without blocking (flushing what TLS
        // kept back when the socket was full) while the other reads it in
        // odd-sized pieces, some into slices, some into a BytesMut.
        let send = |conn: Arc<Conn>| {
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..LEN).map(pattern).collect();
                let mut at = 0;
                let start = Instant::now();
                while at < LEN || !conn.flush_pending().unwrap() {
                    assert!(start.elapsed() < Duration::from_secs(30), "stuck at {at}");
                    if at < LEN {
                        let end = (at + 70_001).min(LEN);
                        match conn.send_nonblocking(&data[at..end]) {
                            Ok(n) => at += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    let _ = sys::poll_writable(conn.as_fd(), Duration::from_millis(10));
                }
            })
        };
        let recv = |conn: Arc<Conn>| {
            std::thread::spawn(move || {
                let mut got = 0usize;
                let mut buf = bytes::BytesMut::new();
                let mut slice = vec![0u8; 3_333];
                let mut k = 0;
                while got < LEN {
                    k += 1;
                    let n = if k % 2 == 0 {
                        buf.clear();
                        let n = conn.recv_into(&mut buf, 50_000, false).unwrap();
                        for (i, b) in buf.iter().enumerate() {
                            assert_eq!(*b, pattern(got + i), "byte {}", got + i);
                        }
                        n
                    } else {
                        let n = conn.recv_slice(&mut slice, false).unwrap();
                        for (i, b) in slice[..n].iter().enumerate() {
                            assert_eq!(*b, pattern(got + i), "byte {}", got + i);
                        }
                        n
                    };
                    assert!(n > 0, "end of stream after {got}");
                    got += n;
                }
                assert!(!conn.buffered());
            })
        };
        let ts = [
            send(c.clone()),
            send(s.clone()),
            recv(c.clone()),
            recv(s.clone()),
        ];
        for t in ts {
            t.join().unwrap();
        }
        // The session is bound: both ends export the same material.
        assert_eq!(c.binding(), s.binding());
        assert!(c.binding().is_some());
        assert_eq!(
            c.peer_key(),
            Some(match &*s {
                Conn::Tls(t) => t.own,
                _ => unreachable!(),
            })
        );
        // A clean close reads as end of stream on the other side.
        c.shutdown().unwrap();
        let mut b = [0u8; 8];
        assert_eq!(s.recv_slice(&mut b, false).unwrap(), 0);
    }
}
