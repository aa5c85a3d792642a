//! How `cio` secures a link: the global options (`--tls`, `--identity`,
//! `--known-backends`, `--backend-key`, `--insecure-plaintext`,
//! `--psk-file`), the per-backend choice between TLS and plaintext, and the
//! `cio keygen` / `cio trust` commands.

use std::path::PathBuf;

use cio_core::error_chain;
use cio_frontend::ClientOptions;
use cio_transports::{ClientTls, Endpoint, Fingerprint, Identity, KnownBackends, Pin, Psk};
use clap::Args;

/// The link options every command shares.
#[derive(Debug, Clone, Args)]
pub struct LinkArgs {
    /// File with the pre-shared key the backend requires.
    #[arg(long, global = true, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,

    /// Use TLS even to a loopback address (it is always used beyond this
    /// machine, and to every backend listed in the known-backends file).
    #[arg(long, global = true)]
    pub tls: bool,

    /// This client's identity for TLS (made by `cio keygen`)
    /// [default: ~/.config/cio/identity.pem].
    #[arg(long, global = true, value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// The backend keys this client trusts, one `HOST:PORT sha256:…` per
    /// line (add one with `cio trust`) [default: ~/.config/cio/known_backends].
    #[arg(long, global = true, value_name = "FILE")]
    pub known_backends: Option<PathBuf>,

    /// Trust this backend key for this run (sha256:…, as `ciod keygen`
    /// printed it) instead of the known-backends file.
    #[arg(long, global = true, value_name = "FINGERPRINT")]
    pub backend_key: Option<Fingerprint>,

    /// Allow plaintext to a backend beyond this machine: register writes
    /// and DMA cross the network in the clear. Only on a network you trust,
    /// with --psk-file.
    #[arg(long, global = true, conflicts_with = "tls")]
    pub insecure_plaintext: bool,

    /// Polling mode: wait for each reply polling the socket for up to US
    /// microseconds before sleeping (lower latency; a core spins while
    /// waiting). Pair it with `ciod --poll-us`. [default: 0]
    #[arg(long, global = true, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=100000))]
    pub poll_us: Option<u64>,
}

fn config_dir() -> PathBuf {
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("cio"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".config/cio"),
    }
}

/// Where the client's identity lives by default.
pub fn default_identity() -> PathBuf {
    config_dir().join("identity.pem")
}

fn default_known() -> PathBuf {
    config_dir().join("known_backends")
}

impl LinkArgs {
    fn known_path(&self) -> PathBuf {
        self.known_backends.clone().unwrap_or_else(default_known)
    }

    /// The pre-shared key, if one was given.
    pub fn psk(&self) -> Result<Option<Psk>, String> {
        self.psk_file
            .as_deref()
            .map(|p| Psk::from_file(p).map_err(|e| error_chain(&e)))
            .transpose()
    }

    /// Options for a connection to `ep`: TLS where it is asked for, where
    /// the backend's key is known, or where the address reaches beyond this
    /// machine; plaintext otherwise.
    pub fn options(&self, ep: &Endpoint) -> Result<ClientOptions, String> {
        let psk = self.psk()?;
        let known = KnownBackends::load(&self.known_path()).map_err(|e| error_chain(&e))?;
        let pinned = self.backend_key.or_else(|| known.get(ep));
        let local = ep.is_local_only().map_err(|e| error_chain(&e))?;
        let tls = !matches!(ep, Endpoint::Unix(_))
            && (self.tls || pinned.is_some() || (!local && !self.insecure_plaintext));
        let tls = if tls {
            let id_path = self.identity.clone().unwrap_or_else(default_identity);
            if !id_path.exists() {
                return Err(format!(
                    "{ep} needs TLS and this client has no identity at {}: make one with `cio keygen` (then give its fingerprint to the backend's authorized_clients)",
                    id_path.display()
                ));
            }
            let identity = Identity::load(&id_path).map_err(|e| error_chain(&e))?;
            let pin = match (pinned, &psk) {
                (Some(fp), _) => Pin::Key(fp),
                (None, Some(_)) => Pin::AnyWithPsk,
                (None, None) => {
                    return Err(format!(
                        "no key is known for backend {ep}: get its fingerprint from its administrator (`ciod keygen` printed it) and add it with `cio trust {ep} sha256:…`, or pass --backend-key"
                    ))
                }
            };
            Some(ClientTls { identity, pin })
        } else {
            None
        };
        Ok(ClientOptions {
            psk,
            tls,
            insecure_plaintext: self.insecure_plaintext,
            poll: std::time::Duration::from_micros(self.poll_us.unwrap_or(0)),
            ..ClientOptions::default()
        })
    }

    /// The same options as arguments, for a `cio` started from this one.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut path = |flag: &str, p: &Option<PathBuf>| {
            if let Some(p) = p {
                a.push(flag.into());
                a.push(p.into());
            }
        };
        path("--psk-file", &self.psk_file);
        path("--identity", &self.identity);
        path("--known-backends", &self.known_backends);
        if let Some(fp) = &self.backend_key {
            a.push("--backend-key".into());
            a.push(fp.to_string().into());
        }
        if self.tls {
            a.push("--tls".into());
        }
        if self.insecure_plaintext {
            a.push("--insecure-plaintext".into());
        }
        if let Some(us) = self.poll_us {
            a.push("--poll-us".into());
            a.push(us.to_string().into());
        }
        a
    }

    /// `cio trust HOST FINGERPRINT`.
    pub fn trust(&self, host: &str, fp: Fingerprint) -> Result<(), String> {
        let ep: Endpoint = host.parse().map_err(|e| error_chain(&e))?;
        let path = self.known_path();
        let known = KnownBackends::load(&path).map_err(|e| error_chain(&e))?;
        match known.get(&ep) {
            Some(k) if k == fp => {
                outln!("{ep} is already trusted with {fp}");
                return Ok(());
            }
            Some(k) => {
                return Err(format!(
                    "{} already trusts {k} for {ep}: if the backend's key really changed, remove that line first",
                    path.display()
                ))
            }
            None => {}
        }
        KnownBackends::append(&path, &ep, &fp).map_err(|e| error_chain(&e))?;
        outln!("trusting {fp} for {ep} (in {})", path.display());
        Ok(())
    }
}
