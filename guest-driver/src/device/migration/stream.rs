//! The migration stream: the bytes MIG_DATA_READ hands out in STOP_COPY and
//! MIG_DATA_WRITE takes in RESUMING. Version 1, all fields little-endian:
//!
//! ```text
//! header (32 bytes)
//!   0  4  magic "VFUM"
//!   4  2  version, 1
//!   6  2  header size, 32
//!   8  2  PCI vendor ID of the device that saved it
//!  10  2  PCI device ID
//!  12  4  config section length
//!  16  4  interrupt section length
//!  20  4  model section length
//!  24  4  CRC32C of the three sections, in order
//!  28  4  reserved, 0
//! config section: the configuration space as the library emulates it (256 or 4096
//!   bytes; bytes the model owns are 0 here)
//! interrupt section
//!   0  1  flags: bit 0 INTx asserted; other bits 0
//!   1  3  reserved, 0
//!   4  2  MSI-X vectors (0 without MSI-X)
//!   6  2  reserved, 0
//!   8     MSI-X table, 16 bytes per vector
//!   ..    pending bit array, one le64 per 64 vectors
//! model section: what the model's `save` returned, opaque to the library
//! ```
//!
//! The stream ends after the model section: a stream longer or shorter than its header
//! says is refused, as is one whose checksum does not match. Whether the sections fit
//! the device that loads them (its config space size and read-only bytes, its MSI-X
//! vector count) is checked by the server before anything is applied.

use thiserror::Error;

use crate::crc32c::crc32c;
use crate::device::errno::{Errno, EINVAL, ENODEV, EPROTONOSUPPORT};

