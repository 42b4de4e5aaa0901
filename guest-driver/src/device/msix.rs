//! MSI-X table and pending bit array (PBA) emulation.
//!
//! The table and the PBA live in the BARs and at the offsets of the description's
//! [`MsixDesc`]. BAR accesses that fall on them are answered here and never reach the
//! model; an access that covers both emulated and model bytes (possible in a bulk BAR)
//! is split, each part going to its owner.
//!
//! Table entry `n` is 16 bytes at `table_offset + 16 n`:
//!
//! | offset | field | writable bits |
//! |---|---|---|
//! | 0 | message address, low 32 bits | 31:2 (bits 1:0 read 0) |
//! | 4 | message address, high 32 bits | all |
//! | 8 | message data | all |
//! | 12 | vector control | bit 0, the vector's mask bit |
//!
//! The PBA holds one bit per vector (bit `n % 64` of qword `n / 64`); it is read-only,
//! writes are ignored. A vector raised while it cannot be delivered (function mask,
//! vector mask, or a mask set by the client with DEVICE_SET_IRQS) gets its pending bit
//! set; it is delivered, and the bit cleared, when nothing masks it any more.
//!
//! Deliberate deviation: the mask bit of every vector resets to 0 (unmasked), where
//! the PCI specification says 1. Clients such as QEMU and cloud-hypervisor emulate the
//! MSI-X table themselves and never write the device's copy; with masked vectors at
//! reset their interrupts would never be delivered. Guest drivers mask each vector
//! before they program it (Linux masks the whole table when it enables MSI-X), so they
//! do not see the difference.
//!
//! Every access width and alignment works (byte by byte); the BAR's own access rules
//! have been checked before.

use super::description::MsixDesc;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: the mask bit.
pub const VECTOR_CTRL_MASK: u32 = 1;
/// Vector control value at reset (see the module documentation).
pub const VECTOR_CTRL_RESET: u32 = 0;

/// Writable bits of each byte of an entry.
const ENTRY_WMASK: [u8; 16] = [
    0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0, 0,
];

/// One table entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// The vector's mask bit.
    pub masked: bool,
}

/// The MSI-X table and PBA of one device.
#[derive(Debug, Clone)]
pub struct MsixTable {
    desc: MsixDesc,
    entries: Vec<u8>,
    pending: Vec<u64>,
}

impl MsixTable {
    /// A table at its reset state for a (sanitized) description.
    pub fn new(desc: MsixDesc) -> Self {
        let n = usize::from(desc.vectors);
        let mut t = Self {
            desc,
            entries: vec![0; n * ENTRY_SIZE as usize],
            pending: vec![0; n.div_ceil(64)],
        };
        t.reset();
        t
    }

    /// Back to the reset state: entries zero with the reset vector control, nothing
    /// pending.
    pub fn reset(&mut self) {
        self.entries.fill(0);
        for e in self.entries.chunks_exact_mut(ENTRY_SIZE as usize) {
            e[12..16].copy_from_slice(&VECTOR_CTRL_RESET.to_le_bytes());
        }
        self.pending.fill(0);
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u32 {
        u32::from(self.desc.vectors)
    }

    /// `(bar, start, end)` of the table.
    pub fn table_range(&self) -> (u8, u64, u64) {
        let start = u64::from(self.desc.table_offset);
        (
            self.desc.table_bar,
            start,
            start + self.entries.len() as u64,
        )
    }

    /// `(bar, start, end)` of the PBA.
    pub fn pba_range(&self) -> (u8, u64, u64) {
        let start = u64::from(self.desc.pba_offset);
        (
            self.desc.pba_bar,
            start,
            start + 8 * self.pending.len() as u64,
        )
    }

    /// The byte ranges (`start..end`) of BAR `bar` emulated here.
    pub fn ranges(&self, bar: u8) -> Vec<(u64, u64)> {
        [self.table_range(), self.pba_range()]
            .into_iter()
            .filter(|r| r.0 == bar)
            .map(|r| (r.1, r.2))
            .collect()
    }

    /// Whether byte `offset` of BAR `bar` is emulated here.
    pub fn owns(&self, bar: u8, offset: u64) -> bool {
        self.ranges(bar)
            .iter()
            .any(|&(s, e)| offset >= s && offset < e)
    }

    /// Where byte `offset` of BAR `bar` is: in the table (index into the entries) or
    /// in the PBA (byte index).
    fn locate(&self, bar: u8, offset: u64) -> Option<Place> {
        let (tb, ts, te) = self.table_range();
        if tb == bar && offset >= ts && offset < te {
            return Some(Place::Table((offset - ts) as usize));
        }
        let (pb, ps, pe) = self.pba_range();
        if pb == bar && offset >= ps && offset < pe {
            return Some(Place::Pba((offset - ps) as usize));
        }
        None
    }

    /// Reads bytes at `offset` of BAR `bar`; bytes not emulated here read 0.
    pub fn read(&self, bar: u8, offset: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let place = offset
                .checked_add(i as u64)
                .and_then(|o| self.locate(bar, o));
            *b = match place {
                Some(Place::Table(k)) => self.entries[k],
                Some(Place::Pba(k)) => (self.pending[k / 8] >> (8 * (k % 8))) as u8,
                None => 0,
            };
        }
    }

