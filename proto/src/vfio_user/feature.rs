//! DEVICE_FEATURE (16): get, set or probe a device feature. vfio-user supports the
//! migration features of Linux VFIO, with arrays carried inline instead of by pointer.
//!
//! ```text
//! payload: le32 argsz, le32 flags (bits 0-15 feature, 16 GET, 17 SET, 18 PROBE), data
//! MIGRATION (1)          GET reply data: le64 flags (STOP_COPY 1, P2P 2, PRE_COPY 4)
//! MIG_DEVICE_STATE (2)   SET data / GET reply data: le32 device_state, le32 data_fd
//! DMA_LOGGING_START (6)  SET data: le64 page_size, le32 num_ranges, le32 0,
//!                        num_ranges x (le64 iova, le64 length)
//! DMA_LOGGING_STOP (7)   SET, no data
//! DMA_LOGGING_REPORT (8) GET data: le64 iova, le64 length, le64 page_size;
//!                        the reply adds the bitmap (u64 words, bit k = page k)
//! ```
//! A SET or PROBE reply repeats the request's payload.

use super::{check_argsz, DecodeError};
use crate::wire::{Reader, Writer};

/// Feature: migration support flags.
pub const FEATURE_MIGRATION: u16 = 1;
/// Feature: migration device state.
pub const FEATURE_MIG_DEVICE_STATE: u16 = 2;
/// Feature: start dirty-page logging.
pub const FEATURE_DMA_LOGGING_START: u16 = 6;
/// Feature: stop dirty-page logging.
pub const FEATURE_DMA_LOGGING_STOP: u16 = 7;
/// Feature: report dirty pages.
pub const FEATURE_DMA_LOGGING_REPORT: u16 = 8;

const FLAG_GET: u32 = 1 << 16;
const FLAG_SET: u32 = 1 << 17;
const FLAG_PROBE: u32 = 1 << 18;
const FEATURE_MASK: u32 = 0xffff;
/// Most ranges in DMA_LOGGING_START.
const MAX_LOGGING_RANGES: u32 = 1 << 16;

/// Migration flag: STOP_COPY is supported (required).
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// Migration flag: RUNNING_P2P is supported.
pub const MIGRATION_P2P: u64 = 1 << 1;
/// Migration flag: PRE_COPY is supported.
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// What the request does with the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureOp {
    /// Read the feature's data.
    Get,
    /// Write it.
    Set,
    /// Ask whether the listed operations are supported.
    Probe {
        /// Probe GET.
        get: bool,
        /// Probe SET.
        set: bool,
    },
}

/// Migration device states (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    /// The device failed a transition.
    Error = 0,
    /// Stopped, not saving or resuming.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, migration data readable.
    StopCopy = 3,
    /// Stopped, migration data writable.
    Resuming = 4,
    /// Running without peer-to-peer DMA (not used by vfio-user).
    RunningP2p = 5,
    /// Running, migration data readable.
    PreCopy = 6,
    /// PRE_COPY without P2P (not used by vfio-user).
    PreCopyP2p = 7,
}

impl MigState {
    /// Every state, in numeric order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The uapi's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    fn from_u32(v: u32) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            5 => MigState::RunningP2p,
            6 => MigState::PreCopy,
            7 => MigState::PreCopyP2p,
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "device_state",
                    value: v.into(),
                })
            }
        })
    }
}

impl TryFrom<u32> for MigState {
    type Error = DecodeError;

    fn try_from(v: u32) -> Result<Self, DecodeError> {
        Self::from_u32(v)
    }
}

impl std::fmt::Display for MigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes of the DMA_LOGGING_REPORT bitmap for `length` bytes of IOVA at `page_size`
/// granularity: one bit per page (a partial last page counts), rounded up to whole u64
/// words. `None` for a `page_size` that is not a power of two, or a size that does not
/// fit a `u64`.
pub fn logging_bitmap_len(length: u64, page_size: u64) -> Option<u64> {
    if !page_size.is_power_of_two() {
        return None;
    }
    let pages = length.div_ceil(page_size);
    pages.div_ceil(64).checked_mul(8)
}

/// An IOVA range for dirty-page logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggingRange {
    /// Start.
    pub iova: u64,
    /// Length.
    pub length: u64,
}

/// Feature-specific data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureData {
    /// No data (probes, GET requests of MIGRATION and MIG_DEVICE_STATE, LOGGING_STOP).
    None,
    /// MIGRATION GET reply: `MIGRATION_*` flags.
    Migration {
        /// Supported migration flags.
        flags: u64,
    },
    /// MIG_DEVICE_STATE SET request, and GET/SET reply.
    MigState {
        /// The state.
        state: MigState,
        /// Unused in vfio-user; carried as sent.
        data_fd: i32,
    },
    /// DMA_LOGGING_START SET request and reply.
    LoggingStart {
        /// Page size (a hint in the request, the chosen size in the reply).
        page_size: u64,
        /// Ranges to log; empty means everything.
        ranges: Vec<LoggingRange>,
    },
    /// DMA_LOGGING_REPORT GET request (empty bitmap) and reply (with bitmap).
    LoggingReport {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        length: u64,
        /// Bitmap granularity (power of two).
        page_size: u64,
        /// The bitmap, in u64 words, little-endian bytes; empty in the request.
        bitmap: Vec<u8>,
    },
    /// Data of a feature or operation this crate does not interpret, kept as sent.
    Raw(Vec<u8>),
}

