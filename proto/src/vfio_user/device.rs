//! DEVICE_GET_INFO (4), DEVICE_GET_REGION_IO_FDS (6), DEVICE_GET_IRQ_INFO (7) and
//! DEVICE_SET_IRQS (8).

use super::{check_argsz, DecodeError};
use crate::wire::{Reader, Writer};

/// Device flag: DEVICE_RESET is supported.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// Device flag: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// The request of DEVICE_GET_INFO, DEVICE_GET_REGION_INFO, DEVICE_GET_REGION_IO_FDS and
/// DEVICE_GET_IRQ_INFO: the reply size the client can take and the index asked about
/// (0 for GET_INFO). The spec says the other fields must be zero; like libvfio-user,
/// they are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetInfoRequest {
    /// Maximum reply payload size.
    pub argsz: u32,
    /// Region or IRQ index; 0 for DEVICE_GET_INFO.
    pub index: u32,
}

/// DEVICE_GET_INFO reply (16 bytes; vfio-user has no `cap_offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of the full reply payload (16).
    pub argsz: u32,
    /// `DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions (>= 9 for PCI).
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Payload size.
    pub const SIZE: u32 = 16;

    pub(crate) fn decode_request(r: &mut Reader<'_>) -> Result<GetInfoRequest, DecodeError> {
        let argsz = r.u32()?;
        r.bytes(12)?;
        check_argsz("DEVICE_GET_INFO argsz", argsz, Self::SIZE)?;
        Ok(GetInfoRequest { argsz, index: 0 })
    }

    pub(crate) fn encode_request(req: &GetInfoRequest, out: &mut Vec<u8>) {
        out.put_u32(req.argsz);
        out.put_bytes(&[0; 12]);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(self.flags);
        out.put_u32(self.num_regions);
        out.put_u32(self.num_irqs);
    }
}

/// IRQ info flag: eventfd signalling is supported.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// IRQ info flag: MASK / UNMASK are supported.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// IRQ info flag: the interrupt masks itself when triggered.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// IRQ info flag: vectors are set up as a set.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// DEVICE_GET_IRQ_INFO reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Size of the full reply payload (16).
    pub argsz: u32,
    /// `IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}

impl IrqInfo {
    /// Payload size.
    pub const SIZE: u32 = 16;

    pub(crate) fn decode_request(r: &mut Reader<'_>) -> Result<GetInfoRequest, DecodeError> {
        let argsz = r.u32()?;
        let _flags = r.u32()?;
        let index = r.u32()?;
        let _count = r.u32()?;
        check_argsz("DEVICE_GET_IRQ_INFO argsz", argsz, Self::SIZE)?;
        Ok(GetInfoRequest { argsz, index })
    }

    pub(crate) fn encode_request(req: &GetInfoRequest, out: &mut Vec<u8>) {
        out.put_u32(req.argsz);
        out.put_u32(0);
        out.put_u32(req.index);
        out.put_u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(self.flags);
        out.put_u32(self.index);
        out.put_u32(self.count);
    }
}

/// SET_IRQS data type: none.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS data type: one bool byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// SET_IRQS data type: eventfds in the ancillary data.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// SET_IRQS action: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const IRQ_SET_DATA_MASK: u32 = 0x07;
const IRQ_SET_ACTION_MASK_ALL: u32 = 0x38;

/// The data of a SET_IRQS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IrqData {
    /// Perform the action on every vector of the range.
    None,
    /// Perform it where the byte is non-zero.
    Bool(Vec<u8>),
    /// Eventfds: as many as `count` come with the message, or none to de-assign.
    EventFd {
        /// Whether fds come with the message (else: de-assign).
        assign: bool,
    },
}

/// DEVICE_SET_IRQS request. The reply has no payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetIrqs {
    /// `IRQ_SET_ACTION_MASK`, `_UNMASK` or `_TRIGGER`.
    pub action: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors; 0 with DATA_NONE and TRIGGER disables the whole index.
    pub count: u32,
    /// What to do it with.
    pub data: IrqData,
}

impl SetIrqs {
    /// Fixed payload size.
    pub const SIZE: u32 = 20;

