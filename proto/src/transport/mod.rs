//! Framed vfio-user messages over a UNIX stream socket, with file descriptors passed as
//! SCM_RIGHTS ancillary data.
//!
//! [`MessageReader`] and [`MessageWriter`] keep their progress between calls, so they
//! work the same on a blocking socket (a call returns a whole message) and on a
//! non-blocking one driven by an event loop (a call returns `None` / `false` on
//! `EAGAIN` and picks up where it stopped next time). `EINTR` is retried.
//!
//! File descriptors are owned ([`OwnedFd`](std::os::fd::OwnedFd)) from the moment they
//! are received: a message that is rejected, or dropped, closes them.

pub mod fds;
mod reader;
mod writer;

pub use reader::{Frame, MessageReader, RawMessage, Rejected, READ_BUFFER};
pub use writer::MessageWriter;

use std::io;

use thiserror::Error;

use crate::vfio_user::DecodeError;

/// Largest number of fds the kernel passes in one `sendmsg` (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Limits an endpoint enforces on what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, header included.
    pub max_msg_size: usize,
    /// Most file descriptors accepted with one message.
    pub max_msg_fds: usize,
}

impl Limits {
    /// The spec's defaults: `max_msg_fds` 1 and 1 MiB of data plus room for the headers
    /// of the largest command.
    pub const DEFAULT: Limits = Limits {
        max_msg_size: crate::vfio_user::DEFAULT_MAX_DATA_XFER_SIZE as usize + 4096,
        max_msg_fds: crate::vfio_user::DEFAULT_MAX_MSG_FDS as usize,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A failure of the connection itself: after it the stream cannot be trusted to be in
/// sync, and the caller closes the connection.
#[derive(Debug, Error)]
#[allow(missing_docs)] // variant fields are named in the error message
pub enum TransportError {
    /// The peer closed the connection between two messages.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection after {received} of {expected} bytes of a message")]
    ClosedMidMessage { received: usize, expected: usize },
    /// A header that cannot be framed (its size is below 16 bytes or beyond what can be
    /// skipped): the stream is out of sync.
    #[error("unframeable header: {0}")]
    BadHeader(DecodeError),
    /// The kernel truncated the ancillary data: more fds than the kernel can pass.
    #[error("ancillary data truncated; fds were dropped")]
    FdsTruncated,
    /// A message to send is larger than the peer accepts.
    #[error("outgoing message of {size} bytes exceeds the limit of {limit}")]
    SendTooLarge { size: usize, limit: usize },
    /// An outgoing message carries more fds than the peer accepts.
    #[error("outgoing message carries {count} fds, the limit is {limit}")]
    SendTooManyFds { count: usize, limit: usize },
    /// A system call failed.
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests;
