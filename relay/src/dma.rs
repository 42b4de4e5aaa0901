//! The relay's view of a client's DMA memory: the regions it mapped, the files behind
//! them with the relay's own mapping of each (which serves the copy path), and the
//! window each region has in the tunnel device's shared memory (the zero-copy path).
//!
//! The relay is the authority on what the device VM may reach: it checks every copy
//! request against this table (range inside one region, permission), and removes a
//! region's window before it answers the client's DMA_UNMAP.
//!
//! Every DMA_MAP with an fd hands the relay a new descriptor, though clients map many
//! regions of one file (QEMU passes its RAM block's memfd with each map; with a vIOMMU
//! there are thousands). The relay keeps one descriptor and one mapping per file and
//! open mode ([`ClientFile`]), shared by the regions, and a client may make it hold at
//! most [`MAX_CLIENT_FDS`] descriptors (files and interrupt eventfds): beyond, a
//! DMA_MAP or SET_IRQS is refused with EMFILE instead of taking the descriptors every
//! other device's client needs.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Weak};
use std::time::Duration;

use log::{error, warn};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::VhostUserFrontendReqHandler;

use crate::client_memory::{ClientMapping, ClientSpan};
use crate::frontend_requests::FrontendRequests;

/// Page size of DMA maps and windows.
pub const PAGE: u64 = 4096;

/// Most descriptors one client may make the relay hold: its distinct memory files and
/// its interrupt eventfds, those of requests in flight included. (A PCI function has
/// at most 2048 MSI-X vectors and 32 MSI; QEMU passes one file per RAM block.)
pub const MAX_CLIENT_FDS: usize = 4096;

/// What tells two descriptors of one file apart for the relay: the file, and the
/// open flags that decide what pread, pwrite and mmap may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    flags: i32,
}

impl FileKey {
    fn of(fd: &OwnedFd) -> Option<Self> {
        // SAFETY: fstat and F_GETFL on a valid descriptor write only into `st`.
        let (st, flags) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return None;
            }
            (st, libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))
        };
        (flags >= 0).then_some(Self {
            dev: st.st_dev,
            ino: st.st_ino,
            flags: flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_DIRECT),
        })
    }
}

/// A file the client passed with DMA_MAP, shared by every region of it: its
/// descriptor (pread/pwrite, windows) and, when it is sealed against shrinking and the
/// relay's budget allows, the relay's mapping of its first `len` bytes.
#[derive(Debug)]
pub struct ClientFile {
    /// The descriptor (the first the client passed for this file).
    pub fd: OwnedFd,
    map: Option<ClientMapping>,
    writable: bool,
}

impl ClientFile {
    /// Takes `fd` and maps the file if it can ([`ClientMapping::new`]): readable, and
    /// writable if the descriptor allows it. Accesses through the mapping are checked
    /// against each region's permission by the table.
    pub fn new(fd: OwnedFd) -> Self {
        // SAFETY: F_GETFL and fstat only read the descriptor's state.
        let (flags, len) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            let len = if libc::fstat(fd.as_raw_fd(), &mut st) == 0 {
                st.st_size.max(0) as u64
            } else {
                0
            };
            (libc::fcntl(fd.as_raw_fd(), libc::F_GETFL), len)
        };
        let mode = if flags < 0 {
            -1
        } else {
            flags & libc::O_ACCMODE
        };
        let readable = mode == libc::O_RDONLY || mode == libc::O_RDWR;
        let writable = mode == libc::O_RDWR;
        let map = (readable && len > 0)
            .then(|| ClientMapping::new(fd.as_fd(), 0, len, true, writable))
            .flatten();
        Self { fd, map, writable }
    }

    /// `len` bytes at `offset` of the file: through the mapping if it covers them
    /// (and is writable, for a write), else through the descriptor.
    fn span(&self, offset: u64, len: usize, write: bool) -> Result<ClientSpan<'_>, DmaError> {
        if let Some(map) = self.map.as_ref().filter(|_| self.writable || !write) {
            if let Some(slice) = map.slice(offset, len) {
                return Ok(ClientSpan::Mapped(slice));
            }
        }
        Ok(ClientSpan::File {
            fd: self.fd.as_fd(),
            offset,
            len,
        })
    }

    /// Whether the relay maps the file.
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }
}