    /// The number of fds this request carries.
    pub fn fd_count(&self) -> usize {
        match self.data {
            IrqData::EventFd { assign: true } => self.count as usize,
            _ => 0,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>, nfds: usize) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let start = r.u32()?;
        let count = r.u32()?;
        let bad = |field, value: u32| DecodeError::InvalidField {
            field,
            value: value.into(),
        };
        if flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0 {
            return Err(bad("SET_IRQS flags", flags));
        }
        let data_type = flags & IRQ_SET_DATA_MASK;
        let action = flags & IRQ_SET_ACTION_MASK_ALL;
        if !data_type.is_power_of_two() {
            return Err(bad("SET_IRQS data type", flags));
        }
        if !action.is_power_of_two() {
            return Err(bad("SET_IRQS action", flags));
        }
        if start.checked_add(count).is_none() {
            return Err(bad("SET_IRQS start + count", start));
        }
        if count == 0 && (start != 0 || flags != IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER) {
            return Err(bad("SET_IRQS count 0 (only DATA_NONE|TRIGGER at 0)", flags));
        }
        let data = match data_type {
            IRQ_SET_DATA_NONE => IrqData::None,
            IRQ_SET_DATA_BOOL => IrqData::Bool(r.bytes(count as usize)?.to_vec()),
            _ => {
                if nfds != 0 && nfds != count as usize {
                    return Err(DecodeError::FdCount {
                        command: "DEVICE_SET_IRQS",
                        got: nfds,
                        expected: count as usize,
                    });
                }
                IrqData::EventFd { assign: nfds != 0 }
            }
        };
        let expected_argsz = Self::SIZE
            + match &data {
                IrqData::Bool(b) => b.len() as u32,
                _ => 0,
            };
        if argsz < expected_argsz {
            return Err(bad("SET_IRQS argsz", argsz));
        }
        Ok(Self {
            action,
            index,
            start,
            count,
            data,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let (data_type, bytes): (u32, &[u8]) = match &self.data {
            IrqData::None => (IRQ_SET_DATA_NONE, &[]),
            IrqData::Bool(b) => (IRQ_SET_DATA_BOOL, b),
            IrqData::EventFd { .. } => (IRQ_SET_DATA_EVENTFD, &[]),
        };
        out.put_u32(Self::SIZE + bytes.len() as u32);
        out.put_u32(data_type | self.action);
        out.put_u32(self.index);
        out.put_u32(self.start);
        out.put_u32(self.count);
        out.put_bytes(bytes);
    }
}

/// Sub-region type: ioeventfd.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// Sub-region type: ioregionfd.
pub const IO_FD_TYPE_IOREGIONFD: u32 = 1;

/// What a sub-region's fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFdKind {
    /// An ioeventfd: writes that match are signalled on the fd.
    IoEventFd {
        /// `KVM_IOEVENTFD_FLAG_*`.
        flags: u32,
        /// Value a write must match (with the DATAMATCH flag).
        datamatch: u64,
    },
    /// An ioregionfd.
    IoRegionFd {
        /// `KVM_IOREGION_*`.
        flags: u32,
        /// Opaque value sent back on the fd.
        user_data: u64,
    },
}

/// One entry of a DEVICE_GET_REGION_IO_FDS reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRegion {
    /// Start within the region.
    pub offset: u64,
    /// Length (0: any access size).
    pub size: u64,
    /// Index into the reply's fds.
    pub fd_index: u32,
    /// The fd's kind and its parameters.
    pub kind: IoFdKind,
}

/// Size of one sub-region entry.
///
/// The spec gives 40 bytes (its argsz formula subtracts 32 where the fixed part is 16;
/// this follows the table). libvfio-user sends 48-byte ioeventfd entries with
/// `datamatch` at +40. Both are accepted; 40 is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFdLayout {
    /// 40-byte entries, as the spec's tables.
    Spec40,
    /// 48-byte entries, as libvfio-user (shadow fields zero).
    LibVfioUser48,
}

impl IoFdLayout {
    fn entry_size(self) -> usize {
        match self {
            IoFdLayout::Spec40 => 40,
            IoFdLayout::LibVfioUser48 => 48,
        }
    }
}

/// DEVICE_GET_REGION_IO_FDS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionIoFds {
    /// Size of the full reply payload; larger than the payload when the request's argsz
    /// was too small, in which case `sub_regions` is empty and no fds come.
    pub argsz: u32,
    /// Region index.
    pub index: u32,
    /// Number of sub-regions of the full reply.
    pub count: u32,
    /// The entries (empty in a truncated reply).
    pub sub_regions: Vec<SubRegion>,
    /// Entry layout on the wire.
    pub layout: IoFdLayout,
}

