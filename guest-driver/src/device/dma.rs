//! DMA: the map table (what the client mapped with DMA_MAP) and [`Dma`], the handle a
//! model uses to read and write that memory (libvfio-user's `vfu_dma_read`,
//! `vfu_dma_write`, `vfu_addr_to_sgl` and `vfu_sgl_read`/`vfu_sgl_write`, in Rust).
//!
//! Map rules (vfio-user spec, with libvfio-user's choices where the spec is silent):
//! - address, size and (with an fd) file offset are multiples of the 4 KiB page size
//!   the server states in `pgsizes`, else `EINVAL`; a range that wraps is `EINVAL`;
//! - a map over any mapped byte fails with `EEXIST` (the spec's rule; libvfio-user
//!   accepts an identical re-map and answers a partial overlap with `EINVAL`);
//! - more than `max_dma_maps` maps fail with `ENOSPC`;
//! - an unmap must match a map exactly (address and size), else `ENOENT`; UNMAP_ALL
//!   drops everything. Dropping a map closes its fd and unmaps its memory.
//!
//! Every region has a [`DmaBacking`]:
//! - [`DmaBacking::Local`]: the memory is mapped in this process — the client's fd,
//!   mmapped by [`DmaTable::map`] in direct mode (`MAP_SHARED`, `PROT_READ` and/or
//!   `PROT_WRITE` as the DMA_MAP flags say, at the map's file offset), or a window in
//!   the tunnel's shared memory. It is only ever accessed with volatile copies
//!   ([`VolatileSlice`]): the client, or another VM, may write it at the same time.
//! - [`DmaBacking::Remote`]: not mapped here; reached through a [`DmaRemote`] (vfio-user
//!   DMA_READ / DMA_WRITE messages to the client in direct mode, the tunnel's copy
//!   path behind the relay).
//!
//! [`Dma`] checks every access against the table before anything is touched: a range
//! must lie inside one region (scatter-gather segments may run across adjacent
//! regions, and are split there) that has the permission the access needs (reads a
//! readable region, writes a writable one); else `EFAULT`. A scatter-gather write
//! validates every segment before it writes any. The model does not see which path
//! an access takes. Pages written through [`Dma`] are recorded per region
//! ([`DmaRegion::dirty_pages`]) for dirty page logging.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use vfu_proto::vfio_user::{DmaMap, DmaUnmap};
use vm_memory::VolatileSlice;

use super::errno::{Errno, EEXIST, EFAULT, EINVAL, ENOENT, ENOSPC};

/// DMA page size (the `pgsizes` the server states).
pub const DMA_PAGE_SIZE: u64 = 4096;

/// The path to client memory that is not mapped in this process.
///
/// Implemented by the transports: direct mode sends vfio-user DMA_READ / DMA_WRITE to
/// the client, the tunnel sends its DMA_READ / DMA_WRITE to the relay. The range has
/// been checked against the map table (inside one region, with the permission) before
/// a call; a failure of the path itself (the client answered with an error, went away,
/// did not answer) is `EFAULT`.
pub trait DmaRemote {
    /// Reads `buf.len()` bytes of client memory at `iova` into `buf`.
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Writes `data` to client memory at `iova`.
    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno>;
}

/// A [`DmaRemote`] for callers without a path to remote memory: every access fails
/// with `EFAULT` (local regions stay reachable).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoRemote;

impl DmaRemote for NoRemote {
    fn read(&mut self, _iova: u64, _buf: &mut [u8]) -> Result<(), Errno> {
        Err(EFAULT)
    }

    fn write(&mut self, _iova: u64, _data: &[u8]) -> Result<(), Errno> {
        Err(EFAULT)
    }
}

/// Where the memory of a [`LocalMemory`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalSource {
    /// An mmap of the client's fd, made by the table and unmapped when the region is
    /// dropped.
    Mmap,
    /// A window at this offset of the tunnel's shared memory region 0; the transport
    /// owns that mapping.
    Window(u64),
}

/// Client memory mapped in this process: a pointer and a length.
///
/// Accessed only through volatile copies; never handed out as a Rust reference.
#[derive(Debug)]
pub struct LocalMemory {
    ptr: NonNull<u8>,
    len: usize,
    source: LocalSource,
}

// SAFETY: the memory is a shared mapping of the process, valid from any thread for as
// long as the value lives (see the constructors); all accesses are volatile copies
// through `&self`/`&mut self`, so moving the value to another thread is sound.
unsafe impl Send for LocalMemory {}

/// The errno of the last failed system call (`EINVAL` if there is none).
fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .and_then(|e| Errno::try_from(e).ok())
        .filter(|e| *e != 0)
        .unwrap_or(EINVAL)
}

impl LocalMemory {
    /// A window of `len` bytes at `ptr`, which is `offset` bytes into the tunnel's
    /// shared memory region 0.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as the value
    /// lives, and every other user of that memory in this process must access it with
    /// volatile accesses only (other processes and VMs may access it any way).
    pub unsafe fn window(ptr: NonNull<u8>, len: usize, offset: u64) -> Self {
        Self {
            ptr,
            len,
            source: LocalSource::Window(offset),
        }
    }

