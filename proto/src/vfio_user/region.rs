//! REGION_READ (9), REGION_WRITE (10) and REGION_WRITE_MULTI (15).

use super::DecodeError;
use crate::wire::{Reader, Writer};

/// REGION_READ request and REGION_WRITE reply: where and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Payload size.
    pub const SIZE: usize = 16;

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(self.offset);
        out.put_u32(self.region);
        out.put_u32(self.count);
    }
}

/// REGION_READ reply: the bytes read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionReadReply {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes (`count` = their number).
    pub data: Vec<u8>,
}

/// REGION_WRITE request: the bytes to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionWrite {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes (`count` = their number).
    pub data: Vec<u8>,
}

/// Reads offset, region, count and exactly `count` bytes of data.
fn decode_with_data(r: &mut Reader<'_>) -> Result<(u64, u32, Vec<u8>), DecodeError> {
    let head = RegionAccess::decode(r)?;
    if head.count as usize != r.remaining() {
        return Err(DecodeError::LengthMismatch {
            field: "region access count",
            value: head.count.into(),
            actual: r.remaining() as u64,
        });
    }
    Ok((head.offset, head.region, r.rest().to_vec()))
}

fn encode_with_data(offset: u64, region: u32, data: &[u8], out: &mut Vec<u8>) {
    out.put_u64(offset);
    out.put_u32(region);
    out.put_u32(data.len() as u32);
    out.put_bytes(data);
}

impl RegionReadReply {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (offset, region, data) = decode_with_data(r)?;
        Ok(Self {
            offset,
            region,
            data,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_with_data(self.offset, self.region, &self.data, out);
    }
}

impl RegionWrite {
    /// Where and how much this write touches.
    pub fn access(&self) -> RegionAccess {
        RegionAccess {
            offset: self.offset,
            region: self.region,
            count: self.data.len() as u32,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (offset, region, data) = decode_with_data(r)?;
        Ok(Self {
            offset,
            region,
            data,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        encode_with_data(self.offset, self.region, &self.data, out);
    }
}

/// Largest write one REGION_WRITE_MULTI entry can describe.
pub const MAX_MULTI_WRITE_DATA: usize = 8;
const MULTI_ENTRY: usize = 24;

/// One entry of REGION_WRITE_MULTI: a write of at most 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiWrite {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes used of `data` (1 to 8).
    pub count: u32,
    /// The data; bytes past `count` are zero.
    pub data: [u8; MAX_MULTI_WRITE_DATA],
}

impl MultiWrite {
    /// A write of `data` (1 to [`MAX_MULTI_WRITE_DATA`] bytes) at `offset` of region
    /// `region`; `None` for an empty or longer `data`, which an entry cannot describe.
    pub fn new(region: u32, offset: u64, data: &[u8]) -> Option<Self> {
        if data.is_empty() || data.len() > MAX_MULTI_WRITE_DATA {
            return None;
        }
        let mut bytes = [0u8; MAX_MULTI_WRITE_DATA];
        bytes[..data.len()].copy_from_slice(data);
        Some(Self {
            offset,
            region,
            count: data.len() as u32,
            data: bytes,
        })
    }

    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..(self.count as usize).min(MAX_MULTI_WRITE_DATA)]
    }

    pub(crate) fn decode_all(r: &mut Reader<'_>) -> Result<Vec<Self>, DecodeError> {
        let wr_cnt = r.u64()?;
        if wr_cnt == 0 || wr_cnt.saturating_mul(MULTI_ENTRY as u64) != r.remaining() as u64 {
            return Err(DecodeError::LengthMismatch {
                field: "REGION_WRITE_MULTI wr_cnt",
                value: wr_cnt,
                actual: r.remaining() as u64,
            });
        }
        let mut out = Vec::with_capacity(wr_cnt as usize);
        for _ in 0..wr_cnt {
            let offset = r.u64()?;
            let region = r.u32()?;
            let count = r.u32()?;
            let mut data = r.array::<MAX_MULTI_WRITE_DATA>()?;
            if count == 0 || count as usize > MAX_MULTI_WRITE_DATA {
                return Err(DecodeError::InvalidField {
                    field: "REGION_WRITE_MULTI count",
                    value: count.into(),
                });
            }
            // Bytes past count carry no meaning; keep them zero so equal writes compare
            // equal.
            data[count as usize..].fill(0);
            out.push(Self {
                offset,
                region,
                count,
                data,
            });
        }
        Ok(out)
    }

    pub(crate) fn encode_all(writes: &[Self], out: &mut Vec<u8>) {
        out.put_u64(writes.len() as u64);
        for w in writes {
            out.put_u64(w.offset);
            out.put_u32(w.region);
            out.put_u32(w.count);
            out.put_bytes(&w.data);
        }
    }
}