/// "VFUM" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VFUM");
/// The version written and read.
pub const VERSION: u16 = 1;
/// Size of the version 1 header.
pub const HEADER_SIZE: usize = 32;
/// Size of the fixed part of the interrupt section.
const IRQ_FIXED: usize = 8;
/// Interrupt section flag: INTx asserted.
const IRQ_FLAG_INTX: u8 = 1;

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StreamError {
    /// Fewer bytes than the header.
    #[error("migration stream of {len} bytes is shorter than its {HEADER_SIZE}-byte header")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Not a stream of this library.
    #[error("not a vfu-guest migration stream (magic {found:#010x})")]
    BadMagic {
        /// The first four bytes.
        found: u32,
    },
    /// A version this library does not read.
    #[error("migration stream version {found} (this library reads version {VERSION})")]
    Version {
        /// The stream's version.
        found: u16,
    },
    /// A header field that version 1 fixes has another value.
    #[error("migration stream header: {field} is {value:#x}")]
    Header {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The sections the header announces do not add up to the stream.
    #[error("migration stream of {len} bytes; its header announces {announced}")]
    Length {
        /// Bytes received.
        len: usize,
        /// Header plus the three section lengths.
        announced: u64,
    },
    /// The data does not match its checksum.
    #[error("migration stream checksum {stated:#010x}, its sections sum to {computed:#010x}")]
    Checksum {
        /// The header's CRC32C.
        stated: u32,
        /// The CRC32C of the sections.
        computed: u32,
    },
    /// Saved from a device with other PCI IDs.
    #[error("migration stream of device {vendor:04x}:{device:04x}, loaded into {own_vendor:04x}:{own_device:04x}")]
    OtherDevice {
        /// The stream's vendor ID.
        vendor: u16,
        /// The stream's device ID.
        device: u16,
        /// This device's vendor ID.
        own_vendor: u16,
        /// This device's device ID.
        own_device: u16,
    },
    /// A section does not fit this device.
    #[error("migration stream {section} section: {detail}")]
    Section {
        /// Which section.
        section: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The model refused its section.
    #[error("the device model refused its migration state: errno {0}")]
    Model(Errno),
}

impl StreamError {
    /// The errno the client gets: `EPROTONOSUPPORT` for another version, `ENODEV` for
    /// another device, the model's own errno, `EINVAL` for everything malformed.
    pub fn errno(&self) -> Errno {
        match self {
            StreamError::Version { .. } => EPROTONOSUPPORT,
            StreamError::OtherDevice { .. } => ENODEV,
            StreamError::Model(e) => *e,
            _ => EINVAL,
        }
    }

    /// A section error.
    pub fn section(section: &'static str, detail: impl Into<String>) -> Self {
        StreamError::Section {
            section,
            detail: detail.into(),
        }
    }
}

/// The state of a device, as saved or as read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// The emulated configuration space.
    pub config: &'a [u8],
    /// Whether INTx is asserted.
    pub intx_asserted: bool,
    /// MSI-X vectors.
    pub msix_vectors: u16,
    /// The MSI-X table, 16 bytes per vector.
    pub msix_table: &'a [u8],
    /// The pending bit array.
    pub msix_pending: Vec<u64>,
    /// The model's own state.
    pub model: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Writes a stream of `state`.
pub fn encode(state: &DeviceState<'_>) -> Vec<u8> {
    let mut irq = Vec::with_capacity(IRQ_FIXED + state.msix_table.len() + 8);
    irq.push(if state.intx_asserted {
        IRQ_FLAG_INTX
    } else {
        0
    });
    irq.extend_from_slice(&[0; 3]);
    irq.extend_from_slice(&state.msix_vectors.to_le_bytes());
    irq.extend_from_slice(&[0; 2]);
    irq.extend_from_slice(state.msix_table);
    for q in &state.msix_pending {
        irq.extend_from_slice(&q.to_le_bytes());
    }
    let sections = [state.config, &irq[..], state.model];
    let crc = sections
        .iter()
        .fold(0, |c, s| crate::crc32c::crc32c_update(c, s));
    let len32 = |s: &[u8]| u32::try_from(s.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_SIZE + sections.iter().map(|s| s.len()).sum::<usize>());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&state.vendor_id.to_le_bytes());
    out.extend_from_slice(&state.device_id.to_le_bytes());
    for s in sections {
        out.extend_from_slice(&len32(s).to_le_bytes());
    }
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for s in sections {
        out.extend_from_slice(s);
    }
    out
}

/// Reads a stream for the device `vendor_id:device_id`: header, lengths, checksum and
/// the interrupt section's layout are checked here; the sections' contents against the
/// device by the caller.
pub fn decode(
    bytes: &[u8],
    vendor_id: u16,
    device_id: u16,
) -> Result<DeviceState<'_>, StreamError> {
    if bytes.len() < HEADER_SIZE {
        return Err(StreamError::Truncated { len: bytes.len() });
    }
    let magic = u32_at(bytes, 0);
    if magic != MAGIC {
        return Err(StreamError::BadMagic { found: magic });
    }
    let version = u16_at(bytes, 4);
    if version != VERSION {
        return Err(StreamError::Version { found: version });
    }
    let header = u16_at(bytes, 6);
    if usize::from(header) != HEADER_SIZE {
        return Err(StreamError::Header {
            field: "header size",
            value: header.into(),
        });
    }
    let reserved = u32_at(bytes, 28);
    if reserved != 0 {
        return Err(StreamError::Header {
            field: "reserved",
            value: reserved.into(),
        });
    }
    let lens = [u32_at(bytes, 12), u32_at(bytes, 16), u32_at(bytes, 20)];
    let announced = HEADER_SIZE as u64 + lens.iter().map(|&l| u64::from(l)).sum::<u64>();
    if announced != bytes.len() as u64 {
        return Err(StreamError::Length {
            len: bytes.len(),
            announced,
        });
    }
    let (config, rest) = bytes[HEADER_SIZE..].split_at(lens[0] as usize);
    let (irq, model) = rest.split_at(lens[1] as usize);
    let stated = u32_at(bytes, 24);
    let computed = crc32c(&bytes[HEADER_SIZE..]);
    if stated != computed {
        return Err(StreamError::Checksum { stated, computed });
    }
    let (vendor, device) = (u16_at(bytes, 8), u16_at(bytes, 10));
    if (vendor, device) != (vendor_id, device_id) {
        return Err(StreamError::OtherDevice {
            vendor,
            device,
            own_vendor: vendor_id,
            own_device: device_id,
        });
    }
    if irq.len() < IRQ_FIXED {
        return Err(StreamError::section(
            "interrupt",
            format!("{} bytes, fewer than its {IRQ_FIXED}-byte head", irq.len()),
        ));
    }
    if irq[0] & !IRQ_FLAG_INTX != 0 || irq[1..4] != [0; 3] || irq[6..8] != [0; 2] {
        return Err(StreamError::section(
            "interrupt",
            "reserved flags or fields set",
        ));
    }
    let vectors = u16_at(irq, 4);
    let table_len = 16 * usize::from(vectors);
    let pba_words = usize::from(vectors).div_ceil(64);
    if irq.len() != IRQ_FIXED + table_len + 8 * pba_words {
        return Err(StreamError::section(
            "interrupt",
            format!(
                "{} bytes for {vectors} MSI-X vectors (expected {})",
                irq.len(),
                IRQ_FIXED + table_len + 8 * pba_words
            ),
        ));
    }
    let msix_table = &irq[IRQ_FIXED..IRQ_FIXED + table_len];
    let msix_pending = irq[IRQ_FIXED + table_len..]
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .collect();
    Ok(DeviceState {
        vendor_id: vendor,
        device_id: device,
        config,
        intx_asserted: irq[0] & IRQ_FLAG_INTX != 0,
        msix_vectors: vectors,
        msix_table,
        msix_pending,
        model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let config: Vec<u8> = (0..256).map(|i| i as u8).collect();
        let table: Vec<u8> = (0..2 * 16).map(|i| (i * 3) as u8).collect();
        let model = b"model state".to_vec();
        (config, table, model)
    }

    fn state<'a>(config: &'a [u8], table: &'a [u8], model: &'a [u8]) -> DeviceState<'a> {
        DeviceState {
            vendor_id: 0x1234,
            device_id: 0x11f0,
            config,
            intx_asserted: true,
            msix_vectors: 2,
            msix_table: table,
            msix_pending: vec![0b10],
            model,
        }
    }

    /// A stream decodes back to what was saved; the header is laid out as documented
    /// (magic, version, sizes, checksum).
    #[test]
    fn round_trip_and_layout() {
        let (c, t, m) = sample();
        let s = state(&c, &t, &m);
        let bytes = encode(&s);
        assert_eq!(&bytes[0..4], b"VFUM");
        assert_eq!(u16_at(&bytes, 4), 1);
        assert_eq!(u16_at(&bytes, 6), 32);
        assert_eq!(u32_at(&bytes, 12), 256);
        assert_eq!(u32_at(&bytes, 16), 8 + 32 + 8);
        assert_eq!(u32_at(&bytes, 20), 11);
        assert_eq!(u32_at(&bytes, 24), crc32c(&bytes[32..]));
        assert_eq!(bytes.len(), 32 + 256 + 48 + 11);
        assert_eq!(decode(&bytes, 0x1234, 0x11f0), Ok(s));
    }

    /// Every kind of damage is refused with its own error and errno, and never
    /// panics: truncation at every length, any flipped bit, other magic, version,
    /// header size, reserved bits, lengths, device.
    #[test]
    fn corruption_is_refused() {
        let (c, t, m) = sample();
        let good = encode(&state(&c, &t, &m));
        for len in 0..good.len() {
            let e = decode(&good[..len], 0x1234, 0x11f0).unwrap_err();
            assert_eq!(e.errno(), EINVAL, "truncated to {len}: {e}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer, 0x1234, 0x11f0),
            Err(StreamError::Length { .. })
        ));
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad, 0x1234, 0x11f0).is_err(), "bit {bit} flipped");
        }
        let patch = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            decode(&b, 0x1234, 0x11f0).unwrap_err()
        };
        assert_eq!(
            patch(0, b"QEMU"),
            StreamError::BadMagic {
                found: u32::from_le_bytes(*b"QEMU")
            }
        );
        let e = patch(4, &[2, 0]);
        assert_eq!(e, StreamError::Version { found: 2 });
        assert_eq!(e.errno(), EPROTONOSUPPORT);
        assert!(matches!(patch(6, &[40, 0]), StreamError::Header { .. }));
        assert!(matches!(patch(28, &[1]), StreamError::Header { .. }));
        assert!(matches!(patch(12, &[0, 2]), StreamError::Length { .. }));
        assert!(matches!(patch(300, &[0xff]), StreamError::Checksum { .. }));
        let e = decode(&good, 0x1234, 0x11f1).unwrap_err();
        assert_eq!(e.errno(), ENODEV, "{e}");
        assert!(e.to_string().contains("1234:11f0"), "{e}");
    }

    /// The interrupt section's own layout: reserved bits, and a length that does not
    /// match its vector count, are refused even with a correct checksum.
    #[test]
    fn interrupt_section_layout() {
        let (c, t, m) = sample();
        let mut s = state(&c, &t, &m);
        s.msix_vectors = 3;
        assert!(matches!(
            decode(&encode(&s), 0x1234, 0x11f0),
            Err(StreamError::Section {
                section: "interrupt",
                ..
            })
        ));
        let mut bytes = encode(&state(&c, &t, &m));
        bytes[32 + 256] |= 0x80;
        let crc = crc32c(&bytes[32..]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&bytes, 0x1234, 0x11f0),
            Err(StreamError::Section { .. })
        ));
        let none = DeviceState {
            msix_vectors: 0,
            msix_table: &[],
            msix_pending: Vec::new(),
            intx_asserted: false,
            ..state(&c, &t, &m)
        };
        assert_eq!(decode(&encode(&none), 0x1234, 0x11f0), Ok(none));
    }
}
