//! Tunnel message bodies (`docs/tunnel.md`, sections 6.2 to 7).

use crate::vfio_user::{Header, HEADER_SIZE};
use crate::wire::{Reader, Writer};

use super::{Kind, TunnelError, TunnelHeader, TUNNEL_HEADER_SIZE};

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_NAME: usize = 64;
/// Most segments in one DMA_READ or DMA_WRITE.
pub const MAX_DMA_SEGMENTS: usize = 64;
/// Longest ERROR text, in bytes.
pub const MAX_ERROR_TEXT: usize = 256;
/// Size of one fd slot.
const SLOT_SIZE: usize = 16;

/// HELLO request: what the driver offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol major version.
    pub version_major: u16,
    /// Protocol minor version.
    pub version_minor: u16,
    /// Queue pairs the driver set up (>= 1).
    pub queue_pairs: u16,
    /// Largest message the driver accepts (>= 4096).
    pub max_msg_size: u32,
    /// Features the driver supports.
    pub features: u64,
}

/// HELLO reply: what is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// 0 or an errno.
    pub status: u32,
    /// Protocol major version.
    pub version_major: u16,
    /// Protocol minor version.
    pub version_minor: u16,
    /// Queue pairs the device uses.
    pub queue_pairs: u16,
    /// Largest message the device accepts.
    pub max_msg_size: u32,
    /// Features in force.
    pub features: u64,
    /// Size of shared memory region 0; 0 if there is none.
    pub shm_size: u64,
}

/// IRQ: raise vectors `start .. start + count` of interrupt index `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqTrigger {
    /// vfio-user interrupt index (INTx 0 ... REQ 4).
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors (>= 1).
    pub count: u32,
}

/// One IOVA range of a copy-path request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSegment {
    /// Client IO virtual address.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What replaces one file descriptor of a vfio-user message (`docs/tunnel.md`, 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SlotType {
    /// DMA_MAP: a window in shared memory region 0 at offset `value`.
    DmaWindow = 1,
    /// SET_IRQS: an eventfd the relay keeps.
    EventFd = 2,
    /// REGION_IO_FDS reply: an ioeventfd the relay creates; `value` is the doorbell id.
    IoEventFd = 3,
    /// REGION_INFO reply: device-VM memory at guest-physical address `value`.
    GuestMemory = 4,
}

/// Slot flag: the window is readable.
pub const SLOT_READ: u32 = 1 << 0;
/// Slot flag: the window is writable.
pub const SLOT_WRITE: u32 = 1 << 1;

/// One fd slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// What the slot stands for.
    pub slot_type: SlotType,
    /// `SLOT_READ` / `SLOT_WRITE` for windows, 0 otherwise.
    pub flags: u32,
    /// Meaning depends on the type.
    pub value: u64,
}

impl Slot {
    /// A window slot at `offset` with the client's permissions.
    pub fn window(offset: u64, read: bool, write: bool) -> Self {
        let mut flags = 0;
        if read {
            flags |= SLOT_READ;
        }
        if write {
            flags |= SLOT_WRITE;
        }
        Self {
            slot_type: SlotType::DmaWindow,
            flags,
            value: offset,
        }
    }

