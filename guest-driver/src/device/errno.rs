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
