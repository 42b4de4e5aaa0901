//! The client's DMA maps as the bridge keeps them, and the server's DMA_READ /
//! DMA_WRITE served from them.
//!
//! A map with a `DMA_WINDOW` slot lies in the tunnel's shared memory region 0: the
//! bridge reads and writes it there, and hands the server an fd onto it when the
//! transport can give one ([`crate::transport::WindowFds`]), so that the server maps
//! the memory itself. Any other map (no slot: the relay's copy path) reaches the server
//! without an fd, and its DMA_READ / DMA_WRITE go through the tunnel's copy path.
//! Either way a request is checked against the maps (range inside mapped memory, the
//! permission it needs) before anything moves: the device-API table
//! ([`crate::device::DmaTable`]) does that.

use std::ptr::NonNull;

use log::debug;
use vfu_proto::tunnel::{Slot, SlotType};
use vfu_proto::vfio_user::{DmaAccess, DmaMap, DmaUnmap, DmaWrite};

use crate::device::dma::{LocalMemory, LocalSource};
use crate::device::errno::{EINVAL, EIO};
use crate::device::{Dma, DmaBacking, DmaRemote, DmaTable, Errno};

/// `E2BIG`: a transfer larger than the bridge stated.
const E2BIG: Errno = libc::E2BIG as Errno;

/// Shared memory region 0, where windows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Windows {
    base: NonNull<u8>,
    len: usize,
}

/// The client's maps.
#[derive(Debug)]
pub struct Regions {
    table: DmaTable,
    windows: Option<Windows>,
    max_xfer: usize,
}

// SAFETY: the window pointer names shared memory that the engine keeps mapped for as
// long as the channel's server lives (`ChannelServer::set_windows`), valid from any
// thread; it is accessed only with volatile copies through `DmaTable`.
unsafe impl Send for Regions {}

/// What a DMA_MAP became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In a window at this offset of shared memory region 0.
    Window(u64),
    /// Reached through the tunnel's copy path.
    Remote,
}

impl Regions {
    /// No maps; at most `max_maps`; server transfers of at most `max_xfer` bytes.
    pub fn new(max_maps: usize, max_xfer: usize) -> Self {
        Self {
            table: DmaTable::new(max_maps),
            windows: None,
            max_xfer,
        }
    }

    /// Windows are at `base` (`len` bytes). Maps made through older windows (none in
    /// practice: the engine sets them once, before any channel) keep theirs.
    ///
    /// # Safety
    /// The memory stays mapped for as long as these regions live, and is accessed in
    /// this process with volatile accesses only.
    pub unsafe fn set_windows(&mut self, base: NonNull<u8>, len: usize) {
        self.windows = Some(Windows { base, len });
    }

    /// Number of maps.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Records a DMA_MAP with its slots (none, or one `DMA_WINDOW` whose permissions
    /// are the map's, inside shared memory region 0), with the table's checks
    /// (alignment, overlap, count).
    pub fn map(&mut self, m: &DmaMap, slots: &[Slot]) -> Result<Placement, Errno> {
        let (backing, placement) = match slots {
            [] => (DmaBacking::Remote, Placement::Remote),
            [s] if s.slot_type == SlotType::DmaWindow => {
                if s.flags != Slot::window(0, m.read, m.write).flags {
                    debug!("DMA_MAP {:#x}: window flags {:#x}", m.address, s.flags);
                    return Err(EINVAL);
                }
                let w = self.windows.ok_or(EINVAL)?;
                let offset = usize::try_from(s.value).map_err(|_| EINVAL)?;
                let len = usize::try_from(m.size).map_err(|_| EINVAL)?;
                if offset.checked_add(len).is_none_or(|end| end > w.len) {
                    return Err(EINVAL);
                }
                // SAFETY: `offset + len` lies inside shared memory region 0 (checked),
                // which `set_windows`'s caller keeps mapped and accessed volatile-only;
                // the relay keeps this window mapped until the bridge answers the
                // DMA_UNMAP (or SESSION_END) that removes the region from the table.
                let mem = unsafe {
                    let ptr = NonNull::new_unchecked(w.base.as_ptr().add(offset));
                    LocalMemory::window(ptr, len, s.value)
                };
                (DmaBacking::Local(mem), Placement::Window(s.value))
            }
            _ => return Err(EINVAL),
        };
        self.table.map_backed(m, None, backing)?;
        Ok(placement)
    }

    /// Forgets a map (or all, for UNMAP_ALL): its window is not touched after this.
    pub fn unmap(&mut self, u: &DmaUnmap) -> Result<(), Errno> {
        self.table.unmap(u)
    }

    /// Forgets every map.
    pub fn clear(&mut self) {
        self.table.clear();
    }

    /// The maps, for handing them to a new connection: the DMA_MAP and its window.
    pub fn maps(&self) -> Vec<(DmaMap, Placement)> {
        self.table
            .iter()
            .map(|r| {
                let placement = match &r.backing {
                    DmaBacking::Local(m) => match m.source() {
                        LocalSource::Window(off) => Placement::Window(off),
                        LocalSource::Mmap => Placement::Remote,
                    },
                    DmaBacking::Remote => Placement::Remote,
                };
                let m = DmaMap {
                    read: r.read,
                    write: r.write,
                    offset: 0,
                    address: r.address,
                    size: r.size,
                };
                (m, placement)
            })
            .collect()
    }