/// One region the client mapped.
#[derive(Debug)]
pub struct Region {
    /// IOVA of the first byte.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// The device may read it.
    pub read: bool,
    /// The device may write it.
    pub write: bool,
    /// Offset of the region in its file.
    pub fd_offset: u64,
    /// The client's file, if it passed an fd: the copy path reads and writes it with
    /// pread/pwrite where the relay has no mapping of it (so a client that shrinks its
    /// file gets errors instead of crashing the relay with SIGBUS), else through the
    /// mapping (a file sealed against shrinking, see [`crate::client_memory`]).
    pub file: Option<Arc<ClientFile>>,
    /// Offset of the region's window in shared memory region 0, if it has one.
    pub window: Option<u64>,
    /// The device accepted the map (copy requests are served only then).
    pub committed: bool,
    /// A window map of this region was sent but never acknowledged: the device VM may
    /// see the memory, and the relay cannot take it back.
    pub unconfirmed_window: bool,
    /// Set by [`DmaTable::insert`]: tells this map apart from a later one of the same
    /// range (a client may pipeline map, unmap, map).
    pub id: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.iova + self.size
    }

    fn contains(&self, iova: u64, len: u64) -> bool {
        iova >= self.iova && iova.checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// Why a DMA table operation failed; each maps to the errno the client or the device
/// VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    /// Overlaps a mapped region.
    Overlap,
    /// Too many regions.
    Full,
    /// Not page aligned.
    Misaligned,
    /// No region matches.
    NotFound,
    /// Outside every region or against its permission.
    Fault,
    /// The client holds as many descriptors as it may ([`MAX_CLIENT_FDS`]).
    TooManyFds,
    /// A descriptor whose file cannot be told.
    BadFd,
}

impl DmaError {
    /// The errno.
    pub fn errno(self) -> u32 {
        (match self {
            DmaError::Overlap => libc::EEXIST,
            DmaError::Full => libc::ENOSPC,
            DmaError::Misaligned => libc::EINVAL,
            DmaError::NotFound => libc::ENOENT,
            DmaError::Fault => libc::EFAULT,
            DmaError::TooManyFds => libc::EMFILE,
            DmaError::BadFd => libc::EINVAL,
        }) as u32
    }
}

/// A client's DMA regions, keyed by IOVA.
#[derive(Debug, Default)]
pub struct DmaTable {
    regions: BTreeMap<u64, Region>,
    /// Regions a forwarded DMA_UNMAP took out, keyed by that unmap's ID: the device
    /// VM may still finish work queued before the unmap, so the copy path serves them
    /// until the device acknowledges.
    unmapping: Vec<(u64, Vec<Region>)>,
    next_unmap: u64,
    next_id: u64,
    /// The client's files, shared by their regions; an entry whose regions are all
    /// gone is dead and is pruned when the table fills.
    files: HashMap<FileKey, Weak<ClientFile>>,
}

impl DmaTable {
    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Number of regions whose unmap is in flight.
    pub fn unmapping_len(&self) -> usize {
        self.unmapping.iter().map(|(_, v)| v.len()).sum()
    }

    /// The shared [`ClientFile`] for a DMA_MAP's descriptor: the one the table has
    /// for the same file and open mode (`fd` is closed), else a new one, if the client
    /// holds fewer than `max` descriptors (`others()` besides its files) after it.
    pub fn file(
        &mut self,
        fd: OwnedFd,
        others: impl FnOnce() -> usize,
        max: usize,
    ) -> Result<Arc<ClientFile>, DmaError> {
        // (DMA_MAP checked the fd with fstat already: this does not fail in practice.)
        let key = FileKey::of(&fd).ok_or(DmaError::BadFd)?;
        if let Some(file) = self.files.get(&key).and_then(Weak::upgrade) {
            return Ok(file);
        }
        let others = others();
        if self.files.len() + others >= max {
            self.files.retain(|_, f| f.strong_count() > 0);
            if self.files.len() + others >= max {
                return Err(DmaError::TooManyFds);
            }
        }
        let file = Arc::new(ClientFile::new(fd));
        self.files.insert(key, Arc::downgrade(&file));
        Ok(file)
    }

    /// Descriptors the client's files hold.
    pub fn files_held(&self) -> usize {
        self.files.values().filter(|f| f.strong_count() > 0).count()
    }

    /// Checks that a map of `[iova, iova + size)` with file offset `offset` can be
    /// added to a table holding at most `max` regions.
    pub fn check_map(&self, iova: u64, size: u64, offset: u64, max: usize) -> Result<(), DmaError> {
        if iova % PAGE != 0 || size % PAGE != 0 || offset % PAGE != 0 || size == 0 {
            return Err(DmaError::Misaligned);
        }
        let end = iova.checked_add(size).ok_or(DmaError::Misaligned)?;
        if self.regions.len() >= max {
            return Err(DmaError::Full);
        }
        let before = self.regions.range(..end).next_back();
        if before.is_some_and(|(_, r)| r.end() > iova) {
            return Err(DmaError::Overlap);
        }
        Ok(())
    }

