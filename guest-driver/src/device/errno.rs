//! Errors of the device API: positive Linux errno values, as a vfio-user error reply
//! carries them.

/// A positive errno (`libc::EINVAL`, ...), the error of every device API call; the
/// server puts it in the error reply.
pub type Errno = u32;

/// Invalid argument: bad index, offset, width or count.
pub const EINVAL: Errno = libc::EINVAL as Errno;
/// No such entry: DMA_UNMAP of a range that is not mapped.
pub const ENOENT: Errno = libc::ENOENT as Errno;
/// Already exists: DMA_MAP over a mapped range.
pub const EEXIST: Errno = libc::EEXIST as Errno;
/// No space: the DMA map table is full.
pub const ENOSPC: Errno = libc::ENOSPC as Errno;
/// Operation not supported (DEVICE_FEATURE, migration).
pub const EOPNOTSUPP: Errno = libc::EOPNOTSUPP as Errno;
/// I/O error: a device model failed an access.
pub const EIO: Errno = libc::EIO as Errno;
/// Bad address: a DMA access outside the client's maps, without the permission it
/// needs, or that the client (or the relay) failed.
pub const EFAULT: Errno = libc::EFAULT as Errno;
/// Protocol not supported: a migration stream of a version this library does not read.
pub const EPROTONOSUPPORT: Errno = libc::EPROTONOSUPPORT as Errno;
/// No such device: a migration stream saved from a device of other PCI IDs.
pub const ENODEV: Errno = libc::ENODEV as Errno;
/// File too large: a migration stream over the size the library buffers.
pub const EFBIG: Errno = libc::EFBIG as Errno;
/// Argument list too long: a DMA_LOGGING_REPORT bitmap over the largest transfer.
pub const E2BIG: Errno = libc::E2BIG as Errno;
/// Busy: DMA_LOGGING_START while logging runs.
pub const EBUSY: Errno = libc::EBUSY as Errno;
