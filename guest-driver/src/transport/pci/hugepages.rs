//! DMA memory for a driver without an IOMMU: hugepages, locked, whose physical
//! addresses (read from /proc/self/pagemap) are what the device is given. A hugepage is
//! physically contiguous and the kernel does not move it, so each one (or a run of
//! physically adjacent ones) is a chunk of [`SharedMemory`].

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::virtqueue::SharedMemory;

/// Size of the hugepages used (the x86_64 default).
pub const HUGEPAGE: usize = 2 << 20;
const PAGE: u64 = 4096;

/// Why no DMA memory could be had.
#[derive(Debug, Error)]
pub enum HugeMemoryError {
    /// Not enough free hugepages.
    #[error(
        "cannot allocate {mib} MiB of hugepages ({source}); reserve them first, e.g. \
         `echo {pages} > /proc/sys/vm/nr_hugepages` (HugePages_Free in /proc/meminfo)"
    )]
    NoHugepages {
        /// MiB wanted.
        mib: usize,
        /// Pages wanted.
        pages: usize,
        /// The error of mmap.
        source: std::io::Error,
    },
    /// Physical addresses are hidden from this process.
    #[error(
        "/proc/self/pagemap shows no physical address for {0:#x}: vfu-guest needs \
         CAP_SYS_ADMIN (run it as root) to give the device physical addresses"
    )]
    NoPhysicalAddress(u64),
    /// pagemap could not be read, or memory could not be locked.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Hugepage memory mapped into this process.
#[derive(Debug)]
pub struct HugeMemory {
    ptr: *mut u8,
    len: usize,
    /// (local pointer, length, physical address) of each physically contiguous run.
    chunks: Vec<(*mut u8, usize, u64)>,
}

// SAFETY: the mapping is owned by this value and lives until its drop; it is shared with
// the device and accessed through volatile copies only.
unsafe impl Send for HugeMemory {}

impl Drop for HugeMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `allocate`; allocations made from it must
        // not outlive it (the transport owns both together).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The page frame number in a pagemap entry, if the page is present and the kernel
/// showed it (bit 63: present; bits 0-54: PFN, zero without CAP_SYS_ADMIN).
pub fn pfn(entry: u64) -> Option<u64> {
    let present = entry & (1 << 63) != 0;
    let pfn = entry & ((1 << 55) - 1);
    (present && pfn != 0).then_some(pfn)
}

/// Merges `(local, physical)` page starts of `page` bytes, in local order, into runs
/// contiguous both locally and physically: `(local, length, physical)`.
pub fn runs(pages: &[(usize, u64)], page: usize) -> Vec<(usize, usize, u64)> {
    let mut out: Vec<(usize, usize, u64)> = Vec::new();
    for &(local, phys) in pages {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == local && last.2 + last.1 as u64 == phys {
                last.1 += page;
                continue;
            }
        }
        out.push((local, page, phys));
    }
    out
}

impl HugeMemory {
    /// Maps `bytes` (rounded up to whole hugepages) of locked hugepage memory and finds
    /// its physical addresses.
    pub fn allocate(bytes: usize) -> Result<Self, HugeMemoryError> {
        let pages = bytes.div_ceil(HUGEPAGE).max(1);
        let len = pages * HUGEPAGE;
        // SAFETY: an anonymous shared hugetlb mapping, populated and locked; the result
        // is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | libc::MAP_POPULATE
                    | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HugeMemoryError::NoHugepages {
                mib: len >> 20,
                pages,
                source: std::io::Error::last_os_error(),
            });
        }
        let mut mem = Self {
            ptr: ptr as *mut u8,
            len,
            chunks: Vec::new(),
        };
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| HugeMemoryError::Io {
            what: "opening /proc/self/pagemap",
            source,
        })?;
        let mut starts = Vec::with_capacity(pages);
        for i in 0..pages {
            let local = mem.ptr as usize + i * HUGEPAGE;
            // Make sure the page is there (MAP_POPULATE should have done it).
            // SAFETY: `local` is the first byte of a page of our mapping.
            unsafe { std::ptr::write_volatile(local as *mut u8, 0) };
            let mut entry = [0u8; 8];
            pagemap
                .read_exact_at(&mut entry, (local as u64 / PAGE) * 8)
                .map_err(|source| HugeMemoryError::Io {
                    what: "reading /proc/self/pagemap",
                    source,
                })?;
            let pfn = pfn(u64::from_le_bytes(entry))
                .ok_or(HugeMemoryError::NoPhysicalAddress(local as u64))?;
            starts.push((local, pfn * PAGE));
        }
        mem.chunks = runs(&starts, HUGEPAGE)
            .into_iter()
            .map(|(local, len, phys)| (local as *mut u8, len, phys))
            .collect();
        Ok(mem)
    }

    /// The memory as the driver's [`SharedMemory`] (physical addresses as guest-physical).
    ///
    /// # Safety
    /// The returned value and its allocations must not outlive `self`.
    pub unsafe fn shared(&self) -> SharedMemory {
        // SAFETY: every chunk lies in our mapping, readable and writable; the caller
        // keeps it alive.
        unsafe { SharedMemory::new(&self.chunks) }
    }

    /// `(local pointer, length, physical address)` of each physically contiguous run:
    /// the device addresses when there is no IOMMU.
    pub fn physical_runs(&self) -> &[(*mut u8, usize, u64)] {
        &self.chunks
    }

    /// Physically contiguous runs.
    pub fn runs(&self) -> usize {
        self.chunks.len()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only present pages with a shown frame number have a physical address.
    #[test]
    fn pagemap_entries() {
        assert_eq!(pfn((1 << 63) | 0x1234), Some(0x1234));
        assert_eq!(pfn(0x1234), None, "not present");
        assert_eq!(pfn(1 << 63), None, "frame number hidden (no CAP_SYS_ADMIN)");
        assert_eq!(pfn((1 << 63) | (1 << 55) | 7), Some(7), "flag bits ignored");
    }

    /// Pages adjacent both locally and physically merge; a physical gap or a jump back
    /// starts a new run.
    #[test]
    fn contiguous_runs() {
        let p = HUGEPAGE;
        let pages = [
            (0x1000_0000, 0x4000_0000),
            (0x1000_0000 + p, 0x4000_0000 + p as u64),
            (0x1000_0000 + 2 * p, 0x8000_0000),
            (0x1000_0000 + 3 * p, 0x4000_0000),
        ];
        assert_eq!(
            runs(&pages, p),
            vec![
                (0x1000_0000, 2 * p, 0x4000_0000),
                (0x1000_0000 + 2 * p, p, 0x8000_0000),
                (0x1000_0000 + 3 * p, p, 0x4000_0000),
            ]
        );
    }
}