    /// Adds a region (checked with [`DmaTable::check_map`]); returns its ID.
    pub fn insert(&mut self, mut region: Region) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        region.id = self.next_id;
        self.regions.insert(region.iova, region);
        self.next_id
    }

    /// The device accepted the map that made region `id` at `iova`, wherever that
    /// region is now (an unmap may already be taking it out). Looked up by address
    /// first: a client may hold 65535 regions, and a scan of them all for every reply
    /// held the tunnel thread, and every other device's replies, for seconds.
    pub fn commit(&mut self, iova: u64, id: u64) {
        if let Some(r) = self.regions.get_mut(&iova).filter(|r| r.id == id) {
            r.committed = true;
            return;
        }
        let unmapping = self.unmapping.iter_mut().flat_map(|(_, v)| v.iter_mut());
        if let Some(r) = unmapping.into_iter().find(|r| r.id == id) {
            r.committed = true;
        }
    }

    /// Removes region `id` if it is still mapped at `iova` (a refused or lost map). A
    /// region that an unmap already took out is left to that unmap.
    pub fn remove_id(&mut self, iova: u64, id: u64) -> Option<Region> {
        match self.regions.get(&iova) {
            Some(r) if r.id == id => self.regions.remove(&iova),
            _ => None,
        }
    }

    /// Removes the region at exactly `iova` / `size`.
    pub fn remove(&mut self, iova: u64, size: u64) -> Result<Region, DmaError> {
        match self.regions.get(&iova) {
            Some(r) if r.size == size => Ok(self.regions.remove(&iova).expect("present")),
            _ => Err(DmaError::NotFound),
        }
    }

    /// Whether a region at exactly `iova` / `size` exists.
    pub fn has_exact(&self, iova: u64, size: u64) -> bool {
        self.regions.get(&iova).is_some_and(|r| r.size == size)
    }

    /// The windows are gone (the frontend went away): the regions keep their fds and
    /// mappings only.
    pub fn forget_windows(&mut self) {
        for r in self.all_mut() {
            r.window = None;
        }
    }

    /// Takes every region's window and unmaps it with `unmap(offset, size)`; a region
    /// whose unmap is not confirmed (false) is marked as such.
    pub fn unmap_windows(&mut self, mut unmap: impl FnMut(u64, u64) -> bool) {
        for r in self.all_mut() {
            if let Some(offset) = r.window.take() {
                if !unmap(offset, r.size) {
                    r.unconfirmed_window = true;
                }
            }
        }
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Region> {
        self.regions
            .values_mut()
            .chain(self.unmapping.iter_mut().flat_map(|(_, v)| v.iter_mut()))
    }

    /// The regions the device accepted (not those being unmapped).
    pub fn committed_mut(&mut self) -> impl Iterator<Item = &mut Region> {
        self.regions.values_mut().filter(|r| r.committed)
    }

    /// Removes every region, including those being unmapped.
    pub fn take_all(&mut self) -> Vec<Region> {
        let mut all: Vec<Region> = std::mem::take(&mut self.regions).into_values().collect();
        for (_, regions) in self.unmapping.drain(..) {
            all.extend(regions);
        }
        all
    }

    /// Starts unmapping `[iova, iova + size)` (every region if `all`): the regions
    /// leave the table, so the IOVA range can be mapped again, but stay reachable for
    /// copy requests until [`DmaTable::finish_unmap`] with the returned ID.
    pub fn begin_unmap(&mut self, iova: u64, size: u64, all: bool) -> u64 {
        let regions = if all {
            std::mem::take(&mut self.regions).into_values().collect()
        } else {
            self.remove(iova, size).into_iter().collect()
        };
        let id = self.next_unmap;
        self.next_unmap = self.next_unmap.wrapping_add(1);
        self.unmapping.push((id, regions));
        id
    }

    /// The device acknowledged (or refused, or never got) the unmap `id`: its regions
    /// are no longer reachable and are handed back to be released.
    pub fn finish_unmap(&mut self, id: u64) -> Vec<Region> {
        match self.unmapping.iter().position(|(i, _)| *i == id) {
            Some(at) => self.unmapping.remove(at).1,
            None => Vec::new(),
        }
    }

    /// The committed region holding all of `[iova, iova + len)` with the permission:
    /// a mapped one, else one whose unmap the device has not acknowledged yet.
    fn find(&self, iova: u64, len: u64, write: bool) -> Result<&Region, DmaError> {
        let allows = |r: &Region| {
            r.committed && r.contains(iova, len) && if write { r.write } else { r.read }
        };
        if let Some((_, r)) = self.regions.range(..=iova).next_back() {
            if allows(r) {
                return Ok(r);
            }
        }
        self.unmapping
            .iter()
            .flat_map(|(_, v)| v.iter())
            .find(|r| allows(r))
            .ok_or(DmaError::Fault)
    }

    /// Checks that every segment lies in a committed region with the permission;
    /// returns whether all of them can be served from the client's fds.
    pub fn check_segments(&self, segments: &[(u64, u64)], write: bool) -> Result<bool, DmaError> {
        self.local_spans(segments, write).map(|s| s.is_some())
    }

    /// The client memory of the segments, in order, for a copy, after checking that
    /// every segment lies in a committed region with the permission (`Fault` if one
    /// does not). `None` when some segment's region has no fd: only the client can
    /// reach it.
    pub fn local_spans(
        &self,
        segments: &[(u64, u64)],
        write: bool,
    ) -> Result<Option<Vec<ClientSpan<'_>>>, DmaError> {
        let mut spans = Some(Vec::with_capacity(segments.len()));
        for &(iova, len) in segments {
            let r = self.find(iova, len, write)?;
            let at = iova - r.iova;
            let n = usize::try_from(len).map_err(|_| DmaError::Fault)?;
            let span = match &r.file {
                Some(file) => {
                    let offset = r.fd_offset.checked_add(at).ok_or(DmaError::Fault)?;
                    file.span(offset, n, write)?
                }
                None => {
                    spans = None;
                    continue;
                }
            };
            if let Some(v) = spans.as_mut() {
                v.push(span);
            }
        }
        Ok(spans)
    }
}

