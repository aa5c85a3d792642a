//! `cio read`, `cio write`, `cio dump`: a remote device's registers and
//! memory by hand, as `setpci`/`devmem2`/`pcimem` do for local ones.
//! Offsets may be register names from the device's hw profile.

use std::io::Write;
use std::path::Path;

use cio_core::{error_chain, Device, CONFIG_REGION};
use cio_frontend::RemoteDevice;
use cio_hw_profiles::Profile;

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
    let profile = Profile::builtin_for(info.vendor, info.device).ok_or_else(|| {
        format!(
            "{s:?} is not a number, and {} has no built-in profile naming registers",
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

fn register_at(dev: &RemoteDevice, region: u32, off: u64) -> Option<String> {
    let info = dev.info();
    let p = Profile::builtin_for(info.vendor, info.device)?;
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

/// `cio dump`: `len` bytes from `off`, read in 4-byte accesses where the
/// region takes them (the width registers are made for: edu, for one,
/// answers 8-byte reads of its registers with all-ones), else 8, 2 or 1,
/// as a hex dump (or raw to `out`).
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
    let w = [4usize, 8, 2, 1]
        .into_iter()
        .find(|&w| info.accepts_width(w) && off % w as u64 == 0 && len % w as u64 == 0)
        .ok_or_else(|| {
            format!("region {region} takes no access width that fits {len} bytes at {off:#x}")
        })?;
    let mut data = vec![0u8; len as usize];
    for (i, chunk) in data.chunks_mut(w).enumerate() {
        dev.read(region, off + (i * w) as u64, chunk)
            .map_err(|e| error_chain(&e))?;
    }
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
