//! The 16-byte header that starts every vfio-user message.
//!
//! ```text
//! offset size field
//!      0    2 message ID     (chosen by the sender of a command, echoed in its reply)
//!      2    2 command
//!      4    4 message size   (header included)
//!      8    4 flags          (bits 0-3 type: 0 command, 1 reply; bit 4 NO_REPLY; bit 5 ERROR)
//!     12    4 error          (errno, meaningful in a reply with ERROR set)
//! ```

use crate::wire::{Reader, Writer};

use super::error::DecodeError;

/// Size of the vfio-user message header in bytes.
pub const HEADER_SIZE: usize = 16;

const TYPE_MASK: u32 = 0xf;
const TYPE_COMMAND: u32 = 0;
const TYPE_REPLY: u32 = 1;
const FLAG_NO_REPLY: u32 = 1 << 4;
const FLAG_ERROR: u32 = 1 << 5;
const KNOWN_FLAGS: u32 = TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;

/// Whether a message is a command or the reply to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// A request: the receiver must reply unless `no_reply` is set.
    Command,
    /// The answer to the command with the same message ID.
    Reply,
}

/// A decoded, validated message header.
///
/// `command` stays a raw number so that a server can answer an unknown command with an
/// error reply that echoes it; [`super::Command::try_from`] names the known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Message ID; a reply carries the ID of its command.
    pub msg_id: u16,
    /// Command number.
    pub command: u16,
    /// Total message size, header included (at least [`HEADER_SIZE`]).
    pub size: u32,
    /// Command or reply.
    pub msg_type: MessageType,
    /// The sender does not want a reply (commands only).
    pub no_reply: bool,
    /// The reply reports a failure: `error` holds the errno and there is no payload.
    pub error: Option<u32>,
}

impl Header {
    /// A command header for a payload of `payload_len` bytes.
    pub fn command(msg_id: u16, command: u16, payload_len: usize) -> Self {
        Self {
            msg_id,
            command,
            size: message_size(payload_len),
            msg_type: MessageType::Command,
            no_reply: false,
            error: None,
        }
    }

    /// A successful reply to `request` with a payload of `payload_len` bytes.
    pub fn reply_to(request: &Header, payload_len: usize) -> Self {
        Self {
            msg_id: request.msg_id,
            command: request.command,
            size: message_size(payload_len),
            msg_type: MessageType::Reply,
            no_reply: false,
            error: None,
        }
    }

    /// An error reply (header only) to `request` carrying `errno`.
    pub fn error_reply_to(request: &Header, errno: u32) -> Self {
        Self {
            msg_id: request.msg_id,
            command: request.command,
            size: HEADER_SIZE as u32,
            msg_type: MessageType::Reply,
            no_reply: false,
            error: Some(errno),
        }
    }

    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }

    /// Decodes and validates a header.
    ///
    /// Rejects a size smaller than the header, an unknown message type, unknown flag bits,
    /// NO_REPLY on a reply and ERROR on a command. A non-zero error field without the ERROR
    /// flag is ignored, as the spec gives it meaning only with the flag.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let msg_id = r.u16()?;
        let command = r.u16()?;
        let size = r.u32()?;
        let flags = r.u32()?;
        let error = r.u32()?;
        if (size as usize) < HEADER_SIZE {
            return Err(DecodeError::SizeTooSmall { size });
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags { flags });
        }
        let msg_type = match flags & TYPE_MASK {
            TYPE_COMMAND => MessageType::Command,
            TYPE_REPLY => MessageType::Reply,
            other => return Err(DecodeError::BadMessageType { value: other }),
        };
        let no_reply = flags & FLAG_NO_REPLY != 0;
        let is_error = flags & FLAG_ERROR != 0;
        match msg_type {
            MessageType::Reply if no_reply => return Err(DecodeError::UnknownFlags { flags }),
            MessageType::Command if is_error => return Err(DecodeError::UnknownFlags { flags }),
            _ => {}
        }
        Ok(Self {
            msg_id,
            command,
            size,
            msg_type,
            no_reply,
            error: is_error.then_some(error),
        })
    }

    /// Appends the 16 header bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut flags = match self.msg_type {
            MessageType::Command => TYPE_COMMAND,
            MessageType::Reply => TYPE_REPLY,
        };
        if self.no_reply {
            flags |= FLAG_NO_REPLY;
        }
        if self.error.is_some() {
            flags |= FLAG_ERROR;
        }
        out.put_u16(self.msg_id);
        out.put_u16(self.command);
        out.put_u32(self.size);
        out.put_u32(flags);
        out.put_u32(self.error.unwrap_or(0));
    }

    /// The header as an array.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut v = Vec::with_capacity(HEADER_SIZE);
        self.encode(&mut v);
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(&v);
        out
    }
}

/// The `size` field for a payload of `payload_len` bytes, saturating (an encoder never
/// builds a message that large; the transport refuses to send it).
fn message_size(payload_len: usize) -> u32 {
    u32::try_from(payload_len.saturating_add(HEADER_SIZE)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header built by hand from the spec's table decodes to the expected fields.
    #[test]
    fn golden_command_header() {
        // msg_id 0x1234, command 9 (REGION_READ), size 32, flags: command + NO_REPLY.
        let bytes = [
            0x34, 0x12, 0x09, 0x00, 0x20, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0, 0, 0, 0,
        ];
        let h = Header::decode(&bytes).unwrap();
        assert_eq!(h.msg_id, 0x1234);
        assert_eq!(h.command, 9);
        assert_eq!(h.size, 32);
        assert_eq!(h.msg_type, MessageType::Command);
        assert!(h.no_reply);
        assert_eq!(h.error, None);
        assert_eq!(h.to_bytes(), bytes);
    }

    /// An error reply sets type 1 and bit 5 and carries the errno.
    #[test]
    fn golden_error_reply() {
        let bytes = [
            0x07, 0x00, 0x05, 0x00, 0x10, 0x00, 0x00, 0x00, 0x21, 0x00, 0x00, 0x00, 0x16, 0, 0, 0,
        ];
        let h = Header::decode(&bytes).unwrap();
        assert_eq!(h.msg_type, MessageType::Reply);
        assert_eq!(h.error, Some(22));
        let req = Header::command(7, 5, 0);
        assert_eq!(Header::error_reply_to(&req, 22).to_bytes(), bytes);
    }

    /// Sizes below 16, unknown types and unknown flag bits are rejected.
    #[test]
    fn rejects_bad_headers() {
        let mut b = Header::command(1, 1, 0).to_bytes();
        b[4] = 15;
        assert!(matches!(
            Header::decode(&b),
            Err(DecodeError::SizeTooSmall { size: 15 })
        ));
        let mut b = Header::command(1, 1, 0).to_bytes();
        b[8] = 2;
        assert!(matches!(
            Header::decode(&b),
            Err(DecodeError::BadMessageType { value: 2 })
        ));
        let mut b = Header::command(1, 1, 0).to_bytes();
        b[9] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(DecodeError::UnknownFlags { .. })
        ));
        assert!(Header::decode(&b[..15]).is_err());
    }
}