/// DEVICE_FEATURE request or reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFeature {
    /// Request: maximum reply payload size; reply: size of the full reply payload.
    pub argsz: u32,
    /// Feature index.
    pub feature: u16,
    /// Operation.
    pub op: FeatureOp,
    /// Data.
    pub data: FeatureData,
}

impl DeviceFeature {
    /// Fixed payload size.
    pub const FIXED: u32 = 8;

    /// A request, with `argsz` as large as the reply can get for known features.
    pub fn request(feature: u16, op: FeatureOp, data: FeatureData) -> Self {
        let mut f = Self {
            argsz: 0,
            feature,
            op,
            data,
        };
        f.argsz = f.payload_len() as u32;
        if op == FeatureOp::Get {
            f.argsz = f.argsz.max(Self::FIXED + 16);
        }
        f
    }

    /// A DMA_LOGGING_REPORT GET request for `length` bytes at `iova`, reported at
    /// `page_size` granularity, with `argsz` large enough for the bitmap of the reply
    /// (saturating at `u32::MAX`).
    pub fn logging_report(iova: u64, length: u64, page_size: u64) -> Self {
        let bitmap = logging_bitmap_len(length, page_size).unwrap_or(0);
        let argsz = u64::from(Self::FIXED + 24).saturating_add(bitmap);
        Self {
            argsz: u32::try_from(argsz).unwrap_or(u32::MAX),
            feature: FEATURE_DMA_LOGGING_REPORT,
            op: FeatureOp::Get,
            data: FeatureData::LoggingReport {
                iova,
                length,
                page_size,
                bitmap: Vec::new(),
            },
        }
    }

    /// Length of the encoded payload.
    pub fn payload_len(&self) -> usize {
        let mut v = Vec::new();
        self.encode(&mut v);
        v.len()
    }