    /// An eventfd slot.
    pub fn eventfd() -> Self {
        Self {
            slot_type: SlotType::EventFd,
            flags: 0,
            value: 0,
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, TunnelError> {
        let raw_type = r.u32()?;
        let flags = r.u32()?;
        let value = r.u64()?;
        let slot_type = match raw_type {
            1 => SlotType::DmaWindow,
            2 => SlotType::EventFd,
            3 => SlotType::IoEventFd,
            4 => SlotType::GuestMemory,
            _ => {
                return Err(TunnelError::InvalidField {
                    field: "slot type",
                    value: raw_type.into(),
                })
            }
        };
        let allowed = match slot_type {
            SlotType::DmaWindow => SLOT_READ | SLOT_WRITE,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(TunnelError::InvalidField {
                field: "slot flags",
                value: flags.into(),
            });
        }
        Ok(Self {
            slot_type,
            flags,
            value,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.slot_type as u32);
        out.put_u32(self.flags);
        out.put_u64(self.value);
    }
}

/// A vfio-user message inside the tunnel: framed and header-checked, payload not yet
/// decoded, fds replaced by slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioUserFrame {
    /// The vfio-user header; `header.size` is `16 + payload.len()`.
    pub header: Header,
    /// The vfio-user payload.
    pub payload: Vec<u8>,
    /// One slot per fd of the message on a socket.
    pub slots: Vec<Slot>,
}

/// The body of a tunnel message; the variant fixes the kind and the REPLY flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// VFIO_USER.
    VfioUser(VfioUserFrame),
    /// HELLO request.
    Hello(Hello),
    /// HELLO reply.
    HelloReply(HelloReply),
    /// CHANNEL_UP request with the device name.
    ChannelUp {
        /// Device name, 1 to 64 bytes of UTF-8 without NUL.
        name: String,
    },
    /// CHANNEL_DOWN request.
    ChannelDown,
    /// SESSION_START request.
    SessionStart,
    /// SESSION_END request.
    SessionEnd,
    /// IRQ (no reply).
    Irq(IrqTrigger),
    /// DMA_READ request.
    DmaRead {
        /// Ranges to read, 1 to 64.
        segments: Vec<DmaSegment>,
    },
    /// DMA_READ reply; `data` is empty unless `status` is 0.
    DmaReadReply {
        /// 0 or an errno.
        status: u32,
        /// The bytes of all segments, in order.
        data: Vec<u8>,
    },
    /// DMA_WRITE request.
    DmaWrite {
        /// Ranges to write, 1 to 64.
        segments: Vec<DmaSegment>,
        /// The bytes for all segments, in order.
        data: Vec<u8>,
    },
    /// DOORBELL (no reply).
    Doorbell {
        /// Doorbell id from the IOEVENTFD slot.
        id: u64,
        /// Signals since the last DOORBELL.
        count: u64,
    },
    /// POSTED_DONE (no reply): the driver carried out every posted vfio-user request
    /// of the channel up to and including the one with this (relay-assigned) message ID.
    PostedDone {
        /// The vfio-user message ID of the last posted request carried out.
        msg_id: u16,
    },
    /// ERROR (no reply).
    Error {
        /// The errno.
        errno: u32,
        /// Up to 256 bytes of UTF-8.
        text: String,
    },
    /// A reply that is only a status: to CHANNEL_UP, CHANNEL_DOWN, SESSION_START,
    /// SESSION_END, DMA_WRITE, or (with ENOSYS) to a request of unknown kind.
    Status {
        /// Kind of the request answered (raw, to answer unknown kinds).
        kind: u16,
        /// 0 or an errno.
        status: u32,
    },
}

impl Body {
    /// Roughly how many bytes the encoded body takes: exact enough for the bulk data
    /// to be written without growing the buffer.
    fn size_hint(&self) -> usize {
        64 + match self {
            Body::VfioUser(f) => f.payload.len() + 16 * f.slots.len(),
            Body::DmaRead { segments } => 16 * segments.len(),
            Body::DmaReadReply { data, .. } => data.len(),
            Body::DmaWrite { segments, data } => 16 * segments.len() + data.len(),
            Body::Error { text, .. } => text.len(),
            _ => 0,
        }
    }

    /// The kind number and REPLY flag this body is sent with.
    pub fn kind(&self) -> (u16, bool) {
        let (k, reply) = match self {
            Body::VfioUser(_) => (Kind::VfioUser, false),
            Body::Hello(_) => (Kind::Hello, false),
            Body::HelloReply(_) => (Kind::Hello, true),
            Body::ChannelUp { .. } => (Kind::ChannelUp, false),
            Body::ChannelDown => (Kind::ChannelDown, false),
            Body::SessionStart => (Kind::SessionStart, false),
            Body::SessionEnd => (Kind::SessionEnd, false),
            Body::Irq(_) => (Kind::Irq, false),
            Body::DmaRead { .. } => (Kind::DmaRead, false),
            Body::DmaReadReply { .. } => (Kind::DmaRead, true),
            Body::DmaWrite { .. } => (Kind::DmaWrite, false),
            Body::Doorbell { .. } => (Kind::Doorbell, false),
            Body::PostedDone { .. } => (Kind::PostedDone, false),
            Body::Error { .. } => (Kind::Error, false),
            Body::Status { kind, .. } => return (*kind, true),
        };
        (k as u16, reply)
    }
}

/// A whole tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelMessage {
    /// Channel; 0 for the tunnel itself.
    pub channel: u32,
    /// Request ID (0 for kinds without a reply).
    pub tag: u32,
    /// The body.
    pub body: Body,
}

