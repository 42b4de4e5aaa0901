//! Checks and operations on file descriptors a peer handed over.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Whether `fd` is an eventfd (`None` if that cannot be told, e.g. without /proc).
pub fn is_eventfd(fd: BorrowedFd<'_>) -> Option<bool> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    Some(link.as_os_str() == "anon_inode:[eventfd]")
}

/// Makes `fd` non-blocking, so that signalling it never stalls the caller (an eventfd
/// whose counter a peer drove to the maximum would block a write).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a valid descriptor have no memory effects.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK == 0
            && libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Adds 1 to an eventfd without blocking. A counter at its maximum already means
/// "signalled", so EAGAIN counts as success.
pub fn signal_eventfd(fd: impl AsFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local array to a valid descriptor.
    let n = unsafe {
        libc::write(
            fd.as_fd().as_raw_fd(),
            one.as_ptr() as *const libc::c_void,
            8,
        )
    };
    if n == 8 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        return Ok(());
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// An eventfd is recognised and a pipe is not; a saturated non-blocking eventfd is
    /// signalled without blocking.
    #[test]
    fn eventfd_checks() {
        // SAFETY: eventfd(2) returns a new fd that we own.
        let e = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
        assert_eq!(is_eventfd(e.as_fd()), Some(true));
        let mut p = [0; 2];
        // SAFETY: pipe(2) writes two new fds.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: both are new and owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        assert_eq!(is_eventfd(r.as_fd()), Some(false));
        drop(w);
        set_nonblocking(e.as_fd()).unwrap();
        let max = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array.
        assert_eq!(
            unsafe { libc::write(e.as_raw_fd(), max.as_ptr() as *const _, 8) },
            8
        );
        signal_eventfd(&e).unwrap();
    }
}