impl RegionIoFds {
    /// Fixed part of the payload.
    pub const FIXED: u32 = 16;

    /// Whether this reply only says how large the full one is.
    pub fn is_truncated(&self) -> bool {
        self.sub_regions.is_empty() && self.count > 0
    }

    /// Number of fds the reply carries: one past the highest `fd_index`.
    pub fn fd_count(&self) -> usize {
        self.sub_regions
            .iter()
            .map(|s| s.fd_index as usize + 1)
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn decode_request(r: &mut Reader<'_>) -> Result<GetInfoRequest, DecodeError> {
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let count = r.u32()?;
        check_argsz("DEVICE_GET_REGION_IO_FDS argsz", argsz, Self::FIXED)?;
        if flags != 0 || count != 0 {
            return Err(DecodeError::InvalidField {
                field: "DEVICE_GET_REGION_IO_FDS flags/count",
                value: u64::from(flags) << 32 | u64::from(count),
            });
        }
        Ok(GetInfoRequest { argsz, index })
    }

    pub(crate) fn encode_request(req: &GetInfoRequest, out: &mut Vec<u8>) {
        out.put_u32(req.argsz);
        out.put_u32(0);
        out.put_u32(req.index);
        out.put_u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>, nfds: usize) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let count = r.u32()?;
        if flags != 0 {
            return Err(DecodeError::InvalidField {
                field: "DEVICE_GET_REGION_IO_FDS reply flags",
                value: flags.into(),
            });
        }
        let rest = r.remaining();
        let layout = if rest == 0 || count as usize * 40 == rest {
            IoFdLayout::Spec40
        } else if count as usize * 48 == rest {
            IoFdLayout::LibVfioUser48
        } else {
            return Err(DecodeError::LengthMismatch {
                field: "DEVICE_GET_REGION_IO_FDS count",
                value: count.into(),
                actual: rest as u64,
            });
        };
        let n = if rest == 0 { 0 } else { count as usize };
        let mut sub_regions = Vec::with_capacity(n);
        for _ in 0..n {
            let offset = r.u64()?;
            let size = r.u64()?;
            let fd_index = r.u32()?;
            let io_type = r.u32()?;
            let flags = r.u32()?;
            let _padding = r.u32()?;
            if layout == IoFdLayout::LibVfioUser48 {
                let _shadow_offset = r.u64()?;
            }
            let value = r.u64()?;
            let kind = match io_type {
                IO_FD_TYPE_IOEVENTFD => IoFdKind::IoEventFd {
                    flags,
                    datamatch: value,
                },
                IO_FD_TYPE_IOREGIONFD => IoFdKind::IoRegionFd {
                    flags,
                    user_data: value,
                },
                other => {
                    return Err(DecodeError::InvalidField {
                        field: "sub-region type",
                        value: other.into(),
                    })
                }
            };
            if fd_index as usize >= nfds {
                return Err(DecodeError::FdCount {
                    command: "DEVICE_GET_REGION_IO_FDS",
                    got: nfds,
                    expected: fd_index as usize + 1,
                });
            }
            sub_regions.push(SubRegion {
                offset,
                size,
                fd_index,
                kind,
            });
        }
        Ok(Self {
            argsz,
            index,
            count,
            sub_regions,
            layout,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(self.argsz);
        out.put_u32(0);
        out.put_u32(self.index);
        out.put_u32(self.count);
        for s in &self.sub_regions {
            out.put_u64(s.offset);
            out.put_u64(s.size);
            out.put_u32(s.fd_index);
            let (t, flags, value) = match s.kind {
                IoFdKind::IoEventFd { flags, datamatch } => {
                    (IO_FD_TYPE_IOEVENTFD, flags, datamatch)
                }
                IoFdKind::IoRegionFd { flags, user_data } => {
                    (IO_FD_TYPE_IOREGIONFD, flags, user_data)
                }
            };
            out.put_u32(t);
            out.put_u32(flags);
            out.put_u32(0);
            if self.layout == IoFdLayout::LibVfioUser48 {
                out.put_u64(0);
            }
            out.put_u64(value);
        }
    }

    /// Size of the full payload for these entries.
    pub fn needed_argsz(&self) -> u32 {
        Self::FIXED + (self.sub_regions.len() * self.layout.entry_size()) as u32
    }
}
