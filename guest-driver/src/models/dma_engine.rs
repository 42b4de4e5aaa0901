//! `dma-engine`: a small PCI Express copy engine, the sample model for DMA and MSI-X.
//!
//! A driver programs a source, a destination, a length and a completion address, and
//! writes START. The device copies the bytes from source to destination by DMA,
//! computes their CRC32C, writes a 16-byte completion record by DMA and raises an
//! interrupt: MSI-X vector 0 when MSI-X is enabled, INTx otherwise. The copy is done
//! synchronously, inside the register write that starts it.
//!
//! PCI identity: vendor 0x1234, device 0x11f0, revision 1, class 0x088000 (other
//! system peripheral). No ID is set aside for experimental devices: 0x1234 is not
//! assigned by PCI-SIG or listed in the PCI ID database, and QEMU uses it for its own
//! experimental devices (bochs-display 1234:1111, edu 1234:11e8); 0x11f0 is not one of
//! them. Do not ship the model with these IDs in a product.
//!
//! Capabilities: power management, PCI Express endpoint (function level reset), MSI-X
//! with 2 vectors (the table at 0x800 and the PBA at 0xc00 of BAR 0, emulated by the
//! library; vector 1 is not used). INTx on pin A.
//!
//! BAR 0: 4 KiB of 32-bit memory; registers take naturally aligned 4- and 8-byte
//! accesses (an 8-byte access is two dword accesses, low address first). Registers:
//!
//! | offset | name | width | access | meaning |
//! |---|---|---|---|---|
//! | 0x00 | ID | 32 | RO | 0x45414d44 ("DMAE") |
//! | 0x04 | VERSION | 32 | RO | 1 |
//! | 0x08 | SRC_IOVA | 64 | RW | source IOVA |
//! | 0x10 | DST_IOVA | 64 | RW | destination IOVA |
//! | 0x18 | COMPLETION_IOVA | 64 | RW | where the completion record goes |
//! | 0x20 | LEN | 32 | RW | bytes to copy, 0 to 1 MiB |
//! | 0x24 | CONTROL | 32 | WO (reads 0) | bit 0 START: run one copy |
//! | 0x28 | STATUS | 32 | RO | bits 7:0 state (0 IDLE, 1 DONE, 2 ERROR), bits 31:16 errno of an error |
//! | 0x2c | CRC32C | 32 | RO | CRC32C of the bytes of the last operation (0 when its copy failed) |
//! | 0x30 | SEQ | 32 | RO | operations completed (successful or not) |
//! | 0x34 | INTR_STATUS | 32 | RW1C | bit 0: an operation completed; writing 1 clears it and de-asserts INTx |
//! | 0x38 | DMA_NS | 64 | RO | nanoseconds the last operation spent in its source read and destination write |
//! | 0x40 | IRQ_NS | 64 | RO | CLOCK_MONOTONIC, in ns, when the last interrupt was raised |
//!
//! CONTROL bit 1 (NOCRC) skips the CRC32C (CRC32C and the record's CRC read 0): with
//! DMA_NS it measures the DMA path alone.
//!
//! Everything else reads 0 and ignores writes. One operation, on START:
//!
//! 1. SEQ is incremented; a LEN over 1 MiB fails the operation with `EINVAL`.
//! 2. LEN bytes are read by DMA at SRC_IOVA (one scatter-gather segment: it may run
//!    across adjacent DMA maps, each readable); a fault fails the operation with its
//!    errno (`EFAULT`) and nothing is written to the destination.
//! 3. The bytes are written by DMA at DST_IOVA (every part is checked first: a fault
//!    writes nothing).
//! 4. The CRC32C (Castagnoli, as iSCSI and ext4 use it) of the bytes is computed.
//! 5. The completion record, `{le32 status (0 or errno), le32 crc32c, le32 len, le32
//!    seq}`, is written by DMA at COMPLETION_IOVA; if that faults, the operation fails
//!    with `EFAULT` (when it had not failed already).
//! 6. STATUS, CRC32C and INTR_STATUS bit 0 are set, and interrupt 0 is raised.
//!
//! `docs/dma-engine.md` has the register table and a worked example of what a client
//! does.
//!
//! Migration state (`save`/`restore`), 64 bytes, little-endian: `u8 format (1)`, 3
//! reserved zero bytes, then SRC_IOVA, DST_IOVA, COMPLETION_IOVA (u64), LEN, STATUS,
//! CRC32C, SEQ, INTR_STATUS (u32), DMA_NS, IRQ_NS (u64). An operation runs inside the
//! register write that starts it, so none is ever in progress when the device stops;
//! a completion the driver has not acknowledged is INTR_STATUS (with the interrupt
//! state, which the library migrates).

