//! Per-device-model data: ids, BAR layouts with named registers, which
//! registers are safe to cache, which have read side effects, which are
//! doorbells, DMA constraints, reset method and quirks. Profiles are TOML
//! files (`profiles/*.toml`, built in, or loaded from a path) checked by
//! [`Profile::validate`] when loaded.
#![deny(missing_docs)]

use std::path::Path;

use serde::Deserialize;

pub mod edu;

/// Profiles compiled into the binary.
const BUILTIN: &[(&str, &str)] = &[
    ("edu.toml", include_str!("../profiles/edu.toml")),
    ("memory.toml", include_str!("../profiles/memory.toml")),
    ("nvme.toml", include_str!("../profiles/nvme.toml")),
    ("e1000e.toml", include_str!("../profiles/e1000e.toml")),
    ("ivshmem.toml", include_str!("../profiles/ivshmem.toml")),
];

/// Errors loading or checking a profile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("reading profile {path}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys.
    #[error("parsing profile {path}: {message}")]
    Parse {
        /// Path or built-in name.
        path: String,
        /// Parser message.
        message: String,
    },
    /// The data is inconsistent.
    #[error("profile {profile}: {message}")]
    Invalid {
        /// Profile name.
        profile: String,
        /// What is wrong.
        message: String,
    },
}

/// How a register may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read-only.
    Ro,
    /// Write-only.
    Wo,
    /// Read-write.
    Rw,
}

/// One register.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Short name.
    pub name: String,
    /// Offset in the BAR.
    pub offset: u64,
    /// Width in bytes.
    pub width: u8,
    /// Access.
    pub access: Access,
    /// Reading it changes device state (never cache or speculate it).
    #[serde(default)]
    pub read_side_effects: bool,
    /// Writing it starts work on the device (a batch boundary).
    #[serde(default)]
    pub doorbell: bool,
    /// Its value never changes: a frontend may cache it.
    #[serde(default)]
    pub cacheable: bool,
    /// What it does.
    #[serde(default)]
    pub description: String,
}

/// One BAR.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bar {
    /// BAR number (0–5).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Access widths the device accepts.
    pub widths: Vec<u8>,
    /// Named registers.
    #[serde(default, rename = "register")]
    pub registers: Vec<Register>,
}

/// A device-visible buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    /// Start.
    pub offset: u64,
    /// Size.
    pub size: u64,
}

/// DMA constraints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dma {
    /// Address bits the device drives.
    pub address_bits: u8,
    /// The device's own buffer in its DMA address space, if any.
    pub buffer: Option<Span>,
}

/// Reset methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reset {
    /// No reset the host can trigger.
    None,
    /// Function-level reset.
    Function,
    /// Power-management D3hot/D0.
    Pm,
    /// Secondary bus reset.
    Bus,
}

/// A device model's profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name.
    pub name: String,
    /// Human description.
    pub description: String,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// Reset method.
    pub reset: Reset,
    /// Known quirks, for humans.
    #[serde(default)]
    pub quirks: Vec<String>,
    /// DMA constraints.
    pub dma: Option<Dma>,
    /// BARs.
    #[serde(default, rename = "bar")]
    pub bars: Vec<Bar>,
}

impl Profile {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let p: Self = toml::from_str(text).map_err(|e| Error::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        p.validate()?;
        Ok(p)
    }

    /// Loads a profile file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Every built-in profile.
    pub fn builtin() -> Vec<Self> {
        BUILTIN
            .iter()
            .map(|(n, t)| Self::parse(t, n).expect("built-in profiles are checked by tests"))
            .collect()
    }

    /// The built-in profile for a vendor:device pair.
    pub fn builtin_for(vendor: u16, device: u16) -> Option<Self> {
        Self::builtin()
            .into_iter()
            .find(|p| p.vendor == vendor && p.device == device)
    }

    /// The register covering `offset` of BAR `bar`.
    pub fn register_at(&self, bar: u32, offset: u64) -> Option<&Register> {
        self.bars
            .iter()
            .find(|b| b.index == bar)?
            .registers
            .iter()
            .find(|r| r.offset <= offset && offset < r.offset + u64::from(r.width))
    }

