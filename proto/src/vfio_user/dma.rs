//! DMA_MAP (2), DMA_UNMAP (3), DMA_READ (11) and DMA_WRITE (12).

use super::{check_argsz, DecodeError};
use crate::wire::{Reader, Writer};

/// DMA_MAP flag: readable by the device.
pub const DMA_MAP_READ: u32 = 1 << 0;
/// DMA_MAP flag: writable by the device.
pub const DMA_MAP_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flag (legacy): return a dirty bitmap.
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap every region (address and size 0). The spec calls flags
/// "unused", but QEMU sends this (`VFIO_DMA_UNMAP_FLAG_ALL`).
pub const DMA_UNMAP_ALL: u32 = 1 << 1;

/// DMA_MAP request (32 bytes). The reply has no payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    /// Device may read.
    pub read: bool,
    /// Device may write.
    pub write: bool,
    /// Offset of the region in the fd that comes with the message (0 without fd).
    pub offset: u64,
    /// IOVA of the region.
    pub address: u64,
    /// Size in bytes (> 0, no wrap-around).
    pub size: u64,
}

impl DmaMap {
    /// Payload size.
    pub const SIZE: u32 = 32;

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let offset = r.u64()?;
        let address = r.u64()?;
        let size = r.u64()?;
        check_argsz("DMA_MAP argsz", argsz, Self::SIZE)?;
        if flags & !(DMA_MAP_READ | DMA_MAP_WRITE) != 0 {
            return Err(DecodeError::InvalidField {
                field: "DMA_MAP flags",
                value: flags.into(),
            });
        }
        check_range("DMA_MAP", address, size)?;
        Ok(Self {
            read: flags & DMA_MAP_READ != 0,
            write: flags & DMA_MAP_WRITE != 0,
            offset,
            address,
            size,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(Self::SIZE);
        let mut flags = 0;
        if self.read {
            flags |= DMA_MAP_READ;
        }
        if self.write {
            flags |= DMA_MAP_WRITE;
        }
        out.put_u32(flags);
        out.put_u64(self.offset);
        out.put_u64(self.address);
        out.put_u64(self.size);
    }
}

/// DMA_UNMAP request, and its reply (which echoes the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Maximum reply payload size (>= 24).
    pub argsz: u32,
    /// Unmap every region (`VFIO_DMA_UNMAP_FLAG_ALL`); address and size are 0.
    pub all: bool,
    /// IOVA of the region to unmap.
    pub address: u64,
    /// Its size; must match the map exactly.
    pub size: u64,
}

impl DmaUnmap {
    /// Payload size.
    pub const SIZE: u32 = 24;

    /// An unmap of one region, as a client sends it.
    pub fn region(address: u64, size: u64) -> Self {
        Self {
            argsz: Self::SIZE,
            all: false,
            address,
            size,
        }
    }

    /// An unmap of every region, as QEMU sends it.
    pub fn all() -> Self {
        Self {
            argsz: Self::SIZE,
            all: true,
            address: 0,
            size: 0,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let address = r.u64()?;
        let size = r.u64()?;
        check_argsz("DMA_UNMAP argsz", argsz, Self::SIZE)?;
        // The legacy dirty-bitmap variant was removed from the spec with migration v2;
        // dirty logging goes through DEVICE_FEATURE now.
        if flags & !DMA_UNMAP_ALL != 0 {
            return Err(DecodeError::InvalidField {
                field: "DMA_UNMAP flags",
                value: flags.into(),
            });
        }
        let all = flags & DMA_UNMAP_ALL != 0;
        if all {
            if address != 0 || size != 0 {
                return Err(DecodeError::InvalidField {
                    field: "DMA_UNMAP_ALL address/size",
                    value: address | size,
                });
            }
        } else {
            check_range("DMA_UNMAP", address, size)?;
        }
        Ok(Self {
            argsz,
            all,
            address,
            size,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(if self.all { DMA_UNMAP_ALL } else { 0 });
        out.put_u64(self.address);
        out.put_u64(self.size);
    }
}

fn check_range(what: &'static str, address: u64, size: u64) -> Result<(), DecodeError> {
    if size == 0 || address.checked_add(size - 1).is_none() {
        return Err(DecodeError::InvalidField {
            field: if what == "DMA_MAP" {
                "DMA_MAP size"
            } else {
                "DMA_UNMAP size"
            },
            value: size,
        });
    }
    Ok(())
}

/// Width of the `count` field of DMA_READ / DMA_WRITE.
///
/// The spec and libvfio-user use a u64 (data at payload offset 16). QEMU's client uses
/// a u32 (data at offset 12) and pads its DMA_READ reply with 4 zero bytes at the end.
/// Decoders accept all of these; encoders send what the value says, and endpoints send
/// [`CountWidth::U64`] unless they know the peer is QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CountWidth {
    /// u64 count, as the spec and libvfio-user.
    U64,
    /// u32 count, as QEMU, without padding.
    U32,
    /// u32 count followed, in a DMA_READ reply, by 4 bytes of padding (QEMU's reply).
    U32Padded,
}

impl CountWidth {
    fn header_len(self) -> usize {
        match self {
            CountWidth::U64 => 16,
            CountWidth::U32 | CountWidth::U32Padded => 12,
        }
    }

    fn put_count(self, out: &mut Vec<u8>, count: u64) {
        match self {
            CountWidth::U64 => out.put_u64(count),
            CountWidth::U32 | CountWidth::U32Padded => out.put_u32(count as u32),
        }
    }
}

/// Reads address and count, finding out the count width from how many bytes follow:
/// `data_follows` says whether `count` bytes of data come after the count.
fn decode_addr_count(
    payload: &[u8],
    data_follows: bool,
) -> Result<(u64, u64, CountWidth), DecodeError> {
    let mut r = Reader::new(payload);
    let address = r.u64()?;
    let len = payload.len() as u64;
    let mut count = Reader::new(&payload[8..]);
    if !data_follows {
        // Only the count follows the address: its width is the rest of the payload.
        return match len {
            16 => Ok((address, count.u64()?, CountWidth::U64)),
            12 => Ok((address, count.u32()?.into(), CountWidth::U32)),
            _ => Err(DecodeError::LengthMismatch {
                field: "DMA address/count",
                value: 16,
                actual: len,
            }),
        };
    }
    let c64 = Reader::new(&payload[8..]).u64().ok();
    let c32 = u64::from(count.u32()?);
    // The u64 reading is the spec's; it wins where both readings fit.
    if let Some(c) = c64 {
        if c <= len && len == 16 + c {
            return Ok((address, c, CountWidth::U64));
        }
    }
    if len == 12 + c32 {
        return Ok((address, c32, CountWidth::U32));
    }
    if len == 16 + c32 {
        return Ok((address, c32, CountWidth::U32Padded));
    }
    Err(DecodeError::LengthMismatch {
        field: "DMA count",
        value: c64.unwrap_or(c32),
        actual: len,
    })
}

/// DMA_READ request: read `count` bytes at `address` of client memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess {
    /// IOVA.
    pub address: u64,
    /// Bytes.
    pub count: u64,
    /// Count width on the wire.
    pub width: CountWidth,
}

impl DmaAccess {
    pub(crate) fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let (address, count, width) = decode_addr_count(payload, false)?;
        Ok(Self {
            address,
            count,
            width,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.address);
        self.width.put_count(out, self.count);
    }
}

/// DMA_READ reply: the data read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaReadReply {
    /// IOVA, echoed.
    pub address: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// Count width on the wire.
    pub width: CountWidth,
}