impl TunnelMessage {
    /// A message on `channel` with tag 0.
    pub fn new(channel: u32, body: Body) -> Self {
        Self {
            channel,
            tag: 0,
            body,
        }
    }

    /// Encodes header and body. The body is written once, straight after the header,
    /// whose length field is filled in last.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TUNNEL_HEADER_SIZE + self.body.size_hint());
        out.resize(TUNNEL_HEADER_SIZE, 0);
        encode_body(&self.body, &mut out);
        let (kind, reply) = self.body.kind();
        let header = TunnelHeader {
            len: u32::try_from(out.len() - TUNNEL_HEADER_SIZE).unwrap_or(u32::MAX),
            channel: self.channel,
            kind,
            reply,
            tag: self.tag,
        };
        out[..TUNNEL_HEADER_SIZE].copy_from_slice(&header.to_bytes());
        out
    }

    /// Decodes one complete message of at most `max_msg_size` bytes.
    pub fn decode(bytes: &[u8], max_msg_size: usize) -> Result<Self, TunnelError> {
        if bytes.len() > max_msg_size {
            return Err(TunnelError::TooLarge {
                size: bytes.len(),
                limit: max_msg_size,
            });
        }
        let header = TunnelHeader::decode(bytes)?;
        let body_bytes = &bytes[TUNNEL_HEADER_SIZE..];
        if header.len as usize != body_bytes.len() {
            return Err(TunnelError::LengthMismatch {
                len: header.len,
                actual: body_bytes.len(),
            });
        }
        Self::decode_body(&header, body_bytes)
    }

    /// Decodes the body of a message whose header was already decoded.
    pub fn decode_body(header: &TunnelHeader, body: &[u8]) -> Result<Self, TunnelError> {
        let body = decode_body(header, body)?;
        Ok(Self {
            channel: header.channel,
            tag: header.tag,
            body,
        })
    }
}

