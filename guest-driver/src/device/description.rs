//! The static description of a device: PCI identity, BARs, interrupts, capabilities.
//!
//! A model returns a [`DeviceDescription`] once, from
//! [`DeviceModel::describe`](super::DeviceModel::describe); the server builds the
//! configuration space, the region table and the IRQ table from it.
//! [`DeviceDescription::validate`] lists what is wrong with a description;
//! [`DeviceDescription::sanitized`] drops the faulty parts so that a server can always
//! be built (and logs what it dropped).

use thiserror::Error;

/// How a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mmio32,
    /// 64-bit memory BAR: takes this BAR register and the next one.
    Mmio64,
    /// I/O port BAR (4 to 256 bytes).
    Io,
}

/// One BAR.
///
/// Accesses are checked before the model sees them: a width of `count` bytes must lie
/// within `min_access..=max_access`. When `max_access <= 8` (a register BAR) `count`
/// must be a power of two and the offset a multiple of `count` (natural alignment).
/// When `max_access > 8` (a bulk BAR, such as memory) any `count` that is a multiple
/// of `min_access` is allowed, at an offset that is a multiple of `min_access`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BarDesc {
    /// Size in bytes: a power of two, at least 16 for memory, 4 to 256 for I/O.
    pub size: u64,
    /// Decoding.
    pub kind: BarKind,
    /// Prefetchable (memory BARs only).
    pub prefetchable: bool,
    /// Smallest access in bytes (a power of two, >= 1).
    pub min_access: usize,
    /// Largest access in bytes (>= `min_access`).
    pub max_access: usize,
}

impl BarDesc {
    /// A 32-bit, non-prefetchable memory BAR taking 1- to 8-byte aligned accesses.
    pub fn mmio32(size: u64) -> Self {
        Self {
            size,
            kind: BarKind::Mmio32,
            prefetchable: false,
            min_access: 1,
            max_access: 8,
        }
    }

    /// A 64-bit memory BAR taking 1- to 8-byte aligned accesses.
    pub fn mmio64(size: u64, prefetchable: bool) -> Self {
        Self {
            size,
            kind: BarKind::Mmio64,
            prefetchable,
            min_access: 1,
            max_access: 8,
        }
    }

    /// An I/O port BAR taking 1- to 4-byte aligned accesses.
    pub fn io(size: u64) -> Self {
        Self {
            size,
            kind: BarKind::Io,
            prefetchable: false,
            min_access: 1,
            max_access: 4,
        }
    }

    /// Whether `count` bytes at `offset` are an allowed access (bounds, width and
    /// alignment).
    pub fn access_ok(&self, offset: u64, count: usize) -> bool {
        let Some(end) = offset.checked_add(count as u64) else {
            return false;
        };
        if count == 0 || end > self.size || count < self.min_access || count > self.max_access {
            return false;
        }
        let min = self.min_access.max(1) as u64;
        if self.max_access > 8 {
            count as u64 % min == 0 && offset % min == 0
        } else {
            count.is_power_of_two() && offset % count as u64 == 0
        }
    }

    fn check(&self, index: usize) -> Result<(), DescriptionError> {
        let bad = |reason: &'static str| DescriptionError::Bar { index, reason };
        if !self.size.is_power_of_two() {
            return Err(bad("size is not a power of two"));
        }
        if !self.min_access.is_power_of_two() || self.max_access < self.min_access {
            return Err(bad("access widths are not a power of two range"));
        }
        match self.kind {
            BarKind::Io => {
                if !(4..=256).contains(&self.size) {
                    return Err(bad("an I/O BAR is 4 to 256 bytes"));
                }
                if self.prefetchable {
                    return Err(bad("an I/O BAR is not prefetchable"));
                }
            }
            BarKind::Mmio32 => {
                if !(16..=(1 << 31)).contains(&self.size) {
                    return Err(bad("a 32-bit memory BAR is 16 bytes to 2 GiB"));
                }
            }
            BarKind::Mmio64 => {
                if self.size < 16 || self.size > (1 << 63) {
                    return Err(bad("a 64-bit memory BAR is 16 bytes to 2^63 bytes"));
                }
                if index == 5 {
                    return Err(bad("a 64-bit BAR needs two registers; BAR 5 is the last"));
                }
            }
        }
        Ok(())
    }
}

