//! The virtio-pci capabilities of a device's configuration space (virtio 1.2, section
//! 4.1.4), parsed once into typed locations.

use thiserror::Error;

/// PCI capability ID of vendor-specific capabilities, which virtio uses.
const CAP_VENDOR: u8 = 0x09;
/// PCI capability ID of MSI-X.
const CAP_MSIX: u8 = 0x11;
/// Capabilities pointer in the configuration space header.
const CAP_POINTER: usize = 0x34;
/// Status register bit: the capability list exists.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// `cfg_type` values.
const COMMON_CFG: u8 = 1;
const NOTIFY_CFG: u8 = 2;
const ISR_CFG: u8 = 3;
const DEVICE_CFG: u8 = 4;
const SHARED_MEMORY_CFG: u8 = 8;

/// A structure inside a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    /// BAR index (0..=5).
    pub bar: u8,
    /// Offset inside the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A shared memory region of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedMemoryCap {
    /// Region id (the tunnel's DMA windows are region 0).
    pub id: u8,
    /// Where it lies.
    pub range: BarRange,
}

/// The MSI-X capability: how many vectors, and where the table and the pending bit
/// array lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    /// Vectors in the table.
    pub table_size: u16,
    /// The table: 16 bytes per vector.
    pub table: BarRange,
    /// The pending bit array: a bit per vector, in 64-bit words.
    pub pba: BarRange,
}

impl MsixCap {
    /// Decodes the capability at `at` (message control, table and PBA offset/BIR).
    fn decode(space: &[u8], at: usize) -> Option<Self> {
        let control = u16_at(space, at + 2)?;
        let table = u32_at(space, at + 4)?;
        let pba = u32_at(space, at + 8)?;
        let table_size = (control & 0x7ff) + 1;
        Some(Self {
            table_size,
            table: BarRange {
                bar: (table & 7) as u8,
                offset: u64::from(table & !7),
                len: 16 * u64::from(table_size),
            },
            pba: BarRange {
                bar: (pba & 7) as u8,
                offset: u64::from(pba & !7),
                len: 8 * u64::from(table_size.div_ceil(64)),
            },
        })
    }
}

impl BarRange {
    /// Whether the two ranges share a byte of the same BAR.
    pub fn overlaps(&self, other: &BarRange) -> bool {
        self.bar == other.bar
            && self.offset < other.offset.saturating_add(other.len)
            && other.offset < self.offset.saturating_add(self.len)
    }
}

/// Where the virtio structures of a modern virtio-pci device lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: BarRange,
    /// Notification area, and the multiplier of `queue_notify_off`.
    pub notify: BarRange,
    /// Bytes between the notification addresses of consecutive `queue_notify_off`s.
    pub notify_multiplier: u32,
    /// ISR status byte.
    pub isr: BarRange,
    /// Device-specific configuration, if any.
    pub device: Option<BarRange>,
    /// Shared memory regions.
    pub shared_memory: Vec<SharedMemoryCap>,
    /// The MSI-X capability, if the function has one.
    pub msix: Option<MsixCap>,
}

/// Why a configuration space is not that of a modern virtio-pci device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CapsError {
    /// The configuration space is shorter than its header.
    #[error("configuration space of {0} bytes is too short")]
    Short(usize),
    /// The device has no capability list.
    #[error("the device has no capability list")]
    NoCapabilities,
    /// The capability list points outside the space, or loops.
    #[error("malformed capability list at offset {0:#x}")]
    Malformed(usize),
    /// A required structure is missing.
    #[error("no virtio {0} capability: not a modern (virtio 1.x) PCI device")]
    Missing(&'static str),
    /// A capability names a BAR that does not exist.
    #[error("virtio capability at {at:#x} names BAR {bar}")]
    BadBar {
        /// Where the capability is.
        at: usize,
        /// The BAR it names.
        bar: u8,
    },
}

