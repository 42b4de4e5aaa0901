//! PCI configuration space emulation: a type 0 header and the capability list.
//!
//! Every byte the library emulates has a value, a write mask (bits a write may change)
//! and a write-1-to-clear mask. Accesses of any width and alignment are applied byte
//! by byte against those masks, so a write that straddles fields changes exactly the
//! writable bits of each. A few registers have side effects beyond the masks
//! ([`WriteEffects`]): unsupported power states are ignored, MSI Multiple Message
//! Enable is clamped to what the device is capable of, and Initiate Function Level
//! Reset resets the device.
//!
//! Layout:
//!
//! ```text
//! 0x00 vendor, device        0x04 command, status      0x08 revision, class
//! 0x0c cache line, latency, header type 0, BIST 0
//! 0x10-0x27 BARs (size masks: write all ones, read back the size and type bits)
//! 0x2c subsystem vendor, subsystem   0x30 expansion ROM (none: reads 0)
//! 0x34 capabilities pointer   0x3c interrupt line (rw), pin (INTA or none)
//! 0x40.. capabilities, dword aligned, in description order, then MSI, then MSI-X
//! ```
//!
//! Bytes outside the header and the capabilities (device-specific registers, and the
//! extended space 0x100.. of a PCI Express device) are not emulated here: the server
//! passes them to the model.

use super::description::{
    BarKind, Capability, DeviceDescription, PcieDeviceType, MSIX_LEN, MSI_LEN, PCIE_LEN, PM_LEN,
};

/// Command register bits.
pub mod command {
    /// I/O space enable.
    pub const IO: u16 = 1 << 0;
    /// Memory space enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits.
pub mod status {
    /// INTx asserted.
    pub const INTX: u16 = 1 << 3;
    /// Capabilities list present.
    pub const CAP_LIST: u16 = 1 << 4;
    /// Error bits, write 1 to clear.
    pub const W1C: u16 = 0xf900;
}

/// Capability IDs.
pub mod cap_id {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const PCIE: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Header register offsets.
pub mod reg {
    /// Vendor ID.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID.
    pub const DEVICE_ID: usize = 0x02;
    /// Command.
    pub const COMMAND: usize = 0x04;
    /// Status.
    pub const STATUS: usize = 0x06;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// Class code (3 bytes: programming interface, subclass, base class).
    pub const CLASS: usize = 0x09;
    /// Cache line size.
    pub const CACHE_LINE: usize = 0x0c;
    /// Latency timer.
    pub const LATENCY: usize = 0x0d;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR 0 (BARs 1 to 5 follow, 4 bytes each).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM BAR.
    pub const ROM: usize = 0x30;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line.
    pub const INT_LINE: usize = 0x3c;
    /// Interrupt pin.
    pub const INT_PIN: usize = 0x3d;
    /// End of the type 0 header.
    pub const HEADER_END: usize = 0x40;
}

/// MSI capability: Message Control bits.
const MSI_CTRL_ENABLE: u16 = 1 << 0;
const MSI_CTRL_MME_SHIFT: u16 = 4;
const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_PVM: u16 = 1 << 8;
/// MSI-X Message Control bits.
const MSIX_CTRL_MASK: u16 = 1 << 14;
const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// PCI Express Device Control: Initiate Function Level Reset.
const PCIE_DEVCTL_FLR: u16 = 1 << 15;

/// Where each capability sits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapLayout {
    /// Power management capability offset.
    pub pm: Option<usize>,
    /// MSI capability offset.
    pub msi: Option<usize>,
    /// MSI vectors the capability offers.
    pub msi_vectors: u32,
    /// MSI-X capability offset.
    pub msix: Option<usize>,
    /// PCI Express capability offset.
    pub pcie: Option<usize>,
    /// Every capability: (offset, id, length).
    pub all: Vec<(usize, u8, usize)>,
}

/// What a configuration write did beyond changing bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteEffects {
    /// Initiate Function Level Reset was written: the device must reset.
    pub flr: bool,
    /// The INTx disable bit went from 1 to 0.
    pub intx_unblocked: bool,
    /// MSI vectors whose mask bit went from 1 to 0.
    pub msi_unmasked: u32,
    /// MSI-X went from masked (function mask set) to unmasked.
    pub msix_unmasked: bool,
}

