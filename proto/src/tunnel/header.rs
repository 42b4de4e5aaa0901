//! The 16-byte tunnel header (`docs/tunnel.md`, section 6.1).

use crate::wire::Reader;

use super::TunnelError;

/// Size of the tunnel header.
pub const TUNNEL_HEADER_SIZE: usize = 16;

/// Flag bit: this message answers the request with the same kind, channel and tag.
pub const FLAG_REPLY: u16 = 1;

/// Message kinds (`docs/tunnel.md`, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// A vfio-user message with its fd slots.
    VfioUser = 1,
    /// Version and feature negotiation.
    Hello = 2,
    /// A device is exported on a channel.
    ChannelUp = 3,
    /// A device is withdrawn.
    ChannelDown = 4,
    /// A client connected.
    SessionStart = 5,
    /// A client disconnected.
    SessionEnd = 6,
    /// The driver raises interrupts.
    Irq = 7,
    /// Copy-path read of client memory.
    DmaRead = 8,
    /// Copy-path write of client memory.
    DmaWrite = 9,
    /// A client signalled an ioeventfd.
    Doorbell = 10,
    /// A protocol violation report.
    Error = 11,
    /// The driver carried out posted vfio-user requests (feature `POSTED_DONE`).
    PostedDone = 12,
}

impl Kind {
    /// The kind with this number, if known.
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::VfioUser,
            2 => Kind::Hello,
            3 => Kind::ChannelUp,
            4 => Kind::ChannelDown,
            5 => Kind::SessionStart,
            6 => Kind::SessionEnd,
            7 => Kind::Irq,
            8 => Kind::DmaRead,
            9 => Kind::DmaWrite,
            10 => Kind::Doorbell,
            11 => Kind::Error,
            12 => Kind::PostedDone,
            _ => return None,
        })
    }

    /// Whether messages of this kind are requests that get a reply.
    pub fn has_reply(self) -> bool {
        !matches!(
            self,
            Kind::VfioUser | Kind::Irq | Kind::Doorbell | Kind::Error | Kind::PostedDone
        )
    }
}

/// A tunnel header. `kind` stays raw so that an unknown kind can be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelHeader {
    /// Bytes of body after the header.
    pub len: u32,
    /// Channel the message concerns; 0 for the tunnel itself.
    pub channel: u32,
    /// Body format.
    pub kind: u16,
    /// Whether this is a reply.
    pub reply: bool,
    /// Request ID, echoed by the reply.
    pub tag: u32,
}

impl TunnelHeader {
    /// Decodes a header and checks its reserved bits. Does not look at the body.
    pub fn decode(bytes: &[u8]) -> Result<Self, TunnelError> {
        let mut r = Reader::new(bytes);
        let len = r.u32()?;
        let channel = r.u32()?;
        let kind = r.u16()?;
        let flags = r.u16()?;
        let tag = r.u32()?;
        if flags & !FLAG_REPLY != 0 {
            return Err(TunnelError::ReservedFlags { flags });
        }
        Ok(Self {
            len,
            channel,
            kind,
            reply: flags & FLAG_REPLY != 0,
            tag,
        })
    }

    /// Appends the 16 header bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// The 16 header bytes.
    pub fn to_bytes(&self) -> [u8; TUNNEL_HEADER_SIZE] {
        let flags = if self.reply { FLAG_REPLY } else { 0 };
        let mut b = [0u8; TUNNEL_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..8].copy_from_slice(&self.channel.to_le_bytes());
        b[8..10].copy_from_slice(&self.kind.to_le_bytes());
        b[10..12].copy_from_slice(&flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    /// Total message size, header included.
    pub fn message_size(&self) -> usize {
        TUNNEL_HEADER_SIZE + self.len as usize
    }
}