/// The MSI-X capability: table and PBA locations. The table and PBA live in the BARs
/// named here; the library emulates them ([`super::msix`]): their accesses never
/// reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsixDesc {
    /// Number of vectors, 1 to 2048.
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in it (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in it (8-byte aligned).
    pub pba_offset: u32,
}

/// PCI Express device/port type of the PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PcieDeviceType {
    /// PCI Express endpoint (type 0).
    Endpoint,
    /// Legacy PCI Express endpoint (type 1).
    LegacyEndpoint,
}

/// A PCI capability in the capability list (MSI and MSI-X come from
/// [`DeviceDescription::msi_vectors`] and [`DeviceDescription::msix`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Power management, version 3, D0 and D3hot, no PME, No_Soft_Reset set.
    Pm,
    /// PCI Express capability version 2, x1 link at 2.5 GT/s, FLR capable. Its presence
    /// makes the configuration space 4096 bytes.
    PciExpress(PcieDeviceType),
    /// Vendor-specific capability: these bytes follow the id, next and length bytes
    /// (at most 252 of them); read-only.
    Vendor(Vec<u8>),
}

/// What a device is, as the server presents it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceDescription {
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// PCI device ID.
    pub device_id: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, 24 bits: base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    /// BARs 0 to 5. A 64-bit BAR at `i` takes `i + 1` too, which must be `None`.
    pub bars: [Option<BarDesc>; 6],
    /// Legacy INTx (pin INTA).
    pub intx: bool,
    /// MSI vectors: 0 (no MSI capability) or a power of two up to 32.
    pub msi_vectors: u32,
    /// MSI-X capability.
    pub msix: Option<MsixDesc>,
    /// Other capabilities, in list order (MSI and MSI-X follow them).
    pub capabilities: Vec<Capability>,
}

impl DeviceDescription {
    /// A description with these IDs and class, no BARs, no interrupts, no capabilities.
    pub fn new(vendor_id: u16, device_id: u16, class_code: u32) -> Self {
        Self {
            vendor_id,
            device_id,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class_code: class_code & 0x00ff_ffff,
            bars: [None; 6],
            intx: false,
            msi_vectors: 0,
            msix: None,
            capabilities: Vec::new(),
        }
    }

