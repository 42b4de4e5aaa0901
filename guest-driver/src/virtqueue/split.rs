//! The driver's half of a VIRTIO 1.x split virtqueue.
//!
//! ```text
//! descriptor table  16 bytes x size   le64 addr, le32 len, le16 flags, le16 next
//! available ring    le16 flags, le16 idx, le16 ring[size], le16 used_event
//! used ring         le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event
//! ```
//! Ordering: descriptors and ring entries are written before the index that publishes
//! them (release store); the used index is read with an acquire load before the entries
//! it covers. With `VIRTIO_F_EVENT_IDX` a full fence separates publishing the available
//! index from reading `avail_event` (and setting `used_event` from re-checking the used
//! index), so neither side misses a notification.
//!
//! The free list lives in this process, not in the shared descriptor table, and every
//! used element the device returns is checked (known head, in flight, length within the
//! chain's writable bytes), so a misbehaving device cannot corrupt the driver's state.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use thiserror::Error;

use super::{Allocation, SharedMemory};

const DESC_SIZE: usize = 16;
/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (`VIRTIO_RING_F_INDIRECT_DESC`,
/// which this driver never negotiates; only [`crate::hostile`] sets it).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Errors of the driver-side queue.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("invalid queue size {0}")]
    BadSize(u16),
    /// Shared memory ran out while allocating the rings.
    #[error("out of shared memory for the rings")]
    NoMemory,
    /// Not enough free descriptors for the chain.
    #[error("queue full: {needed} descriptors needed, {free} free")]
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain with no segment.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The device returned a used element that is not a chain in flight, or claims more
    /// bytes than the chain's writable part.
    #[error("device returned an invalid used element (id {id}, len {len})")]
    BadUsed {
        /// Descriptor id the device returned.
        id: u32,
        /// Length it claimed.
        len: u32,
    },
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writable: bool,
}

/// One entry of the descriptor table, as the driver publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor, with `VIRTQ_DESC_F_NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// The 16 bytes of the table entry.
    pub fn to_bytes(self) -> [u8; DESC_SIZE] {
        let mut bytes = [0u8; DESC_SIZE];
        bytes[0..8].copy_from_slice(&self.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.next.to_le_bytes());
        bytes
    }
}

/// A chain the device has finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor of the chain (the value [`DriverQueue::add`] returned).
    pub head: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: Allocation,
    avail: Allocation,
    used: Allocation,
    /// Local free list: next[i] is the descriptor after i in the free list or chain.
    next: Vec<u16>,
    free_head: u16,
    num_free: u16,
    /// Per head: descriptors in its chain, writable bytes, in flight.
    chain_len: Vec<u16>,
    writable: Vec<u32>,
    in_flight: Vec<bool>,
    avail_idx: u16,
    last_kick_idx: u16,
    last_used: u16,
    event_idx: bool,
}

