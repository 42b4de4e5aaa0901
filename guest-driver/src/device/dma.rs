//! The DMA map table: what the client mapped with DMA_MAP, and the fds that came with
//! it.
//!
//! Rules (vfio-user spec, with libvfio-user's choices where the spec is silent):
//! - address, size and (with an fd) file offset are multiples of the 4 KiB page size
//!   the server states in `pgsizes`, else `EINVAL`; a range that wraps is `EINVAL`;
//! - a map over any mapped byte fails with `EEXIST` (the spec's rule; libvfio-user
//!   accepts an identical re-map and answers a partial overlap with `EINVAL`);
//! - more than `max_dma_maps` maps fail with `ENOSPC`;
//! - an unmap must match a map exactly (address and size), else `ENOENT`; UNMAP_ALL
//!   drops everything. Dropping a map closes its fd.
//!
//! Models do not reach client memory yet; [`DmaTable::find`] is the lookup a DMA
//! handle will use.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use vfu_proto::vfio_user::{DmaMap, DmaUnmap};

use super::errno::{Errno, EEXIST, EINVAL, ENOENT, ENOSPC};

/// DMA page size (the `pgsizes` the server states).
pub const DMA_PAGE_SIZE: u64 = 4096;

/// One mapped range of client memory.
#[derive(Debug)]
pub struct DmaRegion {
    /// IOVA of the first byte.
    pub address: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the range in `fd`.
    pub offset: u64,
    /// The device may read it.
    pub read: bool,
    /// The device may write it.
    pub write: bool,
    /// The memory fd to map, if the client passed one (direct mode); `None` when the
    /// memory is reached otherwise (tunnel windows, DMA_READ/DMA_WRITE messages).
    pub fd: Option<OwnedFd>,
}

impl DmaRegion {
    /// IOVA of the last byte.
    pub fn last(&self) -> u64 {
        self.address.saturating_add(self.size.saturating_sub(1))
    }

    /// Whether `len` bytes at `iova` lie inside this region.
    pub fn contains(&self, iova: u64, len: u64) -> bool {
        if len == 0 {
            return iova >= self.address && iova <= self.last();
        }
        match iova.checked_add(len - 1) {
            Some(end) => iova >= self.address && end <= self.last(),
            None => false,
        }
    }
}

/// The maps of the current client, keyed by IOVA.
#[derive(Debug)]
pub struct DmaTable {
    regions: BTreeMap<u64, DmaRegion>,
    max_maps: usize,
}

impl DmaTable {
    /// An empty table holding at most `max_maps` maps.
    pub fn new(max_maps: usize) -> Self {
        Self {
            regions: BTreeMap::new(),
            max_maps,
        }
    }

    /// Number of maps.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The maps in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = &DmaRegion> {
        self.regions.values()
    }

    /// The region holding `len` bytes at `iova` entirely, if any.
    pub fn find(&self, iova: u64, len: u64) -> Option<&DmaRegion> {
        self.regions
            .range(..=iova)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(iova, len))
    }

    /// DMA_MAP.
    pub fn map(&mut self, m: &DmaMap, fd: Option<OwnedFd>) -> Result<(), Errno> {
        let aligned = |v: u64| v % DMA_PAGE_SIZE == 0;
        if m.size == 0 || !aligned(m.address) || !aligned(m.size) {
            return Err(EINVAL);
        }
        if fd.is_some() && !aligned(m.offset) {
            return Err(EINVAL);
        }
        let last = m.address.checked_add(m.size - 1).ok_or(EINVAL)?;
        let below = self.regions.range(..=m.address).next_back();
        let above = self.regions.range(m.address..).next();
        if below.is_some_and(|(_, r)| r.last() >= m.address)
            || above.is_some_and(|(&a, _)| a <= last)
        {
            return Err(EEXIST);
        }
        if self.regions.len() >= self.max_maps {
            return Err(ENOSPC);
        }
        self.regions.insert(
            m.address,
            DmaRegion {
                address: m.address,
                size: m.size,
                offset: m.offset,
                read: m.read,
                write: m.write,
                fd,
            },
        );
        Ok(())
    }

    /// DMA_UNMAP.
    pub fn unmap(&mut self, u: &DmaUnmap) -> Result<(), Errno> {
        if u.all {
            self.clear();
            return Ok(());
        }
        match self.regions.get(&u.address) {
            Some(r) if r.size == u.size => {
                self.regions.remove(&u.address);
                Ok(())
            }
            _ => Err(ENOENT),
        }
    }

    /// Drops every map (closing the fds).
    pub fn clear(&mut self) {
        self.regions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(address: u64, size: u64) -> DmaMap {
        DmaMap {
            read: true,
            write: true,
            offset: 0,
            address,
            size,
        }
    }

    /// Overlaps are EEXIST (touching ranges are fine), misalignment and wrap-around are
    /// EINVAL, a full table is ENOSPC, unmaps must match exactly (ENOENT) and
    /// UNMAP_ALL empties the table.
    #[test]
    fn map_table_rules() {
        let mut t = DmaTable::new(3);
        t.map(&m(0x10000, 0x4000), None).unwrap();
        assert_eq!(t.map(&m(0x10000, 0x4000), None), Err(EEXIST));
        assert_eq!(t.map(&m(0xf000, 0x2000), None), Err(EEXIST));
        assert_eq!(t.map(&m(0x13000, 0x1000), None), Err(EEXIST));
        assert_eq!(t.map(&m(0x8000, 0x10000), None), Err(EEXIST), "covers it");
        t.map(&m(0x14000, 0x1000), None).unwrap();
        t.map(&m(0xf000, 0x1000), None).unwrap();
        assert_eq!(t.map(&m(0x100000, 0x1000), None), Err(ENOSPC));
        assert_eq!(t.map(&m(0x100800, 0x1000), None), Err(EINVAL));
        assert_eq!(t.map(&m(0x100000, 0x800), None), Err(EINVAL));
        assert_eq!(t.map(&m(u64::MAX - 0xfff, 0x2000), None), Err(EINVAL));
        assert_eq!(t.map(&m(0x1000, 0), None), Err(EINVAL));
        assert!(t.find(0x11000, 0x3000).is_some());
        assert!(t.find(0x13000, 0x2000).is_none(), "spans two maps");
        assert!(t.find(0x20000, 1).is_none());
        assert_eq!(t.unmap(&DmaUnmap::region(0x10000, 0x1000)), Err(ENOENT));
        assert_eq!(t.unmap(&DmaUnmap::region(0x11000, 0x3000)), Err(ENOENT));
        t.unmap(&DmaUnmap::region(0x10000, 0x4000)).unwrap();
        assert_eq!(t.len(), 2);
        t.unmap(&DmaUnmap::all()).unwrap();
        assert!(t.is_empty());
    }

    /// A map at the very top of the address space is accepted and found.
    #[test]
    fn top_of_address_space() {
        let mut t = DmaTable::new(8);
        t.map(&m(u64::MAX - 0xfff, 0x1000), None).unwrap();
        assert!(t.find(u64::MAX, 1).is_some());
        assert!(t.find(u64::MAX, 2).is_none());
        assert_eq!(t.map(&m(u64::MAX - 0x1fff, 0x2000), None), Err(EEXIST));
    }
}
