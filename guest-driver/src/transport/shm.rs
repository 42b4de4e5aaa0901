//! The loopback VMM's shared memory region: the area where the relay's DMA windows
//! appear. The relay asks for each window with vhost-user BACKEND_SHMEM_MAP; this side
//! maps the fd it receives at the requested offset of a reserved address range, with
//! the requested permission, and replaces it with an inaccessible mapping on
//! BACKEND_SHMEM_UNMAP. A real VMM does the same inside the device VM's BAR.
//!
//! It also keeps a duplicate of each window's fd, so that a bridged vfio-user server
//! can be handed the memory of a window as an fd ([`WindowFds`]).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{HandlerResult, VhostUserFrontendReqHandler};

use super::WindowFds;

const PAGE: u64 = 4096;

/// A mapped window: the fd the relay sent (duplicated) and where it is mapped.
#[derive(Debug)]
struct Window {
    len: usize,
    fd: OwnedFd,
    fd_offset: u64,
}

/// A reserved range of address space of `size` bytes.
#[derive(Debug)]
pub struct ShmArea {
    base: *mut u8,
    size: usize,
    /// The windows mapped now, by offset; the lock serialises map and unmap requests.
    windows: Mutex<BTreeMap<usize, Window>>,
}

// SAFETY: the area is a reservation owned by this value; the driver reads it through
// volatile accesses, and map/unmap are serialised by `lock`.
unsafe impl Send for ShmArea {}
// SAFETY: as above.
unsafe impl Sync for ShmArea {}

impl ShmArea {
    /// Reserves `size` bytes of address space, inaccessible until windows are mapped.
    pub fn reserve(size: u64) -> std::io::Result<Self> {
        let size =
            usize::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: an anonymous PROT_NONE reservation; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: base as *mut u8,
            size,
            windows: Mutex::new(BTreeMap::new()),
        })
    }

    /// Start and size of the area.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base, self.size)
    }

    fn check(&self, req: &VhostUserMMap) -> Result<(usize, usize), std::io::Error> {
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        if req.shmid != vfu_proto::tunnel::SHM_ID_WINDOWS
            || req.shm_offset % PAGE != 0
            || req.len % PAGE != 0
            || req.len == 0
            || req.fd_offset % PAGE != 0
        {
            return Err(bad());
        }
        let off = usize::try_from(req.shm_offset).map_err(|_| bad())?;
        let len = usize::try_from(req.len).map_err(|_| bad())?;
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(bad());
        }
        Ok((off, len))
    }
}

impl Drop for ShmArea {
    fn drop(&mut self) {
        // SAFETY: unmaps the whole reservation (and every window in it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

impl VhostUserFrontendReqHandler for ShmArea {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        let (off, len) = self.check(req)?;
        let prot = if req.flags & VhostUserMMapFlags::WRITABLE.bits() != 0 {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let fd_offset = libc::off_t::try_from(req.fd_offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: MAP_FIXED inside our own reservation (checked bounds) replaces only
        // pages of the reservation.
        let p = unsafe {
            libc::mmap(
                self.base.add(off) as *mut libc::c_void,
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                fd_offset,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            warn!("SHMEM_MAP at {off:#x}+{len:#x}: {e}");
            return Err(e);
        }
        debug!("window mapped at {off:#x}+{len:#x}");
        remove_overlapping(&mut windows, off, len);
        match dup_cloexec(fd.as_raw_fd()) {
            Ok(fd) => {
                windows.insert(
                    off,
                    Window {
                        len,
                        fd,
                        fd_offset: req.fd_offset,
                    },
                );
            }
            // The window works; only handing it out as an fd does not.
            Err(e) => warn!("window at {off:#x}: no fd kept for bridged servers ({e})"),
        }
        Ok(0)
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> HandlerResult<u64> {
        let (off, len) = self.check(req)?;
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        remove_overlapping(&mut windows, off, len);
        // SAFETY: MAP_FIXED inside our reservation puts back an inaccessible mapping.
        let p = unsafe {
            libc::mmap(
                self.base.add(off) as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        debug!("window unmapped at {off:#x}+{len:#x}");
        Ok(0)
    }
}

/// Forgets the windows that overlap `len` bytes at `off`.
fn remove_overlapping(windows: &mut BTreeMap<usize, Window>, off: usize, len: usize) {
    let end = off.saturating_add(len);
    windows.retain(|&at, w| at.saturating_add(w.len) <= off || at >= end);
}

/// A close-on-exec duplicate of `fd`.
fn dup_cloexec(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller holds open; the result is
    // checked and owned by nobody else.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl WindowFds for ShmArea {
    fn window_fd(&self, offset: u64, len: u64) -> Option<(OwnedFd, u64)> {
        let off = usize::try_from(offset).ok()?;
        let len = usize::try_from(len).ok()?;
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (&at, w) = windows.range(..=off).next_back()?;
        if off.checked_add(len)? > at + w.len {
            return None;
        }
        let fd = dup_cloexec(w.fd.as_raw_fd()).ok()?;
        Some((fd, w.fd_offset + (off - at) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: memfd_create with a valid C string; the fd is new and ours.
        let fd = unsafe {
            OwnedFd::from_raw_fd(libc::memfd_create(
                c"vfu-shm-test".as_ptr(),
                libc::MFD_CLOEXEC,
            ))
        };
        // SAFETY: ftruncate on the fd we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        fd
    }

    fn req(shm_offset: u64, fd_offset: u64, len: u64) -> VhostUserMMap {
        VhostUserMMap {
            shmid: vfu_proto::tunnel::SHM_ID_WINDOWS,
            padding: Default::default(),
            fd_offset,
            shm_offset,
            len,
            flags: VhostUserMMapFlags::WRITABLE.bits(),
        }
    }

    /// A mapped window can be handed out as an fd at the right file offset, for a range
    /// inside it only; after SHMEM_UNMAP it cannot.
    #[test]
    fn window_fds_follow_map_and_unmap() {
        let area = ShmArea::reserve(1 << 20).unwrap();
        let fd = memfd(0x4000);
        area.shmem_map(&req(0x2000, 0x1000, 0x2000), &fd.as_fd())
            .unwrap();
        let (got, at) = area.window_fd(0x3000, 0x1000).expect("inside the window");
        assert_eq!(at, 0x2000);
        assert_ne!(got.as_raw_fd(), fd.as_raw_fd());
        assert!(
            area.window_fd(0x3000, 0x2000).is_none(),
            "runs past the window"
        );
        assert!(
            area.window_fd(0x1000, 0x1000).is_none(),
            "before the window"
        );
        area.shmem_unmap(&req(0x2000, 0, 0x2000)).unwrap();
        assert!(area.window_fd(0x2000, 0x1000).is_none(), "unmapped");
    }
}