    /// Whether the device has a PCI Express capability (4096-byte config space).
    pub fn is_pcie(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::PciExpress(_)))
    }

    /// Size of the configuration space: 4096 with a PCI Express capability, else 256.
    pub fn config_size(&self) -> u64 {
        if self.is_pcie() {
            4096
        } else {
            256
        }
    }

    /// Every problem of this description (empty when it is valid).
    pub fn validate(&self) -> Vec<DescriptionError> {
        self.clone().sanitized().1
    }

    /// This description with its faulty parts removed, and what was removed.
    pub fn sanitized(mut self) -> (Self, Vec<DescriptionError>) {
        let mut errors = Vec::new();
        if self.class_code > 0x00ff_ffff {
            errors.push(DescriptionError::ClassCode(self.class_code));
            self.class_code &= 0x00ff_ffff;
        }
        let mut i = 0;
        while i < 6 {
            if let Some(bar) = self.bars[i] {
                if let Err(e) = bar.check(i) {
                    errors.push(e);
                    self.bars[i] = None;
                } else if bar.kind == BarKind::Mmio64 {
                    if self.bars[i + 1].is_some() {
                        errors.push(DescriptionError::Bar {
                            index: i + 1,
                            reason: "taken by the upper half of the 64-bit BAR before it",
                        });
                        self.bars[i + 1] = None;
                    }
                    i += 1;
                }
            }
            i += 1;
        }
        if self.msi_vectors != 0 && (!self.msi_vectors.is_power_of_two() || self.msi_vectors > 32) {
            errors.push(DescriptionError::MsiVectors(self.msi_vectors));
            self.msi_vectors = 0;
        }
        if let Some(m) = self.msix {
            if let Err(reason) = self.check_msix(&m) {
                errors.push(DescriptionError::Msix(reason));
                self.msix = None;
            }
        }
        let mut seen_pm = false;
        let mut seen_pcie = false;
        let mut kept = Vec::new();
        for cap in std::mem::take(&mut self.capabilities) {
            let dup = match &cap {
                Capability::Pm => std::mem::replace(&mut seen_pm, true),
                Capability::PciExpress(_) => std::mem::replace(&mut seen_pcie, true),
                Capability::Vendor(data) => {
                    if data.len() > MAX_VENDOR_DATA {
                        errors.push(DescriptionError::Capability(
                            "vendor-specific data longer than 252 bytes",
                        ));
                        continue;
                    }
                    false
                }
            };
            if dup {
                errors.push(DescriptionError::Capability("duplicate capability"));
                continue;
            }
            kept.push(cap);
        }
        self.capabilities = kept;
        // Everything must fit between 0x40 and 0x100; drop from the end until it does.
        while self.capability_bytes() > CAP_SPACE {
            errors.push(DescriptionError::Capability(
                "capabilities do not fit in the 192 bytes of config space after the header",
            ));
            if self.capabilities.pop().is_none() && self.msix.take().is_none() {
                self.msi_vectors = 0;
            }
        }
        (self, errors)
    }

    fn check_msix(&self, m: &MsixDesc) -> Result<(), &'static str> {
        if m.vectors == 0 || m.vectors > 2048 {
            return Err("vectors must be 1 to 2048");
        }
        let fits = |bar: u8, offset: u32, len: u64| -> Result<(), &'static str> {
            let b = self
                .bars
                .get(usize::from(bar))
                .copied()
                .flatten()
                .ok_or("table or PBA in a BAR that does not exist")?;
            if b.kind == BarKind::Io {
                return Err("table or PBA in an I/O BAR");
            }
            if offset % 8 != 0 {
                return Err("table or PBA offset not 8-byte aligned");
            }
            if u64::from(offset) + len > b.size {
                return Err("table or PBA beyond the end of its BAR");
            }
            Ok(())
        };
        let n = u64::from(m.vectors);
        fits(m.table_bar, m.table_offset, n * 16)?;
        fits(m.pba_bar, m.pba_offset, n.div_ceil(64) * 8)?;
        if m.table_bar == m.pba_bar {
            let (t0, t1) = (
                u64::from(m.table_offset),
                u64::from(m.table_offset) + n * 16,
            );
            let (p0, p1) = (
                u64::from(m.pba_offset),
                u64::from(m.pba_offset) + n.div_ceil(64) * 8,
            );
            if t0 < p1 && p0 < t1 {
                return Err("table and PBA overlap");
            }
        }
        Ok(())
    }

    /// Bytes the capability list takes (each capability dword-aligned).
    pub(crate) fn capability_bytes(&self) -> usize {
        let mut n: usize = self
            .capabilities
            .iter()
            .map(|c| match c {
                Capability::Pm => PM_LEN,
                Capability::PciExpress(_) => PCIE_LEN,
                Capability::Vendor(d) => (3 + d.len()).next_multiple_of(4),
            })
            .sum();
        if self.msi_vectors > 0 {
            n += MSI_LEN;
        }
        if self.msix.is_some() {
            n += MSIX_LEN;
        }
        n
    }
}

/// Most data bytes of a vendor-specific capability (its length byte counts 3 more).
pub const MAX_VENDOR_DATA: usize = 252;
/// Bytes available for capabilities: 0x40 to 0x100.
pub(crate) const CAP_SPACE: usize = 0xc0;
pub(crate) const PM_LEN: usize = 8;
pub(crate) const MSI_LEN: usize = 24;
pub(crate) const MSIX_LEN: usize = 12;
pub(crate) const PCIE_LEN: usize = 60;

