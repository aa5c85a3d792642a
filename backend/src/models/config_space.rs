//! An emulated type-0 PCI configuration header with write masks, BAR sizing
//! and an optional MSI capability, shared by the emulated models.

use cio_core::device::{
    REGION_64BIT, REGION_PREFETCH, REGION_READ, REGION_WRITE, WIDTH_1, WIDTH_2, WIDTH_4,
};
use cio_core::{DeviceInfo, IrqInfo, RegionInfo, RegionKind, CONFIG_REGION};

/// Size of emulated config space.
pub const CONFIG_SIZE: usize = 256;
/// Offset of the MSI capability when present (first free slot, as QEMU places it).
pub const MSI_CAP: usize = 0x40;

/// PCI command register bits a driver may change (I/O, memory, bus master,
/// INTx disable).
const COMMAND_WMASK: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;

/// Identity of an emulated function.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem_device: u16,
    /// 24-bit class code.
    pub class: u32,
    /// Revision.
    pub revision: u8,
}

impl Identity {
    /// The description of a function with this identity, served as `name`.
    pub fn info(&self, name: &str, regions: Vec<RegionInfo>, irqs: Vec<IrqInfo>) -> DeviceInfo {
        DeviceInfo {
            name: name.to_owned(),
            vendor: self.vendor,
            device: self.device,
            subsystem_vendor: self.subsystem_vendor,
            subsystem_device: self.subsystem_device,
            class: self.class,
            revision: self.revision,
            regions,
            irqs,
            // Every model resets to its power-on state.
            reset: cio_core::ResetMethod::Full,
        }
    }
}

/// The region description of emulated config space.
pub fn region_info() -> RegionInfo {
    RegionInfo {
        index: CONFIG_REGION,
        kind: RegionKind::Config,
        size: CONFIG_SIZE as u64,
        flags: REGION_READ | REGION_WRITE,
        widths: WIDTH_1 | WIDTH_2 | WIDTH_4,
    }
}

/// A memory BAR: size (power of two, ≥ 16) and `REGION_*` flags.
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    /// BAR number.
    pub index: usize,
    /// Size in bytes.
    pub size: u64,
    /// `REGION_PREFETCH` / `REGION_64BIT`.
    pub flags: u8,
}

/// Config space bytes plus the mask of bits software may write.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    initial: [u8; CONFIG_SIZE],
    has_msi: bool,
}

impl ConfigSpace {
    /// Builds the header. `intx_pin` 0 means no INTx; `msi` adds a 64-bit,
    /// single-vector MSI capability.
    pub fn new(id: Identity, bars: &[Bar], intx_pin: u8, msi: bool) -> Self {
        let mut c = Self {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            initial: [0; CONFIG_SIZE],
            has_msi: msi,
        };
        c.put16(0x00, id.vendor);
        c.put16(0x02, id.device);
        c.bytes[0x08] = id.revision;
        c.put_bytes(0x09, &id.class.to_le_bytes()[..3]);
        c.put16(0x2c, id.subsystem_vendor);
        c.put16(0x2e, id.subsystem_device);
        c.wmask16(0x04, COMMAND_WMASK);
        c.wmask[0x0c] = 0xff; // cache line size
        c.wmask[0x0d] = 0xff; // latency timer
        c.wmask[0x3c] = 0xff; // interrupt line
        c.bytes[0x3d] = intx_pin;
        for bar in bars {
            let off = 0x10 + 4 * bar.index;
            let mut low = 0u32;
            if bar.flags & REGION_64BIT != 0 {
                low |= 0b100;
            }
            if bar.flags & REGION_PREFETCH != 0 {
                low |= 0b1000;
            }
            c.put32(off, low);
            let mask = !(bar.size - 1);
            c.wmask32(off, (mask as u32) & !0xf);
            if bar.flags & REGION_64BIT != 0 {
                c.wmask32(off + 4, (mask >> 32) as u32);
            }
        }
        if msi {
            c.put16(0x06, 0x0010); // status: capability list
            c.bytes[0x34] = MSI_CAP as u8;
            c.bytes[MSI_CAP] = 0x05; // MSI
            c.bytes[MSI_CAP + 1] = 0; // end of list
            c.put16(MSI_CAP + 2, 0x0080); // 64-bit capable, 1 vector
            c.wmask32(MSI_CAP + 4, 0xffff_fffc); // address low
            c.wmask32(MSI_CAP + 8, 0xffff_ffff); // address high
            c.wmask16(MSI_CAP + 12, 0xffff); // data
        }
        c.initial = c.bytes;
        c
    }

