//! Reaching a client's DMA memory from the relay: its own mapping of a region when the
//! client's fd can never shrink (a sealed memfd), else pread/pwrite on the fd.
//!
//! A mapping is a memcpy away from the data (about 3x faster than pread/pwrite of shmem
//! here, `docs/benchmarks.md`), but touching a mapped page that the file no longer
//! holds raises SIGBUS. So the relay maps only memfds sealed with `F_SEAL_SHRINK` (QEMU
//! seals `memory-backend-memfd` that way by default); any other fd is served with
//! positional I/O, where a file cut short is an `EFAULT` to the device, not a crash.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Mutex;

use log::debug;
use vm_memory::VolatileSlice;

use crate::dma::DmaError;

/// Most bytes of client memory the relay maps into its own address space, over all
/// clients: a quarter of the 128 TiB a process has. Clients choose the size of what
/// they map (a sparse memfd may announce any size), and a relay whose address space is
/// full aborts on its next large allocation; memory beyond the budget is served with
/// pread/pwrite.
pub const MAX_MAPPED_BYTES: u64 = 32 << 40;

/// Most mappings of client memory the relay keeps, over all clients: the kernel
/// allows a process 65530 (`vm.max_map_count`), and thread stacks, the allocator and
/// the device VM's memory need theirs.
pub const MAX_MAPPINGS: usize = 16384;

/// What mappings of client memory use, against a limit of bytes and of mappings.
#[derive(Debug)]
struct Budget {
    bytes: u64,
    count: usize,
    max_bytes: u64,
    max_count: usize,
}

impl Budget {
    /// Takes `len` bytes and one mapping, if they are left.
    fn reserve(&mut self, len: u64) -> bool {
        if self.count >= self.max_count || self.bytes.saturating_add(len) > self.max_bytes {
            return false;
        }
        self.bytes += len;
        self.count += 1;
        true
    }

    fn release(&mut self, len: u64) {
        self.bytes = self.bytes.saturating_sub(len);
        self.count = self.count.saturating_sub(1);
    }
}

/// The relay's mappings of client memory, over all clients.
static MAPPED: Mutex<Budget> = Mutex::new(Budget {
    bytes: 0,
    count: 0,
    max_bytes: MAX_MAPPED_BYTES,
    max_count: MAX_MAPPINGS,
});

fn reserve(len: u64) -> bool {
    MAPPED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reserve(len)
}

fn unreserve(len: u64) {
    MAPPED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .release(len)
}

/// The relay's mapping of one DMA region.
#[derive(Debug)]
pub struct ClientMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access goes
// through volatile slices, and it is unmapped only in Drop.
unsafe impl Send for ClientMapping {}
// SAFETY: as above; &ClientMapping only hands out volatile slices.
unsafe impl Sync for ClientMapping {}

impl ClientMapping {
    /// Maps `[offset, offset + size)` of `fd` if it is sealed against shrinking, the
    /// fd allows the access and the relay's budget ([`MAX_MAPPED_BYTES`],
    /// [`MAX_MAPPINGS`]) has room; `None` otherwise (the copy path then uses
    /// pread/pwrite).
    pub fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        read: bool,
        write: bool,
    ) -> Option<Self> {
        if !vfu_proto::mem::cannot_shrink(fd) {
            return None;
        }
        let len = usize::try_from(size).ok()?;
        if !reserve(size) {
            debug!(
                "fd {}: {size:#x} bytes not mapped: the relay's mapping budget is used up; pread/pwrite serve it",
                fd.as_raw_fd()
            );
            return None;
        }
        // A write-only region is mapped readable too: the mapping is the relay's own,
        // and every access through it is checked against the region's permission.
        match vfu_proto::mem::map_fd(fd, offset, size, read || write, write) {
            Ok(ptr) => Some(Self { ptr, len }),
            Err(e) => {
                unreserve(size);
                debug!(
                    "fd {} not mapped ({e}); pread/pwrite serve it",
                    fd.as_raw_fd()
                );
                None
            }
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: empty mappings are not made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A volatile view of `len` bytes at `offset`.
    pub fn slice(&self, offset: u64, len: usize) -> Option<VolatileSlice<'_>> {
        let start = usize::try_from(offset).ok()?;
        if start.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: [ptr + start, ptr + start + len) lies inside the mapping, which lives
        // as long as `self`; the file cannot shrink under it (sealed), and the slice is
        // only accessed volatilely.
        Some(unsafe { VolatileSlice::new(self.ptr.as_ptr().add(start), len) })
    }
}