    /// Serves the server's DMA_READ: the data, or the errno of the error reply
    /// (`EFAULT` outside the maps or without read permission, `E2BIG` over the
    /// transfer size the bridge stated).
    pub fn read(&mut self, a: &DmaAccess, remote: &mut dyn DmaRemote) -> Result<Vec<u8>, Errno> {
        let len = usize::try_from(a.count).map_err(|_| E2BIG)?;
        if len > self.max_xfer {
            return Err(E2BIG);
        }
        let mut buf = vec![0u8; len];
        Dma::new(&mut self.table, remote).read_sg(&[(a.address, a.count)], &mut buf)?;
        Ok(buf)
    }

    /// Serves the server's DMA_WRITE (checked in full before a byte is written).
    pub fn write(&mut self, w: &DmaWrite, remote: &mut dyn DmaRemote) -> Result<(), Errno> {
        if w.data.len() > self.max_xfer {
            return Err(E2BIG);
        }
        let len = w.data.len() as u64;
        Dma::new(&mut self.table, remote).write_sg(&[(w.address, len)], &w.data)
    }
}

/// An errno for the client from an error reply of the server: some servers (the
/// `vfio_user` crate's) answer errno 0, which would read as success.
pub fn nonzero(errno: u32) -> Errno {
    if errno == 0 {
        EIO
    } else {
        errno
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::errno::{EEXIST, EFAULT, ENOENT};
    use crate::device::NoRemote;
    use vfu_proto::vfio_user::CountWidth;

    /// A copy-path remote over a buffer at IOVA 0x10000, counting calls.
    struct Remote {
        mem: Vec<u8>,
        calls: usize,
    }

    impl DmaRemote for Remote {
        fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
            self.calls += 1;
            let off = (iova - 0x10000) as usize;
            buf.copy_from_slice(&self.mem[off..off + buf.len()]);
            Ok(())
        }
        fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
            self.calls += 1;
            let off = (iova - 0x10000) as usize;
            self.mem[off..off + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn map(address: u64, size: u64, write: bool) -> DmaMap {
        DmaMap {
            read: true,
            write,
            offset: 0,
            address,
            size,
        }
    }

    /// Window maps are read and written in shared memory, copy-path maps through the
    /// remote; ranges outside the maps and writes to read-only maps fail with EFAULT
    /// and touch nothing; oversize transfers fail with E2BIG.
    #[test]
    fn serves_dma_from_windows_and_the_copy_path() {
        let mut shm = vec![0u8; 0x4000];
        let base = NonNull::new(shm.as_mut_ptr()).unwrap();
        let mut r = Regions::new(16, 0x2000);
        // SAFETY: `shm` outlives `r` and is only accessed through it meanwhile.
        unsafe { r.set_windows(base, shm.len()) };
        let win = Slot::window(0x1000, true, true);
        assert_eq!(
            r.map(&map(0x20000, 0x2000, true), &[win]),
            Ok(Placement::Window(0x1000))
        );
        assert_eq!(
            r.map(&map(0x10000, 0x1000, false), &[]),
            Ok(Placement::Remote)
        );
        assert_eq!(r.map(&map(0x20000, 0x1000, true), &[]), Err(EEXIST));
        let ro_slot = Slot::window(0, true, false);
        assert_eq!(r.map(&map(0x40000, 0x1000, true), &[ro_slot]), Err(EINVAL));
        let beyond = Slot::window(0x3000, true, true);
        assert_eq!(r.map(&map(0x40000, 0x2000, true), &[beyond]), Err(EINVAL));

        let mut remote = Remote {
            mem: (0..0x1000).map(|i| i as u8).collect(),
            calls: 0,
        };
        let acc = |address, count| DmaAccess {
            address,
            count,
            width: CountWidth::U64,
        };
        assert_eq!(
            r.read(&acc(0x10010, 4), &mut remote).unwrap(),
            vec![0x10, 0x11, 0x12, 0x13]
        );
        let w = |address, data: &[u8]| DmaWrite {
            address,
            data: data.to_vec(),
            width: CountWidth::U64,
        };
        r.write(&w(0x20100, b"abc"), &mut NoRemote).unwrap();
        assert_eq!(&shm[0x1100..0x1103], b"abc");
        assert_eq!(
            r.read(&acc(0x20100, 3), &mut NoRemote).unwrap(),
            b"abc".to_vec()
        );
        assert_eq!(r.write(&w(0x10000, b"x"), &mut remote), Err(EFAULT));
        assert_eq!(remote.mem[0], 0, "read-only map untouched");
        assert_eq!(r.read(&acc(0x30000, 1), &mut remote), Err(EFAULT));
        assert_eq!(r.read(&acc(0x20000, 0x2001), &mut remote), Err(E2BIG));
        assert_eq!(remote.calls, 1);

        let maps = r.maps();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[1].1, Placement::Window(0x1000));
        assert_eq!(r.unmap(&DmaUnmap::region(0x20000, 0x1000)), Err(ENOENT));
        r.unmap(&DmaUnmap::region(0x20000, 0x2000)).unwrap();
        assert_eq!(r.read(&acc(0x20100, 3), &mut NoRemote), Err(EFAULT));
        assert_eq!(r.len(), 1);
        drop(r);
        drop(shm);
    }
}
