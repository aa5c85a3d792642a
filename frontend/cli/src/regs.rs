//! `cio read`, `cio write`, `cio dump`: a remote device's registers and
//! memory by hand, as `setpci`/`devmem2`/`pcimem` do for local ones.
//! Offsets may be register names from the device's hw profile.

use std::io::Write;
use std::path::Path;

use cio_core::{error_chain, Device, CONFIG_REGION};
use cio_frontend::RemoteDevice;
use cio_hw_profiles::Profile;

/// Bytes `cio dump` asks for at a time (the progress bar moves by these).
const DUMP_CHUNK: usize = 256 * 1024;

/// A region by number (`0`-`5`, `7`) or name (`bar0`-`bar5`, `config`).
pub fn region(s: &str) -> Result<u32, String> {
    let s = s.to_ascii_lowercase();
    if s == "config" || s == "cfg" {
        return Ok(CONFIG_REGION);
    }
    let n = s.strip_prefix("bar").unwrap_or(&s);
    n.parse::<u32>()
        .map_err(|_| format!("region {s:?}: give 0-5 or bar0-bar5 for a BAR, or config"))
}

/// A number in decimal or `0x` hex.
pub fn number(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
}

/// An offset, or a register of the device's profile: (offset, its width
/// if named, its name).
fn offset(
    dev: &RemoteDevice,
    region: u32,
    s: &str,
) -> Result<(u64, Option<usize>, String), String> {
    if let Ok(n) = number(s) {
        let name = register_at(dev, region, n).unwrap_or_default();
        return Ok((n, None, name));
    }
    let info = dev.info();
    let profile = profile_for(info.vendor, info.device).ok_or_else(|| {
        format!(
            "{s:?} is not a number, and {} has no profile naming registers (give one with --profile FILE)",
            info.name
        )
    })?;
    let bar = profile.bars.iter().find(|b| b.index == region);
    let reg = bar
        .and_then(|b| b.registers.iter().find(|r| r.name.eq_ignore_ascii_case(s)))
        .ok_or_else(|| {
            let known: Vec<&str> = bar
                .map(|b| b.registers.iter().map(|r| r.name.as_str()).collect())
                .unwrap_or_default();
            format!(
                "no register {s:?} in region {region} of {} (known: {})",
                profile.name,
                known.join(", ")
            )
        })?;
    Ok((reg.offset, Some(reg.width as usize), reg.name.clone()))
}

/// A profile given with `--profile FILE`, used for devices of its ids.
static GIVEN: std::sync::OnceLock<Profile> = std::sync::OnceLock::new();

/// Loads `--profile FILE` (checked like the built-in ones).
pub fn load_profile(path: &std::path::Path) -> Result<(), String> {
    let p = Profile::load(path).map_err(|e| e.to_string())?;
    p.validate().map_err(|e| e.to_string())?;
    let _ = GIVEN.set(p);
    Ok(())
}

/// The profile for a device: the one given with `--profile` if its ids
/// match, else the built-in one.
pub fn profile_for(vendor: u16, device: u16) -> Option<Profile> {
    GIVEN
        .get()
        .filter(|p| p.vendor == vendor && p.device == device)
        .cloned()
        .or_else(|| Profile::builtin_for(vendor, device))
}

fn register_at(dev: &RemoteDevice, region: u32, off: u64) -> Option<String> {
    let info = dev.info();
    let p = profile_for(info.vendor, info.device)?;
    let b = p.bars.iter().find(|b| b.index == region)?;
    b.registers
        .iter()
        .find(|r| r.offset == off)
        .map(|r| r.name.clone())
}

fn label(region: u32, off: u64, name: &str) -> String {
    let r = if region == CONFIG_REGION {
        "config".to_string()
    } else {
        format!("bar{region}")
    };
    if name.is_empty() {
        format!("{r}+{off:#x}")
    } else {
        format!("{r}+{off:#x} ({name})")
    }
}

fn width(w: Option<usize>, named: Option<usize>) -> Result<usize, String> {
    let w = w.or(named).unwrap_or(4);
    if [1, 2, 4, 8].contains(&w) {
        Ok(w)
    } else {
        Err(format!("width {w}: give 1, 2, 4 or 8 bytes"))
    }
}

/// `cio read`.
pub fn read(
    dev: &mut RemoteDevice,
    region_s: &str,
    off_s: &str,
    w: Option<usize>,
) -> Result<String, String> {
    let region = self::region(region_s)?;
    let (off, named, name) = offset(dev, region, off_s)?;
    let w = width(w, named)?;
    let mut buf = vec![0u8; w];
    dev.read(region, off, &mut buf)
        .map_err(|e| error_chain(&e))?;
    let mut b = [0u8; 8];
    b[..w].copy_from_slice(&buf);
    let v = u64::from_le_bytes(b);
    Ok(format!(
        "{} = {v:#0width$x}",
        label(region, off, &name),
        width = 2 + 2 * w
    ))
}

/// `cio write`: a posted write, then a round trip so that an error of the
/// write is reported.
pub fn write(
    dev: &mut RemoteDevice,
    region_s: &str,
    off_s: &str,
    value_s: &str,
    w: Option<usize>,
) -> Result<String, String> {
    let region = self::region(region_s)?;
    let (off, named, name) = offset(dev, region, off_s)?;
    let w = width(w, named)?;
    let v = number(value_s)?;
    if w < 8 && v >> (8 * w) != 0 {
        return Err(format!("{v:#x} does not fit in {w} bytes"));
    }
    dev.write(region, off, &v.to_le_bytes()[..w])
        .and_then(|()| dev.flush())
        .map_err(|e| error_chain(&e))?;
    Ok(format!(
        "{} <- {v:#0width$x}",
        label(region, off, &name),
        width = 2 + 2 * w
    ))
}