    /// Checks internal consistency: BAR numbers and sizes, widths, register
    /// alignment, bounds, overlaps, unique names, and flag combinations that
    /// make no sense (a cacheable register with read side effects, a
    /// read-only doorbell).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |message: String| Error::Invalid {
            profile: self.name.clone(),
            message,
        };
        let mut seen_bars = Vec::new();
        for bar in &self.bars {
            if bar.index > 5 || seen_bars.contains(&bar.index) {
                return Err(bad(format!(
                    "BAR {} is out of range or repeated",
                    bar.index
                )));
            }
            seen_bars.push(bar.index);
            if !bar.size.is_power_of_two() || bar.size < 16 {
                return Err(bad(format!(
                    "BAR {} size {:#x} is not a power of two ≥ 16",
                    bar.index, bar.size
                )));
            }
            if bar.widths.is_empty() || bar.widths.iter().any(|w| ![1, 2, 4, 8].contains(w)) {
                return Err(bad(format!(
                    "BAR {} widths {:?} must be among 1, 2, 4, 8",
                    bar.index, bar.widths
                )));
            }
            let mut regs: Vec<&Register> = bar.registers.iter().collect();
            regs.sort_by_key(|r| r.offset);
            for (i, r) in regs.iter().enumerate() {
                let what = format!("register {} (BAR {} {:#x})", r.name, bar.index, r.offset);
                if !bar.widths.contains(&r.width) {
                    return Err(bad(format!(
                        "{what}: width {} is not an accepted BAR width",
                        r.width
                    )));
                }
                if r.offset % u64::from(r.width) != 0 {
                    return Err(bad(format!("{what}: not aligned to its width")));
                }
                if r.offset + u64::from(r.width) > bar.size {
                    return Err(bad(format!("{what}: ends past the BAR")));
                }
                if let Some(next) = regs.get(i + 1) {
                    if r.offset + u64::from(r.width) > next.offset {
                        return Err(bad(format!("{what}: overlaps register {}", next.name)));
                    }
                }
                if r.cacheable && (r.read_side_effects || r.access != Access::Ro) {
                    return Err(bad(format!("{what}: only a read-only register without read side effects can be cacheable")));
                }
                if r.doorbell && r.access == Access::Ro {
                    return Err(bad(format!("{what}: a doorbell must be writable")));
                }
                if r.name.is_empty() || regs.iter().filter(|o| o.name == r.name).count() > 1 {
                    return Err(bad(format!(
                        "{what}: register names must be unique and non-empty"
                    )));
                }
            }
        }
        if let Some(d) = &self.dma {
            if d.address_bits == 0 || d.address_bits > 64 {
                return Err(bad(format!(
                    "dma address_bits {} out of range",
                    d.address_bits
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_load_and_edu_names_its_registers() {
        let all = Profile::builtin();
        assert_eq!(all.len(), BUILTIN.len());
        let edu = Profile::builtin_for(0x1234, 0x11e8).unwrap();
        assert_eq!(edu.register_at(0, 0x98).unwrap().name, "dma_cmd");
        assert_eq!(edu.register_at(0, 0x9c).unwrap().name, "dma_cmd");
        assert!(edu.register_at(0, 0x10).is_none());
        let doorbells: Vec<&str> = edu.bars[0]
            .registers
            .iter()
            .filter(|r| r.doorbell)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(doorbells, ["factorial", "irq_raise", "dma_cmd"]);
    }

    fn with_register(reg: &str) -> Result<Profile, Error> {
        let text = format!(
            "name = \"t\"\ndescription = \"\"\nvendor = 1\ndevice = 2\nreset = \"none\"\n[[bar]]\nindex = 0\nsize = 256\nwidths = [4, 8]\n{reg}"
        );
        Profile::parse(&text, "test")
    }

    #[test]
    fn validation_catches_each_inconsistency() {
        let ok = "[[bar.register]]\nname = \"a\"\noffset = 0\nwidth = 4\naccess = \"rw\"\n";
        assert!(with_register(ok).is_ok());
        let cases = [
            ("offset = 2", "not aligned"),
            ("offset = 256", "ends past"),
            ("width = 2", "width 2"),
        ];
        for (change, want) in cases {
            let field = change.split(' ').next().unwrap();
            let text: String = ok
                .lines()
                .map(|l| if l.starts_with(field) { change } else { l })
                .collect::<Vec<_>>()
                .join("\n");
            let e = with_register(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{change}: {e}");
        }
        let wide = ok.replace("width = 4", "width = 8");
        let overlap = format!(
            "{wide}[[bar.register]]\nname = \"b\"\noffset = 4\nwidth = 4\naccess = \"rw\"\n"
        );
        assert!(with_register(&overlap)
            .unwrap_err()
            .to_string()
            .contains("overlaps register b"));
        let overlap =
            format!("{ok}[[bar.register]]\nname = \"a\"\noffset = 4\nwidth = 4\naccess = \"rw\"\n");
        assert!(with_register(&overlap)
            .unwrap_err()
            .to_string()
            .contains("unique"));
        let cached = ok.replace("access = \"rw\"", "access = \"rw\"\ncacheable = true");
        assert!(with_register(&cached)
            .unwrap_err()
            .to_string()
            .contains("cacheable"));
        let bell = ok.replace("access = \"rw\"", "access = \"ro\"\ndoorbell = true");
        assert!(with_register(&bell)
            .unwrap_err()
            .to_string()
            .contains("doorbell"));
        let unknown = ok.replace("access = \"rw\"", "access = \"rw\"\ncolour = 1");
        assert!(matches!(with_register(&unknown), Err(Error::Parse { .. })));
    }
}