    /// Maps `size` bytes of `fd` at `offset`, shared, readable and/or writable.
    ///
    /// A regular file (a memfd, a file in /dev/shm or hugetlbfs) must hold the whole
    /// range: an access past its end would raise SIGBUS.
    fn mmap(fd: &OwnedFd, offset: u64, size: u64, read: bool, write: bool) -> Result<Self, Errno> {
        let len = usize::try_from(size).map_err(|_| EINVAL)?;
        let ptr = vfu_proto::mem::map_fd(fd.as_fd(), offset, size, read, write)
            .map_err(|e| e.raw_os_error().map_or(EINVAL, |e| e as Errno))?;
        Ok(Self {
            ptr,
            len,
            source: LocalSource::Mmap,
        })
    }

    /// Address of the first byte in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a region of the table).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the memory comes from.
    pub fn source(&self) -> LocalSource {
        self.source
    }

    /// `len` bytes at `offset` as a volatile slice, if they are inside the mapping.
    ///
    /// Crate-private: a slice can be written, and the caller must have checked that the
    /// region is writable (a read-only mapping faults on a write) before it writes.
    pub(crate) fn slice(&self, offset: usize, len: usize) -> Option<VolatileSlice<'_>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset + len <= self.len` and the mapping is valid for `self.len`
        // bytes while `self` lives (constructors' contracts), which the returned
        // lifetime keeps; every access through a `VolatileSlice` is volatile.
        Some(unsafe { VolatileSlice::new(self.ptr.as_ptr().add(offset), len) })
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` (volatile reads).
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), Errno> {
        let s = self.slice(offset, buf.len()).ok_or(EFAULT)?;
        s.copy_to(buf);
        Ok(())
    }

    /// Copies `data` to `offset` (volatile writes).
    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), Errno> {
        let s = self.slice(offset, data.len()).ok_or(EFAULT)?;
        s.copy_from(data);
        Ok(())
    }
}

impl Drop for LocalMemory {
    fn drop(&mut self) {
        if self.source == LocalSource::Mmap {
            // SAFETY: the mapping was created by `mmap` with this address and length
            // and is unmapped only here; no slice of it outlives `self`.
            if unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) } != 0 {
                log::warn!("munmap of a DMA region failed: errno {}", last_errno());
            }
        }
    }
}

/// How the memory of a region is reached.
#[derive(Debug)]
pub enum DmaBacking {
    /// Mapped in this process.
    Local(LocalMemory),
    /// Not mapped here: through the transport's [`DmaRemote`].
    Remote,
}

/// One mapped range of client memory.
#[derive(Debug)]
pub struct DmaRegion {
    /// IOVA of the first byte.
    pub address: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the range in `fd` (as the client stated it).
    pub offset: u64,
    /// The device may read it.
    pub read: bool,
    /// The device may write it.
    pub write: bool,
    /// The memory fd the client passed, if any (direct mode).
    pub fd: Option<OwnedFd>,
    /// How the memory is reached.
    pub backing: DmaBacking,
    /// Dirty pages: bit `i % 64` of entry `i / 64` is page `i` of the region.
    dirty: BTreeMap<u64, u64>,
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

    /// Whether the memory is mapped in this process.
    pub fn is_local(&self) -> bool {
        matches!(self.backing, DmaBacking::Local(_))
    }

    fn allows(&self, write: bool) -> bool {
        if write {
            self.write
        } else {
            self.read
        }
    }

    /// Records the pages of `len` bytes at `iova` (inside the region) as written.
    fn mark_dirty(&mut self, iova: u64, len: u64) {
        if len == 0 || !self.contains(iova, len) {
            return;
        }
        let first = (iova - self.address) / DMA_PAGE_SIZE;
        let last = (iova - self.address + (len - 1)) / DMA_PAGE_SIZE;
        for page in first..=last {
            *self.dirty.entry(page / 64).or_insert(0) |= 1 << (page % 64);
        }
    }

    /// IOVAs of the pages written through [`Dma`] since the map (or the last
    /// [`DmaTable::clear_dirty`]), in order.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (&word, &bits) in &self.dirty {
            for bit in 0..64 {
                if bits & (1 << bit) != 0 {
                    out.push(self.address + (word * 64 + bit) * DMA_PAGE_SIZE);
                }
            }
        }
        out
    }
}

/// One part of an access: `len` bytes at `iova` inside the region at `region`,
/// `at` bytes into the caller's buffer.
#[derive(Debug, Clone, Copy)]
struct Piece {
    region: u64,
    iova: u64,
    len: usize,
    at: usize,
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

    fn find_mut(&mut self, iova: u64, len: u64) -> Option<&mut DmaRegion> {
        self.regions
            .range_mut(..=iova)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(iova, len))
    }

    /// Checks a DMA_MAP against the rules and the table (nothing is changed).
    fn check(&self, m: &DmaMap, with_fd: bool) -> Result<(), Errno> {
        let aligned = |v: u64| v % DMA_PAGE_SIZE == 0;
        if m.size == 0 || !aligned(m.address) || !aligned(m.size) {
            return Err(EINVAL);
        }
        if with_fd && !aligned(m.offset) {
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
        Ok(())
    }

    /// DMA_MAP in direct mode: with an fd the memory is mmapped here (shared, with the
    /// DMA_MAP's permissions, at its file offset) and the region is local; without one
    /// it is remote. A region mapped with neither permission is not mmapped (nothing
    /// may access it). The mmap comes after every other check; its failure is the
    /// answer (its errno, or `EINVAL` for a range past the end of a regular file).
    pub fn map(&mut self, m: &DmaMap, fd: Option<OwnedFd>) -> Result<(), Errno> {
        self.check(m, fd.is_some())?;
        let backing = match &fd {
            Some(f) if m.read || m.write => {
                DmaBacking::Local(LocalMemory::mmap(f, m.offset, m.size, m.read, m.write)?)
            }
            _ => DmaBacking::Remote,
        };
        self.insert(m, fd, backing);
        Ok(())
    }

    /// DMA_MAP with the backing decided by the caller (a tunnel window, or remote);
    /// `fd` is kept with the region, not mapped. A local backing must cover the whole
    /// region (`EINVAL` otherwise).
    pub fn map_backed(
        &mut self,
        m: &DmaMap,
        fd: Option<OwnedFd>,
        backing: DmaBacking,
    ) -> Result<(), Errno> {
        self.check(m, fd.is_some())?;
        if let DmaBacking::Local(mem) = &backing {
            if (mem.len() as u64) < m.size {
                return Err(EINVAL);
            }
        }
        self.insert(m, fd, backing);
        Ok(())
    }

    fn insert(&mut self, m: &DmaMap, fd: Option<OwnedFd>, backing: DmaBacking) {
        self.regions.insert(
            m.address,
            DmaRegion {
                address: m.address,
                size: m.size,
                offset: m.offset,
                read: m.read,
                write: m.write,
                fd,
                backing,
                dirty: BTreeMap::new(),
            },
        );
    }

    /// DMA_UNMAP. The region's memory is unmapped (and its fd closed) before this
    /// returns.
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

    /// Drops every map (unmapping the memory, closing the fds).
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    /// Forgets the dirty pages of every region.
    pub fn clear_dirty(&mut self) {
        for r in self.regions.values_mut() {
            r.dirty.clear();
        }
    }

    /// Calls `f` with the IOVA of every page written through [`Dma`] (since its map
    /// or the last clear) that overlaps `start..end`, in IOVA order; the pages for which
    /// `f` returns `true` are forgotten.
    pub(crate) fn visit_dirty(&mut self, start: u64, end: u64, mut f: impl FnMut(u64) -> bool) {
        for r in self.regions.values_mut() {
            if r.address >= end || r.last() < start {
                continue;
            }
            let address = r.address;
            r.dirty.retain(|&word, bits| {
                for bit in 0..64 {
                    if *bits & (1 << bit) == 0 {
                        continue;
                    }
                    let page = address.saturating_add((word * 64 + bit) * DMA_PAGE_SIZE);
                    if page.saturating_add(DMA_PAGE_SIZE) > start && page < end && f(page) {
                        *bits &= !(1 << bit);
                    }
                }
                *bits != 0
            });
        }
    }

    /// Regions reached through a tunnel window become remote (the windows' mapping is
    /// going away).
    pub(crate) fn demote_windows(&mut self) {
        for r in self.regions.values_mut() {
            if matches!(&r.backing, DmaBacking::Local(m) if matches!(m.source(), LocalSource::Window(_)))
            {
                r.backing = DmaBacking::Remote;
            }
        }
    }

    /// Splits `len` bytes at `iova` into pieces, one per region, each region allowing
    /// the access; the regions must follow each other without a gap. Pieces are
    /// appended to `out`, their buffer offsets starting at `at`.
    fn split(
        &self,
        iova: u64,
        len: u64,
        write: bool,
        at: usize,
        out: &mut Vec<Piece>,
    ) -> Result<(), Errno> {
        let mut cur = iova;
        let mut left = len;
        let mut at = at;
        while left > 0 {
            let r = self
                .find(cur, 1)
                .filter(|r| r.allows(write))
                .ok_or(EFAULT)?;
            let here = (r.last() - cur).saturating_add(1).min(left);
            let n = usize::try_from(here).map_err(|_| EFAULT)?;
            out.push(Piece {
                region: r.address,
                iova: cur,
                len: n,
                at,
            });
            left -= here;
            at = at.checked_add(n).ok_or(EFAULT)?;
            if left > 0 {
                cur = cur.checked_add(here).ok_or(EFAULT)?;
            }
        }
        Ok(())
    }

    /// The pieces of a scatter-gather list for a buffer of `buf_len` bytes.
    fn pieces(&self, sg: &[(u64, u64)], buf_len: usize, write: bool) -> Result<Vec<Piece>, Errno> {
        let total = sg
            .iter()
            .try_fold(0u64, |acc, &(_, len)| acc.checked_add(len))
            .ok_or(EINVAL)?;
        if total != buf_len as u64 {
            return Err(EINVAL);
        }
        let mut out = Vec::with_capacity(sg.len());
        let mut at = 0usize;
        for &(iova, len) in sg {
            self.split(iova, len, write, at, &mut out)?;
            // `len` fits: the total equals a buffer length.
            at += len as usize;
        }
        Ok(out)
    }
}

/// A model's access to client memory, from [`DeviceContext::dma`](super::DeviceContext::dma).
///
/// Every access is checked against the client's maps first (see the module
/// documentation); a failure is `EFAULT` (`EINVAL` for a scatter-gather list whose
/// lengths do not add up to the buffer). Local regions are copied with volatile
/// accesses; remote ones go through the transport, which may take a round trip to the
/// client.
pub struct Dma<'a> {
    table: &'a mut DmaTable,
    remote: &'a mut dyn DmaRemote,
}

impl std::fmt::Debug for Dma<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma")
            .field("regions", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Dma<'a> {
    /// A handle on `table`, reaching remote regions through `remote`.
    pub fn new(table: &'a mut DmaTable, remote: &'a mut dyn DmaRemote) -> Self {
        Self { table, remote }
    }

    /// Reads `buf.len()` bytes at `iova`: the range must lie in one readable region.
    pub fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if buf.is_empty() {
            return Ok(());
        }
        let r = self
            .table
            .find(iova, buf.len() as u64)
            .filter(|r| r.read)
            .ok_or(EFAULT)?;
        match &r.backing {
            DmaBacking::Local(m) => {
                let off = usize::try_from(iova - r.address).map_err(|_| EFAULT)?;
                m.read_at(off, buf)
            }
            DmaBacking::Remote => self.remote.read(iova, buf),
        }
    }

    /// Writes `data` at `iova`: the range must lie in one writable region.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        let r = self
            .table
            .find_mut(iova, len)
            .filter(|r| r.write)
            .ok_or(EFAULT)?;
        r.mark_dirty(iova, len);
        match &r.backing {
            DmaBacking::Local(m) => {
                let off = usize::try_from(iova - r.address).map_err(|_| EFAULT)?;
                m.write_at(off, data)
            }
            DmaBacking::Remote => self.remote.write(iova, data),
        }
    }

    /// Reads the segments `sg` (`(iova, len)` pairs) one after the other into `buf`,
    /// whose length must be their total. Each segment must be readable; one may run
    /// across adjacent regions. Everything is checked before anything is read.
    pub fn read_sg(&mut self, sg: &[(u64, u64)], buf: &mut [u8]) -> Result<(), Errno> {
        let pieces = self.table.pieces(sg, buf.len(), false)?;
        for p in pieces {
            let chunk = &mut buf[p.at..p.at + p.len];
            let r = self.table.regions.get(&p.region).ok_or(EFAULT)?;
            match &r.backing {
                DmaBacking::Local(m) => {
                    let off = usize::try_from(p.iova - r.address).map_err(|_| EFAULT)?;
                    m.read_at(off, chunk)?;
                }
                DmaBacking::Remote => self.remote.read(p.iova, chunk)?,
            }
        }
        Ok(())
    }

    /// Writes `data` to the segments `sg` one after the other; `data.len()` must be
    /// their total. Every segment is validated (writable, mapped) before any byte is
    /// written. A remote write that fails on the way leaves the earlier segments
    /// written.
    pub fn write_sg(&mut self, sg: &[(u64, u64)], data: &[u8]) -> Result<(), Errno> {
        let pieces = self.table.pieces(sg, data.len(), true)?;
        for p in &pieces {
            if let Some(r) = self.table.regions.get_mut(&p.region) {
                r.mark_dirty(p.iova, p.len as u64);
            }
        }
        for p in pieces {
            let chunk = &data[p.at..p.at + p.len];
            let r = self.table.regions.get(&p.region).ok_or(EFAULT)?;
            match &r.backing {
                DmaBacking::Local(m) => {
                    let off = usize::try_from(p.iova - r.address).map_err(|_| EFAULT)?;
                    m.write_at(off, chunk)?;
                }
                DmaBacking::Remote => self.remote.write(p.iova, chunk)?,
            }
        }
        Ok(())
    }

    /// The scatter-gather list of `len` bytes at `iova`: one `(iova, len)` segment per
    /// region the range crosses (libvfio-user's `vfu_addr_to_sgl`). Every region must
    /// allow reads, or writes with `write`; else `EFAULT`.
    pub fn sg(&self, iova: u64, len: u64, write: bool) -> Result<Vec<(u64, u64)>, Errno> {
        let mut pieces = Vec::new();
        self.table.split(iova, len, write, 0, &mut pieces)?;
        Ok(pieces.iter().map(|p| (p.iova, p.len as u64)).collect())
    }

    /// Zero-copy access: `len` bytes at `iova` as a volatile slice, when they lie in one
    /// local region that is readable and writable (a slice can be written). `None` for
    /// a remote region (use [`read`](Self::read)/[`write`](Self::write), which work
    /// everywhere), a region without both permissions, or a range outside the maps.
    /// The pages are recorded as dirty.
    pub fn slice(&mut self, iova: u64, len: usize) -> Option<VolatileSlice<'_>> {
        let r = self.table.find_mut(iova, len as u64)?;
        if !(r.read && r.write && r.is_local()) {
            return None;
        }
        r.mark_dirty(iova, len as u64);
        let r: &DmaRegion = r;
        let off = usize::try_from(iova - r.address).ok()?;
        match &r.backing {
            DmaBacking::Local(m) => m.slice(off, len),
            DmaBacking::Remote => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::fd::FromRawFd;

    fn m(address: u64, size: u64) -> DmaMap {
        DmaMap {
            read: true,
            write: true,
            offset: 0,
            address,
            size,
        }
    }

    fn map_rw(address: u64, size: u64, read: bool, write: bool) -> DmaMap {
        DmaMap {
            read,
            write,
            offset: 0,
            address,
            size,
        }
    }

    /// A memfd of `len` bytes.
    pub(crate) fn memfd(len: u64) -> OwnedFd {
        memfd_named(len, "vfu-dma-test")
    }

    /// A memfd of `len` bytes called `name` (as /proc/self/maps shows it).
    pub(crate) fn memfd_named(len: u64, name: &str) -> OwnedFd {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create");
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on an fd we own.
        assert_eq!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) },
            0
        );
        fd
    }

    pub(crate) fn pread(fd: &OwnedFd, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        vfu_proto::mem::read_exact_at(fd.as_fd(), &mut buf, offset).unwrap();
        buf
    }

    pub(crate) fn pwrite(fd: &OwnedFd, offset: u64, data: &[u8]) {
        vfu_proto::mem::write_all_at(fd.as_fd(), data, offset).unwrap();
    }

    /// A [`DmaRemote`] over a byte vector standing for client memory at IOVA 0, that
    /// records every call.
    #[derive(Default)]
    pub(crate) struct MemRemote {
        pub mem: Vec<u8>,
        pub calls: Vec<(bool, u64, usize)>,
    }

    impl DmaRemote for MemRemote {
        fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
            self.calls.push((false, iova, buf.len()));
            let at = iova as usize;
            let src = self.mem.get(at..at + buf.len()).ok_or(EFAULT)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
            self.calls.push((true, iova, data.len()));
            let at = iova as usize;
            let dst = self.mem.get_mut(at..at + data.len()).ok_or(EFAULT)?;
            dst.copy_from_slice(data);
            Ok(())
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
        let mut r = MemRemote::default();
        let mut dma = Dma::new(&mut t, &mut r);
        let mut b = [0u8; 2];
        assert_eq!(dma.read(u64::MAX, &mut b), Err(EFAULT), "wraps");
        assert_eq!(dma.sg(u64::MAX, 2, false), Err(EFAULT));
        assert_eq!(dma.read_sg(&[(u64::MAX, 2)], &mut b), Err(EFAULT));
        assert_eq!(dma.read_sg(&[(0, u64::MAX), (0, 2)], &mut b), Err(EINVAL));
        assert!(r.calls.is_empty());
    }

    /// Direct mode: a DMA_MAP with an fd is mmapped shared at the map's file offset, so
    /// device reads see what the client wrote to the file and device writes land in
    /// it; a read-only map refuses writes (EFAULT, the file untouched) and a write-only
    /// one refuses reads; a map past the end of the file is EINVAL; DMA_UNMAP unmaps.
    #[test]
    fn mmapped_regions() {
        let fd = memfd(0x4000);
        pwrite(&fd, 0x1000, b"client data");
        let dup = |f: &OwnedFd| f.try_clone().unwrap();
        let mut t = DmaTable::new(8);
        let mut at_offset = m(0x10000, 0x2000);
        at_offset.offset = 0x1000;
        t.map(&at_offset, Some(dup(&fd))).unwrap();
        t.map(&map_rw(0x20000, 0x1000, true, false), Some(dup(&fd)))
            .unwrap();
        t.map(&map_rw(0x30000, 0x1000, false, true), Some(dup(&fd)))
            .unwrap();
        let mut past_end = m(0x40000, 0x2000);
        past_end.offset = 0x3000;
        assert_eq!(t.map(&past_end, Some(dup(&fd))), Err(EINVAL));
        assert!(t.iter().all(DmaRegion::is_local));
        let mut remote = MemRemote::default();
        let mut dma = Dma::new(&mut t, &mut remote);
        let mut b = [0u8; 11];
        dma.read(0x10000, &mut b).unwrap();
        assert_eq!(&b, b"client data");
        dma.write(0x11ff0, b"device!").unwrap();
        assert_eq!(pread(&fd, 0x2ff0, 7), b"device!");
        assert_eq!(dma.write(0x20000, b"x"), Err(EFAULT), "read-only");
        assert_eq!(pread(&fd, 0, 1), [0]);
        assert_eq!(dma.read(0x30000, &mut b), Err(EFAULT), "write-only");
        dma.write(0x30000, b"w").unwrap();
        assert_eq!(pread(&fd, 0, 1), b"w");
        assert_eq!(dma.read(0x11ff8, &mut b), Err(EFAULT), "runs past the end");
        assert!(remote.calls.is_empty());
        t.unmap(&DmaUnmap::region(0x10000, 0x2000)).unwrap();
        assert_eq!(t.len(), 2);
    }

    /// A failing mmap (an fd that cannot be mapped) fails the DMA_MAP with the kernel's
    /// errno and leaves the table unchanged; a map with neither permission is kept
    /// without a mapping.
    #[test]
    fn mmap_failure_is_the_answer() {
        // SAFETY: eventfd(2) returns a new fd or -1, checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut t = DmaTable::new(8);
        let e = t.map(&m(0x10000, 0x1000), Some(efd)).unwrap_err();
        assert_eq!(e, libc::ENODEV as Errno);
        assert!(t.is_empty());
        t.map(&map_rw(0x10000, 0x1000, false, false), Some(memfd(0x1000)))
            .unwrap();
        assert!(!t.iter().next().unwrap().is_local());
    }

    /// Remote regions go through the DmaRemote with the caller's IOVA; permissions and
    /// bounds are checked first, so a denied access never reaches the remote; the
    /// remote's failure is the answer.
    #[test]
    fn remote_regions() {
        let mut t = DmaTable::new(8);
        t.map(&m(0x1000, 0x2000), None).unwrap();
        t.map(&map_rw(0x4000, 0x1000, true, false), None).unwrap();
        let mut r = MemRemote {
            mem: (0..0x5000).map(|i| i as u8).collect(),
            calls: Vec::new(),
        };
        let mut dma = Dma::new(&mut t, &mut r);
        let mut b = [0u8; 4];
        dma.read(0x1ffe, &mut b).unwrap();
        assert_eq!(b, [0xfe, 0xff, 0x00, 0x01]);
        dma.write(0x2000, &[9, 9]).unwrap();
        assert_eq!(dma.write(0x4000, &[1]), Err(EFAULT), "read-only");
        assert_eq!(dma.read(0x2ffe, &mut b), Err(EFAULT), "past the end");
        assert_eq!(dma.read(0x3000, &mut b), Err(EFAULT), "unmapped");
        assert!(dma.slice(0x1000, 4).is_none(), "no zero-copy for remote");
        dma.read(0x1000, &mut []).unwrap();
        assert_eq!(r.calls, vec![(false, 0x1ffe, 4), (true, 0x2000, 2)]);
        assert_eq!(&r.mem[0x2000..0x2002], &[9, 9]);
        r.mem.truncate(0x1000);
        let mut dma = Dma::new(&mut t, &mut r);
        assert_eq!(dma.read(0x1000, &mut b), Err(EFAULT), "remote failed");
        let mut none = NoRemote;
        let mut dma = Dma::new(&mut t, &mut none);
        assert_eq!(dma.read(0x1000, &mut b), Err(EFAULT));
        assert_eq!(dma.write(0x1000, &b), Err(EFAULT));
    }

    /// Scatter-gather: segments are read and written in order, a segment running across
    /// two adjacent regions (one local, one remote) is split at the boundary, the list
    /// must add up to the buffer (EINVAL), and a write with one bad segment (unmapped,
    /// read-only, or across a gap) writes nothing at all, local or remote.
    #[test]
    fn scatter_gather() {
        let fd = memfd(0x1000);
        let mut t = DmaTable::new(8);
        t.map(&m(0x1000, 0x1000), Some(fd.try_clone().unwrap()))
            .unwrap();
        t.map(&m(0x2000, 0x1000), None).unwrap();
        t.map(&map_rw(0x3000, 0x1000, true, false), None).unwrap();
        t.map(&m(0x5000, 0x1000), None).unwrap();
        let mut r = MemRemote {
            mem: vec![0; 0x6000],
            calls: Vec::new(),
        };
        let mut dma = Dma::new(&mut t, &mut r);
        assert_eq!(dma.sg(0x1ffc, 8, true), Ok(vec![(0x1ffc, 4), (0x2000, 4)]));
        assert_eq!(dma.sg(0x2ffc, 8, true), Err(EFAULT), "read-only part");
        assert_eq!(dma.sg(0x3ffc, 8, false), Err(EFAULT), "gap");
        dma.write_sg(&[(0x1ffc, 8), (0x5000, 2)], b"abcdefgh12")
            .unwrap();
        assert_eq!(pread(&fd, 0xffc, 4), b"abcd");
        let mut b = [0u8; 10];
        dma.read_sg(&[(0x5000, 2), (0x1ffc, 8)], &mut b).unwrap();
        assert_eq!(&b, b"12abcdefgh");
        assert_eq!(
            dma.read_sg(&[(0x1000, 4)], &mut b),
            Err(EINVAL),
            "lengths do not add up"
        );
        let before = r_snapshot(&fd);
        for bad in [
            vec![(0x1000, 4), (0x3000, 6)],
            vec![(0x1000, 4), (0x9000, 6)],
            vec![(0x1000, 4), (0x4ffc, 6)],
            vec![(0x1000, 4), (0x5ffc, 6)],
        ] {
            let mut dma = Dma::new(&mut t, &mut r);
            assert_eq!(dma.write_sg(&bad, b"XXXXXXXXXX"), Err(EFAULT), "{bad:x?}");
        }
        assert_eq!(r_snapshot(&fd), before, "nothing written locally");
        assert_eq!(
            r.calls,
            vec![
                (true, 0x2000, 4),
                (true, 0x5000, 2),
                (false, 0x5000, 2),
                (false, 0x2000, 4),
            ],
            "nothing written remotely"
        );
        let mut dma = Dma::new(&mut t, &mut r);
        dma.read_sg(&[(0x3000, 0), (0x2000, 10)], &mut b).unwrap();
    }

    fn r_snapshot(fd: &OwnedFd) -> Vec<u8> {
        pread(fd, 0, 0x1000)
    }

    /// Zero-copy slices exist for local read-write regions only; what is written
    /// through one lands in the client's file; pages written through the handle (by
    /// write, write_sg or slice) are listed as dirty and the list can be cleared.
    #[test]
    fn slices_and_dirty_pages() {
        let fd = memfd(0x4000);
        let mut t = DmaTable::new(8);
        t.map(&m(0x10000, 0x4000), Some(fd.try_clone().unwrap()))
            .unwrap();
        t.map(&map_rw(0x20000, 0x1000, true, false), Some(memfd(0x1000)))
            .unwrap();
        let mut r = NoRemote;
        let mut dma = Dma::new(&mut t, &mut r);
        let s = dma.slice(0x12000, 16).unwrap();
        s.copy_from(&[7u8; 16]);
        assert_eq!(s.len(), 16);
        assert!(dma.slice(0x20000, 1).is_none(), "read-only");
        assert!(dma.slice(0x13ff8, 16).is_none(), "past the end");
        dma.write(0x10ffe, &[1, 2, 3]).unwrap();
        assert_eq!(pread(&fd, 0x2000, 16), [7u8; 16]);
        assert_eq!(
            t.find(0x10000, 1).unwrap().dirty_pages(),
            vec![0x10000, 0x11000, 0x12000]
        );
        assert!(t.find(0x20000, 1).unwrap().dirty_pages().is_empty());
        t.clear_dirty();
        assert!(t.find(0x10000, 1).unwrap().dirty_pages().is_empty());
    }

    /// Tunnel windows: a local backing must cover the region, and demoting windows
    /// turns window-backed regions remote while mmapped ones stay local.
    #[test]
    fn windows_and_demotion() {
        let mut shm = vec![0u8; 0x3000];
        let base = NonNull::new(shm.as_mut_ptr()).unwrap();
        let mut t = DmaTable::new(8);
        // SAFETY: `shm` outlives the table's use of it (the table is demoted, then
        // dropped, before `shm`).
        let small = unsafe { LocalMemory::window(base, 0x1000, 0) };
        assert_eq!(
            t.map_backed(&m(0x1000, 0x2000), None, DmaBacking::Local(small)),
            Err(EINVAL)
        );
        // SAFETY: as above.
        let w = unsafe { LocalMemory::window(base, 0x2000, 0) };
        t.map_backed(&m(0x1000, 0x2000), None, DmaBacking::Local(w))
            .unwrap();
        t.map(&m(0x8000, 0x1000), Some(memfd(0x1000))).unwrap();
        let mut r = NoRemote;
        Dma::new(&mut t, &mut r).write(0x1004, b"win").unwrap();
        assert_eq!(&shm[4..7], b"win");
        t.demote_windows();
        let local: Vec<_> = t.iter().map(|r| (r.address, r.is_local())).collect();
        assert_eq!(local, vec![(0x1000, false), (0x8000, true)]);
        drop(t);
        drop(shm);
    }

    /// One operation of the property test.
    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        ReadSg(Vec<(u64, u64)>),
        WriteSg(Vec<(u64, u64)>, u8),
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let iova = 0u64..0x14000;
        prop_oneof![
            (iova.clone(), 0usize..0x2100).prop_map(|(a, n)| Op::Read(a, n)),
            (
                iova.clone(),
                proptest::collection::vec(any::<u8>(), 0..0x2100)
            )
                .prop_map(|(a, d)| Op::Write(a, d)),
            proptest::collection::vec((iova.clone(), 0u64..0x1800), 1..4).prop_map(Op::ReadSg),
            (
                proptest::collection::vec((iova, 0u64..0x1800), 1..4),
                any::<u8>()
            )
                .prop_map(|(sg, b)| Op::WriteSg(sg, b)),
        ]
    }

    /// Whether `len` bytes at `iova` are covered by regions with the permission:
    /// inside one region (`single`), or across regions without a gap.
    fn covered(
        regions: &[(u64, u64, bool, bool)],
        iova: u64,
        len: u64,
        write: bool,
        single: bool,
    ) -> bool {
        let ok = |r: &(u64, u64, bool, bool)| if write { r.3 } else { r.2 };
        if len == 0 {
            return true;
        }
        if single {
            return regions
                .iter()
                .any(|r| ok(r) && iova >= r.0 && iova + len <= r.0 + r.1);
        }
        let mut at = iova;
        while at < iova + len {
            match regions.iter().find(|r| at >= r.0 && at < r.0 + r.1) {
                Some(r) if ok(r) => at = r.0 + r.1,
                _ => return false,
            }
        }
        true
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Against a reference model of client memory: every access succeeds exactly
        /// when the maps and permissions allow it (one region for read/write, adjacent
        /// regions for scatter-gather), reads return what was written through any
        /// path, a failed write (single or scatter-gather) changes no byte anywhere,
        /// and nothing is ever written outside a writable region, locally or remotely.
        #[test]
        fn accesses_match_a_reference_model(
            maps in proptest::collection::vec(
                (0u64..16, 1u64..4, proptest::prelude::any::<(bool, bool, bool)>()),
                1..8,
            ),
            ops in proptest::collection::vec(arb_op(), 1..24),
        ) {
            let mut t = DmaTable::new(16);
            let mut regions = Vec::new();
            let mut local = Vec::new();
            for (page, pages, (read, write, is_local)) in maps {
                let m = map_rw(page * 0x1000, pages * 0x1000, read, write);
                let fd = is_local.then(|| memfd(m.size));
                let keep = fd.as_ref().map(|f| f.try_clone().unwrap());
                if t.map(&m, fd).is_ok() {
                    regions.push((m.address, m.size, read, write));
                    if let Some(f) = keep {
                        if read || write {
                            local.push((m.address, m.size, f));
                        }
                    }
                }
            }
            // Which IOVAs belong to a region that is not mapped here.
            let in_remote: Vec<bool> = (0..0x20000u64)
                .map(|i| {
                    regions.iter().any(|r| {
                        i >= r.0 && i < r.0 + r.1 && !local.iter().any(|l| l.0 == r.0)
                    })
                })
                .collect();
            let mut remote = MemRemote { mem: vec![0; 0x20000], calls: Vec::new() };
            let mut reference = vec![0u8; 0x20000];
            for op in ops {
                let mut dma = Dma::new(&mut t, &mut remote);
                match op {
                    Op::Read(a, n) => {
                        let mut buf = vec![0u8; n];
                        let r = dma.read(a, &mut buf);
                        proptest::prop_assert_eq!(r.is_ok(), covered(&regions, a, n as u64, false, true));
                        if r.is_ok() {
                            proptest::prop_assert_eq!(&buf[..], &reference[a as usize..a as usize + n]);
                        }
                    }
                    Op::Write(a, d) => {
                        let r = dma.write(a, &d);
                        proptest::prop_assert_eq!(r.is_ok(), covered(&regions, a, d.len() as u64, true, true));
                        if r.is_ok() {
                            reference[a as usize..a as usize + d.len()].copy_from_slice(&d);
                        }
                    }
                    Op::ReadSg(sg) => {
                        let total: u64 = sg.iter().map(|s| s.1).sum();
                        let mut buf = vec![0u8; total as usize];
                        let r = dma.read_sg(&sg, &mut buf);
                        let ok = sg.iter().all(|s| covered(&regions, s.0, s.1, false, false));
                        proptest::prop_assert_eq!(r.is_ok(), ok);
                        if ok {
                            let mut at = 0;
                            for (a, n) in sg {
                                let (a, n) = (a as usize, n as usize);
                                proptest::prop_assert_eq!(&buf[at..at + n], &reference[a..a + n]);
                                at += n;
                            }
                        }
                    }
                    Op::WriteSg(sg, b) => {
                        let total: u64 = sg.iter().map(|s| s.1).sum();
                        let data: Vec<u8> = (0..total).map(|i| b.wrapping_add(i as u8)).collect();
                        let r = dma.write_sg(&sg, &data);
                        let ok = sg.iter().all(|s| covered(&regions, s.0, s.1, true, false));
                        proptest::prop_assert_eq!(r.is_ok(), ok);
                        if ok {
                            let mut at = 0;
                            for (a, n) in sg {
                                let (a, n) = (a as usize, n as usize);
                                reference[a..a + n].copy_from_slice(&data[at..at + n]);
                                at += n;
                            }
                        }
                    }
                }
                // The backing stores hold exactly the reference.
                for (a, size, f) in &local {
                    let (a, size) = (*a as usize, *size as usize);
                    proptest::prop_assert_eq!(pread(f, 0, size), reference[a..a + size].to_vec());
                }
                for (i, &byte) in remote.mem.iter().enumerate() {
                    let want = if in_remote[i] { reference[i] } else { 0 };
                    proptest::prop_assert_eq!(byte, want, "remote byte {:#x}", i);
                }
            }
        }
    }
}
