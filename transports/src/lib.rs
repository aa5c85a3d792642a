//! cio transports: one connection abstraction ([`Conn`], [`Listener`]) over
//! TCP, TLS over TCP ([`tls`], with [`identity`] keys pinned by
//! fingerprint), Unix sockets and RDMA ([`rdma`], with the `rdma` feature), in-process pairs for tests, the batched
//! send queue ([`OutQueue`]) and pre-shared-key authentication ([`auth`]).
//!
//! Everything is a file descriptor, so the backend's mio loop and the
//! frontend's poll(2) pump can wait on any transport the same way.
#![deny(missing_docs)]

pub mod auth;
mod conn;
mod endpoint;
pub mod identity;
mod mode;
mod out;
pub mod rdma;
mod reader;
pub mod sys;
pub mod tls;

pub use auth::{Psk, ResumeKey, Side};
pub use conn::{relay_pair, set_tcp_keepalive, Conn, Listener, RELAY_BUFFER};
pub use endpoint::{Endpoint, DEFAULT_PORT};
pub use identity::{AuthorizedClients, Fingerprint, Identity, KnownBackends};
pub use out::{BadAck, OutQueue};
pub use reader::{FrameReader, Received, Resolve, DIRECT_MIN};
pub use tls::{ClientTls, Pin, ServerTls};

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint string is not valid.
    #[error("invalid endpoint {0}")]
    BadEndpoint(String),
    /// Name resolution failed.
    #[error("resolving {endpoint}")]
    Resolve {
        /// The endpoint.
        endpoint: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("connecting to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Binding a listener failed.
    #[error("listening on {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be read.
    #[error("reading key file {path}")]
    KeyFile {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key is too short to be safe.
    #[error("pre-shared key has {0} bytes; at least {min} are required", min = auth::MIN_KEY_LEN)]
    WeakKey(usize),
    /// A TLS connection could not be set up.
    #[error("TLS with {endpoint}: {why}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// What went wrong, in words a user can act on.
        why: String,
        /// The link failed (timeout, reset), not the keys: trying again
        /// may work.
        transient: bool,
    },
    /// An identity (key and certificate) could not be read or made.
    #[error("identity {0}")]
    Identity(String),
    /// An authorized-clients or known-backends file is unusable.
    #[error("trust file {0}")]
    TrustFile(String),
    /// The system random generator failed.
    #[error("system random number generator: {0}")]
    Random(String),
}

impl Error {
    /// True if trying again later may succeed (the peer was unreachable),
    /// false if the configuration itself is wrong.
    pub fn should_reconnect(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Resolve { .. }
                | Self::Tls {
                    transient: true,
                    ..
                }
        )
    }
}