impl DmaReadReply {
    /// Decodes a reply without knowing the peer. A QEMU reply whose first four data
    /// bytes are zero reads the same as a spec reply; an endpoint that knows its peer's
    /// layout uses [`DmaReadReply::decode_as`].
    pub(crate) fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let (address, count, width) = decode_addr_count(payload, true)?;
        Self::with_layout(payload, address, count, width)
    }

    /// Decodes a reply in a known layout.
    pub fn decode_as(payload: &[u8], width: CountWidth) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let address = r.u64()?;
        let count = match width {
            CountWidth::U64 => r.u64()?,
            _ => u64::from(r.u32()?),
        };
        let pad = if width == CountWidth::U32Padded { 4 } else { 0 };
        let expected = (width.header_len() as u64 + pad).checked_add(count);
        if expected != Some(payload.len() as u64) {
            return Err(DecodeError::LengthMismatch {
                field: "DMA_READ count",
                value: count,
                actual: payload.len() as u64,
            });
        }
        Self::with_layout(payload, address, count, width)
    }

    fn with_layout(
        payload: &[u8],
        address: u64,
        count: u64,
        width: CountWidth,
    ) -> Result<Self, DecodeError> {
        let start = width.header_len();
        let end = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_add(start));
        let data = end
            .and_then(|end| payload.get(start..end))
            .ok_or(DecodeError::LengthMismatch {
                field: "DMA_READ count",
                value: count,
                actual: payload.len() as u64,
            })?
            .to_vec();
        Ok(Self {
            address,
            data,
            width,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.address);
        self.width.put_count(out, self.data.len() as u64);
        out.put_bytes(&self.data);
        if self.width == CountWidth::U32Padded {
            out.put_u32(0);
        }
    }
}

/// DMA_WRITE request: write `data` at `address` of client memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaWrite {
    /// IOVA.
    pub address: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// Count width on the wire.
    pub width: CountWidth,
}

impl DmaWrite {
    pub(crate) fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let (address, count, width) = decode_addr_count(payload, true)?;
        let reply = DmaReadReply::with_layout(payload, address, count, width)?;
        if width == CountWidth::U32Padded {
            // A request is never padded: the lengths say it is a u32 request with
            // trailing garbage.
            return Err(DecodeError::TrailingBytes { extra: 4 });
        }
        Ok(Self {
            address,
            data: reply.data,
            width,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.address);
        self.width.put_count(out, self.data.len() as u64);
        out.put_bytes(&self.data);
    }
}

/// DMA_WRITE reply. The spec's table gives address and a 4-byte count (a 12-byte
/// payload), libvfio-user expects address and a u64 count (16 bytes), and QEMU replies
/// with the header alone. All three are accepted; [`DmaWriteReply::Echo`] with
/// [`CountWidth::U64`] is what this crate sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaWriteReply {
    /// Header only (QEMU).
    Empty,
    /// Address and count echoed.
    Echo {
        /// IOVA.
        address: u64,
        /// Bytes written.
        count: u64,
        /// Count width on the wire.
        width: CountWidth,
    },
}

impl DmaWriteReply {
    pub(crate) fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.is_empty() {
            return Ok(DmaWriteReply::Empty);
        }
        let (address, count, width) = decode_addr_count(payload, false)?;
        Ok(DmaWriteReply::Echo {
            address,
            count,
            width,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        if let DmaWriteReply::Echo {
            address,
            count,
            width,
        } = self
        {
            out.put_u64(*address);
            width.put_count(out, *count);
        }
    }
}