use crate::device::{
    BarDesc, BarKind, Capability, DeviceContext, DeviceDescription, DeviceModel, Errno, MsixDesc,
    PcieDeviceType,
};

/// PCI vendor ID (unassigned; see the module documentation).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x11f0;
/// Class code: other system peripheral.
pub const CLASS_CODE: u32 = 0x08_8000;
/// Revision.
pub const REVISION: u8 = 1;
/// The register BAR.
pub const REG_BAR: u8 = 0;
/// Size of the register BAR.
pub const REG_BAR_SIZE: u64 = 0x1000;
/// Largest LEN.
pub const MAX_LEN: u32 = 1 << 20;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE: u32 = 0x800;
/// Offset of the MSI-X PBA in BAR 0.
pub const MSIX_PBA: u32 = 0xc00;
/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 2;
/// Value of the ID register: "DMAE" in little-endian bytes.
pub const ID_VALUE: u32 = u32::from_le_bytes(*b"DMAE");
/// Value of the VERSION register.
pub const VERSION_VALUE: u32 = 1;
/// Size of the completion record.
pub const RECORD_SIZE: usize = 16;

/// Register offsets in BAR 0.
pub mod reg {
    /// Identification.
    pub const ID: u64 = 0x00;
    /// Register layout version.
    pub const VERSION: u64 = 0x04;
    /// Source IOVA (64 bits).
    pub const SRC_IOVA: u64 = 0x08;
    /// Destination IOVA (64 bits).
    pub const DST_IOVA: u64 = 0x10;
    /// Completion record IOVA (64 bits).
    pub const COMPLETION_IOVA: u64 = 0x18;
    /// Bytes to copy.
    pub const LEN: u64 = 0x20;
    /// Bit 0: start.
    pub const CONTROL: u64 = 0x24;
    /// State and errno.
    pub const STATUS: u64 = 0x28;
    /// CRC32C of the bytes of the last operation.
    pub const CRC32C: u64 = 0x2c;
    /// Completed operations.
    pub const SEQ: u64 = 0x30;
    /// Bit 0: an operation completed (write 1 to clear).
    pub const INTR_STATUS: u64 = 0x34;
    /// Time spent in DMA by the last operation, ns (64-bit).
    pub const DMA_NS: u64 = 0x38;
    /// CLOCK_MONOTONIC of the last interrupt, ns (64-bit).
    pub const IRQ_NS: u64 = 0x40;
}

/// CONTROL bit: start an operation.
pub const CONTROL_START: u32 = 1 << 0;
/// CONTROL bit: skip the CRC32C.
pub const CONTROL_NOCRC: u32 = 1 << 1;
/// INTR_STATUS bit: an operation completed.
pub const INTR_DONE: u32 = 1 << 0;

/// STATUS states (bits 7:0).
pub mod state {
    /// Nothing ran since reset.
    pub const IDLE: u32 = 0;
    /// The last operation succeeded.
    pub const DONE: u32 = 1;
    /// The last operation failed; bits 31:16 hold the errno.
    pub const ERROR: u32 = 2;
}

pub use crate::crc32c::{crc32c, crc32c_update};