fn decode_body(header: &TunnelHeader, bytes: &[u8]) -> Result<Body, TunnelError> {
    let mut r = Reader::new(bytes);
    let Some(kind) = Kind::from_u16(header.kind) else {
        if header.reply {
            // A peer's answer (ENOSYS) to a kind we sent and it did not know.
            let status = r.u32()?;
            reserved_u32(&mut r)?;
            end(&r)?;
            return Ok(Body::Status {
                kind: header.kind,
                status,
            });
        }
        return Err(TunnelError::UnknownKind { kind: header.kind });
    };
    if header.reply && !kind.has_reply() {
        return Err(TunnelError::BadReplyFlag {
            kind: header.kind,
            reply: true,
        });
    }
    let body = match (kind, header.reply) {
        (Kind::VfioUser, _) => Body::VfioUser(decode_vfio_user(&mut r)?),
        (Kind::Hello, false) => {
            let version_major = r.u16()?;
            let version_minor = r.u16()?;
            let queue_pairs = r.u16()?;
            reserved_u16(&mut r)?;
            let max_msg_size = r.u32()?;
            reserved_u32(&mut r)?;
            let features = r.u64()?;
            check_pairs_and_size(queue_pairs, max_msg_size)?;
            Body::Hello(Hello {
                version_major,
                version_minor,
                queue_pairs,
                max_msg_size,
                features,
            })
        }
        (Kind::Hello, true) => {
            let status = r.u32()?;
            let version_major = r.u16()?;
            let version_minor = r.u16()?;
            let queue_pairs = r.u16()?;
            reserved_u16(&mut r)?;
            let max_msg_size = r.u32()?;
            let features = r.u64()?;
            let shm_size = r.u64()?;
            if status == 0 {
                check_pairs_and_size(queue_pairs, max_msg_size)?;
            }
            Body::HelloReply(HelloReply {
                status,
                version_major,
                version_minor,
                queue_pairs,
                max_msg_size,
                features,
                shm_size,
            })
        }
        (Kind::ChannelUp, false) => {
            let len = r.u16()? as usize;
            reserved_u16(&mut r)?;
            let raw = r.bytes(len)?;
            Body::ChannelUp {
                name: decode_name(raw)?,
            }
        }
        (Kind::ChannelDown, false) => Body::ChannelDown,
        (Kind::SessionStart, false) => Body::SessionStart,
        (Kind::SessionEnd, false) => Body::SessionEnd,
        (Kind::Irq, _) => {
            let index = r.u32()?;
            let start = r.u32()?;
            let count = r.u32()?;
            reserved_u32(&mut r)?;
            if count == 0 {
                return Err(TunnelError::InvalidField {
                    field: "irq count",
                    value: 0,
                });
            }
            Body::Irq(IrqTrigger {
                index,
                start,
                count,
            })
        }
        (Kind::DmaRead, false) => {
            let segments = decode_segments(&mut r)?;
            Body::DmaRead { segments }
        }
        (Kind::DmaRead, true) => {
            let status = r.u32()?;
            reserved_u32(&mut r)?;
            let data = r.rest().to_vec();
            if status != 0 && !data.is_empty() {
                return Err(TunnelError::TrailingBytes { extra: data.len() });
            }
            Body::DmaReadReply { status, data }
        }
        (Kind::DmaWrite, false) => {
            let segments = decode_segments(&mut r)?;
            let total = segments_total(&segments)?;
            let data = r.rest();
            if data.len() as u64 != total {
                return Err(TunnelError::InvalidField {
                    field: "dma write data length",
                    value: data.len() as u64,
                });
            }
            Body::DmaWrite {
                segments,
                data: data.to_vec(),
            }
        }
        (Kind::Doorbell, _) => Body::Doorbell {
            id: r.u64()?,
            count: r.u64()?,
        },
        (Kind::PostedDone, _) => {
            let msg_id = r.u16()?;
            match r.u16()? {
                0 => reserved_u32(&mut r)?,
                v => {
                    return Err(TunnelError::InvalidField {
                        field: "reserved",
                        value: v.into(),
                    })
                }
            }
            Body::PostedDone { msg_id }
        }
        (Kind::Error, _) => {
            let errno = r.u32()?;
            reserved_u32(&mut r)?;
            let raw = r.rest();
            if raw.len() > MAX_ERROR_TEXT {
                return Err(TunnelError::InvalidField {
                    field: "error text length",
                    value: raw.len() as u64,
                });
            }
            let text = std::str::from_utf8(raw)
                .map_err(|e| TunnelError::InvalidField {
                    field: "error text (UTF-8)",
                    value: e.valid_up_to() as u64,
                })?
                .to_owned();
            Body::Error { errno, text }
        }
        (
            Kind::ChannelUp
            | Kind::ChannelDown
            | Kind::SessionStart
            | Kind::SessionEnd
            | Kind::DmaWrite,
            true,
        ) => {
            let status = r.u32()?;
            reserved_u32(&mut r)?;
            Body::Status {
                kind: header.kind,
                status,
            }
        }
    };
    end(&r)?;
    Ok(body)
}

fn decode_vfio_user(r: &mut Reader<'_>) -> Result<VfioUserFrame, TunnelError> {
    let header_bytes = r.bytes(HEADER_SIZE)?;
    let header = Header::decode(header_bytes).map_err(TunnelError::VfioUser)?;
    let payload = r.bytes(header.payload_len())?.to_vec();
    let rest = r.remaining();
    if rest % SLOT_SIZE != 0 {
        return Err(TunnelError::TrailingBytes {
            extra: rest % SLOT_SIZE,
        });
    }
    let mut slots = Vec::with_capacity(rest / SLOT_SIZE);
    while r.remaining() > 0 {
        slots.push(Slot::decode(r)?);
    }
    Ok(VfioUserFrame {
        header,
        payload,
        slots,
    })
}

