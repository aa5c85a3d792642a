//! Who is at each end of a TLS link: an [`Identity`] is a key pair in a
//! self-signed certificate, known to others by its [`Fingerprint`]; a
//! backend keeps the clients it lets in ([`AuthorizedClients`]), a client
//! the backends it trusts ([`KnownBackends`]), both plain text files in the
//! manner of ssh's `authorized_keys` and `known_hosts`.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::{Endpoint, Error};

/// SHA-256 of an identity's certificate: how an identity is named, pinned
/// and authorized. Written `sha256:` and 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert_der: &[u8]) -> Self {
        Self(Sha256::digest(cert_der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// Parses `sha256:` followed by 64 hex digits (`:` between bytes allowed).
    fn from_str(s: &str) -> Result<Self, String> {
        let hex: String = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{s:?}: a fingerprint starts with sha256:"))?
            .chars()
            .filter(|c| *c != ':')
            .collect();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?}: a fingerprint has 64 hex digits after sha256:"
            ));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Self(out))
    }
}

/// A private key and its self-signed certificate.
pub struct Identity {
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
    pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
            pem: self.pem.clone(),
        }
    }
}

fn identity_err(path: &Path, why: impl fmt::Display) -> Error {
    Error::Identity(format!("{}: {why}", path.display()))
}

impl Identity {
    /// A new ECDSA P-256 key in a self-signed certificate whose common name
    /// is `name` (shown to nobody but the people reading the file).
    pub fn generate(name: &str) -> Result<Self, Error> {
        let bad = |e: rcgen::Error| Error::Identity(format!("generating a key: {e}"));
        let mut params = rcgen::CertificateParams::new(vec!["cio".to_string()]).map_err(bad)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().map_err(bad)?;
        let cert = params.self_signed(&key).map_err(bad)?;
        let pem = format!("{}{}", key.serialize_pem(), cert.pem());
        Self::from_pem(&pem).map_err(|e| Error::Identity(format!("generated key: {e}")))
    }

    /// Reads a PEM file holding one private key and its certificate (as
    /// `cio keygen` and `ciod keygen` write them).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let pem = std::fs::read_to_string(path).map_err(|e| identity_err(path, e))?;
        Self::from_pem(&pem).map_err(|e| identity_err(path, e))
    }

    fn from_pem(pem: &str) -> Result<Self, String> {
        let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("no private key ({e:?})"))?;
        let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or("no certificate")?
            .map_err(|e| format!("bad certificate ({e:?})"))?;
        Ok(Self {
            fingerprint: Fingerprint::of(&cert),
            cert,
            key,
            pem: pem.to_string(),
        })
    }

    /// The identity as PEM: the private key, then the certificate.
    pub fn to_pem(&self) -> &str {
        &self.pem
    }

    /// Writes the identity to a new file readable by its owner only;
    /// refuses to overwrite an existing one.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| identity_err(path, e))?;
        f.write_all(self.to_pem().as_bytes())
            .map_err(|e| identity_err(path, e))
    }

    /// Makes a new identity named `name` in a new file at `path` (and its
    /// directory): what `cio keygen` and `ciod keygen` do. An existing file
    /// is never overwritten; the error names its key.
    pub fn create(path: &Path, name: &str) -> Result<Self, Error> {
        if path.exists() {
            let key = Self::load(path)
                .map(|i| i.fingerprint().to_string())
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            return Err(identity_err(
                path,
                format!("exists already (key {key}); it is never overwritten"),
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| identity_err(dir, e))?;
        }
        let id = Self::generate(name)?;
        id.save(path)?;
        Ok(id)
    }

    /// Its fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// Lines of a trust file without comments (`#` to the end of the line) and
/// blank lines, with their line numbers.
fn lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let l = l.split('#').next().unwrap_or("");
        let words: Vec<&str> = l.split_whitespace().collect();
        (!words.is_empty()).then_some((i + 1, words))
    })
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::TrustFile(format!("{}: {e}", path.display())))
}

/// The clients a backend lets in: one `FINGERPRINT NAME` per line (the
/// name, for logs and access rules, is one word; `#` starts a comment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizedClients {
    names: HashMap<Fingerprint, String>,
}