impl WriteEffects {
    /// Combines the effects of two writes.
    pub fn merge(&mut self, other: WriteEffects) {
        self.flr |= other.flr;
        self.intx_unblocked |= other.intx_unblocked;
        self.msi_unmasked |= other.msi_unmasked;
        self.msix_unmasked |= other.msix_unmasked;
    }
}

/// The emulated configuration space of one device.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    defaults: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    owned: Vec<bool>,
    layout: CapLayout,
    intx_level: bool,
}

/// Writes `len` little-endian bytes of `val` at `off`, ignoring what falls outside.
fn put(buf: &mut [u8], off: usize, val: u64, len: usize) {
    for i in 0..len {
        if let Some(b) = buf.get_mut(off + i) {
            *b = (val >> (8 * i)) as u8;
        }
    }
}

/// Reads `len` (<= 8) little-endian bytes at `off`; missing bytes read as 0.
fn get(buf: &[u8], off: usize, len: usize) -> u64 {
    (0..len).fold(0u64, |acc, i| {
        acc | u64::from(buf.get(off + i).copied().unwrap_or(0)) << (8 * i)
    })
}

impl ConfigSpace {
    /// Builds the power-on configuration space of a (sanitized) description.
    pub fn new(desc: &DeviceDescription) -> Self {
        let size = desc.config_size() as usize;
        let mut s = Self {
            bytes: vec![0; size],
            defaults: Vec::new(),
            wmask: vec![0; size],
            w1c: vec![0; size],
            owned: vec![false; size],
            layout: CapLayout::default(),
            intx_level: false,
        };
        for o in &mut s.owned[..reg::HEADER_END] {
            *o = true;
        }
        s.build_header(desc);
        s.build_capabilities(desc);
        s.defaults = s.bytes.clone();
        s
    }

    fn set(&mut self, off: usize, len: usize, val: u64, wmask: u64) {
        put(&mut self.bytes, off, val, len);
        put(&mut self.wmask, off, wmask, len);
    }

    fn build_header(&mut self, desc: &DeviceDescription) {
        self.set(reg::VENDOR_ID, 2, desc.vendor_id.into(), 0);
        self.set(reg::DEVICE_ID, 2, desc.device_id.into(), 0);
        let cmd_mask = command::IO
            | command::MEMORY
            | command::BUS_MASTER
            | command::PARITY
            | command::SERR
            | command::INTX_DISABLE;
        self.set(reg::COMMAND, 2, 0, cmd_mask.into());
        put(&mut self.w1c, reg::STATUS, status::W1C.into(), 2);
        self.set(reg::REVISION, 1, desc.revision.into(), 0);
        self.set(reg::CLASS, 3, (desc.class_code & 0x00ff_ffff).into(), 0);
        self.set(reg::CACHE_LINE, 1, 0, 0xff);
        // The latency timer is hardwired to 0 on PCI Express.
        let latency_mask = if desc.is_pcie() { 0 } else { 0xff };
        self.set(reg::LATENCY, 1, 0, latency_mask);
        let mut i = 0;
        while i < 6 {
            let off = reg::BAR0 + 4 * i;
            if let Some(bar) = desc.bars[i] {
                let size_mask = !(bar.size.wrapping_sub(1));
                let pf = if bar.prefetchable { 1 << 3 } else { 0 };
                match bar.kind {
                    BarKind::Io => self.set(off, 4, 1, size_mask & 0xffff_fffc),
                    BarKind::Mmio32 => self.set(off, 4, pf, size_mask & 0xffff_fff0),
                    BarKind::Mmio64 => {
                        self.set(off, 4, pf | 0b100, size_mask & 0xffff_fff0);
                        self.set(off + 4, 4, 0, size_mask >> 32);
                        i += 1;
                    }
                }
            }
            i += 1;
        }
        self.set(
            reg::SUBSYSTEM_VENDOR_ID,
            2,
            desc.subsystem_vendor_id.into(),
            0,
        );
        self.set(reg::SUBSYSTEM_ID, 2, desc.subsystem_id.into(), 0);
        self.set(reg::INT_LINE, 1, 0, 0xff);
        self.set(reg::INT_PIN, 1, u64::from(desc.intx), 0);
    }

