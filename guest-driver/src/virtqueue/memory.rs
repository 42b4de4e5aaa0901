//! Memory the driver shares with the device.
//!
//! The driver places rings and buffers here and hands the device their guest-physical
//! addresses. In the loopback VMM this is a memfd mapped into this process (guest-
//! physical address = offset); in a real device VM it is hugepage memory whose physical
//! addresses come from /proc/self/pagemap. Every access goes through volatile copies:
//! the device may write this memory at any time.

use std::sync::Mutex;

use vm_memory::volatile_memory::VolatileSlice;

/// One contiguous stretch: local mapping and guest-physical address.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    ptr: *mut u8,
    len: usize,
    gpa: u64,
}

/// A piece of shared memory handed out by [`SharedMemory::alloc`].
#[derive(Debug, Clone, Copy)]
pub struct Allocation {
    /// Guest-physical address, as the device sees it.
    pub gpa: u64,
    /// Local address.
    ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: an Allocation is a pointer into a mapping that lives as long as the
// SharedMemory it came from (which the owner keeps alive); all access is volatile.
unsafe impl Send for Allocation {}
// SAFETY: as above; no interior state.
unsafe impl Sync for Allocation {}

impl Allocation {
    /// A volatile view of `len` bytes at `offset` inside this allocation.
    pub fn slice(&self, offset: usize, len: usize) -> Option<VolatileSlice<'_>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: [ptr + offset, ptr + end) lies inside this allocation, which is inside
        // a live mapping; VolatileSlice only performs volatile accesses.
        Some(unsafe { VolatileSlice::new(self.ptr.add(offset), len) })
    }

    /// Local address of byte `offset` (for ring field accesses).
    pub(crate) fn ptr_at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.len);
        // SAFETY: callers pass offsets inside the allocation (checked in debug builds).
        unsafe { self.ptr.add(offset) }
    }

    /// Fills the allocation with zeros.
    pub fn zero(&self) {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut at = 0;
        while at < self.len {
            let n = (self.len - at).min(ZEROS.len());
            if let Some(s) = self.slice(at, n) {
                s.copy_from(&ZEROS[..n]);
            }
            at += n;
        }
    }
}

/// Shared memory with a bump allocator. Allocations are never freed individually: the
/// driver allocates its rings and buffer pools once.
#[derive(Debug)]
pub struct SharedMemory {
    chunks: Vec<Chunk>,
    /// (chunk index, offset of the next free byte in it)
    next: Mutex<(usize, usize)>,
}

// SAFETY: the chunks point to mappings owned by whoever created the SharedMemory and
// kept alive for its lifetime; access is volatile; the allocator state is a Mutex.
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Shared memory made of contiguous chunks `(local pointer, length, guest-physical
    /// address)`.
    ///
    /// # Safety
    /// Every chunk must be a mapping of `len` bytes, readable and writable, that stays
    /// mapped for as long as this value and every [`Allocation`] from it live.
    pub unsafe fn new(chunks: &[(*mut u8, usize, u64)]) -> Self {
        Self {
            chunks: chunks
                .iter()
                .map(|&(ptr, len, gpa)| Chunk { ptr, len, gpa })
                .collect(),
            next: Mutex::new((0, 0)),
        }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) inside one chunk, zeroed.
    pub fn alloc(&self, len: usize, align: usize) -> Option<Allocation> {
        let mut next = self.next.lock().ok()?;
        while next.0 < self.chunks.len() {
            let chunk = self.chunks[next.0];
            // Align the guest-physical address: that is what the device checks.
            let gpa = chunk.gpa + next.1 as u64;
            let pad = (align as u64 - gpa % align as u64) % align as u64;
            let start = next.1 + pad as usize;
            if start + len <= chunk.len {
                next.1 = start + len;
                let a = Allocation {
                    gpa: chunk.gpa + start as u64,
                    // SAFETY: start + len <= chunk.len.
                    ptr: unsafe { chunk.ptr.add(start) },
                    len,
                };
                a.zero();
                return Some(a);
            }
            *next = (next.0 + 1, 0);
        }
        None
    }

    /// Bytes not yet allocated.
    pub fn free_bytes(&self) -> usize {
        let next = self.next.lock().map(|n| *n).unwrap_or((usize::MAX, 0));
        self.chunks
            .iter()
            .enumerate()
            .skip(next.0)
            .map(|(i, c)| if i == next.0 { c.len - next.1 } else { c.len })
            .sum()
    }
}