fn decode_segments(r: &mut Reader<'_>) -> Result<Vec<DmaSegment>, TunnelError> {
    let n = r.u32()? as usize;
    reserved_u32(r)?;
    if n == 0 || n > MAX_DMA_SEGMENTS {
        return Err(TunnelError::InvalidField {
            field: "nsegs",
            value: n as u64,
        });
    }
    // The count is bounded above, and each segment is read through the bounded reader.
    let mut segments = Vec::with_capacity(n);
    for _ in 0..n {
        let iova = r.u64()?;
        let len = r.u64()?;
        if len == 0 || iova.checked_add(len).is_none() {
            return Err(TunnelError::InvalidField {
                field: "segment length",
                value: len,
            });
        }
        segments.push(DmaSegment { iova, len });
    }
    segments_total(&segments)?;
    Ok(segments)
}

/// Decodes the start of a DMA_READ or DMA_WRITE request body: its segments, and the
/// offset in the body where a DMA_WRITE's data begins. `body` may stop there: this is
/// for receivers that leave the data where it lies (tunnel feature `DIRECT_DATA`).
pub fn decode_dma_request_head(body: &[u8]) -> Result<(Vec<DmaSegment>, usize), TunnelError> {
    let mut r = Reader::new(body);
    let segments = decode_segments(&mut r)?;
    Ok((segments, r.position()))
}

/// Encodes the header and the segments of a DMA_WRITE request that carries `data_len`
/// bytes of data; the caller places the data straight after them.
pub fn encode_dma_write_head(
    channel: u32,
    tag: u32,
    segments: &[DmaSegment],
    data_len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(TUNNEL_HEADER_SIZE + 8 + 16 * segments.len());
    out.resize(TUNNEL_HEADER_SIZE, 0);
    encode_segments(segments, &mut out);
    let header = TunnelHeader {
        len: u32::try_from(out.len() - TUNNEL_HEADER_SIZE + data_len).unwrap_or(u32::MAX),
        channel,
        kind: Kind::DmaWrite as u16,
        reply: false,
        tag,
    };
    out[..TUNNEL_HEADER_SIZE].copy_from_slice(&header.to_bytes());
    out
}

/// Bytes before the data of a reply: the tunnel header, `le32 status`, `le32 reserved`.
pub const REPLY_HEAD_SIZE: usize = TUNNEL_HEADER_SIZE + 8;

/// Encodes the header and status of a reply of `kind` followed by `data_len` bytes of
/// data (a DMA_READ reply's), which the caller places straight after it.
pub fn encode_reply_head(
    channel: u32,
    tag: u32,
    kind: Kind,
    status: u32,
    data_len: usize,
) -> [u8; REPLY_HEAD_SIZE] {
    let header = TunnelHeader {
        len: u32::try_from(8 + data_len).unwrap_or(u32::MAX),
        channel,
        kind: kind as u16,
        reply: true,
        tag,
    };
    let mut out = [0u8; REPLY_HEAD_SIZE];
    out[..TUNNEL_HEADER_SIZE].copy_from_slice(&header.to_bytes());
    out[TUNNEL_HEADER_SIZE..TUNNEL_HEADER_SIZE + 4].copy_from_slice(&status.to_le_bytes());
    out
}

/// Sum of the segment lengths, refusing overflow.
pub(crate) fn segments_total(segments: &[DmaSegment]) -> Result<u64, TunnelError> {
    segments
        .iter()
        .try_fold(0u64, |acc, s| acc.checked_add(s.len))
        .ok_or(TunnelError::InvalidField {
            field: "total segment length",
            value: u64::MAX,
        })
}