/// The dma-engine model.
#[derive(Debug, Default)]
pub struct DmaEngine {
    src: u64,
    dst: u64,
    completion: u64,
    len: u32,
    status: u32,
    crc: u32,
    seq: u32,
    intr_status: u32,
    dma_ns: u64,
    irq_ns: u64,
}

/// Format of the migration state.
const STATE_FORMAT: u8 = 1;
/// Size of the migration state.
const STATE_LEN: usize = 64;

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Replaces the low (`high == false`) or high half of `reg` with `v`.
fn set_half(reg: &mut u64, high: bool, v: u32) {
    if high {
        *reg = (*reg & 0xffff_ffff) | u64::from(v) << 32;
    } else {
        *reg = (*reg & !0xffff_ffff) | u64::from(v);
    }
}

impl DmaEngine {
    /// A device at its reset state.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_dword(&self, offset: u64) -> u32 {
        match offset {
            reg::ID => ID_VALUE,
            reg::VERSION => VERSION_VALUE,
            0x08 | 0x0c => (self.src >> (8 * (offset & 4))) as u32,
            0x10 | 0x14 => (self.dst >> (8 * (offset & 4))) as u32,
            0x18 | 0x1c => (self.completion >> (8 * (offset & 4))) as u32,
            reg::LEN => self.len,
            reg::STATUS => self.status,
            reg::CRC32C => self.crc,
            reg::SEQ => self.seq,
            reg::INTR_STATUS => self.intr_status,
            0x38 | 0x3c => (self.dma_ns >> (8 * (offset & 4))) as u32,
            0x40 | 0x44 => (self.irq_ns >> (8 * (offset & 4))) as u32,
            _ => 0,
        }
    }

    fn write_dword(&mut self, ctx: &mut DeviceContext<'_>, offset: u64, v: u32) {
        let high = offset & 4 != 0;
        match offset {
            0x08 | 0x0c => set_half(&mut self.src, high, v),
            0x10 | 0x14 => set_half(&mut self.dst, high, v),
            0x18 | 0x1c => set_half(&mut self.completion, high, v),
            reg::LEN => self.len = v,
            reg::CONTROL if v & CONTROL_START != 0 => self.run(ctx, v & CONTROL_NOCRC == 0),
            reg::INTR_STATUS => {
                self.intr_status &= !v;
                if self.intr_status & INTR_DONE == 0 {
                    ctx.lower_intx();
                }
            }
            _ => {}
        }
    }

    /// Steps 2 to 4: the copy itself; its CRC32C (0 when `with_crc` is off).
    fn copy(&mut self, ctx: &mut DeviceContext<'_>, with_crc: bool) -> Result<u32, Errno> {
        if self.len > MAX_LEN {
            return Err(crate::device::errno::EINVAL);
        }
        let len = self.len as usize;
        let mut buf = vec![0u8; len];
        let mut dma = ctx.dma();
        let t = std::time::Instant::now();
        let moved = dma
            .read_sg(&[(self.src, len as u64)], &mut buf)
            .and_then(|()| dma.write_sg(&[(self.dst, len as u64)], &buf));
        self.dma_ns = t.elapsed().as_nanos() as u64;
        moved?;
        Ok(if with_crc { crc32c(&buf) } else { 0 })
    }

    /// One operation (see the module documentation).
    fn run(&mut self, ctx: &mut DeviceContext<'_>, with_crc: bool) {
        self.seq = self.seq.wrapping_add(1);
        let (mut errno, crc) = match self.copy(ctx, with_crc) {
            Ok(crc) => (0, crc),
            Err(e) => (e, 0),
        };
        let mut record = [0u8; RECORD_SIZE];
        for (i, v) in [errno, crc, self.len, self.seq].into_iter().enumerate() {
            record[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        if let Err(e) = ctx.dma().write(self.completion, &record) {
            if errno == 0 {
                errno = e;
            }
        }
        self.status = if errno == 0 {
            state::DONE
        } else {
            state::ERROR | (errno & 0xffff) << 16
        };
        self.crc = crc;
        self.intr_status |= INTR_DONE;
        self.irq_ns = monotonic_ns();
        ctx.raise_interrupt(0);
    }
}

impl DeviceModel for DmaEngine {
    fn describe(&self) -> DeviceDescription {
        let mut d = DeviceDescription::new(VENDOR_ID, DEVICE_ID, CLASS_CODE);
        d.revision = REVISION;
        d.subsystem_vendor_id = VENDOR_ID;
        d.subsystem_id = DEVICE_ID;
        d.bars[REG_BAR as usize] = Some(BarDesc {
            size: REG_BAR_SIZE,
            kind: BarKind::Mmio32,
            prefetchable: false,
            min_access: 4,
            max_access: 8,
        });
        d.intx = true;
        d.msix = Some(MsixDesc {
            vectors: MSIX_VECTORS,
            table_bar: REG_BAR,
            table_offset: MSIX_TABLE,
            pba_bar: REG_BAR,
            pba_offset: MSIX_PBA,
        });
        d.capabilities = vec![
            Capability::Pm,
            Capability::PciExpress(PcieDeviceType::Endpoint),
        ];
        d
    }

    fn bar_read(
        &mut self,
        _ctx: &mut DeviceContext<'_>,
        _bar: u8,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let v = self.read_dword(offset + 4 * i as u64).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }

    fn bar_write(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        _bar: u8,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno> {
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut v = [0u8; 4];
            v[..chunk.len()].copy_from_slice(chunk);
            self.write_dword(ctx, offset + 4 * i as u64, u32::from_le_bytes(v));
        }
        Ok(())
    }

    fn reset(&mut self, _ctx: &mut DeviceContext<'_>) {
        *self = Self::default();
    }

    fn save(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(STATE_LEN);
        out.extend_from_slice(&[STATE_FORMAT, 0, 0, 0]);
        for v in [self.src, self.dst, self.completion] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.len, self.status, self.crc, self.seq, self.intr_status] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.dma_ns, self.irq_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Some(out)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), Errno> {
        let einval = crate::device::errno::EINVAL;
        if state.len() != STATE_LEN || state[..4] != [STATE_FORMAT, 0, 0, 0] {
            log::warn!(
                "dma-engine: migration state of {} bytes, head {:?}; refused",
                state.len(),
                state.get(..4)
            );
            return Err(einval);
        }
        let u64_at =
            |at: usize| u64::from_le_bytes(state[at..at + 8].try_into().expect("8 bytes in range"));
        let u32_at =
            |at: usize| u32::from_le_bytes(state[at..at + 4].try_into().expect("4 bytes in range"));
        let status = u32_at(32);
        let intr_status = u32_at(44);
        let status_ok = match status & 0xff {
            state::IDLE | state::DONE => status >> 8 == 0,
            state::ERROR => status & 0xff00 == 0,
            _ => false,
        };
        if !status_ok || intr_status & !INTR_DONE != 0 {
            log::warn!(
                "dma-engine: migration state with STATUS {status:#x}, INTR_STATUS {intr_status:#x}; refused"
            );
            return Err(einval);
        }
        *self = Self {
            src: u64_at(4),
            dst: u64_at(12),
            completion: u64_at(20),
            len: u32_at(28),
            status,
            crc: u32_at(36),
            seq: u32_at(40),
            intr_status,
            dma_ns: u64_at(48),
            irq_ns: u64_at(56),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::tests::{memfd, pread, pwrite, MemRemote};
    use crate::device::errno::{EFAULT, EINVAL};
    use crate::device::irq::tests::{IrqEvent, RecordingIrqs};
    use crate::device::{DeviceServer, Response};
    use vfu_proto::vfio_user::{
        pci_irq, pci_region, DmaMap, Header, IrqData, RegionAccess, RegionWrite, Reply, Request,
        SetIrqs, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    };

    use std::os::fd::OwnedFd;

    const BAR: u32 = REG_BAR as u32;

    struct Dev {
        s: DeviceServer,
        rec: RecordingIrqs,
        remote: MemRemote,
    }

    impl Dev {
        fn new() -> Self {
            let rec = RecordingIrqs::default();
            let s = DeviceServer::new(Box::new(DmaEngine::new()), Box::new(rec.clone()));
            Self {
                s,
                rec,
                remote: MemRemote::default(),
            }
        }

        fn call(&mut self, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, Errno> {
            let h = Header::command(1, req.command() as u16, 0);
            match self.s.handle(&h, req, fds, &mut self.remote) {
                Response::Reply { reply, .. } => Ok(reply),
                Response::Error(e) => Err(e),
                Response::NoReply => panic!("reply expected"),
            }
        }

        fn write(&mut self, region: u32, offset: u64, data: &[u8]) {
            let r = self.call(
                Request::RegionWrite(RegionWrite {
                    offset,
                    region,
                    data: data.to_vec(),
                }),
                Vec::new(),
            );
            assert!(matches!(r, Ok(Reply::RegionWrite(_))), "{r:?}");
        }

        fn read(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
            match self.call(
                Request::RegionRead(RegionAccess {
                    offset,
                    region,
                    count,
                }),
                Vec::new(),
            ) {
                Ok(Reply::RegionRead(r)) => r.data,
                other => panic!("{other:?}"),
            }
        }

        fn r32(&mut self, off: u64) -> u32 {
            u32::from_le_bytes(self.read(BAR, off, 4).try_into().unwrap())
        }

        fn w32(&mut self, off: u64, v: u32) {
            self.write(BAR, off, &v.to_le_bytes());
        }

        fn w64(&mut self, off: u64, v: u64) {
            self.write(BAR, off, &v.to_le_bytes());
        }

        fn map(&mut self, address: u64, size: u64, read: bool, write: bool, fd: Option<OwnedFd>) {
            let m = DmaMap {
                read,
                write,
                offset: 0,
                address,
                size,
            };
            let fds = fd.into_iter().collect();
            assert_eq!(self.call(Request::DmaMap(m), fds), Ok(Reply::DmaMap));
        }

        fn assign(&mut self, index: u32, count: u32) {
            let set = SetIrqs {
                action: IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count,
                data: IrqData::EventFd { assign: true },
            };
            let h = Header::command(2, 8, 0);
            let slots = vec![vfu_proto::tunnel::Slot::eventfd(); count as usize];
            assert!(matches!(
                self.s
                    .handle_tunnel(&h, Request::DeviceSetIrqs(set), &slots, &mut self.remote),
                Response::Reply { .. }
            ));
        }

        /// Offset of the capability with ID `id` in config space.
        fn cap(&mut self, id: u8) -> u64 {
            let mut at = u64::from(self.read(pci_region::CONFIG, 0x34, 1)[0]);
            while at != 0 {
                let b = self.read(pci_region::CONFIG, at, 2);
                if b[0] == id {
                    return at;
                }
                at = u64::from(b[1]);
            }
            panic!("no capability {id:#x}");
        }

        /// Programs and starts one operation.
        fn start(&mut self, src: u64, dst: u64, completion: u64, len: u32) {
            self.w64(reg::SRC_IOVA, src);
            self.w64(reg::DST_IOVA, dst);
            self.w64(reg::COMPLETION_IOVA, completion);
            // LEN and CONTROL in one 8-byte write: LEN first.
            self.w64(reg::LEN, u64::from(len) | u64::from(CONTROL_START) << 32);
        }
    }

    fn record(status: u32, crc: u32, len: u32, seq: u32) -> Vec<u8> {
        [status, crc, len, seq]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// The identity and layout: IDs, class, BAR 0 of 4 KiB with 4/8-byte accesses,
    /// INTx, PCIe, MSI-X with 2 vectors in BAR 0; ID and VERSION read back; other
    /// widths are refused by the server.
    #[test]
    fn identity_and_registers() {
        let d = DmaEngine::new().describe();
        assert!(d.validate().is_empty(), "{:?}", d.validate());
        assert_eq!((d.vendor_id, d.device_id), (0x1234, 0x11f0));
        let mut dev = Dev::new();
        assert_eq!(
            dev.read(pci_region::CONFIG, 0, 4),
            vec![0x34, 0x12, 0xf0, 0x11]
        );
        assert_eq!(dev.r32(reg::ID), ID_VALUE);
        assert_eq!(&ID_VALUE.to_le_bytes(), b"DMAE");
        assert_eq!(dev.r32(reg::VERSION), 1);
        dev.w64(reg::SRC_IOVA, 0x1122_3344_5566_7788);
        dev.w32(reg::DST_IOVA + 4, 0xaabb_ccdd);
        dev.w32(reg::DST_IOVA, 0x1);
        assert_eq!(dev.r32(reg::SRC_IOVA), 0x5566_7788);
        assert_eq!(dev.r32(reg::SRC_IOVA + 4), 0x1122_3344);
        assert_eq!(
            dev.read(BAR, reg::DST_IOVA, 8),
            0xaabb_ccdd_0000_0001u64.to_le_bytes()
        );
        assert_eq!(dev.r32(reg::CONTROL), 0);
        assert_eq!(dev.r32(reg::STATUS), state::IDLE);
        assert_eq!(dev.r32(0x100), 0);
        for (off, count) in [(0, 1), (0, 2), (2, 4), (4, 8)] {
            let r = dev.call(
                Request::RegionRead(RegionAccess {
                    offset: off,
                    region: BAR,
                    count,
                }),
                Vec::new(),
            );
            assert_eq!(r, Err(EINVAL), "{off:#x}+{count}");
        }
        let text = dev.s.lspci();
        assert!(text.contains("MSI-X: Enable- Count=2"), "{text}");
        assert!(
            text.contains("Vector table: BAR=0 offset=00000800"),
            "{text}"
        );
    }

    /// A copy between mmapped (local) source and remote destination, and back: the
    /// bytes arrive, the CRC32C register and the completion record are right, SEQ
    /// counts, STATUS is DONE; without MSI-X the interrupt is INTx (asserted until
    /// INTR_STATUS is cleared); with MSI-X enabled it is vector 0.
    #[test]
    fn copies_and_interrupts() {
        let mut dev = Dev::new();
        let fd = memfd(0x10000);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        pwrite(&fd, 0x100, &data);
        dev.map(0x10000, 0x10000, true, true, Some(fd.try_clone().unwrap()));
        dev.remote.mem = vec![0; 0x30000];
        dev.map(0x20000, 0x10000, true, true, None);
        dev.assign(pci_irq::INTX, 1);
        dev.assign(pci_irq::MSIX, 2);
        dev.rec.take();
        let crc = crc32c(&data);
        dev.start(0x10100, 0x20000, 0x1f000, 5000);
        assert_eq!(&dev.remote.mem[0x20000..0x20000 + 5000], &data[..]);
        assert_eq!(pread(&fd, 0xf000, 16), record(0, crc, 5000, 1));
        assert_eq!(dev.r32(reg::STATUS), state::DONE);
        assert_eq!(dev.r32(reg::CRC32C), crc);
        assert_eq!(dev.r32(reg::SEQ), 1);
        assert_eq!(dev.r32(reg::INTR_STATUS), INTR_DONE);
        assert_eq!(dev.rec.take(), vec![IrqEvent::Trigger(pci_irq::INTX, 0)]);
        assert_ne!(
            dev.read(pci_region::CONFIG, 6, 1)[0] & 0x08,
            0,
            "INTx asserted"
        );
        dev.w32(reg::INTR_STATUS, INTR_DONE);
        assert_eq!(dev.r32(reg::INTR_STATUS), 0);
        assert_eq!(dev.read(pci_region::CONFIG, 6, 1)[0] & 0x08, 0, "lowered");
        // Back from remote to local, record to remote, with MSI-X enabled.
        let msix = dev.cap(0x11);
        dev.write(pci_region::CONFIG, msix + 3, &[0x80]);
        dev.remote.mem[0x20000] ^= 0xff;
        dev.start(0x20000, 0x18000, 0x2f000, 64);
        let mut expect = data[..64].to_vec();
        expect[0] ^= 0xff;
        assert_eq!(pread(&fd, 0x8000, 64), expect);
        let crc = crc32c(&expect);
        assert_eq!(
            &dev.remote.mem[0x2f000..0x2f010],
            &record(0, crc, 64, 2)[..]
        );
        assert_eq!(dev.rec.take(), vec![IrqEvent::Trigger(pci_irq::MSIX, 0)]);
        // LEN 0 is a valid, empty copy.
        dev.start(0x20000, 0x18000, 0x2f000, 0);
        assert_eq!(&dev.remote.mem[0x2f000..0x2f010], &record(0, 0, 0, 3)[..]);
        // Reset: registers back to zero.
        dev.call(Request::DeviceReset, Vec::new()).unwrap();
        assert_eq!(dev.r32(reg::SEQ), 0);
        assert_eq!(dev.r32(reg::SRC_IOVA), 0);
        assert_eq!(dev.r32(reg::STATUS), state::IDLE);
    }

    /// Migration: every register (IOVAs, LEN, STATUS, CRC32C, SEQ, INTR_STATUS and
    /// the timestamps), the MSI-X table and enable, and the pending completion arrive
    /// on a fresh engine, which carries on: its next operation is SEQ + 1.
    #[test]
    fn migrates() {
        use crate::device::migration::test_util::{load, save};
        let mut a = Dev::new();
        let fd = memfd(0x10000);
        pwrite(&fd, 0, &[0x42; 64]);
        a.map(0x10000, 0x10000, true, true, Some(fd.try_clone().unwrap()));
        let msix = a.cap(0x11);
        a.write(pci_region::CONFIG, msix + 3, &[0x80]);
        a.w32(MSIX_TABLE as u64, 0xfee0_1000);
        a.w32(MSIX_TABLE as u64 + 8, 0x4021);
        a.start(0x10000, 0x18000, 0x1f000, 64);
        assert_eq!(a.r32(reg::STATUS), state::DONE);
        let regs = |d: &mut Dev| -> Vec<u32> { (0..0x48).step_by(4).map(|o| d.r32(o)).collect() };
        let before = regs(&mut a);
        let table = a.read(BAR, MSIX_TABLE as u64, 8);
        let stream = save(&mut a.s);

        let mut b = Dev::new();
        load(&mut b.s, &stream).unwrap();
        assert_eq!(regs(&mut b), before);
        assert_eq!(b.read(BAR, MSIX_TABLE as u64, 8), table);
        assert_eq!(b.read(pci_region::CONFIG, msix + 3, 1)[0] & 0x80, 0x80);
        b.map(0x10000, 0x10000, true, true, Some(fd.try_clone().unwrap()));
        b.w32(reg::INTR_STATUS, INTR_DONE);
        b.start(0x10000, 0x18000, 0x1f000, 64);
        assert_eq!(b.r32(reg::SEQ), 2, "carries on");
        assert_eq!(
            pread(&fd, 0xf000, 16),
            record(0, crc32c(&[0x42; 64]), 64, 2)
        );
    }

    /// The model refuses a state of another length or format, reserved bytes, or a
    /// STATUS or INTR_STATUS no operation can produce.
    #[test]
    fn refuses_bad_state() {
        let mut e = DmaEngine::new();
        let good = e.save().unwrap();
        assert_eq!(good.len(), STATE_LEN);
        assert_eq!(e.restore(&good[1..]), Err(EINVAL));
        for (at, v) in [(0, 2u8), (2, 1), (32, 3), (33, 1), (44, 2)] {
            let mut bad = good.clone();
            bad[at] = v;
            assert_eq!(e.restore(&bad), Err(EINVAL), "byte {at} = {v:#x}");
        }
        let mut err = good.clone();
        err[32] = state::ERROR as u8;
        err[34] = EFAULT as u8;
        e.restore(&err).unwrap();
        assert_eq!(e.status, state::ERROR | EFAULT << 16);
    }

    /// Faults: an unmapped or unreadable source fails with EFAULT and writes no
    /// destination byte; a read-only destination fails with EFAULT and writes nothing;
    /// LEN over 1 MiB fails with EINVAL before any DMA; each still writes its
    /// completion record (status = errno) and raises the interrupt; a completion record
    /// that cannot be written makes the operation fail with EFAULT; the remote path's
    /// failure is a fault too.
    #[test]
    fn faults_are_reported() {
        let mut dev = Dev::new();
        dev.remote.mem = vec![0; 0x40000];
        dev.map(0x10000, 0x10000, true, true, None); // remote, read-write
        dev.map(0x20000, 0x1000, false, true, None); // write-only
        dev.map(0x30000, 0x1000, true, false, None); // read-only
        dev.assign(pci_irq::INTX, 1);
        // The driver's acknowledgement: clear the interrupt (INTx drops), unmask.
        let ack = |dev: &mut Dev| {
            assert_eq!(dev.rec.take(), vec![IrqEvent::Trigger(pci_irq::INTX, 0)]);
            dev.w32(reg::INTR_STATUS, INTR_DONE);
            let set = SetIrqs {
                action: IRQ_SET_ACTION_UNMASK,
                index: pci_irq::INTX,
                start: 0,
                count: 1,
                data: IrqData::None,
            };
            dev.call(Request::DeviceSetIrqs(set), Vec::new()).unwrap();
            assert!(dev.rec.take().is_empty());
        };
        dev.rec.take();
        dev.remote.mem[0x10000..0x10100].fill(0x5a);
        let err = |e: u32| state::ERROR | e << 16;
        let cases: [(u64, u64, u32, u32); 4] = [
            (0x50000, 0x11000, 16, EFAULT),   // source unmapped
            (0x20000, 0x11000, 16, EFAULT),   // source write-only
            (0x1fff0, 0x11000, 0x20, EFAULT), // source runs past its map
            (0x10000, 0x11000, MAX_LEN + 1, EINVAL),
        ];
        for (seq, (src, dst, len, errno)) in cases.into_iter().enumerate() {
            dev.remote.calls.clear();
            dev.start(src, dst, 0x1f000, len);
            assert_eq!(dev.r32(reg::STATUS), err(errno), "case {seq}");
            assert!(
                dev.remote.calls.iter().all(|c| !c.0 || c.1 == 0x1f000),
                "case {seq}: no destination write {:?}",
                dev.remote.calls
            );
            assert_eq!(
                &dev.remote.mem[0x1f000..0x1f010],
                &record(errno, 0, len, seq as u32 + 1)[..]
            );
            assert_eq!(dev.r32(reg::CRC32C), 0);
            ack(&mut dev);
        }
        assert!(dev.remote.mem[0x11000..0x11100].iter().all(|b| *b == 0));
        // Destination read-only: nothing written.
        dev.start(0x10000, 0x30000, 0x1f000, 0x20);
        assert_eq!(dev.r32(reg::STATUS), err(EFAULT));
        assert!(dev.remote.mem[0x30000..0x30020].iter().all(|b| *b == 0));
        ack(&mut dev);
        // The copy works, the record does not: EFAULT, and the copy stays done.
        dev.start(0x10000, 0x11000, 0x30000, 0x10);
        assert_eq!(dev.r32(reg::STATUS), err(EFAULT));
        assert_eq!(&dev.remote.mem[0x11000..0x11010], &[0x5a; 16]);
        assert_eq!(dev.r32(reg::CRC32C), crc32c(&[0x5a; 16]));
        ack(&mut dev);
        // The remote path fails (the client memory is not there).
        dev.remote.mem.truncate(0x10000);
        dev.start(0x10000, 0x11000, 0x1f000, 0x10);
        assert_eq!(dev.r32(reg::STATUS), err(EFAULT));
        assert_eq!(dev.r32(reg::SEQ), 7);
        ack(&mut dev);
    }
}