fn u16_at(space: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(space.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(space: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(space.get(at..at + 4)?.try_into().ok()?))
}

impl VirtioCaps {
    /// Walks the capability list of `space` (the first 256 bytes or more of the
    /// configuration space). The first capability of each type is used, as the
    /// specification asks of drivers.
    pub fn parse(space: &[u8]) -> Result<Self, CapsError> {
        if space.len() < 64 {
            return Err(CapsError::Short(space.len()));
        }
        let status = u16_at(space, 6).unwrap_or(0);
        if status & STATUS_CAP_LIST == 0 {
            return Err(CapsError::NoCapabilities);
        }
        let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
        let mut shared_memory = Vec::new();
        let mut msix = None;
        let mut at = usize::from(space[CAP_POINTER] & 0xfc);
        // Each capability is at least 4 bytes in the 192 bytes after the header.
        let mut budget = 48;
        while at != 0 {
            if at < 64 || at + 4 > space.len().min(256) || budget == 0 {
                return Err(CapsError::Malformed(at));
            }
            budget -= 1;
            let (id, next, cap_len) = (space[at], space[at + 1], usize::from(space[at + 2]));
            if id == CAP_MSIX && msix.is_none() {
                msix = MsixCap::decode(space, at);
            }
            if id == CAP_VENDOR && cap_len >= 16 && at + cap_len <= space.len() {
                let cfg_type = space[at + 3];
                let bar = space[at + 4];
                let range =
                    |offset_hi: Option<u32>, len_hi: Option<u32>| -> Result<BarRange, CapsError> {
                        if bar > 5 {
                            return Err(CapsError::BadBar { at, bar });
                        }
                        let off = u64::from(u32_at(space, at + 8).unwrap_or(0))
                            | u64::from(offset_hi.unwrap_or(0)) << 32;
                        let len = u64::from(u32_at(space, at + 12).unwrap_or(0))
                            | u64::from(len_hi.unwrap_or(0)) << 32;
                        Ok(BarRange {
                            bar,
                            offset: off,
                            len,
                        })
                    };
                match cfg_type {
                    COMMON_CFG if common.is_none() => common = Some(range(None, None)?),
                    NOTIFY_CFG if notify.is_none() && cap_len >= 20 => {
                        let mult = u32_at(space, at + 16).unwrap_or(0);
                        notify = Some((range(None, None)?, mult));
                    }
                    ISR_CFG if isr.is_none() => isr = Some(range(None, None)?),
                    DEVICE_CFG if device.is_none() => device = Some(range(None, None)?),
                    SHARED_MEMORY_CFG if cap_len >= 24 => {
                        let id = space[at + 5];
                        let r = range(u32_at(space, at + 16), u32_at(space, at + 20))?;
                        shared_memory.push(SharedMemoryCap { id, range: r });
                    }
                    _ => {}
                }
            }
            at = usize::from(next & 0xfc);
        }
        let (notify, notify_multiplier) = notify.ok_or(CapsError::Missing("notify"))?;
        Ok(Self {
            common: common.ok_or(CapsError::Missing("common configuration"))?,
            notify,
            notify_multiplier,
            isr: isr.ok_or(CapsError::Missing("ISR"))?,
            device,
            shared_memory,
            msix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// QEMU's layout (BAR 4: common 0, ISR 0x1000, device 0x2000, notify 0x3000 with
    /// multiplier 4), behind an MSI-X capability, is found; a shared memory capability
    /// with a 64-bit offset and length is read whole.
    #[test]
    fn parses_qemu_layout() {
        // MSI-X: 3 vectors, table at BAR 1 + 0, PBA at BAR 1 + 0x800.
        let msix = (0x11u8, vec![2, 0, 1, 0, 0, 0, 1, 8, 0, 0]);
        let s = space(&[
            msix,
            vcap(COMMON_CFG, 4, 0, 0, 0x38, &[]),
            vcap(ISR_CFG, 4, 0, 0x1000, 1, &[]),
            vcap(DEVICE_CFG, 4, 0, 0x2000, 0x24, &[]),
            vcap(NOTIFY_CFG, 4, 0, 0x3000, 0x1000, &4u32.to_le_bytes()),
            vcap(SHARED_MEMORY_CFG, 2, 0, 0, 0, &[1, 0, 0, 0, 4, 0, 0, 0]),
        ]);
        let caps = VirtioCaps::parse(&s).unwrap();
        assert_eq!(
            caps.common,
            BarRange {
                bar: 4,
                offset: 0,
                len: 0x38
            }
        );
        assert_eq!(caps.isr.offset, 0x1000);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert_eq!(caps.notify.offset, 0x3000);
        assert_eq!(caps.notify_multiplier, 4);
        assert_eq!(
            caps.msix,
            Some(MsixCap {
                table_size: 3,
                table: BarRange {
                    bar: 1,
                    offset: 0,
                    len: 48
                },
                pba: BarRange {
                    bar: 1,
                    offset: 0x800,
                    len: 8
                },
            })
        );
        assert!(!caps.msix.unwrap().table.overlaps(&caps.common));
        assert_eq!(
            caps.shared_memory,
            vec![SharedMemoryCap {
                id: 0,
                range: BarRange {
                    bar: 2,
                    offset: 1 << 32,
                    len: 4 << 32
                }
            }]
        );
    }

    /// A legacy device (no virtio capabilities), a list that loops, a pointer into the
    /// header, and a capability naming BAR 6 are refused with what is wrong.
    #[test]
    fn refuses_what_is_not_modern_virtio() {
        assert_eq!(VirtioCaps::parse(&[0u8; 16]), Err(CapsError::Short(16)));
        assert_eq!(
            VirtioCaps::parse(&[0u8; 256]),
            Err(CapsError::NoCapabilities)
        );
        let legacy = space(&[(0x11, vec![0u8; 10])]);
        assert_eq!(
            VirtioCaps::parse(&legacy),
            Err(CapsError::Missing("notify"))
        );
        let mut looping = space(&[(0x11, vec![0u8; 2])]);
        looping[0x41] = 0x40;
        assert_eq!(VirtioCaps::parse(&looping), Err(CapsError::Malformed(0x40)));
        let mut header = space(&[(0x11, vec![0u8; 2])]);
        header[CAP_POINTER] = 0x10;
        assert_eq!(VirtioCaps::parse(&header), Err(CapsError::Malformed(0x10)));
        let bad_bar = space(&[vcap(COMMON_CFG, 6, 0, 0, 0x38, &[])]);
        assert_eq!(
            VirtioCaps::parse(&bad_bar),
            Err(CapsError::BadBar { at: 0x40, bar: 6 })
        );
    }
}

/// Configuration spaces for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `cfg_type` values.
    pub const COMMON: u8 = COMMON_CFG;
    /// See [`COMMON`].
    pub const NOTIFY: u8 = NOTIFY_CFG;
    /// See [`COMMON`].
    pub const ISR: u8 = ISR_CFG;
    /// See [`COMMON`].
    pub const DEVICE: u8 = DEVICE_CFG;

    /// A configuration space with a capability list of `caps` (id, bytes after the
    /// id/next pair), laid out from 0x40.
    pub fn space(caps: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut s = vec![0u8; 256];
        s[6] = STATUS_CAP_LIST as u8;
        let mut at = 0x40;
        s[CAP_POINTER] = at as u8;
        for (i, (id, body)) in caps.iter().enumerate() {
            let next = (at + 2 + body.len() + 3) & !3;
            s[at] = *id;
            s[at + 1] = if i + 1 == caps.len() { 0 } else { next as u8 };
            s[at + 2..at + 2 + body.len()].copy_from_slice(body);
            at = next;
        }
        s
    }

    /// A virtio capability body: cap_len, cfg_type, bar, id, padding, offset, length,
    /// then `extra`.
    pub fn vcap(
        cfg_type: u8,
        bar: u8,
        id: u8,
        offset: u32,
        len: u32,
        extra: &[u8],
    ) -> (u8, Vec<u8>) {
        let mut b = vec![(16 + extra.len()) as u8, cfg_type, bar, id, 0, 0];
        b.extend(offset.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend(extra);
        (CAP_VENDOR, b)
    }
}