fn decode_name(raw: &[u8]) -> Result<String, TunnelError> {
    if raw.is_empty() || raw.len() > MAX_CHANNEL_NAME || raw.contains(&0) {
        return Err(TunnelError::InvalidField {
            field: "channel name length",
            value: raw.len() as u64,
        });
    }
    std::str::from_utf8(raw)
        .map(str::to_owned)
        .map_err(|e| TunnelError::InvalidField {
            field: "channel name (UTF-8)",
            value: e.valid_up_to() as u64,
        })
}

fn check_pairs_and_size(queue_pairs: u16, max_msg_size: u32) -> Result<(), TunnelError> {
    if queue_pairs == 0 {
        return Err(TunnelError::InvalidField {
            field: "queue_pairs",
            value: 0,
        });
    }
    if max_msg_size < super::MIN_MSG_SIZE {
        return Err(TunnelError::InvalidField {
            field: "max_msg_size",
            value: max_msg_size.into(),
        });
    }
    Ok(())
}

fn reserved_u16(r: &mut Reader<'_>) -> Result<(), TunnelError> {
    match r.u16()? {
        0 => Ok(()),
        v => Err(TunnelError::InvalidField {
            field: "reserved",
            value: v.into(),
        }),
    }
}

fn reserved_u32(r: &mut Reader<'_>) -> Result<(), TunnelError> {
    match r.u32()? {
        0 => Ok(()),
        v => Err(TunnelError::InvalidField {
            field: "reserved",
            value: v.into(),
        }),
    }
}

fn end(r: &Reader<'_>) -> Result<(), TunnelError> {
    match r.remaining() {
        0 => Ok(()),
        extra => Err(TunnelError::TrailingBytes { extra }),
    }
}

fn encode_body(body: &Body, out: &mut Vec<u8>) {
    match body {
        Body::VfioUser(f) => {
            f.header.encode(out);
            out.put_bytes(&f.payload);
            for s in &f.slots {
                s.encode(out);
            }
        }
        Body::Hello(h) => {
            out.put_u16(h.version_major);
            out.put_u16(h.version_minor);
            out.put_u16(h.queue_pairs);
            out.put_u16(0);
            out.put_u32(h.max_msg_size);
            out.put_u32(0);
            out.put_u64(h.features);
        }
        Body::HelloReply(h) => {
            out.put_u32(h.status);
            out.put_u16(h.version_major);
            out.put_u16(h.version_minor);
            out.put_u16(h.queue_pairs);
            out.put_u16(0);
            out.put_u32(h.max_msg_size);
            out.put_u64(h.features);
            out.put_u64(h.shm_size);
        }
        Body::ChannelUp { name } => {
            out.put_u16(name.len() as u16);
            out.put_u16(0);
            out.put_bytes(name.as_bytes());
        }
        Body::ChannelDown | Body::SessionStart | Body::SessionEnd => {}
        Body::Irq(t) => {
            out.put_u32(t.index);
            out.put_u32(t.start);
            out.put_u32(t.count);
            out.put_u32(0);
        }
        Body::DmaRead { segments } => encode_segments(segments, out),
        Body::DmaReadReply { status, data } => {
            out.put_u32(*status);
            out.put_u32(0);
            out.put_bytes(data);
        }
        Body::DmaWrite { segments, data } => {
            encode_segments(segments, out);
            out.put_bytes(data);
        }
        Body::Doorbell { id, count } => {
            out.put_u64(*id);
            out.put_u64(*count);
        }
        Body::PostedDone { msg_id } => {
            out.put_u16(*msg_id);
            out.put_u16(0);
            out.put_u32(0);
        }
        Body::Error { errno, text } => {
            out.put_u32(*errno);
            out.put_u32(0);
            out.put_bytes(text.as_bytes());
        }
        Body::Status { status, .. } => {
            out.put_u32(*status);
            out.put_u32(0);
        }
    }
}

fn encode_segments(segments: &[DmaSegment], out: &mut Vec<u8>) {
    out.put_u32(segments.len() as u32);
    out.put_u32(0);
    for s in segments {
        out.put_u64(s.iova);
        out.put_u64(s.len);
    }
}

#[cfg(test)]
mod tests;
