//! Why a vfio-user message was rejected, and the errno a peer should hear about it.

use thiserror::Error;

use crate::wire::Truncated;

/// A vfio-user message that cannot be accepted.
///
/// Every variant maps to the errno a server replies with ([`DecodeError::errno`]), so a
/// rejected request is answered, never dropped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[allow(missing_docs)] // variant fields are named in the error message
pub enum DecodeError {
    /// The message ended before a field.
    #[error("message truncated: {0}")]
    Truncated(#[from] Truncated),
    /// The header's size field is below the header size.
    #[error("message size {size} is smaller than the 16-byte header")]
    SizeTooSmall { size: u32 },
    /// The message is larger than this endpoint accepts.
    #[error("message size {size} exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The header's type bits are neither command (0) nor reply (1).
    #[error("message type {value} is neither command nor reply")]
    BadMessageType { value: u32 },
    /// Flag bits that the spec does not define, or that contradict the message type.
    #[error("invalid header flags {flags:#x}")]
    UnknownFlags { flags: u32 },
    /// A command number this implementation does not know.
    #[error("unknown command {command}")]
    UnknownCommand { command: u16 },
    /// The message carries more file descriptors than allowed.
    #[error("{count} file descriptors exceed the limit of {limit}")]
    TooManyFds { count: usize, limit: usize },
    /// The number of file descriptors does not match what the command says.
    #[error("command {command} carries {got} file descriptors, expected {expected}")]
    FdCount {
        command: &'static str,
        got: usize,
        expected: usize,
    },
    /// A field holds a value the spec does not allow.
    #[error("{field}: invalid value {value:#x}")]
    InvalidField { field: &'static str, value: u64 },
    /// An argsz or count is inconsistent with the message size.
    #[error("{field} is {value} but the message holds {actual}")]
    LengthMismatch {
        field: &'static str,
        value: u64,
        actual: u64,
    },
    /// Bytes follow the last field of a fixed-size message.
    #[error("{extra} unexpected trailing bytes")]
    TrailingBytes { extra: usize },
    /// The VERSION capabilities are not valid JSON of the expected shape.
    #[error("invalid capabilities: {reason}")]
    BadCapabilities { reason: String },
}

impl DecodeError {
    /// The errno a vfio-user server puts in the error reply for this rejection.
    pub fn errno(&self) -> u32 {
        let e = match self {
            DecodeError::UnknownCommand { .. } => libc::ENOSYS,
            DecodeError::TooLarge { .. } | DecodeError::TooManyFds { .. } => libc::E2BIG,
            DecodeError::BadCapabilities { .. } => libc::EINVAL,
            DecodeError::Truncated(_)
            | DecodeError::SizeTooSmall { .. }
            | DecodeError::BadMessageType { .. }
            | DecodeError::UnknownFlags { .. }
            | DecodeError::FdCount { .. }
            | DecodeError::InvalidField { .. }
            | DecodeError::LengthMismatch { .. }
            | DecodeError::TrailingBytes { .. } => libc::EINVAL,
        };
        e as u32
    }
}