/// Allocates windows in shared memory region 0: page-aligned, first fit.
#[derive(Debug)]
pub struct WindowAllocator {
    size: u64,
    used: BTreeMap<u64, u64>,
}

impl WindowAllocator {
    /// An allocator over `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            used: BTreeMap::new(),
        }
    }

    /// Total size of the region.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A window of `len` bytes, or `None` if no gap is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.checked_add(PAGE - 1)? / PAGE * PAGE;
        let mut at = 0u64;
        for (&start, &l) in &self.used {
            if start - at >= len {
                break;
            }
            at = start + l;
        }
        if at.checked_add(len)? > self.size {
            return None;
        }
        self.used.insert(at, len);
        Some(at)
    }

    /// Frees the window at `offset`.
    pub fn free(&mut self, offset: u64) {
        if self.used.remove(&offset).is_none() {
            warn!("freeing a window at {offset:#x} that is not allocated");
        }
    }

    /// Forgets every window (the frontend went away).
    pub fn clear(&mut self) {
        self.used.clear();
    }
}

/// What [`Windows::map`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowMap {
    /// The window at this offset of shared memory region 0.
    Mapped(u64),
    /// No window: the copy path serves the region.
    None,
    /// The frontend did not answer in time: no usable window, but the device VM may
    /// see the memory anyway.
    Unconfirmed,
}

/// The shared memory region of the current frontend connection and the windows in it.
pub struct Windows {
    channel: Option<FrontendRequests>,
    alloc: WindowAllocator,
    timeout: Duration,
}

impl std::fmt::Debug for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Windows")
            .field("available", &self.channel.is_some())
            .field("alloc", &self.alloc)
            .finish()
    }
}

impl Windows {
    /// No frontend channel yet; windows of up to `size` bytes in total; the frontend
    /// must acknowledge each map and unmap within `timeout`.
    pub fn new(size: u64, timeout: Duration) -> Self {
        Self {
            channel: None,
            alloc: WindowAllocator::new(size),
            timeout,
        }
    }

    /// The frontend gave the backend its request channel (SET_BACKEND_REQ_FD).
    pub fn attach(&mut self, backend: vhost::vhost_user::Backend) {
        self.alloc.clear();
        self.channel = match FrontendRequests::start(backend, self.timeout) {
            Ok(c) => Some(c),
            Err(e) => {
                error!("no thread for the frontend's backend channel ({e}): no DMA windows");
                None
            }
        };
    }

    /// The frontend went away: its mappings went with it.
    pub fn detach(&mut self) {
        self.channel = None;
        self.alloc.clear();
    }