/// A fault in a [`DeviceDescription`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DescriptionError {
    /// The class code does not fit in 24 bits.
    #[error("class code {0:#x} does not fit in 24 bits")]
    ClassCode(u32),
    /// A BAR is invalid.
    #[error("BAR {index}: {reason}")]
    Bar {
        /// BAR number.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The MSI vector count is not 0 or a power of two up to 32.
    #[error("MSI vectors {0}: must be 0 or a power of two up to 32")]
    MsiVectors(u32),
    /// The MSI-X description is invalid.
    #[error("MSI-X: {0}")]
    Msix(&'static str),
    /// A capability is invalid or does not fit.
    #[error("capability: {0}")]
    Capability(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Access checks: bounds without overflow, widths, natural alignment for register
    /// BARs and min-access granularity for bulk BARs.
    #[test]
    fn access_rules() {
        let reg = BarDesc::mmio32(0x100);
        assert!(reg.access_ok(0, 4));
        assert!(reg.access_ok(0xf8, 8));
        assert!(!reg.access_ok(0xfc, 8), "past the end");
        assert!(!reg.access_ok(2, 4), "unaligned");
        assert!(!reg.access_ok(0, 3), "not a power of two");
        assert!(!reg.access_ok(0, 16), "wider than max_access");
        assert!(!reg.access_ok(0, 0), "empty");
        assert!(!reg.access_ok(u64::MAX, 1), "offset overflow");
        let bulk = BarDesc {
            size: 0x1000,
            kind: BarKind::Mmio32,
            prefetchable: true,
            min_access: 4,
            max_access: 0x1000,
        };
        assert!(bulk.access_ok(4, 12));
        assert!(!bulk.access_ok(2, 12));
        assert!(!bulk.access_ok(0, 6));
        assert!(bulk.access_ok(0, 0x1000));
    }

    /// Sanitizing drops bad BARs, a BAR shadowed by a 64-bit BAR, bad MSI counts, an
    /// MSI-X table outside its BAR, duplicates and capabilities that do not fit.
    #[test]
    fn sanitize_drops_faults() {
        let mut d = DeviceDescription::new(1, 2, 0x12_3456);
        d.bars[0] = Some(BarDesc::mmio64(0x1000, false));
        d.bars[1] = Some(BarDesc::mmio32(0x1000));
        d.bars[2] = Some(BarDesc::io(512));
        d.bars[3] = Some(BarDesc::mmio32(0x1001));
        d.bars[5] = Some(BarDesc::mmio64(0x1000, false));
        d.msi_vectors = 3;
        d.msix = Some(MsixDesc {
            vectors: 512,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        });
        d.capabilities = vec![
            Capability::Pm,
            Capability::Pm,
            Capability::Vendor(vec![0; 300]),
        ];
        let (s, errors) = d.sanitized();
        assert_eq!(errors.len(), 8, "{errors:?}");
        assert_eq!(s.bars[0].map(|b| b.kind), Some(BarKind::Mmio64));
        assert!(s.bars[1..].iter().all(Option::is_none));
        assert_eq!(s.msi_vectors, 0);
        assert_eq!(s.msix, None);
        assert_eq!(s.capabilities, vec![Capability::Pm]);
        assert!(s.validate().is_empty());
    }

    /// Vendor capabilities that overflow the capability area are dropped from the end.
    #[test]
    fn capability_space_is_bounded() {
        let mut d = DeviceDescription::new(1, 2, 0);
        d.capabilities = vec![
            Capability::PciExpress(PcieDeviceType::Endpoint),
            Capability::Vendor(vec![0; 100]),
            Capability::Vendor(vec![0; 100]),
        ];
        let (s, errors) = d.sanitized();
        assert_eq!(errors.len(), 1);
        assert_eq!(s.capabilities.len(), 2);
        assert!(s.capability_bytes() <= CAP_SPACE);
        assert_eq!(s.config_size(), 4096);
    }
}
