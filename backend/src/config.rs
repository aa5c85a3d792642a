//! `ciod` configuration: a TOML file and/or command-line device specs.
//!
//! ```toml
//! listen = "0.0.0.0:7451"        # or "unix:/run/ciod.sock"
//! identity = "/etc/cio/ciod.pem"  # TLS; required beyond loopback
//! authorized_clients = "/etc/cio/authorized_clients"
//! psk_file = "/etc/cio/key"       # optional with TLS
//!
//! [[access]]                      # without these, every client may use
//! client = "alice"                # every device; a name from
//! devices = ["edu0", "1-1"]       # authorized_clients, or "*"
//!
//! [[device]]
//! model = "edu"                   # emulated QEMU edu
//! name = "edu0"
//!
//! [[device]]
//! model = "memory"                # emulated RAM BAR
//! name = "mem0"
//! size = "16M"
//!
//! [[device]]
//! model = "vfio"                  # a real function bound to vfio-pci
//! name = "nic0"
//! bdf = "0000:00:03.0"
//! release = "clear"               # if it has no full reset: what a release
//!                                 # does ("clear": bus mastering off, INTx
//!                                 # disabled; "as-is": hand it on untouched)
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;

use cio_core::{Device, DeviceError};
use serde::Deserialize;

use crate::models::{memory, Edu, Memory};

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address.
    pub listen: Option<String>,
    /// Pre-shared key file.
    pub psk_file: Option<PathBuf>,
    /// The backend's TLS identity (key and certificate, `ciod keygen`).
    pub identity: Option<PathBuf>,
    /// Client keys let in over TLS, one `sha256:… NAME` per line.
    pub authorized_clients: Option<PathBuf>,
    /// Plaintext beyond loopback (with a pre-shared key only).
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Devices.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceEntry>,
    /// Who may use which device (`[[access]]` tables; none: everyone all).
    #[serde(default, rename = "access")]
    pub access: Vec<crate::access::Rule>,
    /// The `[limits]` table: what the flags of the same names set (a flag
    /// given on the command line wins).
    pub limits: Option<LimitsFile>,
}

/// The `[limits]` table; see `docs/config.md`. Sizes are strings
/// (`"4G"`), times seconds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LimitsFile {
    pub max_sessions: Option<u64>,
    pub max_handshakes: Option<u64>,
    pub max_handshakes_per_peer: Option<u64>,
    pub handshake_timeout: Option<u64>,
    pub resume_grace: Option<u64>,
    pub link_timeout: Option<u64>,
    pub poll_us: Option<u64>,
    pub usb_idle_timeout: Option<u64>,
    pub max_mapped_per_session: Option<String>,
    pub max_mapped_total: Option<String>,
    pub max_queued_per_session: Option<String>,
    pub max_queued_total: Option<String>,
}

/// A `[[device]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Model: `edu` or `memory`.
    pub model: String,
    /// Name to serve it as (default: model name plus index).
    pub name: Option<String>,
    /// BAR size for `memory` (e.g. `"16M"`).
    pub size: Option<String>,
    /// PCI address for `vfio`.
    pub bdf: Option<String>,
    /// What releasing it does when it has no reset that clears its state.
    pub release: Option<crate::registry::Release>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The release policies it sets, by device name.
    pub fn release_policies(&self) -> Result<Vec<(String, crate::registry::Release)>, String> {
        let specs = self.specs()?;
        Ok(self
            .devices
            .iter()
            .zip(&specs)
            .filter_map(|(d, s)| d.release.map(|r| (s.name().to_owned(), r)))
            .collect())
    }

    /// The device specs it names.
    pub fn specs(&self) -> Result<Vec<DeviceSpec>, String> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| match (d.model.as_str(), &d.bdf) {
                ("vfio", Some(bdf)) => DeviceSpec::vfio(bdf, d.name.clone()),
                ("vfio", None) => Err("a vfio device needs bdf = \"DDDD:BB:DD.F\"".into()),
                (_, Some(_)) => Err(format!(
                    "bdf is only for model = \"vfio\", not {:?}",
                    d.model
                )),
                _ => DeviceSpec::new(
                    &d.model,
                    d.name.clone().unwrap_or_else(|| format!("{}{i}", d.model)),
                    d.size.as_deref(),
                ),
            })
            .collect()
    }
}

/// A device to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Emulated edu.
    Edu {
        /// Name.
        name: String,
    },
    /// Emulated memory device.
    Memory {
        /// Name.
        name: String,
        /// BAR0 size.
        size: u64,
    },
    /// A real PCI function bound to vfio-pci.
    Vfio {
        /// Name.
        name: String,
        /// PCI address, or a `vendor:device` id resolved when opened.
        bdf: String,
    },
}

impl DeviceSpec {
    /// The name it is served as.
    pub fn name(&self) -> &str {
        match self {
            Self::Edu { name } | Self::Memory { name, .. } | Self::Vfio { name, .. } => name,
        }
    }
}

/// Parses `4096`, `64K`, `16M`, `1G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?} (examples: 4096, 64K, 16M, 1G)"))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || name.contains(char::is_whitespace) {
        return Err(format!(
            "invalid device name {name:?}: 1-64 characters, no spaces"
        ));
    }
    Ok(())
}

