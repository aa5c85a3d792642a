#!/usr/bin/env python3
"""Seeds for the `session` target: requests a real client sends, in the
target's record format (kind u16 LE, body length u8, body). Run once; the
files land in corpus/session/ (kept in the repository with the rest of the
corpus)."""
import os
import struct

def rec(kind, body):
    return struct.pack("<HB", kind, len(body)) + body

def s(x):
    return struct.pack("<H", len(x)) + x

OPEN, READ, WRITE, SET_IRQS, DMA_MAP, DMA_UNMAP, DMA_DATA, SYNC, RESET, CLOSE, LIST = (
    0x12, 0x20, 0x22, 0x30, 0x40, 0x41, 0x42, 0x43, 0x50, 0x14, 0x10)
READ_BULK, WRITE_BULK = 0x23, 0x24

def read(h, region, off, n):
    return rec(READ, struct.pack("<IIQI", h, region, off, n))

def write(h, region, off, data):
    return rec(WRITE, struct.pack("<IIQI", h, region, off, len(data)) + data)

seeds = {
    "list-open-read": rec(LIST, b"") + rec(OPEN, s(b"edu0")) + read(1, 0, 0, 4),
    "edu-factorial": rec(OPEN, s(b"edu0")) + write(1, 0, 8, struct.pack("<I", 5)) + read(1, 0, 8, 4),
    "edu-irq": rec(OPEN, s(b"edu0")) + rec(SET_IRQS, struct.pack("<IBBII", 1, 1, 1, 0, 1))
        + write(1, 0, 0x60, struct.pack("<I", 1)) + read(1, 0, 0x24, 4),
    "edu-dma": rec(OPEN, s(b"edu0")) + rec(DMA_MAP, struct.pack("<IQQB", 1, 0x40000, 4096, 3))
        + rec(DMA_DATA, struct.pack("<IQI", 1, 0x40000, 16) + b"0123456789abcdef")
        + write(1, 0, 0x80, struct.pack("<Q", 0x40000)) + write(1, 0, 0x88, struct.pack("<Q", 0x40000))
        + write(1, 0, 0x90, struct.pack("<Q", 16)) + write(1, 0, 0x98, struct.pack("<Q", 1))
        + rec(SYNC, struct.pack("<IQQ", 1, 0x40000, 4096)) + rec(DMA_UNMAP, struct.pack("<IQ", 1, 0x40000)),
    "mem-bulk": rec(OPEN, s(b"mem0"))
        + rec(WRITE_BULK, struct.pack("<IIQI", 1, 0, 0x13, 40) + bytes(range(40)))
        + rec(READ_BULK, struct.pack("<IIQI", 1, 0, 0x10, 48)),
    "edu-bulk": rec(OPEN, s(b"edu0")) + rec(READ_BULK, struct.pack("<IIQI", 1, 0, 0, 32))
        + rec(READ_BULK, struct.pack("<IIQI", 1, 0, 2, 6)),
    "mem-rw": rec(OPEN, s(b"mem0")) + write(1, 0, 0x100, b"\xaa" * 8) + read(1, 0, 0x100, 8)
        + rec(RESET, struct.pack("<I", 1)) + rec(CLOSE, struct.pack("<I", 1)),
}
os.makedirs("corpus/session", exist_ok=True)
for name, body in seeds.items():
    with open(f"corpus/session/seed-{name}", "wb") as f:
        f.write(bytes([0]) + body)
