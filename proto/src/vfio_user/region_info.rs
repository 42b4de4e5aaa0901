//! DEVICE_GET_REGION_INFO (5): region flags, size, mmap offset and the capability
//! chain (sparse mmap, region type, MSI-X mappable, others passed through).
//!
//! ```text
//! payload: le32 argsz, le32 flags, le32 index, le32 cap_offset, le64 size, le64 offset,
//!          then capabilities; each starts with le16 id, le16 version, le32 next, and
//!          offsets (cap_offset, next) count from the start of the payload.
//! ```
//! When the client's `argsz` is smaller than the full reply, the server sends only the
//! fixed 32 bytes with `argsz` set to the size needed, without capabilities, without the
//! CAPS flag and without the fd; the client asks again with the larger `argsz`
//! ([`RegionInfo::reply_for`] builds that reply).

use super::{check_argsz, DecodeError, GetInfoRequest};
use crate::wire::{Reader, Writer};

/// Fixed size of the region info structure.
pub const REGION_INFO_SIZE: u32 = 32;

/// Region flag: readable.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// Region flag: writable.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// Region flag: mmap-able with the fd that comes with the reply.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Region flag: capabilities follow.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

const CAP_SPARSE_MMAP: u16 = 1;
const CAP_TYPE: u16 = 2;
const CAP_MSIX_MAPPABLE: u16 = 3;
const CAP_HEADER: usize = 8;
/// Most capabilities followed in one chain.
const MAX_CAPS: usize = 32;
/// Most areas in one sparse mmap capability.
const MAX_SPARSE_AREAS: u32 = 1024;

/// One region capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionCap {
    /// Parts of the region that may be mmapped: (offset, size) pairs.
    SparseMmap(Vec<(u64, u64)>),
    /// A device-specific region's type and subtype.
    Type {
        /// Region type.
        region_type: u32,
        /// Subtype.
        subtype: u32,
    },
    /// The MSI-X table may be mapped.
    MsixMappable,
    /// A capability this crate does not interpret, kept byte for byte.
    Other {
        /// Capability id.
        id: u16,
        /// Version.
        version: u16,
        /// Bytes after the 8-byte capability header.
        body: Vec<u8>,
    },
}

impl RegionCap {
    fn id_version(&self) -> (u16, u16) {
        match self {
            RegionCap::SparseMmap(_) => (CAP_SPARSE_MMAP, 1),
            RegionCap::Type { .. } => (CAP_TYPE, 1),
            RegionCap::MsixMappable => (CAP_MSIX_MAPPABLE, 1),
            RegionCap::Other { id, version, .. } => (*id, *version),
        }
    }

    fn encoded_len(&self) -> usize {
        CAP_HEADER
            + match self {
                RegionCap::SparseMmap(a) => 8 + 16 * a.len(),
                RegionCap::Type { .. } => 8,
                RegionCap::MsixMappable => 0,
                RegionCap::Other { body, .. } => body.len(),
            }
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            RegionCap::SparseMmap(areas) => {
                out.put_u32(areas.len() as u32);
                out.put_u32(0);
                for (offset, size) in areas {
                    out.put_u64(*offset);
                    out.put_u64(*size);
                }
            }
            RegionCap::Type {
                region_type,
                subtype,
            } => {
                out.put_u32(*region_type);
                out.put_u32(*subtype);
            }
            RegionCap::MsixMappable => {}
            RegionCap::Other { body, .. } => out.put_bytes(body),
        }
    }

    fn decode(id: u16, version: u16, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        Ok(match id {
            CAP_SPARSE_MMAP => {
                let n = r.u32()?;
                let _reserved = r.u32()?;
                if n > MAX_SPARSE_AREAS || (n as usize) * 16 > r.remaining() {
                    return Err(DecodeError::InvalidField {
                        field: "sparse mmap nr_areas",
                        value: n.into(),
                    });
                }
                let mut areas = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    areas.push((r.u64()?, r.u64()?));
                }
                RegionCap::SparseMmap(areas)
            }
            CAP_TYPE => RegionCap::Type {
                region_type: r.u32()?,
                subtype: r.u32()?,
            },
            CAP_MSIX_MAPPABLE => RegionCap::MsixMappable,
            _ => RegionCap::Other {
                id,
                version,
                body: body.to_vec(),
            },
        })
    }
}

