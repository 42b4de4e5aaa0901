//! Why a tunnel message was rejected.

use thiserror::Error;

use crate::vfio_user::DecodeError;
use crate::wire::Truncated;

/// A tunnel message that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[allow(missing_docs)] // variant fields are named in the error message
pub enum TunnelError {
    /// The message ended before a field.
    #[error("tunnel message truncated: {0}")]
    Truncated(#[from] Truncated),
    /// The header's `len` disagrees with the bytes present.
    #[error("header says {len} body bytes, {actual} present")]
    LengthMismatch { len: u32, actual: usize },
    /// The message is larger than the receiver accepts.
    #[error("tunnel message of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Reserved flag bits are set.
    #[error("reserved header flags {flags:#x}")]
    ReservedFlags { flags: u16 },
    /// A kind this implementation does not know (answer with ENOSYS).
    #[error("unknown message kind {kind:#x}")]
    UnknownKind { kind: u16 },
    /// A kind that has no reply form was marked REPLY, or the reverse.
    #[error("kind {kind:#x} does not take the REPLY flag {reply}")]
    BadReplyFlag { kind: u16, reply: bool },
    /// A field holds a value the spec does not allow.
    #[error("{field}: invalid value {value:#x}")]
    InvalidField { field: &'static str, value: u64 },
    /// Bytes follow the last field of a fixed-size body.
    #[error("{extra} unexpected trailing bytes")]
    TrailingBytes { extra: usize },
    /// The vfio-user message inside a VFIO_USER body is not framed correctly.
    #[error("embedded vfio-user message: {0}")]
    VfioUser(DecodeError),
}

impl TunnelError {
    /// The errno to put in an ERROR message or reply about this rejection.
    pub fn errno(&self) -> u32 {
        let e = match self {
            TunnelError::UnknownKind { .. } => libc::ENOSYS,
            TunnelError::TooLarge { .. } => libc::E2BIG,
            TunnelError::VfioUser(e) => return e.errno(),
            _ => libc::EINVAL,
        };
        e as u32
    }
}
