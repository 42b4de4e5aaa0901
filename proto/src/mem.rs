//! Mapping memory a peer passed as an fd (DMA regions).

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// Maps `size` bytes of `fd` at `offset`, shared, readable and/or writable, at an
/// address the kernel picks. The caller owns the mapping (`munmap(ptr, size)`).
///
/// A regular file (a memfd, a file in /dev/shm or hugetlbfs) must hold the whole range,
/// else `EINVAL`: an access past its end would raise SIGBUS in the process that maps it,
/// and a peer must not be able to crash it that way. (A peer that shrinks the file
/// afterwards still can; that is the same with every vfio-user implementation.)
pub fn map_fd(
    fd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
    read: bool,
    write: bool,
) -> io::Result<NonNull<u8>> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let len = usize::try_from(size).map_err(|_| einval())?;
    let file_offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
    if len == 0 {
        return Err(einval());
    }
    check_range(fd, offset, size)?;
    let mut prot = libc::PROT_NONE;
    if read {
        prot |= libc::PROT_READ;
    }
    if write {
        prot |= libc::PROT_WRITE;
    }
    // SAFETY: a new shared mapping at an address the kernel picks (no MAP_FIXED), so it
    // overlaps no memory Rust knows about; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            file_offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(einval)
}

/// Checks that `fd` can back DMA at `[offset, offset + size)` served with
/// pread/pwrite: a regular file (memfd, tmpfs, hugetlbfs, ...) that holds the range,
/// not opened with `O_APPEND` (where pwrite ignores the offset). `EINVAL` otherwise.
pub fn check_positional_io(fd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<()> {
    let meta = as_file(fd, File::metadata)?;
    // SAFETY: F_GETFL only reads the fd's status flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if !meta.is_file() || flags < 0 || flags & libc::O_APPEND != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    holds(meta.len(), offset, size)
}

/// Whether `fd` is a file of a memory file system: tmpfs (memfds, `/dev/shm`) or
/// hugetlbfs (hugetlb memfds, `/dev/hugepages`), where pread, pwrite and page faults
/// never wait for a device or another process (as they may on FUSE or a network
/// mount). `false` for other file systems and for fds fstatfs cannot describe.
pub fn is_memory_file(fd: BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: fstatfs writes only into the local struct; a bad fd gives an error.
    let kind = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::fstatfs(fd.as_raw_fd(), &mut st) == 0).then_some(st.f_type as i64)
    };
    matches!(kind, Some(TMPFS_MAGIC | HUGETLBFS_MAGIC))
}

/// Whether `fd` is a memfd sealed against shrinking (`F_SEAL_SHRINK`, as QEMU's
/// `memory-backend-memfd` seals by default): memory of it mapped elsewhere can never
/// lose its backing under the mapper.
pub fn cannot_shrink(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GET_SEALS only reads the fd's seals; it fails on fds without seals.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Checks that a regular file holds `[offset, offset + size)` (`EINVAL` otherwise);
/// other kinds of fd pass.
pub fn check_range(fd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<()> {
    let meta = as_file(fd, File::metadata)?;
    if meta.is_file() {
        holds(meta.len(), offset, size)?;
    }
    Ok(())
}

/// Whether a file of `len` bytes holds `[offset, offset + size)` (`EINVAL` otherwise).
fn holds(len: u64, offset: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// Runs `f` on `fd` seen as a [`File`], without taking it over.
fn as_file<R>(fd: BorrowedFd<'_>, f: impl FnOnce(&File) -> io::Result<R>) -> io::Result<R> {
    // SAFETY: the fd is open for the borrow's lifetime; ManuallyDrop keeps the File
    // from closing it, so its owner still owns it afterwards.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    f(&file)
}

/// End of file is `EFAULT`: a client that shrank its file after mapping it gets an
/// error, where touching a mapping of it would raise SIGBUS.
fn eof_is_efault(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::WriteZero => {
            io::Error::from_raw_os_error(libc::EFAULT)
        }
        _ => e,
    }
}

/// Reads exactly `buf.len()` bytes of `fd` at `offset` (pread, retrying short reads
/// and EINTR); end of file is `EFAULT`.
pub fn read_exact_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
    as_file(fd, |f| f.read_exact_at(buf, offset)).map_err(eof_is_efault)
}

/// Writes all of `data` to `fd` at `offset` (pwrite, retrying short writes and EINTR).
pub fn write_all_at(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> io::Result<()> {
    as_file(fd, |f| f.write_all_at(data, offset)).map_err(eof_is_efault)
}

/// Keeps message-sized buffers (up to 1 MiB of data) on the heap: glibc otherwise
/// serves every allocation above 128 KiB with a fresh mmap and returns it on free, so
/// each large message costs a page fault per 4 KiB on first touch (measured: most of
/// the time of a 1 MiB copy-path DMA went to faults and page clearing). Call once at
/// the start of a daemon; without glibc it does nothing.
pub fn keep_large_buffers_on_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tunables; it is called before any thread
    // that allocates is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A range beyond the end of a memfd is refused instead of mapped (it would SIGBUS
    /// on access); a range inside is mapped with the asked permission.
    #[test]
    fn refuses_ranges_past_the_end_of_a_file() {
        // SAFETY: memfd_create with a valid C string; the fd is owned below.
        let fd = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"map-test".as_ptr(), 0)) };
        // SAFETY: ftruncate on our fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 8192) }, 0);
        let e = map_fd(fd.as_fd(), 4096, 8192, true, false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let p = map_fd(fd.as_fd(), 4096, 4096, true, true).unwrap();
        // SAFETY: the mapping is 4096 bytes, readable and writable.
        unsafe {
            p.as_ptr().write_volatile(7);
            assert_eq!(p.as_ptr().read_volatile(), 7);
            libc::munmap(p.as_ptr().cast(), 4096);
        }
    }

    /// Memfds and files in /dev/shm count as memory files, a file on the build
    /// directory's file system (ext4 or overlay here, never tmpfs in CI's checkout) and
    /// a pipe do not.
    #[test]
    fn memory_files_are_those_of_tmpfs_and_hugetlbfs() {
        // SAFETY: memfd_create with a valid C string; the fd is owned below.
        let memfd = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"kind".as_ptr(), 0)) };
        assert!(is_memory_file(memfd.as_fd()));
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            let path = shm.join(format!("vfu-mem-kind-{}", std::process::id()));
            let f = File::create(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert!(is_memory_file(f.as_fd()));
        }
        let here = File::open(env!("CARGO_MANIFEST_DIR")).unwrap();
        // SAFETY: fstatfs writes into the zeroed local struct (all-zero is a valid
        // statfs).
        let kind = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            assert_eq!(libc::fstatfs(here.as_raw_fd(), &mut st), 0);
            st.f_type as i64
        };
        if kind != 0x0102_1994 {
            assert!(!is_memory_file(here.as_fd()));
        }
        let mut p = [0; 2];
        // SAFETY: pipe writes two new fds, owned below.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: both fds are new and owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        assert!(!is_memory_file(r.as_fd()));
        drop(w);
    }
}