/// `cio dump`: `len` bytes from `off`, read in bulk (one request per
/// chunk; the backend makes the accesses the region takes, 4 bytes where it
/// can: see `RegionInfo::bulk_width`), as a hex dump (or raw to `out`).
pub fn dump(
    dev: &mut RemoteDevice,
    region_s: &str,
    off: u64,
    len: Option<u64>,
    out: Option<&Path>,
) -> Result<String, String> {
    let region = self::region(region_s)?;
    let info = dev
        .info()
        .region(region)
        .cloned()
        .ok_or_else(|| format!("the device has no region {region}"))?;
    let len = len
        .unwrap_or_else(|| info.size.saturating_sub(off))
        .min(info.size.saturating_sub(off));
    dev.info()
        .check_bulk(region, off, len as usize, false)
        .map_err(|e| error_chain(&e))?;
    let mut data = vec![0u8; len as usize];
    // A terminal gets a progress bar for a large dump (a pipe or a file
    // nothing).
    let bar = crate::progress::bar(len, "reading");
    for (i, chunk) in data.chunks_mut(DUMP_CHUNK).enumerate() {
        dev.read_bulk(region, off + (i * DUMP_CHUNK) as u64, chunk)
            .map_err(|e| error_chain(&e))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if let Some(path) = out {
        std::fs::File::create(path)
            .and_then(|mut f| f.write_all(&data))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        return Ok(format!(
            "{len} bytes of region {region} from {off:#x} written to {}",
            path.display()
        ));
    }
    let mut s = String::new();
    for (i, line) in data.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        s.push_str(&format!(
            "{:08x}: {:<47}  {text}\n",
            off + 16 * i as u64,
            hex.join(" ")
        ));
    }
    Ok(s.trim_end().to_string())
}

/// `cio config`: the config header and the capability list, decoded as
/// `lspci -vv` does (for the parts cio knows).
pub fn config(dev: &mut RemoteDevice) -> Result<String, String> {
    let size = dev
        .info()
        .region(CONFIG_REGION)
        .map_or(256, |r| r.size.min(256)) as usize;
    let mut c = vec![0u8; size];
    for (i, chunk) in c.chunks_mut(4).enumerate() {
        dev.read(CONFIG_REGION, 4 * i as u64, chunk)
            .map_err(|e| error_chain(&e))?;
    }
    let u16_at = |o: usize| u16::from_le_bytes([c[o], c[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
    let bit = |v: u16, b: u16, name: &str| format!("{name}{}", if v & b != 0 { "+" } else { "-" });
    let cmd = u16_at(0x04);
    let status = u16_at(0x06);
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!(
        "{}: {:04x}:{:04x} (rev {:02x}) class {:02x}{:02x}{:02x}, header type {:#04x}",
        dev.info().name,
        u16_at(0),
        u16_at(2),
        c[0x08],
        c[0x0b],
        c[0x0a],
        c[0x09],
        c[0x0e]
    ));
    line(format!(
        "\tControl: {} {} {} {}",
        bit(cmd, 0x1, "I/O"),
        bit(cmd, 0x2, "Mem"),
        bit(cmd, 0x4, "BusMaster"),
        bit(cmd, 0x400, "DisINTx")
    ));
    line(format!(
        "\tStatus: {} {}",
        bit(status, 0x10, "Cap"),
        bit(status, 0x8, "INTx")
    ));
    if c[0x0e] & 0x7f == 0 {
        for i in 0..6 {
            let v = u32_at(0x10 + 4 * i);
            if v != 0 {
                line(format!("\tBAR{i}: {v:#010x}"));
            }
        }
        line(format!(
            "\tSubsystem: {:04x}:{:04x}",
            u16_at(0x2c),
            u16_at(0x2e)
        ));
    }
    if c[0x3d] != 0 {
        line(format!(
            "\tInterrupt: pin {}, line {}",
            (b'A' + c[0x3d] - 1) as char,
            c[0x3c]
        ));
    }
    if status & 0x10 == 0 {
        line("\tCapabilities: none".into());
        return Ok(s.trim_end().to_string());
    }
    let mut at = (c[0x34] & !3) as usize;
    let mut seen = 0;
    while at >= 0x40 && at + 2 <= size && seen < 48 {
        seen += 1;
        let (id, next) = (c[at], (c[at + 1] & !3) as usize);
        let what = match id {
            0x01 => format!("Power Management version {}", u16_at(at + 2) & 7),
            0x05 => {
                let ctl = u16_at(at + 2);
                format!(
                    "MSI: Enable{} Count={}/{} 64bit{}",
                    if ctl & 1 != 0 { "+" } else { "-" },
                    1 << ((ctl >> 4) & 7),
                    1 << ((ctl >> 1) & 7),
                    if ctl & 0x80 != 0 { "+" } else { "-" }
                )
            }
            0x09 => "Vendor Specific".into(),
            0x10 => format!("Express (v{})", u16_at(at + 2) & 0xf),
            0x11 => {
                let ctl = u16_at(at + 2);
                format!(
                    "MSI-X: Enable{} Count={} Masked{}",
                    if ctl & 0x8000 != 0 { "+" } else { "-" },
                    (ctl & 0x7ff) + 1,
                    if ctl & 0x4000 != 0 { "+" } else { "-" }
                )
            }
            other => format!("capability {other:#04x}"),
        };
        line(format!("\tCapabilities: [{at:02x}] {what}"));
        if next == 0 || next == at {
            break;
        }
        at = next;
    }
    Ok(s.trim_end().to_string())
}