    fn build_capabilities(&mut self, desc: &DeviceDescription) {
        enum Item<'a> {
            Cap(&'a Capability),
            Msi,
            Msix,
        }
        let mut items: Vec<Item<'_>> = desc.capabilities.iter().map(Item::Cap).collect();
        if desc.msi_vectors > 0 {
            items.push(Item::Msi);
        }
        if desc.msix.is_some() {
            items.push(Item::Msix);
        }
        let mut at = reg::HEADER_END;
        let mut prev_next: Option<usize> = None;
        for item in items {
            let (id, len) = match &item {
                Item::Cap(Capability::Pm) => (cap_id::PM, PM_LEN),
                Item::Cap(Capability::PciExpress(_)) => (cap_id::PCIE, PCIE_LEN),
                Item::Cap(Capability::Vendor(d)) => (cap_id::VENDOR, 3 + d.len()),
                Item::Msi => (cap_id::MSI, MSI_LEN),
                Item::Msix => (cap_id::MSIX, MSIX_LEN),
            };
            let span = len.next_multiple_of(4);
            if at + span > 0x100 {
                // The description was sanitized; this cannot happen, but never write
                // past the standard space.
                log::error!("capability {id:#x} does not fit at {at:#x}; left out");
                break;
            }
            match prev_next {
                None => self.set(reg::CAP_PTR, 1, at as u64, 0),
                Some(p) => self.set(p, 1, at as u64, 0),
            }
            self.set(at, 1, id.into(), 0);
            prev_next = Some(at + 1);
            for o in &mut self.owned[at..at + span] {
                *o = true;
            }
            match item {
                Item::Cap(Capability::Pm) => self.build_pm(at),
                Item::Cap(Capability::PciExpress(t)) => self.build_pcie(at, *t),
                Item::Cap(Capability::Vendor(d)) => {
                    self.set(at + 2, 1, len as u64, 0);
                    for (k, b) in d.iter().enumerate() {
                        self.set(at + 3 + k, 1, (*b).into(), 0);
                    }
                }
                Item::Msi => self.build_msi(at, desc.msi_vectors),
                Item::Msix => {
                    if let Some(m) = desc.msix {
                        self.layout.msix = Some(at);
                        let table_size = u64::from(m.vectors.saturating_sub(1) & 0x7ff);
                        self.set(
                            at + 2,
                            2,
                            table_size,
                            (MSIX_CTRL_MASK | MSIX_CTRL_ENABLE).into(),
                        );
                        let table = u64::from(m.table_offset & !7) | u64::from(m.table_bar & 7);
                        let pba = u64::from(m.pba_offset & !7) | u64::from(m.pba_bar & 7);
                        self.set(at + 4, 4, table, 0);
                        self.set(at + 8, 4, pba, 0);
                    }
                }
            }
            self.layout.all.push((at, id, len));
            at += span;
        }
        if prev_next.is_some() {
            put(&mut self.bytes, reg::STATUS, status::CAP_LIST.into(), 2);
        }
    }

    fn build_pm(&mut self, at: usize) {
        self.layout.pm = Some(at);
        // PMC: version 3, no D1/D2, no PME.
        self.set(at + 2, 2, 0x0003, 0);
        // PMCSR: D0, No_Soft_Reset (D3hot -> D0 keeps the state); power state writable.
        self.set(at + 4, 2, 0x0008, 0x0003);
    }

    fn build_msi(&mut self, at: usize, vectors: u32) {
        self.layout.msi = Some(at);
        self.layout.msi_vectors = vectors;
        let mmc = u16::try_from(vectors.max(1).trailing_zeros()).unwrap_or(0);
        let ctrl = (mmc << 1) | MSI_CTRL_64BIT | MSI_CTRL_PVM;
        self.set(at + 2, 2, ctrl.into(), (MSI_CTRL_ENABLE | 0x70).into());
        self.set(at + 4, 4, 0, 0xffff_fffc); // message address
        self.set(at + 8, 4, 0, 0xffff_ffff); // message upper address
        self.set(at + 12, 2, 0, 0xffff); // message data
        let mask_bits = if vectors >= 32 {
            u32::MAX
        } else {
            (1u32 << vectors) - 1
        };
        self.set(at + 16, 4, 0, mask_bits.into()); // mask bits
        self.set(at + 20, 4, 0, 0); // pending bits (device-set)
    }