impl Drop for ClientMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`, unmapped once; no
        // slice outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        unreserve(self.len as u64);
    }
}

/// One stretch of client memory, ready to be copied.
#[derive(Debug)]
pub enum ClientSpan<'a> {
    /// Through the relay's mapping.
    Mapped(VolatileSlice<'a>),
    /// Through the fd, at `offset`.
    File {
        /// The client's fd.
        fd: BorrowedFd<'a>,
        /// Offset in the file.
        offset: u64,
        /// Bytes.
        len: usize,
    },
}

impl ClientSpan<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            ClientSpan::Mapped(s) => s.len(),
            ClientSpan::File { len, .. } => *len,
        }
    }

    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part `[at, at + len)` of this span.
    fn part(&self, at: usize, len: usize) -> Option<ClientSpan<'_>> {
        match self {
            ClientSpan::Mapped(s) => s.subslice(at, len).ok().map(ClientSpan::Mapped),
            ClientSpan::File { fd, offset, len: l } => {
                (at.checked_add(len)? <= *l).then(|| ClientSpan::File {
                    fd: *fd,
                    offset: offset + at as u64,
                    len,
                })
            }
        }
    }
}

/// Which way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client memory into the buffers.
    FromClient,
    /// The buffers into client memory.
    ToClient,
}

/// Copies between client memory (`spans`, in order) and `buffers` (in order), which
/// must hold as many bytes as the spans. A file that no longer holds a range gives
/// `Fault`.
pub fn copy(
    spans: &[ClientSpan<'_>],
    buffers: &[VolatileSlice<'_>],
    direction: Direction,
) -> Result<(), DmaError> {
    let total: usize = spans.iter().map(ClientSpan::len).sum();
    if buffers.iter().map(VolatileSlice::len).sum::<usize>() != total {
        return Err(DmaError::Fault);
    }
    let (mut si, mut s_at) = (0usize, 0usize);
    let (mut bi, mut b_at) = (0usize, 0usize);
    while si < spans.len() && bi < buffers.len() {
        let n = (spans[si].len() - s_at).min(buffers[bi].len() - b_at);
        if n > 0 {
            let span = spans[si].part(s_at, n).ok_or(DmaError::Fault)?;
            let buf = buffers[bi].subslice(b_at, n).map_err(|_| DmaError::Fault)?;
            copy_one(&span, &buf, direction)?;
        }
        s_at += n;
        b_at += n;
        if s_at == spans[si].len() {
            si += 1;
            s_at = 0;
        }
        if b_at == buffers[bi].len() {
            bi += 1;
            b_at = 0;
        }
    }
    Ok(())
}

/// Reads client memory into a new buffer.
pub fn read_to_vec(spans: &[ClientSpan<'_>]) -> Result<Vec<u8>, DmaError> {
    let mut data = vec![0u8; spans.iter().map(ClientSpan::len).sum()];
    copy(
        spans,
        &[VolatileSlice::from(&mut data[..])],
        Direction::FromClient,
    )?;
    Ok(data)
}

fn copy_one(
    span: &ClientSpan<'_>,
    buf: &VolatileSlice<'_>,
    direction: Direction,
) -> Result<(), DmaError> {
    match (span, direction) {
        (ClientSpan::Mapped(m), Direction::FromClient) => m.copy_to_volatile_slice(*buf),
        (ClientSpan::Mapped(m), Direction::ToClient) => buf.copy_to_volatile_slice(*m),
        (ClientSpan::File { fd, offset, .. }, d) => positional(*fd, *offset, buf, d)?,
    }
    Ok(())
}

/// pread into / pwrite from `buf`, retrying short transfers and EINTR; end of file is
/// `Fault`.
fn positional(
    fd: BorrowedFd<'_>,
    offset: u64,
    buf: &VolatileSlice<'_>,
    direction: Direction,
) -> Result<(), DmaError> {
    let guard = buf.ptr_guard_mut();
    let base = guard.as_ptr();
    let mut done = 0usize;
    while done < buf.len() {
        let off = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or(DmaError::Fault)?;
        let left = buf.len() - done;
        // SAFETY: [base + done, base + len) lies inside `buf`, valid for the guard's
        // lifetime; the kernel reads or writes exactly `left` bytes there. The memory
        // may be shared with another process; the kernel copy is fine with that.
        let n = unsafe {
            match direction {
                Direction::FromClient => {
                    libc::pread(fd.as_raw_fd(), base.add(done).cast(), left, off)
                }
                Direction::ToClient => {
                    libc::pwrite(fd.as_raw_fd(), base.add(done).cast(), left, off)
                }
            }
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DmaError::Fault);
        }
        if n == 0 {
            return Err(DmaError::Fault);
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping budget: bytes and mappings both bound it; released mappings give
    /// their share back.
    #[test]
    fn mapping_budget() {
        let mut b = Budget {
            bytes: 0,
            count: 0,
            max_bytes: 100,
            max_count: 3,
        };
        assert!(b.reserve(60));
        assert!(!b.reserve(41), "over the bytes");
        assert!(b.reserve(40));
        assert!(b.reserve(0));
        assert!(!b.reserve(0), "over the count");
        b.release(60);
        assert!(b.reserve(60));
        assert!(!b.reserve(u64::MAX), "no overflow");
    }
    use crate::dma::tests::memfd;
    use std::os::fd::AsFd;

    fn seal_shrink(fd: &std::os::fd::OwnedFd) {
        // SAFETY: F_ADD_SEALS on our own memfd.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
    }

    /// Proves that only sealed memfds are mapped, and that both ways of reaching client
    /// memory copy the same bytes across buffer boundaries that do not line up with the
    /// spans'.
    #[test]
    fn mapped_and_positional_spans_copy_alike() {
        let sealed = memfd(8192);
        seal_shrink(&sealed);
        let plain = memfd(8192);
        assert!(ClientMapping::new(plain.as_fd(), 0, 8192, true, true).is_none());
        let map = ClientMapping::new(sealed.as_fd(), 4096, 4096, true, true).expect("mapped");
        let pattern: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let spans = [
            ClientSpan::Mapped(map.slice(10, 100).unwrap()),
            ClientSpan::File {
                fd: plain.as_fd(),
                offset: 4000,
                len: 200,
            },
        ];
        let mut src = pattern.clone();
        let (a, b) = src.split_at_mut(33);
        copy(
            &spans,
            &[VolatileSlice::from(a), VolatileSlice::from(b)],
            Direction::ToClient,
        )
        .unwrap();
        let mut back = vec![0u8; 300];
        let (a, b) = back.split_at_mut(250);
        copy(
            &spans,
            &[VolatileSlice::from(a), VolatileSlice::from(b)],
            Direction::FromClient,
        )
        .unwrap();
        assert_eq!(back, pattern);
        // The mapping is of offset 4096 of the file: the bytes are really there.
        let mut in_file = vec![0u8; 100];
        vfu_proto::mem::read_exact_at(sealed.as_fd(), &mut in_file, 4096 + 10).unwrap();
        assert_eq!(in_file, pattern[..100]);
    }

    /// Proves that a length mismatch and a file cut short are faults, not crashes.
    #[test]
    fn short_files_and_mismatched_buffers_fault() {
        let plain = memfd(8192);
        let spans = [ClientSpan::File {
            fd: plain.as_fd(),
            offset: 8000,
            len: 100,
        }];
        let mut buf = [0u8; 100];
        assert_eq!(
            copy(
                &spans,
                &[VolatileSlice::from(&mut buf[..50])],
                Direction::FromClient
            ),
            Err(DmaError::Fault)
        );
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(plain.as_raw_fd(), 4096) }, 0);
        assert_eq!(
            copy(
                &spans,
                &[VolatileSlice::from(&mut buf[..])],
                Direction::FromClient
            ),
            Err(DmaError::Fault)
        );
    }
}