    /// Whether windows can be offered (a frontend with a request channel).
    pub fn available(&self) -> bool {
        self.channel.is_some() && self.alloc.size() > 0
    }

    /// Size of shared memory region 0.
    pub fn size(&self) -> u64 {
        self.alloc.size()
    }

    /// The frontend did not acknowledge a request in time: no more windows for this
    /// connection (the copy path serves new maps).
    fn give_up(&mut self, what: &str) {
        error!(
            "the device VM's VMM did not acknowledge {what} within {:?}: \
             no more DMA windows until it reconnects",
            self.timeout
        );
        self.channel = None;
    }

    /// A BACKEND_SHMEM_MAP / UNMAP body for `len` bytes at `shm_offset` of region 0.
    fn request(shm_offset: u64, fd_offset: u64, len: u64, flags: u64) -> VhostUserMMap {
        VhostUserMMap {
            shmid: vfu_proto::tunnel::SHM_ID_WINDOWS,
            padding: [0; 7],
            fd_offset,
            shm_offset,
            len,
            flags,
        }
    }

    /// Maps `len` bytes of `fd` at `fd_offset` into a new window (BACKEND_SHMEM_MAP,
    /// acknowledged by the frontend). Without a window (no room, refused, no answer)
    /// the region goes through the copy path.
    pub fn map(&mut self, fd: &OwnedFd, fd_offset: u64, len: u64, writable: bool) -> WindowMap {
        let Some(channel) = self.channel.as_ref() else {
            return WindowMap::None;
        };
        let Ok(fd) = fd.try_clone() else {
            return WindowMap::None;
        };
        let Some(offset) = self.alloc.alloc(len) else {
            return WindowMap::None;
        };
        let flags = if writable {
            VhostUserMMapFlags::WRITABLE.bits()
        } else {
            0
        };
        let req = Self::request(offset, fd_offset, len, flags);
        match channel.call(move |b| b.shmem_map(&req, &fd).map_err(|e| e.to_string())) {
            Some(Ok(_)) => WindowMap::Mapped(offset),
            Some(Err(e)) => {
                warn!("frontend refused to map a DMA window ({e}); using the copy path");
                self.alloc.free(offset);
                WindowMap::None
            }
            None => {
                // The frontend may still map it: the offset stays taken.
                self.give_up("a window map");
                WindowMap::Unconfirmed
            }
        }
    }