impl AuthorizedClients {
    /// Parses the file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut names = HashMap::new();
        for (n, words) in lines(text) {
            let [fp, name] = words[..] else {
                return Err(format!("line {n}: expected `sha256:… NAME`"));
            };
            let fp: Fingerprint = fp.parse().map_err(|e| format!("line {n}: {e}"))?;
            if names.insert(fp, name.to_string()).is_some() {
                return Err(format!("line {n}: {fp} is listed twice"));
            }
        }
        Ok(Self { names })
    }

    /// Reads an authorized-clients file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::parse(&read_text(path)?)
            .map_err(|e| Error::TrustFile(format!("{}: {e}", path.display())))
    }

    /// The name of an authorized client.
    pub fn name(&self, fp: &Fingerprint) -> Option<&str> {
        self.names.get(fp).map(String::as_str)
    }

    /// The names of the clients.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.values().map(String::as_str)
    }

    /// Lets `fp` in as `name`.
    pub fn insert(&mut self, fp: Fingerprint, name: &str) {
        self.names.insert(fp, name.to_string());
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// No client at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The backends a client trusts: one `ENDPOINT FINGERPRINT` per line, the
/// endpoint as given to cio (`host:port`, `tcp:host:port`; a bare host
/// means the default port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownBackends {
    keys: Vec<(Endpoint, Fingerprint)>,
}

impl KnownBackends {
    /// Parses the file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (n, words) in lines(text) {
            let [ep, fp] = words[..] else {
                return Err(format!("line {n}: expected `HOST:PORT sha256:…`"));
            };
            let ep: Endpoint = ep.parse().map_err(|e| format!("line {n}: {e}"))?;
            let fp: Fingerprint = fp.parse().map_err(|e| format!("line {n}: {e}"))?;
            keys.push((ep, fp));
        }
        Ok(Self { keys })
    }

    /// Reads a known-backends file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, Error> {
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::parse(&read_text(path)?)
            .map_err(|e| Error::TrustFile(format!("{}: {e}", path.display())))
    }

    /// The key trusted for `ep`.
    pub fn get(&self, ep: &Endpoint) -> Option<Fingerprint> {
        self.keys.iter().find(|(e, _)| e == ep).map(|(_, f)| *f)
    }

    /// Trusts `fp` for `ep` (replacing an earlier key).
    pub fn insert(&mut self, ep: Endpoint, fp: Fingerprint) {
        self.keys.retain(|(e, _)| *e != ep);
        self.keys.push((ep, fp));
    }

    /// Appends `ENDPOINT FINGERPRINT` to the file at `path` (made, with its
    /// directory, when missing).
    pub fn append(path: &Path, ep: &Endpoint, fp: &Fingerprint) -> Result<(), Error> {
        let err = |e: std::io::Error| Error::TrustFile(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        writeln!(f, "{ep} {fp}").map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_reject_junk() {
        let fp = Fingerprint::of(b"cert");
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        assert!(fp.to_string().starts_with("sha256:"));
        for bad in ["", "sha256:", "md5:00", "sha256:zz", &fp.to_string()[..70]] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn identities_survive_pem_and_have_stable_fingerprints() {
        let id = Identity::generate("test").unwrap();
        let again = Identity::from_pem(id.to_pem()).unwrap();
        assert_eq!(again.fingerprint(), id.fingerprint());
        assert_ne!(
            Identity::generate("test").unwrap().fingerprint(),
            id.fingerprint()
        );
        let dir = std::env::temp_dir().join(format!("cio-id-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        id.save(&dir).unwrap();
        assert!(
            id.save(&dir).is_err(),
            "an identity file is never overwritten"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            Identity::load(&dir).unwrap().fingerprint(),
            id.fingerprint()
        );
        std::fs::remove_file(&dir).unwrap();
        assert!(Identity::from_pem("nothing").is_err());
    }

    #[test]
    fn trust_files_parse_and_name_bad_lines() {
        let fp = Fingerprint::of(b"a");
        let text = format!("# clients\n{fp} alice # laptop\n\n");
        let a = AuthorizedClients::parse(&text).unwrap();
        assert_eq!(a.name(&fp), Some("alice"));
        assert_eq!(a.len(), 1);
        let e = AuthorizedClients::parse(&format!("{text}{fp} bob\n")).unwrap_err();
        assert!(e.contains("line 4") && e.contains("twice"), "{e}");
        let e = AuthorizedClients::parse("sha256:00 x\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");

        let k = KnownBackends::parse(&format!("host-a:7451 {fp}\n")).unwrap();
        assert_eq!(k.get(&"host-a:7451".parse().unwrap()), Some(fp));
        assert_eq!(k.get(&"host-b:7451".parse().unwrap()), None);
        assert!(KnownBackends::parse("host-a\n").is_err());
    }
}