/// DEVICE_GET_REGION_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size of the full reply payload (32 plus the capabilities). In a truncated reply
    /// this is larger than what was sent.
    pub argsz: u32,
    /// `REGION_INFO_FLAG_*` (CAPS is derived from `caps` when encoding).
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Region size (0: not implemented).
    pub size: u64,
    /// mmap offset into the fd.
    pub offset: u64,
    /// Capabilities, in chain order (empty in a truncated reply).
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    /// A region with these flags and size, no capabilities, at index `index`.
    pub fn new(index: u32, flags: u32, size: u64) -> Self {
        Self {
            argsz: REGION_INFO_SIZE,
            flags,
            index,
            size,
            offset: 0,
            caps: Vec::new(),
        }
    }

    /// Payload size of the full reply.
    pub fn needed_argsz(&self) -> u32 {
        REGION_INFO_SIZE
            + self
                .caps
                .iter()
                .map(|c| c.encoded_len() as u32)
                .sum::<u32>()
    }

    /// Whether this reply was cut to the client's `argsz` (capabilities left out).
    pub fn is_truncated(&self, payload_len: usize) -> bool {
        self.argsz as usize > payload_len
    }

    /// The reply to a request whose `argsz` is `request_argsz`: the full reply when it
    /// fits, else the fixed part with `argsz` = needed size and no capabilities. The
    /// second value says whether the region's fd goes with the reply (only in a full
    /// reply of an MMAP region).
    pub fn reply_for(&self, request_argsz: u32) -> (RegionInfo, bool) {
        let needed = self.needed_argsz();
        let mmap = self.flags & REGION_INFO_FLAG_MMAP != 0;
        if request_argsz >= needed {
            let mut full = self.clone();
            full.argsz = needed;
            (full, mmap)
        } else {
            let mut cut = self.clone();
            cut.argsz = needed;
            cut.caps.clear();
            cut.flags &= !REGION_INFO_FLAG_CAPS;
            (cut, false)
        }
    }

    pub(crate) fn decode_request(r: &mut Reader<'_>) -> Result<GetInfoRequest, DecodeError> {
        let argsz = r.u32()?;
        let _flags = r.u32()?;
        let index = r.u32()?;
        r.bytes(20)?;
        check_argsz("DEVICE_GET_REGION_INFO argsz", argsz, REGION_INFO_SIZE)?;
        Ok(GetInfoRequest { argsz, index })
    }

    pub(crate) fn encode_request(req: &GetInfoRequest, out: &mut Vec<u8>) {
        out.put_u32(req.argsz);
        out.put_u32(0);
        out.put_u32(req.index);
        out.put_bytes(&[0; 20]);
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let cap_offset = r.u32()?;
        let size = r.u64()?;
        let offset = r.u64()?;
        let mut caps = Vec::new();
        if flags & REGION_INFO_FLAG_CAPS != 0 && cap_offset != 0 {
            let mut at = cap_offset as usize;
            loop {
                if caps.len() == MAX_CAPS {
                    return Err(DecodeError::InvalidField {
                        field: "region capability count",
                        value: MAX_CAPS as u64,
                    });
                }
                if at < REGION_INFO_SIZE as usize || at + CAP_HEADER > payload.len() {
                    return Err(DecodeError::InvalidField {
                        field: "region capability offset",
                        value: at as u64,
                    });
                }
                let mut h = Reader::new(&payload[at..]);
                let id = h.u16()?;
                let version = h.u16()?;
                let next = h.u32()? as usize;
                // A capability extends to the next one, or to the end of the payload.
                let end = if next == 0 { payload.len() } else { next };
                if next != 0 && (next < at + CAP_HEADER || next > payload.len()) {
                    return Err(DecodeError::InvalidField {
                        field: "region capability next",
                        value: next as u64,
                    });
                }
                let cap = RegionCap::decode(id, version, &payload[at + CAP_HEADER..end])?;
                if !matches!(cap, RegionCap::Other { .. }) && at + cap.encoded_len() > end {
                    return Err(DecodeError::InvalidField {
                        field: "region capability length",
                        value: id.into(),
                    });
                }
                caps.push(cap);
                if next == 0 {
                    break;
                }
                at = next;
            }
        } else if payload.len() > REGION_INFO_SIZE as usize {
            return Err(DecodeError::TrailingBytes {
                extra: payload.len() - REGION_INFO_SIZE as usize,
            });
        }
        Ok(Self {
            argsz,
            flags: flags & !REGION_INFO_FLAG_CAPS,
            index,
            size,
            offset,
            caps,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let has_caps = !self.caps.is_empty();
        let mut flags = self.flags & !REGION_INFO_FLAG_CAPS;
        if has_caps {
            flags |= REGION_INFO_FLAG_CAPS;
        }
        out.put_u32(self.argsz);
        out.put_u32(flags);
        out.put_u32(self.index);
        out.put_u32(if has_caps { REGION_INFO_SIZE } else { 0 });
        out.put_u64(self.size);
        out.put_u64(self.offset);
        let mut at = REGION_INFO_SIZE as usize;
        for (i, cap) in self.caps.iter().enumerate() {
            let next = if i + 1 == self.caps.len() {
                0
            } else {
                at + cap.encoded_len()
            };
            let (id, version) = cap.id_version();
            out.put_u16(id);
            out.put_u16(version);
            out.put_u32(next as u32);
            cap.encode_body(out);
            at += cap.encoded_len();
        }
    }
}
