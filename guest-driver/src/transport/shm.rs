//! The loopback VMM's shared memory region: the area where the relay's DMA windows
//! appear. The relay asks for each window with vhost-user BACKEND_SHMEM_MAP; this side
//! maps the fd it receives at the requested offset of a reserved address range, with
//! the requested permission, and replaces it with an inaccessible mapping on
//! BACKEND_SHMEM_UNMAP. A real VMM does the same inside the device VM's BAR.

use std::os::fd::AsRawFd;
use std::sync::Mutex;

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{HandlerResult, VhostUserFrontendReqHandler};

const PAGE: u64 = 4096;

/// A reserved range of address space of `size` bytes.
#[derive(Debug)]
pub struct ShmArea {
    base: *mut u8,
    size: usize,
    /// Serialises map and unmap requests.
    lock: Mutex<()>,
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
            lock: Mutex::new(()),
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
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
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
        Ok(0)
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> HandlerResult<u64> {
        let (off, len) = self.check(req)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
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