    pub(crate) fn decode(r: &mut Reader<'_>, is_reply: bool) -> Result<Self, DecodeError> {
        let argsz = r.u32()?;
        let flags = r.u32()?;
        if flags & !(FEATURE_MASK | FLAG_GET | FLAG_SET | FLAG_PROBE) != 0 {
            return Err(DecodeError::InvalidField {
                field: "DEVICE_FEATURE flags",
                value: flags.into(),
            });
        }
        let feature = (flags & FEATURE_MASK) as u16;
        let get = flags & FLAG_GET != 0;
        let set = flags & FLAG_SET != 0;
        let op = if flags & FLAG_PROBE != 0 {
            FeatureOp::Probe { get, set }
        } else {
            match (get, set) {
                (true, false) => FeatureOp::Get,
                (false, true) => FeatureOp::Set,
                _ => {
                    return Err(DecodeError::InvalidField {
                        field: "DEVICE_FEATURE GET/SET",
                        value: flags.into(),
                    })
                }
            }
        };
        if !is_reply {
            check_argsz("DEVICE_FEATURE argsz", argsz, Self::FIXED)?;
        }
        let data = decode_data(r, feature, op, is_reply)?;
        Ok(Self {
            argsz,
            feature,
            op,
            data,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let op = match self.op {
            FeatureOp::Get => FLAG_GET,
            FeatureOp::Set => FLAG_SET,
            FeatureOp::Probe { get, set } => {
                FLAG_PROBE | if get { FLAG_GET } else { 0 } | if set { FLAG_SET } else { 0 }
            }
        };
        out.put_u32(self.argsz);
        out.put_u32(u32::from(self.feature) | op);
        match &self.data {
            FeatureData::None => {}
            FeatureData::Migration { flags } => out.put_u64(*flags),
            FeatureData::MigState { state, data_fd } => {
                out.put_u32(*state as u32);
                out.put_u32(*data_fd as u32);
            }
            FeatureData::LoggingStart { page_size, ranges } => {
                out.put_u64(*page_size);
                out.put_u32(ranges.len() as u32);
                out.put_u32(0);
                for range in ranges {
                    out.put_u64(range.iova);
                    out.put_u64(range.length);
                }
            }
            FeatureData::LoggingReport {
                iova,
                length,
                page_size,
                bitmap,
            } => {
                out.put_u64(*iova);
                out.put_u64(*length);
                out.put_u64(*page_size);
                out.put_bytes(bitmap);
            }
            FeatureData::Raw(bytes) => out.put_bytes(bytes),
        }
    }
}

fn decode_data(
    r: &mut Reader<'_>,
    feature: u16,
    op: FeatureOp,
    is_reply: bool,
) -> Result<FeatureData, DecodeError> {
    if let FeatureOp::Probe { .. } = op {
        // "It is not used for probing"; the reply repeats the (empty) request.
        return Ok(FeatureData::None);
    }
    let get_reply = is_reply && op == FeatureOp::Get;
    Ok(match (feature, op) {
        (FEATURE_MIGRATION, FeatureOp::Get) if get_reply => {
            FeatureData::Migration { flags: r.u64()? }
        }
        (FEATURE_MIGRATION, FeatureOp::Get) => FeatureData::None,
        (FEATURE_MIG_DEVICE_STATE, FeatureOp::Get) if !get_reply => FeatureData::None,
        (FEATURE_MIG_DEVICE_STATE, _) => FeatureData::MigState {
            state: MigState::from_u32(r.u32()?)?,
            data_fd: r.u32()? as i32,
        },
        (FEATURE_DMA_LOGGING_START, FeatureOp::Set) => {
            let page_size = r.u64()?;
            let n = r.u32()?;
            let _reserved = r.u32()?;
            if n > MAX_LOGGING_RANGES || n as usize * 16 != r.remaining() {
                return Err(DecodeError::LengthMismatch {
                    field: "DMA_LOGGING_START num_ranges",
                    value: n.into(),
                    actual: r.remaining() as u64,
                });
            }
            let mut ranges = Vec::with_capacity(n as usize);
            for _ in 0..n {
                ranges.push(LoggingRange {
                    iova: r.u64()?,
                    length: r.u64()?,
                });
            }
            FeatureData::LoggingStart { page_size, ranges }
        }
        (FEATURE_DMA_LOGGING_STOP, FeatureOp::Set) => FeatureData::None,
        (FEATURE_DMA_LOGGING_REPORT, FeatureOp::Get) => {
            let iova = r.u64()?;
            let length = r.u64()?;
            let page_size = r.u64()?;
            if !page_size.is_power_of_two() {
                return Err(DecodeError::InvalidField {
                    field: "DMA_LOGGING_REPORT page_size",
                    value: page_size,
                });
            }
            let bitmap = if get_reply {
                let bitmap = r.rest();
                if bitmap.len() % 8 != 0 {
                    return Err(DecodeError::InvalidField {
                        field: "DMA_LOGGING_REPORT bitmap length",
                        value: bitmap.len() as u64,
                    });
                }
                bitmap.to_vec()
            } else {
                Vec::new()
            };
            FeatureData::LoggingReport {
                iova,
                length,
                page_size,
                bitmap,
            }
        }
        _ => FeatureData::Raw(r.rest().to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bitmap sizes: one bit per page, a partial page counts, whole u64 words; page
    /// sizes that are not powers of two have none.
    #[test]
    fn bitmap_lengths() {
        assert_eq!(logging_bitmap_len(0, 4096), Some(0));
        assert_eq!(logging_bitmap_len(1, 4096), Some(8));
        assert_eq!(logging_bitmap_len(64 * 4096, 4096), Some(8));
        assert_eq!(logging_bitmap_len(64 * 4096 + 1, 4096), Some(16));
        assert_eq!(logging_bitmap_len(1 << 30, 1 << 21), Some(64));
        assert_eq!(
            logging_bitmap_len(u64::MAX, 1),
            Some((u64::MAX / 64 + 1) * 8)
        );
        assert_eq!(logging_bitmap_len(4096, 0), None);
        assert_eq!(logging_bitmap_len(4096, 3000), None);
    }

    /// The report request states an argsz that holds the bitmap of the reply, which
    /// decodes back with the bitmap; states convert from their numbers and no other.
    #[test]
    fn report_request_and_states() {
        let f = DeviceFeature::logging_report(0x10_0000, 130 * 4096, 4096);
        assert_eq!(f.argsz, 8 + 24 + 24);
        let mut payload = Vec::new();
        f.encode(&mut payload);
        let decoded = DeviceFeature::decode(&mut Reader::new(&payload), false).unwrap();
        assert_eq!(decoded, f);
        let mut reply = f.clone();
        reply.data = FeatureData::LoggingReport {
            iova: 0x10_0000,
            length: 130 * 4096,
            page_size: 4096,
            bitmap: vec![0xff; 24],
        };
        let mut payload = Vec::new();
        reply.encode(&mut payload);
        assert_eq!(payload.len() as u32, f.argsz);
        assert_eq!(
            DeviceFeature::decode(&mut Reader::new(&payload), true).unwrap(),
            reply
        );
        let huge = DeviceFeature::logging_report(0, u64::MAX, 4096);
        assert_eq!(huge.argsz, u32::MAX, "saturates");
        for (i, s) in MigState::ALL.iter().enumerate() {
            assert_eq!(MigState::try_from(i as u32).unwrap(), *s);
            assert_eq!(*s as u32, i as u32);
        }
        assert!(MigState::try_from(8).is_err());
        assert_eq!(MigState::StopCopy.to_string(), "STOP_COPY");
    }
}