    fn build_pcie(&mut self, at: usize, t: PcieDeviceType) {
        self.layout.pcie = Some(at);
        let port_type: u64 = match t {
            PcieDeviceType::Endpoint => 0,
            PcieDeviceType::LegacyEndpoint => 1,
        };
        // Capabilities register: version 2, device/port type.
        self.set(at + 2, 2, 2 | port_type << 4, 0);
        // Device capabilities: 128-byte payload, no latency limits, role-based error
        // reporting, FLR capable.
        self.set(at + 4, 4, 7 << 6 | 7 << 9 | 1 << 15 | 1 << 28, 0);
        // Device control: relaxed ordering, no snoop, 512-byte read requests.
        self.set(at + 8, 2, 0x2810, 0xf8ff);
        // Device status: error bits are write-1-to-clear.
        self.set(at + 10, 2, 0, 0);
        put(&mut self.w1c, at + 10, 0x000f, 2);
        // Link capabilities: 2.5 GT/s, x1, no ASPM, port 0.
        self.set(at + 12, 4, 0x0000_0011, 0);
        // Link control: read completion boundary, common clock, extended synch.
        self.set(at + 16, 2, 0, 0x00c8);
        // Link status: 2.5 GT/s, x1.
        self.set(at + 18, 2, 0x0011, 0);
        // Slot and root registers (20..36), device caps/control/status 2: zero.
        // Link capabilities 2: 2.5 GT/s supported.
        self.set(at + 44, 4, 0x2, 0);
        // Link control 2: target link speed 2.5 GT/s.
        self.set(at + 48, 2, 0x1, 0);
    }

    /// Size in bytes (256 or 4096).
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Where the capabilities are.
    pub fn layout(&self) -> &CapLayout {
        &self.layout
    }

    /// Whether the library emulates byte `off` (else the model owns it).
    pub fn is_owned(&self, off: usize) -> bool {
        self.owned.get(off).copied().unwrap_or(false)
    }