impl DriverQueue {
    /// Allocates the rings of a queue of `size` entries in `mem`.
    pub fn new(mem: &SharedMemory, size: u16, event_idx: bool) -> Result<Self, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::BadSize(size));
        }
        let n = size as usize;
        let desc = mem.alloc(DESC_SIZE * n, 16).ok_or(QueueError::NoMemory)?;
        let avail = mem.alloc(6 + 2 * n, 2).ok_or(QueueError::NoMemory)?;
        let used = mem.alloc(6 + 8 * n, 4).ok_or(QueueError::NoMemory)?;
        let next = (1..=size).map(|i| i % size).collect();
        Ok(Self {
            size,
            desc,
            avail,
            used,
            next,
            free_head: 0,
            num_free: size,
            chain_len: vec![0; n],
            writable: vec![0; n],
            in_flight: vec![false; n],
            avail_idx: 0,
            last_kick_idx: 0,
            last_used: 0,
            event_idx,
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available and used rings.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc.gpa, self.avail.gpa, self.used.gpa)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    fn u16_at(a: &Allocation, offset: usize) -> &AtomicU16 {
        // SAFETY: offset is inside the allocation and 2-aligned (rings are allocated
        // with alignment >= 2 and every field offset is even); the memory is shared with
        // the device, so it is only accessed atomically.
        unsafe { AtomicU16::from_ptr(a.ptr_at(offset) as *mut u16) }
    }

    fn write_desc(&self, i: u16, desc: Descriptor) {
        let base = DESC_SIZE * i as usize;
        if let Some(s) = self.desc.slice(base, DESC_SIZE) {
            s.copy_from(&desc.to_bytes());
        }
    }

    /// Makes a chain of `segments` available to the device. Returns its head, which
    /// [`DriverQueue::pop_used`] returns when the device is done with it. Call
    /// [`DriverQueue::kick_needed`] afterwards (once per batch) to learn whether to
    /// notify the device.
    pub fn add(&mut self, segments: &[Segment]) -> Result<u16, QueueError> {
        self.check_room(segments)?;
        let head = self.free_head;
        let mut i = head;
        let mut writable = 0u32;
        for (k, seg) in segments.iter().enumerate() {
            let last = k + 1 == segments.len();
            let next = self.next[i as usize];
            let desc = chain_descriptor(seg, last, next);
            if seg.device_writable {
                writable = writable.saturating_add(seg.len);
            }
            self.write_desc(i, desc);
            if !last {
                i = next;
            }
        }
        self.commit(head, i, segments.len(), writable);
        Ok(head)
    }

    /// [`DriverQueue::add`], with `edit` given the chain's descriptors (in chain order,
    /// links filled in) and their indexes in the table, to change before they are
    /// published: how the misbehaving driver
    /// of [`crate::hostile`] makes chains that loop, point anywhere or claim any length
    /// or direction. The driver's own bookkeeping stays with the descriptors it took
    /// from its free list (its free list lives here, not in the shared table), so an
    /// edited chain comes back like any other; the writable bytes it may be answered
    /// with are counted from the descriptors as published. (`add` itself does not go
    /// through here: the normal path pays nothing for the hook.)
    pub fn add_with(
        &mut self,
        segments: &[Segment],
        edit: impl FnOnce(&mut [Descriptor], &[u16]),
    ) -> Result<u16, QueueError> {
        self.check_room(segments)?;
        let head = self.free_head;
        let mut indexes = Vec::with_capacity(segments.len());
        let mut descs = Vec::with_capacity(segments.len());
        let mut i = head;
        for (k, seg) in segments.iter().enumerate() {
            let last = k + 1 == segments.len();
            let next = self.next[i as usize];
            indexes.push(i);
            descs.push(chain_descriptor(seg, last, next));
            if !last {
                i = next;
            }
        }
        edit(&mut descs, &indexes);
        let mut writable = 0u32;
        for (&at, &desc) in indexes.iter().zip(&descs) {
            if desc.flags & VIRTQ_DESC_F_WRITE != 0 {
                writable = writable.saturating_add(desc.len);
            }
            self.write_desc(at, desc);
        }
        self.commit(head, i, segments.len(), writable);
        Ok(head)
    }

    fn check_room(&self, segments: &[Segment]) -> Result<(), QueueError> {
        if segments.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if segments.len() > self.num_free as usize {
            return Err(QueueError::Full {
                needed: segments.len(),
                free: self.num_free as usize,
            });
        }
        Ok(())
    }

    /// Takes the chain `head ..= tail` of `count` descriptors off the free list and
    /// makes it available.
    fn commit(&mut self, head: u16, tail: u16, count: usize, writable: u32) {
        self.free_head = self.next[tail as usize];
        self.num_free -= count as u16;
        self.chain_len[head as usize] = count as u16;
        self.writable[head as usize] = writable;
        self.in_flight[head as usize] = true;
        self.publish_head(head);
    }

    /// Puts `head` in the next slot of the available ring and publishes the new index.
    /// [`DriverQueue::add_with`] does this for the chains it builds; called on its
    /// own, it offers the device a head the driver never set up (misbehaviour for
    /// [`crate::hostile`]: nothing of the driver's bookkeeping changes).
    pub fn publish_head(&mut self, head: u16) {
        let slot = 4 + 2 * (self.avail_idx % self.size) as usize;
        Self::u16_at(&self.avail, slot).store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Publish the descriptors and the ring entry before the index.
        Self::u16_at(&self.avail, 2).store(self.avail_idx.to_le(), Ordering::Release);
    }

    /// The available index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes `idx` into the available ring's index without adding anything: the
    /// index abuse of [`crate::hostile`]. The driver's own count is unchanged, so its
    /// next [`DriverQueue::add`] publishes a sane index again.
    pub fn publish_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        Self::u16_at(&self.avail, 2).store(idx.to_le(), Ordering::Release);
    }

    /// Whether the device wants a notification for what was added since the last call.
    pub fn kick_needed(&mut self) -> bool {
        // Order the avail index store before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let old = self.last_kick_idx;
        let new = self.avail_idx;
        self.last_kick_idx = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            let off = 4 + 8 * self.size as usize;
            let avail_event = u16::from_le(Self::u16_at(&self.used, off).load(Ordering::Relaxed));
            need_event(avail_event, new, old)
        } else {
            let flags = u16::from_le(Self::u16_at(&self.used, 0).load(Ordering::Relaxed));
            flags & VIRTQ_USED_F_NO_NOTIFY == 0
        }
    }

    /// Whether used elements are waiting.
    pub fn has_used(&self) -> bool {
        let used_idx = u16::from_le(Self::u16_at(&self.used, 2).load(Ordering::Acquire));
        used_idx != self.last_used
    }

    /// Takes the next chain the device has finished with, and frees its descriptors.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, QueueError> {
        let used_idx = u16::from_le(Self::u16_at(&self.used, 2).load(Ordering::Acquire));
        if used_idx == self.last_used {
            return Ok(None);
        }
        let off = 4 + 8 * (self.last_used % self.size) as usize;
        let mut entry = [0u8; 8];
        if let Some(s) = self.used.slice(off, 8) {
            s.copy_to(&mut entry);
        }
        let id = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let len = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        let head = match u16::try_from(id) {
            Ok(h) if (h as usize) < self.in_flight.len() && self.in_flight[h as usize] => h,
            _ => return Err(QueueError::BadUsed { id, len }),
        };
        if len > self.writable[head as usize] {
            return Err(QueueError::BadUsed { id, len });
        }
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain to the free list (walk our own copy of the links).
        let count = self.chain_len[head as usize];
        let mut tail = head;
        for _ in 1..count {
            tail = self.next[tail as usize];
        }
        self.next[tail as usize] = self.free_head;
        self.free_head = head;
        self.num_free += count;
        self.in_flight[head as usize] = false;
        Ok(Some(UsedElem { head, len }))
    }

    /// Asks for interrupts (used-buffer notifications) again and returns whether used
    /// elements arrived meanwhile (then process them before sleeping).
    pub fn enable_interrupts(&mut self) -> bool {
        if self.event_idx {
            let off = 4 + 2 * self.size as usize;
            Self::u16_at(&self.avail, off).store(self.last_used.to_le(), Ordering::Relaxed);
        } else {
            Self::u16_at(&self.avail, 0).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Asks the device not to interrupt (polling). Best effort, as the spec allows.
    pub fn disable_interrupts(&mut self) {
        if self.event_idx {
            // The index farthest from where the device is: it would have to add half
            // the index space (32768 entries, far more than a ring holds) before it
            // passes it. `last_used - 1` is not enough: a device that added an entry the
            // driver has already taken, and decides only afterwards whether to notify,
            // finds that index inside its batch and notifies.
            let off = 4 + 2 * self.size as usize;
            let far = self.last_used.wrapping_add(0x8000);
            Self::u16_at(&self.avail, off).store(far.to_le(), Ordering::Relaxed);
        } else {
            Self::u16_at(&self.avail, 0)
                .store(VIRTQ_AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
        }
    }
}

/// The descriptor of `seg` in a chain: linked to `next` unless it is the last.
fn chain_descriptor(seg: &Segment, last: bool, next: u16) -> Descriptor {
    let mut flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
    if seg.device_writable {
        flags |= VIRTQ_DESC_F_WRITE;
    }
    Descriptor {
        addr: seg.gpa,
        len: seg.len,
        flags,
        next: if last { 0 } else { next },
    }
}

/// `vring_need_event` of the VIRTIO spec: whether moving the index from `old` to `new`
/// passes `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests;