    fn put_bytes(&mut self, off: usize, b: &[u8]) {
        self.bytes[off..off + b.len()].copy_from_slice(b);
    }
    fn put16(&mut self, off: usize, v: u16) {
        self.put_bytes(off, &v.to_le_bytes());
    }
    fn put32(&mut self, off: usize, v: u32) {
        self.put_bytes(off, &v.to_le_bytes());
    }
    fn wmask16(&mut self, off: usize, v: u16) {
        self.wmask[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn wmask32(&mut self, off: usize, v: u32) {
        self.wmask[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Reads `data.len()` bytes at `off` (the caller checked the range).
    pub fn read(&self, off: u64, data: &mut [u8]) {
        let o = off as usize;
        data.copy_from_slice(&self.bytes[o..o + data.len()]);
    }

    /// Writes through the write mask: read-only bits keep their value.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let o = off as usize + i;
            self.bytes[o] = (self.bytes[o] & !self.wmask[o]) | (b & self.wmask[o]);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[0x04], self.bytes[0x05]])
    }

    /// True when the driver set Interrupt Disable (command bit 10): the
    /// function must not assert INTx.
    pub fn intx_disabled(&self) -> bool {
        self.command() & 0x0400 != 0
    }

    /// Sets the status register's Interrupt Status bit (3), which tells
    /// whether the function asserts INTx, whatever Interrupt Disable says:
    /// drivers that mask INTx with the command register (Linux's vfio-pci,
    /// uio_pci_generic) read it to tell their interrupt from a neighbour's.
    pub fn set_intx_status(&mut self, asserted: bool) {
        let st = &mut self.bytes[0x06];
        *st = if asserted { *st | 0x08 } else { *st & !0x08 };
    }

    /// Sets the MSI enable bit, as VFIO does when MSI is routed.
    pub fn set_msi_enabled(&mut self, on: bool) {
        if self.has_msi {
            let ctl = &mut self.bytes[MSI_CAP + 2];
            *ctl = if on { *ctl | 1 } else { *ctl & !1 };
        }
    }

    /// Back to power-on values.
    pub fn reset(&mut self) {
        self.bytes = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConfigSpace {
        ConfigSpace::new(
            Identity {
                vendor: 0x1234,
                device: 0x11e8,
                subsystem_vendor: 0x1af4,
                subsystem_device: 0x1100,
                class: 0x00ff00,
                revision: 0x10,
            },
            &[Bar {
                index: 0,
                size: 1 << 20,
                flags: 0,
            }],
            1,
            true,
        )
    }

    fn r32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_are_read_only_and_bar_sizing_reports_size() {
        let mut c = cfg();
        c.write(0, &[0xff; 4]);
        assert_eq!(r32(&c, 0), 0x11e8_1234);
        c.write(0x10, &[0xff; 4]);
        assert_eq!(r32(&c, 0x10), 0xfff0_0000, "1 MiB BAR sizing mask");
        assert_eq!(r32(&c, 0x08), 0x00ff_0010, "class and revision");
    }

    #[test]
    fn interrupt_status_bit_follows_the_line_and_is_read_only() {
        let mut c = cfg();
        assert_eq!(r32(&c, 0x04) >> 16 & 0x08, 0);
        c.set_intx_status(true);
        assert_eq!(r32(&c, 0x04) >> 16 & 0x08, 0x08);
        c.write(0x06, &[0, 0]);
        assert_eq!(r32(&c, 0x04) >> 16 & 0x08, 0x08, "not writable");
        c.set_intx_status(false);
        assert_eq!(r32(&c, 0x04) >> 16 & 0x08, 0);
        assert!(!c.intx_disabled());
        c.write(0x04, &0x0400u16.to_le_bytes());
        assert!(c.intx_disabled());
    }

    #[test]
    fn command_register_keeps_only_writable_bits_and_reset_restores() {
        let mut c = cfg();
        c.write(0x04, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WMASK);
        c.set_msi_enabled(true);
        assert_eq!(c.bytes[MSI_CAP + 2] & 1, 1);
        c.reset();
        assert_eq!(c.command(), 0);
        assert_eq!(c.bytes[MSI_CAP + 2] & 1, 0);
    }
}