    /// Reads emulated bytes at `off` into `out` (bytes the library does not emulate read
    /// their stored value, 0).
    pub fn read(&self, off: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = off.checked_add(i).map_or(0, |at| self.read_byte(at));
        }
    }

    fn read_byte(&self, off: usize) -> u8 {
        let mut v = self.bytes.get(off).copied().unwrap_or(0);
        if off == reg::STATUS && self.intx_level {
            v |= status::INTX as u8;
        }
        v
    }

    /// Writes `data` at `off` byte by byte against the write masks; returns the side
    /// effects for the caller to carry out.
    pub fn write(&mut self, off: usize, data: &[u8]) -> WriteEffects {
        let before = self.snapshot();
        for (i, &val) in data.iter().enumerate() {
            let Some(at) = off.checked_add(i) else {
                break;
            };
            let (Some(old), Some(&wm), Some(&w1c)) = (
                self.bytes.get(at).copied(),
                self.wmask.get(at),
                self.w1c.get(at),
            ) else {
                continue;
            };
            let new = ((old & !wm) | (val & wm)) & !(val & w1c);
            self.bytes[at] = new;
        }
        self.fixups(&before)
    }

    /// Registers whose changes have side effects.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            command: self.command(),
            pmcsr: self.layout.pm.map(|p| get(&self.bytes, p + 4, 2) as u16),
            msi_ctrl: self.layout.msi.map(|m| get(&self.bytes, m + 2, 2) as u16),
            msi_mask: self.msi_mask(),
            msix_masked: self.msix_function_masked(),
            msix_enabled: self.msix_enabled(),
        }
    }

    fn fixups(&mut self, before: &Snapshot) -> WriteEffects {
        let mut fx = WriteEffects::default();
        if let (Some(p), Some(old)) = (self.layout.pm, before.pmcsr) {
            let new = get(&self.bytes, p + 4, 2) as u16;
            // D1 and D2 are not supported: such a write leaves the power state alone.
            if matches!(new & 3, 1 | 2) {
                put(&mut self.bytes, p + 4, u64::from((new & !3) | (old & 3)), 2);
            }
        }
        if let (Some(m), Some(_)) = (self.layout.msi, before.msi_ctrl) {
            let ctrl = get(&self.bytes, m + 2, 2) as u16;
            let mmc = (ctrl >> 1) & 7;
            let mme = (ctrl >> MSI_CTRL_MME_SHIFT) & 7;
            if mme > mmc {
                let fixed = (ctrl & !(7 << MSI_CTRL_MME_SHIFT)) | (mmc << MSI_CTRL_MME_SHIFT);
                put(&mut self.bytes, m + 2, fixed.into(), 2);
            }
        }
        if let Some(p) = self.layout.pcie {
            let devctl = get(&self.bytes, p + 8, 2) as u16;
            if devctl & PCIE_DEVCTL_FLR != 0 {
                // The bit always reads 0; writing 1 starts a function level reset.
                put(
                    &mut self.bytes,
                    p + 8,
                    u64::from(devctl & !PCIE_DEVCTL_FLR),
                    2,
                );
                fx.flr = true;
            }
        }
        let cmd = self.command();
        fx.intx_unblocked =
            before.command & command::INTX_DISABLE != 0 && cmd & command::INTX_DISABLE == 0;
        fx.msi_unmasked = before.msi_mask & !self.msi_mask();
        fx.msix_unmasked = (before.msix_masked && !self.msix_function_masked())
            || (!before.msix_enabled && self.msix_enabled());
        fx
    }

    /// The bytes the library emulates, for a migration stream (bytes the model owns
    /// are 0 here; the INTx level is [`intx_level`](Self::intx_level)).
    pub fn state(&self) -> &[u8] {
        &self.bytes
    }

    /// Checks saved bytes against this device before [`set_state`](Self::set_state):
    /// the same size, and every bit no write could have changed (read-only, not
    /// write-1-to-clear) as at power-on, except the MSI pending bits, which the device
    /// sets. The error says which byte differs.
    pub fn check_state(&self, saved: &[u8]) -> Result<(), String> {
        if saved.len() != self.bytes.len() {
            return Err(format!(
                "{} bytes of config space, this device has {}",
                saved.len(),
                self.bytes.len()
            ));
        }
        let msi_pending = self.layout.msi.map(|m| m + 20..m + 24);
        for (i, &b) in saved.iter().enumerate() {
            if msi_pending.as_ref().is_some_and(|r| r.contains(&i)) {
                continue;
            }
            let fixed = !(self.wmask[i] | self.w1c[i]);
            if b & fixed != self.defaults[i] & fixed {
                return Err(format!(
                    "byte {i:#x} is {b:#04x}; its read-only bits are {:#04x} on this device",
                    self.defaults[i] & fixed
                ));
            }
        }
        Ok(())
    }

    /// Loads saved bytes (checked with [`check_state`](Self::check_state)) and the INTx
    /// level: the configuration space is as the saving device had it.
    pub fn set_state(&mut self, saved: &[u8], intx_level: bool) {
        if saved.len() == self.bytes.len() {
            self.bytes.copy_from_slice(saved);
        }
        self.intx_level = intx_level;
    }

    /// Back to the power-on state (function level reset).
    pub fn reset(&mut self) {
        self.bytes.clone_from(&self.defaults);
        self.intx_level = false;
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        get(&self.bytes, reg::COMMAND, 2) as u16
    }

    /// Whether the INTx disable bit of the command register is set.
    pub fn intx_disabled(&self) -> bool {
        self.command() & command::INTX_DISABLE != 0
    }

    /// Whether the device asserts INTx (shown in the status register).
    pub fn intx_level(&self) -> bool {
        self.intx_level
    }

    /// Asserts or de-asserts INTx.
    pub fn set_intx_level(&mut self, level: bool) {
        self.intx_level = level;
    }

    /// Whether MSI is enabled in the MSI capability.
    pub fn msi_enabled(&self) -> bool {
        self.layout
            .msi
            .is_some_and(|m| get(&self.bytes, m + 2, 2) as u16 & MSI_CTRL_ENABLE != 0)
    }

    /// MSI vectors the driver enabled (Multiple Message Enable), 0 without MSI.
    pub fn msi_enabled_vectors(&self) -> u32 {
        self.layout.msi.map_or(0, |m| {
            let ctrl = get(&self.bytes, m + 2, 2) as u16;
            1 << ((ctrl >> MSI_CTRL_MME_SHIFT) & 7)
        })
    }

    /// The MSI per-vector mask bits (0 without MSI).
    pub fn msi_mask(&self) -> u32 {
        self.layout
            .msi
            .map_or(0, |m| get(&self.bytes, m + 16, 4) as u32)
    }

    /// The MSI pending bits (0 without MSI).
    pub fn msi_pending(&self) -> u32 {
        self.layout
            .msi
            .map_or(0, |m| get(&self.bytes, m + 20, 4) as u32)
    }

    /// Sets or clears the pending bit of MSI vector `vector`.
    pub fn set_msi_pending(&mut self, vector: u32, pending: bool) {
        if let Some(m) = self.layout.msi {
            if vector < 32 {
                let mut bits = self.msi_pending();
                if pending {
                    bits |= 1 << vector;
                } else {
                    bits &= !(1 << vector);
                }
                put(&mut self.bytes, m + 20, bits.into(), 4);
            }
        }
    }

    /// Whether MSI-X is enabled in the MSI-X capability.
    pub fn msix_enabled(&self) -> bool {
        self.layout
            .msix
            .is_some_and(|m| get(&self.bytes, m + 2, 2) as u16 & MSIX_CTRL_ENABLE != 0)
    }

    /// Whether the MSI-X function mask is set.
    pub fn msix_function_masked(&self) -> bool {
        self.layout
            .msix
            .is_some_and(|m| get(&self.bytes, m + 2, 2) as u16 & MSIX_CTRL_MASK != 0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    command: u16,
    pmcsr: Option<u16>,
    msi_ctrl: Option<u16>,
    msi_mask: u32,
    msix_masked: bool,
    msix_enabled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::description::{BarDesc, MsixDesc};

    fn full_desc() -> DeviceDescription {
        let mut d = DeviceDescription::new(0x1234, 0x5678, 0x01_0802);
        d.subsystem_vendor_id = 0xaaaa;
        d.subsystem_id = 0xbbbb;
        d.revision = 3;
        d.bars[0] = Some(BarDesc::mmio64(0x4000, true));
        d.bars[2] = Some(BarDesc::io(0x20));
        d.bars[3] = Some(BarDesc::mmio32(0x1000));
        d.bars[4] = Some(BarDesc::mmio64(1 << 33, false));
        d.intx = true;
        d.msi_vectors = 4;
        d.msix = Some(MsixDesc {
            vectors: 8,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        });
        d.capabilities = vec![
            Capability::Pm,
            Capability::PciExpress(PcieDeviceType::Endpoint),
            Capability::Vendor(vec![0xde, 0xad, 0xbe, 0xef, 0x01]),
        ];
        d
    }

    fn r32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn r16(c: &ConfigSpace, off: usize) -> u16 {
        let mut b = [0u8; 2];
        c.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn w32(c: &mut ConfigSpace, off: usize, v: u32) -> WriteEffects {
        c.write(off, &v.to_le_bytes())
    }

    /// IDs, class, revision, header type, subsystem IDs, pin and the capability bit sit
    /// where the PCI specification puts them, and are read-only.
    #[test]
    fn header_identity_is_read_only() {
        let mut c = ConfigSpace::new(&full_desc());
        assert_eq!(c.size(), 4096);
        assert_eq!(r32(&c, 0), 0x5678_1234);
        assert_eq!(r32(&c, 8), 0x0108_0203);
        assert_eq!(r32(&c, 0x2c), 0xbbbb_aaaa);
        assert_eq!(c.read_byte(reg::HEADER_TYPE), 0);
        assert_eq!(c.read_byte(reg::INT_PIN), 1);
        assert_ne!(r16(&c, reg::STATUS) & status::CAP_LIST, 0);
        for off in [0, 8, 0x2c, 0x30, 0x34] {
            w32(&mut c, off, 0xffff_ffff);
        }
        c.write(reg::INT_PIN, &[7]);
        assert_eq!(r32(&c, 0), 0x5678_1234);
        assert_eq!(r32(&c, 8), 0x0108_0203);
        assert_eq!(r32(&c, 0x2c), 0xbbbb_aaaa);
        assert_eq!(r32(&c, 0x30), 0, "no expansion ROM");
        assert_eq!(c.read_byte(reg::CAP_PTR), 0x40);
        assert_eq!(c.read_byte(reg::INT_PIN), 1);
        // The interrupt line and cache line size are writable; latency is 0 on PCIe.
        c.write(reg::INT_LINE, &[11]);
        c.write(reg::CACHE_LINE, &[0x10, 0x20]);
        assert_eq!(c.read_byte(reg::INT_LINE), 11);
        assert_eq!(c.read_byte(reg::CACHE_LINE), 0x10);
        assert_eq!(c.read_byte(reg::LATENCY), 0);
    }

    /// Command bits outside the writable set stay 0; status error bits are
    /// write-1-to-clear and the INTx status bit follows the INTx level.
    #[test]
    fn command_and_status() {
        let mut c = ConfigSpace::new(&full_desc());
        c.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0547);
        assert!(c.intx_disabled());
        let fx = c.write(reg::COMMAND, &0x0003u16.to_le_bytes());
        assert!(fx.intx_unblocked);
        c.bytes[reg::STATUS + 1] |= 0x80; // detected parity error, set by "hardware"
        c.write(reg::STATUS, &0x0000u16.to_le_bytes());
        assert_eq!(r16(&c, reg::STATUS) & 0x8000, 0x8000, "writing 0 keeps it");
        c.write(reg::STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(
            r16(&c, reg::STATUS),
            status::CAP_LIST,
            "writing 1 clears it"
        );
        c.set_intx_level(true);
        assert_eq!(r16(&c, reg::STATUS), status::CAP_LIST | status::INTX);
        c.reset();
        assert_eq!(r16(&c, reg::STATUS), status::CAP_LIST);
        assert_eq!(c.command(), 0);
    }

    /// BAR sizing: all ones reads back the size mask with the type bits, for 32-bit,
    /// prefetchable 64-bit (both halves, also above 4 GiB), I/O and absent BARs; an
    /// address written afterwards is kept down to the size alignment.
    #[test]
    fn bar_sizing() {
        let mut c = ConfigSpace::new(&full_desc());
        assert_eq!(r32(&c, 0x10), 0b1100, "64-bit prefetchable type bits");
        for i in 0..6 {
            w32(&mut c, 0x10 + 4 * i, 0xffff_ffff);
        }
        assert_eq!(r32(&c, 0x10), 0xffff_c00c);
        assert_eq!(r32(&c, 0x14), 0xffff_ffff);
        assert_eq!(r32(&c, 0x18), 0xffff_ffe1, "32-byte I/O BAR");
        assert_eq!(r32(&c, 0x1c), 0xffff_f000);
        assert_eq!(
            r32(&c, 0x20),
            0x0000_0004,
            "8 GiB: nothing writable below 4 GiB"
        );
        assert_eq!(r32(&c, 0x24), 0xffff_fffe);
        w32(&mut c, 0x1c, 0xfebf_1234);
        assert_eq!(r32(&c, 0x1c), 0xfebf_1000);
        w32(&mut c, 0x18, 0x0000_c053);
        assert_eq!(r32(&c, 0x18), 0x0000_c041);
        // A BAR that does not exist reads 0 after sizing.
        let mut d = DeviceDescription::new(1, 1, 0);
        d.bars[1] = Some(BarDesc::mmio32(16));
        let mut c = ConfigSpace::new(&d);
        w32(&mut c, 0x10, 0xffff_ffff);
        w32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(r32(&c, 0x10), 0);
        assert_eq!(r32(&c, 0x14), 0xffff_fff0);
        assert_eq!(c.size(), 256);
    }

    /// The capability chain starts at the pointer, visits PM, PCIe, vendor, MSI and
    /// MSI-X in that order with correct contents, and ends with a zero pointer.
    #[test]
    fn capability_chain() {
        let c = ConfigSpace::new(&full_desc());
        let mut at = c.read_byte(reg::CAP_PTR) as usize;
        let mut ids = Vec::new();
        while at != 0 {
            assert_eq!(at % 4, 0);
            ids.push((at, c.read_byte(at)));
            at = c.read_byte(at + 1) as usize;
            assert!(ids.len() < 48);
        }
        let only_ids: Vec<u8> = ids.iter().map(|x| x.1).collect();
        assert_eq!(only_ids, vec![0x01, 0x10, 0x09, 0x05, 0x11]);
        let (pm, pcie, vendor, msi, msix) = (ids[0].0, ids[1].0, ids[2].0, ids[3].0, ids[4].0);
        assert_eq!(r16(&c, pm + 2) & 7, 3, "PM version 3");
        assert_eq!(r16(&c, pcie + 2), 0x0002, "PCIe v2 endpoint");
        assert_ne!(r32(&c, pcie + 4) & (1 << 28), 0, "FLR capable");
        assert_eq!(c.read_byte(vendor + 2), 8);
        assert_eq!(r32(&c, vendor + 3), 0xefbe_adde);
        assert_eq!(r16(&c, msi + 2), 0x0184, "4 vectors, 64-bit, maskable");
        assert_eq!(r16(&c, msix + 2), 7);
        assert_eq!(r32(&c, msix + 4), 0);
        assert_eq!(r32(&c, msix + 8), 0x800);
        assert!(c.is_owned(msix + 11));
        assert!(
            !c.is_owned(msix + 12),
            "device-specific space after the list"
        );
    }

    /// Writes of any width and alignment change only writable bits: a dword write over
    /// MSI control and address, a word write straddling the MSI data and reserved
    /// field, and single bytes.
    #[test]
    fn unaligned_multi_byte_writes() {
        let mut c = ConfigSpace::new(&full_desc());
        let msi = c.layout().msi.unwrap();
        // Bytes msi+1..msi+5: next pointer (ro), control (enable + MME 2), address byte 0.
        c.write(msi + 1, &[0xff, 0x21, 0xff, 0x0f, 0xff]);
        let ctrl = r16(&c, msi + 2);
        assert_eq!(ctrl & 1, 1, "enabled");
        assert_eq!((ctrl >> 4) & 7, 2, "MME written");
        assert_eq!((ctrl >> 1) & 7, 2, "MMC unchanged");
        assert!(c.msi_enabled());
        assert_eq!(c.msi_enabled_vectors(), 4);
        assert_eq!(r32(&c, msi + 4) & 3, 0, "address bits 0-1 read-only");
        assert_eq!(r32(&c, msi + 4), 0xff0c);
        // MME beyond MMC is clamped.
        c.write(msi + 2, &[0x71]);
        assert_eq!((r16(&c, msi + 2) >> 4) & 7, 2);
        // Word write across data (rw) and the reserved upper half (ro).
        c.write(msi + 13, &[0x12, 0x34]);
        assert_eq!(r32(&c, msi + 12), 0x1200);
        // Mask bits: only 4 vectors maskable; clearing reports the unmask.
        w32(&mut c, msi + 16, 0xffff_ffff);
        assert_eq!(c.msi_mask(), 0xf);
        let fx = c.write(msi + 16, &[0x05]);
        assert_eq!(fx.msi_unmasked, 0xa);
        // Pending bits are read-only to the driver.
        c.set_msi_pending(2, true);
        w32(&mut c, msi + 20, 0);
        assert_eq!(c.msi_pending(), 4);
    }

    /// Power state: D3hot and D0 are accepted, D1/D2 are ignored; MSI-X enable and
    /// function mask are writable, the table size is not; Initiate FLR reads back 0 and
    /// reports a reset.
    #[test]
    fn pm_msix_pcie_side_effects() {
        let mut c = ConfigSpace::new(&full_desc());
        let (pm, msix, pcie) = (
            c.layout().pm.unwrap(),
            c.layout().msix.unwrap(),
            c.layout().pcie.unwrap(),
        );
        c.write(pm + 4, &[0x03]);
        assert_eq!(r16(&c, pm + 4) & 3, 3);
        c.write(pm + 4, &[0x01]);
        assert_eq!(r16(&c, pm + 4) & 3, 3, "D1 unsupported: unchanged");
        c.write(pm + 4, &[0x00]);
        assert_eq!(r16(&c, pm + 4), 0x0008);
        c.write(msix + 2, &0xffffu16.to_le_bytes());
        assert_eq!(r16(&c, msix + 2), 0xc007);
        assert!(c.msix_enabled() && c.msix_function_masked());
        let fx = c.write(msix + 3, &[0x80]);
        assert!(fx.msix_unmasked);
        assert!(!c.msix_function_masked());
        let fx = c.write(pcie + 8, &0x8000u16.to_le_bytes());
        assert!(fx.flr);
        assert_eq!(r16(&c, pcie + 8) & 0x8000, 0);
        let fx = c.write(pcie + 8, &0x0001u16.to_le_bytes());
        assert!(!fx.flr);
    }

    /// Accesses beyond the end of the space read 0 and are ignored on write.
    #[test]
    fn out_of_range_is_harmless() {
        let mut c = ConfigSpace::new(&DeviceDescription::new(1, 2, 3));
        let mut b = [0xffu8; 8];
        c.read(252, &mut b);
        assert_eq!(b, [0; 8]);
        c.write(usize::MAX - 2, &[1, 2, 3, 4]);
        assert!(!c.is_owned(usize::MAX));
        assert_eq!(r16(&c, reg::STATUS), 0, "no capabilities");
    }
}
