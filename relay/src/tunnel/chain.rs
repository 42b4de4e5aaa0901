//! Descriptor chains as the driver published them, walked by the relay itself.
//!
//! `virtio-queue` pops the chain's head from the available ring; what the head leads
//! to is read here, each descriptor once, and checked before the relay touches a byte
//! of its buffers. `virtio-queue`'s own iterator ends a chain quietly where it cannot
//! go on (a loop at the queue size, a link beyond the table, a descriptor it cannot
//! read), so a broken chain would look like a shorter, valid one; and it follows
//! indirect tables, which the relay does not offer. Here each of those refuses the
//! chain, with the reason:
//!
//! - the head or a link names a descriptor beyond the queue,
//! - the chain has more descriptors than the queue (it loops),
//! - a descriptor is indirect (`VIRTIO_RING_F_INDIRECT_DESC` is not negotiated),
//! - the table or a buffer lies outside guest memory (or wraps around),
//! - a device-readable buffer follows a device-writable one,
//! - the readable or the writable part is larger than the caller takes.

use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::direct::GuestRanges;

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Why a chain is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The head names a descriptor beyond the queue.
    #[error("head {head} is beyond the queue of {size}")]
    HeadOutOfRange {
        /// The head.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor links beyond the queue.
    #[error("descriptor {at} links to {next}, beyond the queue of {size}")]
    NextOutOfRange {
        /// The descriptor.
        at: u16,
        /// Its link.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// More descriptors than the queue has.
    #[error("it loops (more than {0} descriptors)")]
    Loops(u16),
    /// An indirect descriptor.
    #[error("descriptor {0} is indirect, which the relay does not offer")]
    Indirect(u16),
    /// The descriptor table is not in guest memory.
    #[error("descriptor {0} is outside guest memory (the table is)")]
    TableOutside(u16),
    /// A buffer is not in guest memory.
    #[error("descriptor {at}'s buffer of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory {
        /// The descriptor.
        at: u16,
        /// The buffer's guest-physical address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable buffer after a device-writable one.
    #[error("a device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// A part of the chain is larger than the caller takes.
    #[error("{0} bytes, larger than a message")]
    TooLarge(usize),
    /// A `g2h` chain with no device-readable buffer: no message in it.
    #[error("only device-writable buffers, where the relay reads a message")]
    NoReadable,
    /// An `h2g` chain with a device-readable buffer.
    #[error("a device-readable buffer: not device-writable")]
    NotDeviceWritable,
    /// An `h2g` chain smaller than the spec allows.
    #[error("{0} bytes, fewer than the 256 an h2g buffer must hold")]
    TooSmall(usize),
    /// A device-writable buffer over an available ring: what the relay wrote there
    /// would look like buffers the driver posted.
    #[error("a device-writable buffer over an available ring")]
    OverAvailableRing,
}

/// The buffers of a chain, in chain order: the device-readable ones, then the
/// device-writable ones.
#[derive(Debug, Default)]
pub struct Chain {
    /// The device-readable buffers.
    pub readable: GuestRanges,
    /// The device-writable buffers.
    pub writable: GuestRanges,
}

/// Walks the chain at `head` of a queue of `size` descriptors whose table is at
/// `table`. Each part (readable, writable) may hold at most `max` bytes.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
    max: usize,
) -> Result<Chain, ChainError> {
    if head >= size {
        return Err(ChainError::HeadOutOfRange { head, size });
    }
    let mut chain = Chain::default();
    let (mut readable, mut writable) = (0usize, 0usize);
    let mut at = head;
    for _ in 0..size {
        let mut raw = [0u8; DESC_SIZE as usize];
        table
            .checked_add(u64::from(at) * DESC_SIZE)
            .and_then(|a| mem.read_slice(&mut raw, a).ok())
            .ok_or(ChainError::TableOutside(at))?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & F_INDIRECT != 0 {
            return Err(ChainError::Indirect(at));
        }
        let inside = addr.checked_add(u64::from(len)).is_some()
            && mem.check_range(GuestAddress(addr), len as usize);
        if !inside {
            return Err(ChainError::OutsideMemory { at, addr, len });
        }
        if flags & F_WRITE != 0 {
            writable += len as usize;
            if writable > max {
                return Err(ChainError::TooLarge(writable));
            }
            chain.writable.push(GuestAddress(addr), len as usize);
        } else {
            if chain.writable.buffers() > 0 {
                return Err(ChainError::ReadableAfterWritable);
            }
            readable += len as usize;
            if readable > max {
                return Err(ChainError::TooLarge(readable));
            }
            chain.readable.push(GuestAddress(addr), len as usize);
        }
        if flags & F_NEXT == 0 {
            return Ok(chain);
        }
        if next >= size {
            return Err(ChainError::NextOutOfRange { at, next, size });
        }
        at = next;
    }
    Err(ChainError::Loops(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: u64 = 0x1000;
    const SIZE: u16 = 8;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("guest memory")
    }

    fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = Vec::new();
        raw.extend_from_slice(&addr.to_le_bytes());
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(TABLE + 16 * u64::from(i)))
            .unwrap();
    }

    fn walk8(mem: &GuestMemoryMmap, head: u16) -> Result<Chain, ChainError> {
        walk(mem, GuestAddress(TABLE), SIZE, head, 4096)
    }

    /// A readable buffer linked to a writable one is walked in order.
    #[test]
    fn good_chain() {
        let mem = memory();
        desc(&mem, 2, 0x2000, 100, F_NEXT, 5);
        desc(&mem, 5, 0x3000, 200, F_WRITE, 0);
        let c = walk8(&mem, 2).unwrap();
        assert_eq!((c.readable.len(), c.writable.len()), (100, 200));
    }

    /// Every way a chain can be broken is refused with its reason, where
    /// `virtio-queue`'s iterator would have ended the chain quietly (or followed the
    /// indirect table).
    #[test]
    fn broken_chains_are_refused() {
        let mem = memory();
        assert_eq!(
            walk8(&mem, 8).unwrap_err(),
            ChainError::HeadOutOfRange { head: 8, size: 8 }
        );
        desc(&mem, 0, 0x2000, 16, F_NEXT, 0);
        assert_eq!(walk8(&mem, 0).unwrap_err(), ChainError::Loops(8));
        desc(&mem, 0, 0x2000, 16, F_NEXT, 1);
        desc(&mem, 1, 0x2000, 16, F_NEXT, 0);
        assert_eq!(walk8(&mem, 0).unwrap_err(), ChainError::Loops(8));
        desc(&mem, 0, 0x2000, 16, F_NEXT, 13);
        assert_eq!(
            walk8(&mem, 0).unwrap_err(),
            ChainError::NextOutOfRange {
                at: 0,
                next: 13,
                size: 8
            }
        );
        desc(&mem, 0, 0x2000, 16, F_INDIRECT, 0);
        assert_eq!(walk8(&mem, 0).unwrap_err(), ChainError::Indirect(0));
        desc(&mem, 0, 1 << 40, 16, 0, 0);
        assert!(matches!(
            walk8(&mem, 0).unwrap_err(),
            ChainError::OutsideMemory { .. }
        ));
        desc(&mem, 0, u64::MAX - 7, 16, 0, 0);
        assert!(matches!(
            walk8(&mem, 0).unwrap_err(),
            ChainError::OutsideMemory { .. }
        ));
        desc(&mem, 0, 0xfff0, 32, 0, 0);
        assert!(
            matches!(
                walk8(&mem, 0).unwrap_err(),
                ChainError::OutsideMemory { .. }
            ),
            "runs past the end of guest memory"
        );
        desc(&mem, 0, 0x2000, 16, F_WRITE | F_NEXT, 1);
        desc(&mem, 1, 0x3000, 16, 0, 0);
        assert_eq!(
            walk8(&mem, 0).unwrap_err(),
            ChainError::ReadableAfterWritable
        );
        desc(&mem, 0, 0x2000, 4097, 0, 0);
        assert_eq!(walk8(&mem, 0).unwrap_err(), ChainError::TooLarge(4097));
        assert_eq!(
            walk(&mem, GuestAddress(1 << 40), SIZE, 0, 4096).unwrap_err(),
            ChainError::TableOutside(0)
        );
    }
}