    /// Removes the window at `offset` (BACKEND_SHMEM_UNMAP, acknowledged), so that the
    /// device VM no longer sees the memory. False if that cannot be confirmed: the
    /// frontend refused, did not answer in time, or its channel is gone while it still
    /// runs.
    /// The offset is freed only when the frontend confirms; otherwise it stays taken
    /// until the frontend goes away, so that no new window lands on a live mapping.
    pub fn unmap(&mut self, offset: u64, len: u64) -> bool {
        let Some(channel) = self.channel.as_ref() else {
            return false;
        };
        let req = Self::request(offset, 0, len, 0);
        match channel.call(move |b| b.shmem_unmap(&req).map_err(|e| e.to_string())) {
            Some(Ok(_)) => {
                self.alloc.free(offset);
                true
            }
            Some(Err(e)) => {
                warn!("frontend did not unmap window {offset:#x}: {e}");
                false
            }
            None => {
                self.give_up("a window unmap");
                false
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::client_memory::{self, Direction};
    use vm_memory::VolatileSlice;

    /// A memfd of `len` bytes standing for client memory.
    pub(crate) fn memfd(len: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid C string; the result is checked and owned
        // below.
        let fd = unsafe {
            libc::memfd_create(
                c"vfu-relay-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fd is new and owned by nobody else.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f.into()
    }
    use std::os::fd::AsRawFd;

    /// Reads the segments through the copy path's spans (every one backed by an fd).
    fn read_local(t: &DmaTable, segments: &[(u64, u64)]) -> Result<Vec<u8>, DmaError> {
        client_memory::read_to_vec(&t.local_spans(segments, false)?.ok_or(DmaError::Fault)?)
    }

    /// Writes across the segments through the copy path's spans.
    fn write_local(t: &DmaTable, segments: &[(u64, u64)], data: &mut [u8]) -> Result<(), DmaError> {
        let spans = t.local_spans(segments, true)?.ok_or(DmaError::Fault)?;
        client_memory::copy(&spans, &[VolatileSlice::from(data)], Direction::ToClient)
    }

    fn region(iova: u64, size: u64, read: bool, write: bool) -> Region {
        Region {
            iova,
            size,
            read,
            write,
            fd_offset: 0,
            file: None,
            window: None,
            committed: true,
            unconfirmed_window: false,
            id: 0,
        }
    }

    /// Overlaps, misalignment and a full table are refused with the spec's errnos; an
    /// unmap must match exactly.
    #[test]
    fn table_rules() {
        let mut t = DmaTable::default();
        t.check_map(0x1000, 0x2000, 0, 4).unwrap();
        t.insert(region(0x1000, 0x2000, true, true));
        assert_eq!(t.check_map(0x2000, 0x1000, 0, 4), Err(DmaError::Overlap));
        assert_eq!(t.check_map(0x0, 0x2000, 0, 4), Err(DmaError::Overlap));
        assert_eq!(t.check_map(0x3000, 0x1000, 0, 4), Ok(()));
        assert_eq!(t.check_map(0x3001, 0x1000, 0, 4), Err(DmaError::Misaligned));
        assert_eq!(t.check_map(0x3000, 0x1000, 0, 1), Err(DmaError::Full));
        assert_eq!(t.remove(0x1000, 0x1000).unwrap_err(), DmaError::NotFound);
        assert!(t.remove(0x1000, 0x2000).is_ok());
        assert!(t.is_empty());
    }

    /// A region being unmapped frees its IOVA range for a new map at once but keeps
    /// serving copy requests (work queued before the unmap) until the unmap finishes.
    #[test]
    fn unmap_in_flight() {
        let mut t = DmaTable::default();
        t.insert(region(0x1000, 0x1000, true, false));
        t.insert(region(0x2000, 0x1000, true, true));
        let id = t.begin_unmap(0x1000, 0x1000, false);
        assert_eq!(t.len(), 1);
        assert_eq!(t.check_map(0x1000, 0x1000, 0, 4), Ok(()));
        assert_eq!(t.check_segments(&[(0x1000, 8)], false), Ok(false));
        assert_eq!(t.check_segments(&[(0x1000, 8)], true), Err(DmaError::Fault));
        // A new map of the same range takes over once committed.
        t.insert(region(0x1000, 0x1000, true, true));
        assert_eq!(t.check_segments(&[(0x1000, 8)], true), Ok(false));
        assert_eq!(t.finish_unmap(id).len(), 1);
        assert!(t.finish_unmap(id).is_empty());
        let all = t.begin_unmap(0, 0, true);
        assert!(t.is_empty());
        assert_eq!(t.check_segments(&[(0x2000, 8)], true), Ok(false));
        assert_eq!(t.take_all().len(), 2);
        assert!(t.finish_unmap(all).is_empty());
        assert_eq!(t.check_segments(&[(0x2000, 8)], true), Err(DmaError::Fault));
    }

    /// A map's reply commits exactly its own region: the one at its address with its
    /// ID, or the same region after an unmap took it out; never a later map of the
    /// same range. 65535 maps and their commits stay fast (looked up by address; a scan
    /// of every region per reply took the tunnel thread for a minute and a half in the
    /// hostile-client flood, `dma_map_flood_to_the_limit`).
    #[test]
    fn commit_by_address_and_id() {
        let uncommitted = |iova| Region {
            committed: false,
            ..region(iova, 0x1000, true, true)
        };
        let mut t = DmaTable::default();
        let a = t.insert(uncommitted(0x1000));
        t.commit(0x1000, a);
        assert_eq!(t.check_segments(&[(0x1000, 8)], true), Ok(false));
        // Map, unmap, map again of one range: the first map's late reply commits the
        // region in the unmap, not the new one.
        let b = t.insert(uncommitted(0x2000));
        let unmap = t.begin_unmap(0x2000, 0x1000, false);
        let c = t.insert(uncommitted(0x2000));
        t.commit(0x2000, b);
        assert_eq!(t.check_segments(&[(0x2000, 8)], true), Ok(false));
        assert!(t.finish_unmap(unmap)[0].committed);
        assert_eq!(
            t.check_segments(&[(0x2000, 8)], true),
            Err(DmaError::Fault),
            "the new map is not committed by the old one's reply"
        );
        t.commit(0x2000, c);
        assert_eq!(t.check_segments(&[(0x2000, 8)], true), Ok(false));

        let mut t = DmaTable::default();
        let ids: Vec<u64> = (0..65535u64)
            .map(|i| t.insert(uncommitted(0x10_0000 + i * 0x1000)))
            .collect();
        let start = std::time::Instant::now();
        for (i, id) in ids.into_iter().enumerate() {
            t.commit(0x10_0000 + i as u64 * 0x1000, id);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "65535 commits took {:?}",
            start.elapsed()
        );
        assert_eq!(
            t.check_segments(&[(0x10_0000 + 65534 * 0x1000, 8)], true),
            Ok(false)
        );
    }

    /// Descriptors of one file share one [`ClientFile`] (the duplicate is closed); a
    /// read-only descriptor of it is another; new files stop at the client's limit,
    /// counting its other descriptors, and a file whose regions are gone frees its
    /// place.
    #[test]
    fn files_are_shared_and_bounded() {
        let mut t = DmaTable::default();
        let fd = memfd(0x2000);
        let a = t.file(fd.try_clone().unwrap(), || 0, 4).unwrap();
        let b = t.file(fd.try_clone().unwrap(), || 0, 4).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "the same file: the duplicate was dropped"
        );
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let ro: OwnedFd = std::fs::File::open(&path).unwrap().into();
        let c = t.file(ro, || 0, 4).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "another open mode, another file");
        assert_eq!(t.files_held(), 2);
        // Two files held and two other descriptors: the limit of 4 is reached.
        assert_eq!(
            t.file(memfd(0x1000), || 2, 4).unwrap_err(),
            DmaError::TooManyFds
        );
        assert_eq!(DmaError::TooManyFds.errno(), libc::EMFILE as u32);
        // A known file is still shared at the limit.
        assert!(t.file(fd.try_clone().unwrap(), || 2, 4).is_ok());
        drop(c);
        assert!(t.file(memfd(0x1000), || 2, 4).is_ok(), "c's place is free");
        // A memfd sealed against shrinking is mapped by the relay; others are not.
        assert!(!a.is_mapped());
        let sealed = memfd(0x2000);
        // SAFETY: F_ADD_SEALS on a memfd we own.
        assert_eq!(
            unsafe { libc::fcntl(sealed.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
            0
        );
        assert!(t.file(sealed, || 0, 8).unwrap().is_mapped());
        // Regions keep their file: a region of `a` reads through it.
        let mut r = region(0x1000, 0x1000, true, true);
        r.file = Some(a.clone());
        drop((a, b));
        t.insert(r);
        assert_eq!(t.files_held(), 1);
        assert_eq!(read_local(&t, &[(0x1000, 4)]).unwrap(), [0; 4]);
    }

    /// Copy requests must lie in one committed region with the right permission; a
    /// write touches nothing unless every segment is valid.
    #[test]
    fn segments_and_permissions() {
        let fd = memfd(0x4000);
        let mut t = DmaTable::default();
        let mut rw = region(0x10000, 0x2000, true, true);
        rw.file = Some(Arc::new(ClientFile::new(fd.try_clone().unwrap())));
        t.insert(rw);
        let mut ro = region(0x20000, 0x1000, true, false);
        ro.file = Some(Arc::new(ClientFile::new(fd.try_clone().unwrap())));
        ro.fd_offset = 0x2000;
        t.insert(ro);
        write_local(&t, &[(0x10ff0, 32)], &mut [7u8; 32]).unwrap();
        assert_eq!(read_local(&t, &[(0x10ff0, 32)]).unwrap(), vec![7u8; 32]);
        // Crossing the end of a region, writing a read-only region, an unmapped IOVA.
        assert_eq!(
            t.check_segments(&[(0x11ff0, 32)], false),
            Err(DmaError::Fault)
        );
        assert_eq!(
            write_local(&t, &[(0x20000, 4)], &mut [1; 4]),
            Err(DmaError::Fault)
        );
        assert_eq!(
            t.check_segments(&[(0x30000, 1)], false),
            Err(DmaError::Fault)
        );
        // A two-segment write whose second segment is bad writes nothing.
        assert!(write_local(&t, &[(0x10000, 4), (0x20000, 4)], &mut [9; 8]).is_err());
        assert_eq!(read_local(&t, &[(0x10000, 4)]).unwrap(), vec![0; 4]);
        // A client that shrinks its file gets faults, not a SIGBUS in the relay.
        // SAFETY: ftruncate on our fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 0) }, 0);
        assert_eq!(read_local(&t, &[(0x10000, 4)]), Err(DmaError::Fault));
        // Uncommitted regions serve nothing.
        let mut pending = region(0x40000, 0x1000, true, true);
        pending.committed = false;
        t.insert(pending);
        assert_eq!(
            t.check_segments(&[(0x40000, 1)], false),
            Err(DmaError::Fault)
        );
    }

    /// A frontend that never acknowledges BACKEND_SHMEM_MAP (a real socket whose peer
    /// reads nothing) costs one deadline, not a stalled relay: the map falls back to the
    /// copy path, windows are off for the connection, and an unmap reports that it
    /// cannot confirm.
    #[test]
    fn silent_frontend() {
        let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let backend = vhost::vhost_user::Backend::from_stream(ours);
        backend.set_reply_ack_flag(true);
        backend.set_shmem_flag(true);
        let mut w = Windows::new(1 << 20, std::time::Duration::from_millis(200));
        w.attach(backend);
        assert!(w.available());
        let fd = memfd(4096);
        let start = std::time::Instant::now();
        assert_eq!(w.map(&fd, 0, 4096, true), WindowMap::Unconfirmed);
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert!(!w.available(), "windows are off after a missed deadline");
        assert!(!w.unmap(0, 4096), "an unmap cannot be confirmed");
        drop(peer);
    }

    /// Windows are page aligned, first fit, reused after free, bounded by the size.
    #[test]
    fn windows() {
        let mut a = WindowAllocator::new(0x10000);
        assert_eq!(a.alloc(0x1000), Some(0));
        assert_eq!(a.alloc(1), Some(0x1000));
        assert_eq!(a.alloc(0x4000), Some(0x2000));
        a.free(0x1000);
        assert_eq!(a.alloc(0x1000), Some(0x1000));
        assert_eq!(a.alloc(0x10000), None);
        assert_eq!(a.alloc(u64::MAX), None);
    }
}

/// Window bookkeeping against a frontend on a raw socket (found in review).
#[cfg(test)]
mod frontend_tests {
    use super::tests::memfd;
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// (request, shm_offset) of each request the frontend answered.
    type FrontendLog = Arc<Mutex<Vec<(u32, u64)>>>;

    /// A frontend on a raw socket: answers MAP (9) after `map_delay` with 0, UNMAP (10)
    /// with `unmap_status`; logs (request, shm_offset).
    fn frontend(mut s: UnixStream, map_delay: Duration, unmap_status: u64) -> FrontendLog {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || loop {
            let mut hdr = [0u8; 12];
            if s.read_exact(&mut hdr).is_err() {
                return;
            }
            let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            s.read_exact(&mut body).unwrap();
            let shm_offset = u64::from_le_bytes(body[16..24].try_into().unwrap());
            let status = if req == 9 {
                std::thread::sleep(map_delay);
                0
            } else {
                unmap_status
            };
            l.lock().unwrap().push((req, shm_offset));
            let mut out = Vec::new();
            out.extend_from_slice(&req.to_le_bytes());
            out.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&status.to_le_bytes());
            if s.write_all(&out).is_err() {
                return;
            }
        });
        log
    }

    fn windows(peer_delay: Duration, unmap_status: u64) -> (Windows, FrontendLog) {
        let (ours, peer) = UnixStream::pair().unwrap();
        let backend = vhost::vhost_user::Backend::from_stream(ours);
        backend.set_reply_ack_flag(true);
        backend.set_shmem_flag(true);
        let mut w = Windows::new(1 << 20, Duration::from_millis(200));
        w.attach(backend);
        (w, frontend(peer, peer_delay, unmap_status))
    }

    /// The frontend refuses an unmap: the window is still mapped there, so its offset
    /// must not go to the next map.
    #[test]
    fn refused_unmap_keeps_the_offset() {
        let (mut w, log) = windows(Duration::ZERO, 1);
        let WindowMap::Mapped(a) = w.map(&memfd(8192), 0, 8192, true) else {
            panic!("first map");
        };
        assert!(!w.unmap(a, 8192), "the frontend refused");
        let b = w.map(&memfd(8192), 0, 8192, true);
        assert_ne!(
            b,
            WindowMap::Mapped(a),
            "offset {a:#x} reused while the frontend still maps it: {:?}",
            log.lock().unwrap()
        );
    }

    /// A map acknowledged after the deadline: the frontend did map the memory, so the
    /// relay must not report "no window" (which would let the client's unmap succeed)
    /// but an unconfirmed one, whose unmap answers EIO.
    #[test]
    fn late_map_ack_is_unconfirmed() {
        let (mut w, log) = windows(Duration::from_millis(400), 0);
        assert_eq!(w.map(&memfd(8192), 0, 8192, true), WindowMap::Unconfirmed);
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            log.lock().unwrap().iter().any(|&(r, _)| r == 9),
            "the frontend did map it"
        );
        assert!(!w.available());
    }
}