    /// Writes bytes at `offset` of BAR `bar` against the entries' writable bits; PBA
    /// and bytes not emulated here ignore writes.
    pub fn write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let place = offset
                .checked_add(i as u64)
                .and_then(|o| self.locate(bar, o));
            if let Some(Place::Table(k)) = place {
                let wm = ENTRY_WMASK[k % ENTRY_SIZE as usize];
                self.entries[k] = (self.entries[k] & !wm) | (v & wm);
            }
        }
    }

    /// Entry `vector`, if it exists.
    pub fn entry(&self, vector: u32) -> Option<MsixEntry> {
        let at = usize::try_from(vector)
            .ok()?
            .checked_mul(ENTRY_SIZE as usize)?;
        let e = self.entries.get(at..at + ENTRY_SIZE as usize)?;
        let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        Some(MsixEntry {
            address: u64::from(word(0)) | u64::from(word(4)) << 32,
            data: word(8),
            masked: word(12) & VECTOR_CTRL_MASK != 0,
        })
    }

    /// Whether vector `vector`'s mask bit is set (`false` for a vector that does not
    /// exist).
    pub fn masked(&self, vector: u32) -> bool {
        self.entry(vector).is_some_and(|e| e.masked)
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn pending(&self, vector: u32) -> bool {
        self.pending
            .get(vector as usize / 64)
            .is_some_and(|q| q & (1 << (vector % 64)) != 0)
    }

    /// Sets or clears vector `vector`'s pending bit (ignored for a vector that does not
    /// exist).
    pub fn set_pending(&mut self, vector: u32, pending: bool) {
        if vector >= self.vectors() {
            return;
        }
        if let Some(q) = self.pending.get_mut(vector as usize / 64) {
            if pending {
                *q |= 1 << (vector % 64);
            } else {
                *q &= !(1 << (vector % 64));
            }
        }
    }

    /// Clears every pending bit.
    pub fn clear_pending(&mut self) {
        self.pending.fill(0);
    }

    /// The table entries (16 bytes per vector), for a migration stream.
    pub fn table_bytes(&self) -> &[u8] {
        &self.entries
    }

    /// The pending bit array, one word per 64 vectors.
    pub fn pending_words(&self) -> &[u64] {
        &self.pending
    }

    /// Checks a saved table and PBA against this one before
    /// [`set_state`](Self::set_state): the same sizes, no bit set that a write could
    /// not set, no pending bit for a vector that does not exist.
    pub fn check_state(&self, table: &[u8], pending: &[u64]) -> Result<(), String> {
        if table.len() != self.entries.len() || pending.len() != self.pending.len() {
            return Err(format!(
                "an MSI-X table of {} bytes and {} PBA words; this device has {} and {}",
                table.len(),
                pending.len(),
                self.entries.len(),
                self.pending.len()
            ));
        }
        if let Some(i) = table
            .iter()
            .enumerate()
            .position(|(i, &b)| b & !ENTRY_WMASK[i % ENTRY_SIZE as usize] != 0)
        {
            return Err(format!("MSI-X table byte {i:#x} has read-only bits set"));
        }
        let n = self.vectors() as usize;
        for (w, &q) in pending.iter().enumerate() {
            let valid = match n.saturating_sub(64 * w) {
                v if v >= 64 => u64::MAX,
                v => (1u64 << v) - 1,
            };
            if q & !valid != 0 {
                return Err(format!(
                    "PBA word {w} has bits of vectors that do not exist"
                ));
            }
        }
        Ok(())
    }

    /// Loads a saved table and PBA (checked with [`check_state`](Self::check_state)).
    pub fn set_state(&mut self, table: &[u8], pending: &[u64]) {
        if table.len() == self.entries.len() && pending.len() == self.pending.len() {
            self.entries.copy_from_slice(table);
            self.pending.copy_from_slice(pending);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Place {
    Table(usize),
    Pba(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> MsixDesc {
        MsixDesc {
            vectors: 70,
            table_bar: 0,
            table_offset: 0x800,
            pba_bar: 2,
            pba_offset: 0x10,
        }
    }

    /// Entries reset to zero and unmasked; address bits 1:0 and the reserved vector
    /// control bits are read-only; accesses of any width and alignment (including one
    /// straddling two entries) apply byte by byte; reset restores the table.
    #[test]
    fn table_entries() {
        let mut t = MsixTable::new(desc());
        assert_eq!(t.table_range(), (0, 0x800, 0x800 + 70 * 16));
        assert_eq!(t.pba_range(), (2, 0x10, 0x20));
        assert_eq!(
            t.entry(3),
            Some(MsixEntry {
                address: 0,
                data: 0,
                masked: false
            })
        );
        t.write(0, 0x830, &0xfee0_0003u32.to_le_bytes());
        t.write(0, 0x834, &0x1u32.to_le_bytes());
        t.write(0, 0x838, &0x4021u32.to_le_bytes());
        t.write(0, 0x83c, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(
            t.entry(3),
            Some(MsixEntry {
                address: 0x1_fee0_0000,
                data: 0x4021,
                masked: true
            })
        );
        let mut b = [0u8; 8];
        t.read(0, 0x838, &mut b);
        assert_eq!(b, [0x21, 0x40, 0, 0, 1, 0, 0, 0]);
        // An 8-byte write straddling entries 3 and 4: vector control of 3, address of 4.
        t.write(0, 0x83c, &[0, 0, 0, 0, 0x44, 0x33, 0x22, 0x11]);
        assert!(!t.masked(3));
        assert_eq!(t.entry(4).unwrap().address, 0x1122_3344);
        assert!(t.entry(70).is_none());
        assert!(!t.masked(70));
        t.reset();
        assert_eq!(t.entry(4).unwrap().address, 0);
    }

    /// A saved table and PBA load into a table of the same size; sizes that differ,
    /// read-only bits and pending bits of vectors that do not exist are refused.
    #[test]
    fn state_check_and_load() {
        let mut a = MsixTable::new(desc());
        a.write(0, 0x830, &0xfee0_0000u32.to_le_bytes());
        a.write(0, 0x83c, &1u32.to_le_bytes());
        a.set_pending(69, true);
        let (table, pending) = (a.table_bytes().to_vec(), a.pending_words().to_vec());
        let mut b = MsixTable::new(desc());
        b.check_state(&table, &pending).unwrap();
        b.set_state(&table, &pending);
        assert_eq!(b.entry(3), a.entry(3));
        assert!(b.pending(69));
        assert!(b.check_state(&table[16..], &pending).is_err());
        assert!(b.check_state(&table, &pending[..1]).is_err());
        let mut bad = table.clone();
        bad[0x30] |= 1;
        assert!(b.check_state(&bad, &pending).is_err(), "address bit 0");
        bad = table.clone();
        bad[0x3d] = 1;
        assert!(
            b.check_state(&bad, &pending).is_err(),
            "vector control bit 8"
        );
        assert!(b.check_state(&table, &[0, 1 << 6]).is_err(), "vector 70");
    }

    /// The PBA reflects pending bits, including vectors past 64, ignores writes, and
    /// reads 0 for bits of vectors that do not exist; table and PBA ownership is per
    /// BAR and offset.
    #[test]
    fn pending_bit_array() {
        let mut t = MsixTable::new(desc());
        t.set_pending(1, true);
        t.set_pending(65, true);
        t.set_pending(80, true);
        let mut b = [0u8; 16];
        t.read(2, 0x10, &mut b);
        assert_eq!(b[0], 0x02);
        assert_eq!(b[8], 0x02);
        assert_eq!(&b[9..], &[0; 7]);
        t.write(2, 0x10, &[0xff; 16]);
        assert!(t.pending(1) && !t.pending(0) && t.pending(65) && !t.pending(80));
        t.set_pending(1, false);
        assert!(!t.pending(1));
        assert!(t.owns(2, 0x1f) && !t.owns(2, 0x20) && !t.owns(0, 0x10));
        assert!(t.owns(0, 0x800) && !t.owns(0, 0x7ff) && !t.owns(2, 0x800));
        assert_eq!(t.ranges(2), vec![(0x10, 0x20)]);
        let mut out = [0xffu8; 4];
        t.read(0, u64::MAX - 1, &mut out);
        assert_eq!(out, [0; 4], "no overflow, nothing there");
        t.clear_pending();
        assert!(!t.pending(65));
    }
}