impl DeviceSpec {
    /// A VFIO function by PCI address or `vendor:device` id, served as
    /// `name` (default: what identifies it).
    pub fn vfio(bdf: &str, name: Option<String>) -> Result<Self, String> {
        let bdf = match crate::vfio::parse_id(bdf) {
            Ok(_) => bdf.to_ascii_lowercase(),
            Err(_) => crate::vfio::parse_bdf(bdf)?,
        };
        let name = name.unwrap_or_else(|| bdf.clone());
        check_name(&name)?;
        Ok(Self::Vfio { name, bdf })
    }

    /// Parses `BDF[=NAME]` (the `--vfio` flag).
    pub fn parse_vfio(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((bdf, name)) => Self::vfio(bdf, Some(name.to_owned())),
            None => Self::vfio(s, None),
        }
    }

    fn new(model: &str, name: String, size: Option<&str>) -> Result<Self, String> {
        check_name(&name)?;
        match model {
            "edu" if size.is_none() => Ok(Self::Edu { name }),
            "edu" => Err("the edu model has a fixed size".into()),
            "memory" => {
                let size = size.map_or(Ok(memory::DEFAULT_SIZE), parse_size)?;
                memory::check_size(size)?;
                Ok(Self::Memory { name, size })
            }
            other => Err(format!(
                "unknown device model {other:?} (known: edu, memory)"
            )),
        }
    }

    /// Builds the device.
    pub fn build(&self) -> Result<Box<dyn Device>, DeviceError> {
        Ok(match self {
            Self::Edu { name } => Box::new(Edu::new(name)),
            Self::Memory { name, size } => Box::new(Memory::new(name, *size)?),
            Self::Vfio { name, bdf } => Box::new(crate::vfio::VfioPci::open(bdf, name)?),
        })
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    /// `MODEL[:NAME[:SIZE]]`, e.g. `edu`, `edu:edu1`, `memory:mem0:64M`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let model = parts.next().unwrap_or_default();
        let name = parts
            .next()
            .map_or_else(|| format!("{model}0"), str::to_owned);
        Self::new(model, name, parts.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "edu".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Edu {
                name: "edu0".into()
            }
        );
        assert_eq!(
            "memory:m:64K".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Memory {
                name: "m".into(),
                size: 65536
            }
        );
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("edu:e:4K".parse::<DeviceSpec>().is_err());
        assert!("memory:m:lots".parse::<DeviceSpec>().is_err());
        // A bad size is refused when the spec is read, not when it is built.
        let e = "memory:m:3000".parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("power of two"), "{e}");
    }

    #[test]
    fn file_config_parses_and_rejects_unknown_keys() {
        let c: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:1\"\n[[device]]\nmodel = \"edu\"\n[[device]]\nmodel = \"memory\"\nname = \"m\"\nsize = \"1M\"\n",
        )
        .unwrap();
        let specs = c.specs().unwrap();
        assert_eq!(
            specs[0],
            DeviceSpec::Edu {
                name: "edu0".into()
            }
        );
        assert_eq!(
            specs[1],
            DeviceSpec::Memory {
                name: "m".into(),
                size: 1 << 20
            }
        );
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
    }

    #[test]
    fn release_policies_by_device_name() {
        let c: FileConfig = toml::from_str(
            "[[device]]\nmodel = \"edu\"\nrelease = \"as-is\"\n[[device]]\nmodel = \"vfio\"\nname = \"nic0\"\nbdf = \"0000:00:03.0\"\nrelease = \"clear\"\n[[device]]\nmodel = \"memory\"\n",
        )
        .unwrap();
        use crate::registry::Release;
        assert_eq!(
            c.release_policies().unwrap(),
            [
                ("edu0".to_string(), Release::AsIs),
                ("nic0".into(), Release::Clear)
            ]
        );
        let bad = toml::from_str::<FileConfig>("[[device]]\nmodel = \"edu\"\nrelease = \"keep\"\n");
        assert!(bad.is_err());
    }

    #[test]
    fn vfio_specs_parse() {
        assert_eq!(
            DeviceSpec::parse_vfio("0000:00:02.0=edu1").unwrap(),
            DeviceSpec::Vfio {
                name: "edu1".into(),
                bdf: "0000:00:02.0".into()
            }
        );
        assert_eq!(
            DeviceSpec::parse_vfio("0000:00:02.0").unwrap(),
            DeviceSpec::Vfio {
                name: "0000:00:02.0".into(),
                bdf: "0000:00:02.0".into()
            }
        );
        assert!(DeviceSpec::parse_vfio("00:02.0").is_err());
        assert_eq!(
            DeviceSpec::parse_vfio("8086:10D3=nic").unwrap(),
            DeviceSpec::Vfio {
                name: "nic".into(),
                bdf: "8086:10d3".into()
            }
        );
        let c: FileConfig = toml::from_str("[[device]]\nmodel = \"vfio\"\n").unwrap();
        assert!(c.specs().unwrap_err().contains("needs bdf"));
        let c: FileConfig =
            toml::from_str("[[device]]\nmodel = \"edu\"\nbdf = \"0000:00:02.0\"\n").unwrap();
        assert!(c.specs().unwrap_err().contains("only for"));
    }
}
