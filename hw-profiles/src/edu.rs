//! QEMU `edu`'s register map (QEMU `docs/specs/edu.rst`): what a driver
//! (`cio_frontend::drivers::edu`) and the emulated model
//! (`cio_backend::models::edu`) share, so neither depends on the other.

/// PCI vendor id of QEMU's emulated devices.
pub const VENDOR: u16 = 0x1234;
/// edu's device id.
pub const DEVICE: u16 = 0x11e8;
/// Value of the identification register.
pub const ID: u32 = 0x0100_00ed;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 1 << 20;
/// Start of the device buffer in DMA-engine addresses.
pub const DMA_START: u64 = 0x40000;
/// Size of the device buffer.
pub const DMA_SIZE: u64 = 4096;
/// Interrupt status bit raised after a factorial.
pub const FACT_IRQ: u32 = 0x0000_0001;
/// Interrupt status bit raised after a DMA.
pub const DMA_IRQ: u32 = 0x0000_0100;
/// Status: computing.
pub const STATUS_COMPUTING: u32 = 0x01;
/// Status: raise FACT_IRQ when done.
pub const STATUS_IRQFACT: u32 = 0x80;
/// DMA command: start.
pub const DMA_RUN: u64 = 0x1;
/// DMA command: direction, set = device buffer to RAM.
pub const DMA_TO_RAM: u64 = 0x2;
/// DMA command: raise DMA_IRQ when done.
pub const DMA_IRQ_ENABLE: u64 = 0x4;
/// QEMU's default DMA mask (28 bits).
pub const DMA_MASK: u64 = (1 << 28) - 1;

/// Register offsets in BAR0.
pub mod reg {
    #![allow(missing_docs)]
    pub const ID: u64 = 0x00;
    pub const LIVENESS: u64 = 0x04;
    pub const FACTORIAL: u64 = 0x08;
    pub const STATUS: u64 = 0x20;
    pub const IRQ_STATUS: u64 = 0x24;
    pub const IRQ_RAISE: u64 = 0x60;
    pub const IRQ_ACK: u64 = 0x64;
    pub const DMA_SRC: u64 = 0x80;
    pub const DMA_DST: u64 = 0x88;
    pub const DMA_COUNT: u64 = 0x90;
    pub const DMA_CMD: u64 = 0x98;
}
