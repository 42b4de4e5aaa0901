//! DeviceServer migration, over typed requests: the features (MIGRATION,
//! MIG_DEVICE_STATE, DMA logging), the state machine's transitions, what a stopped
//! device answers, saving on one server and loading on another, refused streams.

use std::os::fd::OwnedFd;

use vfu_proto::vfio_user::{
    pci_irq, pci_region, Capabilities, DeviceFeature, DmaMap, DmaUnmap, FeatureData, FeatureOp,
    Header, IrqData, LoggingRange, MigDataRead, MigDataWrite, MigState, Migration as MigCap,
    RegionAccess, RegionWrite, Reply, Request, SetIrqs, Version, FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION,
    FEATURE_MIG_DEVICE_STATE, IRQ_SET_ACTION_TRIGGER, MIGRATION_STOP_COPY,
};

use super::*;
use crate::crc32c::crc32c;
use crate::device::dma::tests::{memfd, MemRemote};
use crate::device::errno::{EBUSY, EFAULT, ENODEV, EPROTONOSUPPORT};
use crate::device::irq::tests::{IrqEvent, RecordingIrqs};
use crate::device::{BarDesc, BarKind, Capability, MsixDesc, PcieDeviceType};

use MigState::*;

/// Register block of the model: plain memory.
const REGS: usize = 0x100;
/// Write u16 vector: raise_interrupt(vector).
const RAISE: u64 = 0x100;
/// Write anything: assert INTx.
const INTX: u64 = 0x108;
/// Write u64 IOVA: the model writes 8 bytes there by DMA; errno at DMA_RESULT.
const DMA: u64 = 0x110;
const DMA_RESULT: u64 = 0x118;
const MSIX_TABLE: u64 = 0x800;
const MSIX_PBA: u64 = 0xc00;
/// A first register byte the model refuses to restore.
const REFUSED: u8 = 0xee;
const EPERM: Errno = libc::EPERM as Errno;

/// A migrating model: 256 bytes of registers in BAR 0, MSI-X with 4 vectors, INTx,
/// PCIe (4 KiB of config space; the extended part is the model's).
struct MigModel {
    regs: Vec<u8>,
    dma_result: u32,
}

impl DeviceModel for MigModel {
    fn describe(&self) -> DeviceDescription {
        let mut d = DeviceDescription::new(0x1234, 0x5678, 0x08_8000);
        d.bars[0] = Some(BarDesc {
            size: 0x1000,
            kind: BarKind::Mmio32,
            prefetchable: false,
            min_access: 1,
            max_access: 8,
        });
        d.intx = true;
        d.msix = Some(MsixDesc {
            vectors: 4,
            table_bar: 0,
            table_offset: MSIX_TABLE as u32,
            pba_bar: 0,
            pba_offset: MSIX_PBA as u32,
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
        let o = offset as usize;
        if offset == DMA_RESULT {
            data.copy_from_slice(&u64::from(self.dma_result).to_le_bytes()[..data.len()]);
        } else if o + data.len() <= REGS {
            data.copy_from_slice(&self.regs[o..o + data.len()]);
        } else {
            data.fill(0);
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
        match offset {
            RAISE => {
                ctx.raise_interrupt(u32::from(data[0]));
            }
            INTX => {
                ctx.raise_intx();
            }
            DMA => {
                let iova = u64::from_le_bytes(data.try_into().map_err(|_| EINVAL)?);
                self.dma_result = ctx.dma().write(iova, b"dirtying").err().unwrap_or(0);
            }
            o if (o as usize) + data.len() <= REGS => {
                self.regs[o as usize..o as usize + data.len()].copy_from_slice(data);
            }
            _ => {}
        }
        Ok(())
    }

    fn reset(&mut self, _ctx: &mut DeviceContext<'_>) {
        self.regs.fill(0);
    }

    fn save(&self) -> Option<Vec<u8>> {
        Some(self.regs.clone())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), Errno> {
        if state.len() != REGS {
            return Err(EINVAL);
        }
        if state[0] == REFUSED {
            return Err(EPERM);
        }
        self.regs.copy_from_slice(state);
        Ok(())
    }
}

struct H {
    s: DeviceServer,
    rec: RecordingIrqs,
    remote: MemRemote,
    id: u16,
}

impl H {
    fn new() -> Self {
        let rec = RecordingIrqs::default();
        let model = MigModel {
            regs: vec![0; REGS],
            dma_result: 0,
        };
        let s = DeviceServer::new(Box::new(model), Box::new(rec.clone()));
        Self {
            s,
            rec,
            remote: MemRemote {
                mem: vec![0; 0x40_0000],
                calls: Vec::new(),
            },
            id: 0,
        }
    }

    fn call_fds(&mut self, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, Errno> {
        self.id = self.id.wrapping_add(1);
        let h = Header::command(self.id, req.command() as u16, 0);
        match self.s.handle(&h, req, fds, &mut self.remote) {
            Response::Reply { reply, .. } => Ok(reply),
            Response::Error(e) => Err(e),
            Response::NoReply => panic!("reply expected"),
        }
    }

    fn call(&mut self, req: Request) -> Result<Reply, Errno> {
        self.call_fds(req, Vec::new())
    }

    fn feature(&mut self, f: DeviceFeature) -> Result<DeviceFeature, Errno> {
        match self.call(Request::DeviceFeature(f))? {
            Reply::DeviceFeature(f) => Ok(f),
            other => panic!("{other:?}"),
        }
    }

    fn get(&mut self, feature: u16) -> Result<FeatureData, Errno> {
        let f = DeviceFeature::request(feature, FeatureOp::Get, FeatureData::None);
        self.feature(f).map(|f| f.data)
    }

    fn state(&mut self) -> MigState {
        match self.get(FEATURE_MIG_DEVICE_STATE).unwrap() {
            FeatureData::MigState { state, .. } => state,
            other => panic!("{other:?}"),
        }
    }

    fn set_state(&mut self, state: MigState) -> Result<(), Errno> {
        let f = DeviceFeature::request(
            FEATURE_MIG_DEVICE_STATE,
            FeatureOp::Set,
            FeatureData::MigState { state, data_fd: -1 },
        );
        let reply = self.feature(f.clone())?;
        assert_eq!(reply, f, "a SET reply repeats the request");
        Ok(())
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, Errno> {
        match self.call(Request::RegionRead(RegionAccess {
            offset,
            region,
            count,
        }))? {
            Reply::RegionRead(r) => Ok(r.data),
            other => panic!("{other:?}"),
        }
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.call(Request::RegionWrite(RegionWrite {
            offset,
            region,
            data: data.to_vec(),
        }))
        .map(|_| ())
    }

    /// All of BAR 0, in 8-byte reads.
    fn bar(&mut self) -> Vec<u8> {
        (0..0x1000u64 / 8)
            .flat_map(|i| self.read(0, 8 * i, 8).unwrap())
            .collect()
    }

    fn mig_read(&mut self, size: u32) -> Result<Vec<u8>, Errno> {
        match self.call(Request::MigDataRead(MigDataRead::new(size)))? {
            Reply::MigDataRead(r) => {
                assert_eq!(r.argsz as usize, 8 + r.data.len());
                Ok(r.data)
            }
            other => panic!("{other:?}"),
        }
    }

    fn mig_write(&mut self, data: &[u8]) -> Result<(), Errno> {
        self.call(Request::MigDataWrite(MigDataWrite::new(data.to_vec())))
            .map(|_| ())
    }

    /// STOP_COPY, the whole stream in reads of `chunk` bytes, back to STOP.
    fn save(&mut self, chunk: u32) -> Vec<u8> {
        self.set_state(StopCopy).unwrap();
        let mut out = Vec::new();
        loop {
            let d = self.mig_read(chunk).unwrap();
            out.extend_from_slice(&d);
            if d.len() < chunk as usize {
                break;
            }
        }
        self.set_state(Stop).unwrap();
        out
    }

    /// RESUMING, `stream` in writes of `chunk` bytes, then STOP: its result.
    fn load(&mut self, stream: &[u8], chunk: usize) -> Result<(), Errno> {
        self.set_state(Resuming).unwrap();
        for c in stream.chunks(chunk) {
            self.mig_write(c).unwrap();
        }
        self.set_state(Stop)
    }

    /// MSI-X on, INTx and MSI-X vectors assigned (tunnel slots).
    fn setup_irqs(&mut self) {
        for (index, count) in [(pci_irq::INTX, 1), (pci_irq::MSIX, 4)] {
            let req = Request::DeviceSetIrqs(SetIrqs {
                action: IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count,
                data: IrqData::EventFd { assign: true },
            });
            let h = Header::command(99, 8, 0);
            let slots = vec![vfu_proto::tunnel::Slot::eventfd(); count as usize];
            assert!(matches!(
                self.s.handle_tunnel(&h, req, &slots, &mut self.remote),
                Response::Reply { .. }
            ));
        }
        self.rec.take();
    }

    fn cap(&self, id: u8) -> u64 {
        let c = self.s.config.layout().all.iter().find(|c| c.1 == id);
        c.map(|c| c.0 as u64).unwrap()
    }

    fn enable_msix(&mut self) {
        let msix = self.cap(0x11);
        self.write(pci_region::CONFIG, msix + 3, &[0x80]).unwrap();
    }

    fn map(&mut self, address: u64, size: u64, fd: Option<OwnedFd>) {
        let m = DmaMap {
            read: true,
            write: true,
            offset: 0,
            address,
            size,
        };
        let fds = fd.into_iter().collect();
        self.call_fds(Request::DmaMap(m), fds).unwrap();
    }

    /// The model writes 8 bytes at `iova` by DMA.
    fn dma(&mut self, iova: u64) -> Errno {
        self.write(0, DMA, &iova.to_le_bytes()).unwrap();
        let b = self.read(0, DMA_RESULT, 4).unwrap();
        u32::from_le_bytes(b.try_into().unwrap())
    }

    fn report(&mut self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, Errno> {
        let f = DeviceFeature::logging_report(iova, length, page_size);
        match self.feature(f)?.data {
            FeatureData::LoggingReport { bitmap, .. } => Ok(bitmap
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                .collect()),
            other => panic!("{other:?}"),
        }
    }

    fn logging_start(&mut self, page_size: u64, ranges: Vec<LoggingRange>) -> Result<u64, Errno> {
        let f = DeviceFeature::request(
            FEATURE_DMA_LOGGING_START,
            FeatureOp::Set,
            FeatureData::LoggingStart { page_size, ranges },
        );
        match self.feature(f)?.data {
            FeatureData::LoggingStart { page_size, .. } => Ok(page_size),
            other => panic!("{other:?}"),
        }
    }
}

/// MIGRATION GET states STOP_COPY only, MIG_DEVICE_STATE starts RUNNING; probes
/// succeed for the operations each feature has and fail for the others; a GET whose
/// argsz cannot hold the reply, a SET of MIGRATION and data that does not fit are
/// EINVAL; unknown features EOPNOTSUPP.
#[test]
fn features_and_probes() {
    let mut h = H::new();
    assert!(h.s.migratable());
    assert_eq!(
        h.get(FEATURE_MIGRATION),
        Ok(FeatureData::Migration {
            flags: MIGRATION_STOP_COPY
        })
    );
    assert_eq!(h.state(), Running);
    let probe = |h: &mut H, feature, get, set| {
        let f = DeviceFeature::request(feature, FeatureOp::Probe { get, set }, FeatureData::None);
        h.feature(f.clone()).map(|r| assert_eq!(r, f))
    };
    assert_eq!(probe(&mut h, FEATURE_MIGRATION, true, false), Ok(()));
    assert_eq!(probe(&mut h, FEATURE_MIGRATION, false, true), Err(EINVAL));
    assert_eq!(probe(&mut h, FEATURE_MIG_DEVICE_STATE, true, true), Ok(()));
    assert_eq!(
        probe(&mut h, FEATURE_DMA_LOGGING_START, false, true),
        Ok(())
    );
    assert_eq!(
        probe(&mut h, FEATURE_DMA_LOGGING_START, true, false),
        Err(EINVAL)
    );
    assert_eq!(
        probe(&mut h, FEATURE_DMA_LOGGING_REPORT, true, false),
        Ok(())
    );
    assert_eq!(
        probe(&mut h, FEATURE_DMA_LOGGING_STOP, false, false),
        Ok(())
    );
    assert_eq!(probe(&mut h, 3, false, false), Err(EOPNOTSUPP));
    let mut small = DeviceFeature::request(FEATURE_MIGRATION, FeatureOp::Get, FeatureData::None);
    small.argsz = 12;
    assert_eq!(h.feature(small), Err(EINVAL));
    let set = DeviceFeature::request(
        FEATURE_MIGRATION,
        FeatureOp::Set,
        FeatureData::Migration { flags: 1 },
    );
    assert_eq!(h.feature(set), Err(EINVAL));
    let raw = DeviceFeature::request(
        FEATURE_MIG_DEVICE_STATE,
        FeatureOp::Get,
        FeatureData::Raw(vec![1]),
    );
    assert_eq!(h.feature(raw), Err(EINVAL));
}

/// The state machine through the server: every offered state reached from every
/// other (through STOP where there is no direct arc), a request for the current state
/// is a no-op, states not offered are EINVAL and change nothing; the data commands
/// work only in their state; a reset returns to RUNNING from anywhere.
#[test]
fn transitions() {
    let mut h = H::new();
    let offered = [Running, Stop, StopCopy, Resuming];
    for from in offered {
        for to in offered {
            h.s.reset();
            if from != Running {
                h.set_state(from).unwrap();
            }
            assert_eq!(h.state(), from);
            if from == Resuming && to != Resuming {
                // Leaving RESUMING loads a stream: give it a valid one.
                let mut other = H::new();
                let s = other.save(4096);
                for c in s.chunks(100) {
                    h.mig_write(c).unwrap();
                }
            }
            h.set_state(to)
                .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            assert_eq!(h.state(), to, "{from} -> {to}");
            for bad in [Error, RunningP2p, PreCopy, PreCopyP2p] {
                assert_eq!(h.set_state(bad), Err(EINVAL), "{to} -> {bad}");
                assert_eq!(h.state(), to);
            }
        }
    }
    h.s.reset();
    assert_eq!(h.mig_read(16), Err(EINVAL), "RUNNING: no data to read");
    assert_eq!(h.mig_write(b"x"), Err(EINVAL), "RUNNING: no data to write");
    h.set_state(StopCopy).unwrap();
    assert_eq!(h.mig_write(b"x"), Err(EINVAL));
    assert_eq!(h.mig_read(2 << 20), Err(EINVAL), "over the transfer size");
    assert!(h.call(Request::DeviceReset).is_ok());
    assert_eq!(h.state(), Running, "reset");
    h.set_state(Resuming).unwrap();
    assert_eq!(h.mig_read(1), Err(EINVAL));
    let flr = h.cap(0x10) + 9;
    h.write(pci_region::CONFIG, flr, &[0x80]).unwrap();
    assert_eq!(h.state(), Running, "a function level reset too");
}

/// A stopped device: accesses that would reach the model (BAR registers, extended
/// config space) are EINVAL, what the library emulates (config header, MSI-X table and
/// PBA) still works; the event fd is withdrawn; interrupts a configuration change
/// releases are held until the device runs again; nothing of the model changed.
#[test]
fn stopped_device() {
    let mut h = H::new();
    h.setup_irqs();
    h.enable_msix();
    h.write(0, 0x10, &[7]).unwrap();
    // Vector 1 masked in the table: its interrupt waits in the PBA.
    h.write(0, MSIX_TABLE + 16 + 12, &[1]).unwrap();
    h.write(0, RAISE, &[1, 0]).unwrap();
    assert!(h.rec.take().is_empty());
    h.set_state(Stop).unwrap();
    assert!(h.s.event_fd().is_none());
    let mut own = Vec::new();
    for s in [Stop, StopCopy, Resuming] {
        if s == StopCopy {
            h.set_state(s).unwrap();
            own = h.mig_read(1 << 20).unwrap();
        }
        if s == Resuming {
            h.set_state(Stop).unwrap();
            h.set_state(s).unwrap();
            // Its own state, to leave RESUMING with.
            h.mig_write(&own).unwrap();
        }
        assert_eq!(h.read(0, 0x10, 1), Err(EINVAL), "{s}: model register");
        assert_eq!(h.write(0, 0x10, &[9]), Err(EINVAL), "{s}: model register");
        assert_eq!(h.write(0, RAISE, &[0, 0]), Err(EINVAL), "{s}");
        assert_eq!(
            h.read(pci_region::CONFIG, 0x100, 4),
            Err(EINVAL),
            "{s}: extended"
        );
        assert_eq!(
            h.read(pci_region::CONFIG, 0, 4).unwrap(),
            [0x34, 0x12, 0x78, 0x56]
        );
        assert_eq!(h.read(0, MSIX_PBA, 1).unwrap(), [0b10], "{s}: PBA");
        h.write(pci_region::CONFIG, 4, &[0x06, 0]).unwrap();
        // An access straddling the MSI-X table and model bytes is refused whole.
        assert_eq!(h.write(0, MSIX_TABLE - 4, &[0; 8]), Err(EINVAL));
    }
    h.set_state(Stop).unwrap();
    // Unmasking the vector while stopped releases nothing yet.
    h.write(0, MSIX_TABLE + 16 + 12, &[0]).unwrap();
    assert!(h.rec.take().is_empty(), "held while stopped");
    assert_eq!(h.read(0, MSIX_PBA, 1).unwrap(), [0b10]);
    h.set_state(Running).unwrap();
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(pci_irq::MSIX, 1)]);
    assert_eq!(h.read(0, MSIX_PBA, 1).unwrap(), [0]);
    assert!(h.s.event_fd().is_none(), "the model has none");
    assert_eq!(h.read(0, 0x10, 1).unwrap(), [7], "the model kept its state");
}

/// Save on one server, load on another through MIG_DATA_READ / MIG_DATA_WRITE in odd
/// chunks: config space (command, BARs, MSI-X enable), the MSI-X table and PBA, the
/// INTx level and the model's registers are byte for byte the same; the asserted INTx
/// is signalled to the new client once the device runs, and a pending vector is
/// delivered when it is unmasked.
#[test]
fn save_and_load() {
    let mut a = H::new();
    a.setup_irqs();
    a.enable_msix();
    a.write(pci_region::CONFIG, 4, &[0x06, 0]).unwrap();
    a.write(pci_region::CONFIG, 0x10, &0xfebf_0000u32.to_le_bytes())
        .unwrap();
    a.write(pci_region::CONFIG, 0x3c, &[11]).unwrap();
    for v in 0..4u64 {
        let e = MSIX_TABLE + 16 * v;
        a.write(0, e, &(0xfee0_0000u32 + v as u32 * 16).to_le_bytes())
            .unwrap();
        a.write(0, e + 8, &(0x4000 + v as u32).to_le_bytes())
            .unwrap();
    }
    a.write(0, MSIX_TABLE + 2 * 16 + 12, &[1]).unwrap();
    a.write(0, RAISE, &[2, 0]).unwrap();
    a.write(0, 0, b"regs: A!").unwrap();
    a.write(0, INTX, &[1]).unwrap();
    a.rec.take();
    let config_a = a.read(pci_region::CONFIG, 0, 256).unwrap();
    let bar_a = a.bar();
    a.set_state(Stop).unwrap();
    let stream = a.save(100);
    assert_eq!(stream.len(), 32 + 4096 + 8 + 64 + 8 + REGS);
    // A second save gives the same bytes: saving changes nothing.
    assert_eq!(a.save(4096), stream);

    let mut b = H::new();
    b.setup_irqs();
    b.load(&stream, 77).unwrap();
    b.set_state(Running).unwrap();
    assert_eq!(b.read(pci_region::CONFIG, 0, 256).unwrap(), config_a);
    assert_eq!(b.bar(), bar_a, "registers, MSI-X table, PBA");
    assert_eq!(
        b.read(pci_region::CONFIG, 6, 1).unwrap()[0] & 0x08,
        0x08,
        "INTx level"
    );
    assert_eq!(
        b.rec.take(),
        vec![IrqEvent::Trigger(pci_irq::INTX, 0)],
        "the asserted INTx reaches B's client; vector 2 is still masked"
    );
    b.write(0, MSIX_TABLE + 2 * 16 + 12, &[0]).unwrap();
    assert_eq!(b.rec.take(), vec![IrqEvent::Trigger(pci_irq::MSIX, 2)]);
    // And back again, unchanged.
    a.set_state(Running).unwrap();
    assert_eq!(a.bar(), bar_a);
}

/// Refused streams: garbage, another version, another device, a read-only config
/// byte changed (with a correct checksum), a model that refuses its state. Each SET to
/// STOP fails with its errno, the device stays in RESUMING with nothing loaded, and a
/// good stream written afterwards loads.
#[test]
fn refused_streams() {
    let mut a = H::new();
    a.write(0, 0, &[1, 2, 3, 4]).unwrap();
    let good = a.save(4096);
    let fix_crc = |mut s: Vec<u8>| {
        let crc = crc32c(&s[32..]);
        s[24..28].copy_from_slice(&crc.to_le_bytes());
        s
    };
    let mut version = good.clone();
    version[4] = 9;
    let mut device = good.clone();
    device[10] ^= 1;
    let mut vendor_id = good.clone();
    vendor_id[32] ^= 1;
    let mut model = good.clone();
    let at = model.len() - REGS;
    model[at] = REFUSED;
    let cases = [
        (b"not a stream at all, not even 32 bytes".to_vec(), EINVAL),
        (good[..good.len() - 1].to_vec(), EINVAL),
        (version, EPROTONOSUPPORT),
        (device, ENODEV),
        (fix_crc(vendor_id), EINVAL),
        (fix_crc(model), EPERM),
    ];
    let mut b = H::new();
    b.write(0, 0, &[9]).unwrap();
    for (stream, errno) in cases {
        assert_eq!(b.load(&stream, 1000), Err(errno));
        assert_eq!(b.state(), Resuming);
        b.s.reset();
        b.write(0, 0, &[9]).unwrap();
        assert_eq!(b.read(0, 0, 1).unwrap(), [9], "nothing loaded");
    }
    b.set_state(Resuming).unwrap();
    b.mig_write(b"garbage first").unwrap();
    assert_eq!(b.set_state(Stop), Err(EINVAL));
    for c in good.chunks(500) {
        b.mig_write(c).unwrap();
    }
    b.set_state(Running).unwrap();
    assert_eq!(b.read(0, 0, 4).unwrap(), [1, 2, 3, 4]);
}

/// A model without save/restore: every migration feature and MIG_DATA command is
/// EOPNOTSUPP, DMA logging still works; VERSION offers the legacy migration object
/// only to a client that proposes it, and only for a migrating model.
#[test]
fn non_migrating_model_and_version() {
    struct Plain;
    impl DeviceModel for Plain {
        fn describe(&self) -> DeviceDescription {
            let mut d = DeviceDescription::new(1, 2, 3);
            d.bars[0] = Some(BarDesc::mmio32(0x1000));
            d
        }
        fn bar_read(
            &mut self,
            _: &mut DeviceContext<'_>,
            _: u8,
            _: u64,
            d: &mut [u8],
        ) -> Result<(), Errno> {
            d.fill(0);
            Ok(())
        }
        fn bar_write(
            &mut self,
            _: &mut DeviceContext<'_>,
            _: u8,
            _: u64,
            _: &[u8],
        ) -> Result<(), Errno> {
            Ok(())
        }
        fn reset(&mut self, _: &mut DeviceContext<'_>) {}
    }
    let mut h = H::new();
    h.s = DeviceServer::new(Box::new(Plain), Box::new(RecordingIrqs::default()));
    assert!(!h.s.migratable());
    assert_eq!(h.get(FEATURE_MIGRATION), Err(EOPNOTSUPP));
    assert_eq!(h.get(FEATURE_MIG_DEVICE_STATE), Err(EOPNOTSUPP));
    assert_eq!(h.mig_read(4), Err(EOPNOTSUPP));
    assert_eq!(h.mig_write(b"x"), Err(EOPNOTSUPP));
    assert_eq!(h.logging_start(4096, vec![]), Ok(4096));
    let proposal = |migration| {
        Request::Version(Version {
            major: 0,
            minor: 0,
            capabilities: Some(Capabilities {
                migration,
                ..Default::default()
            }),
        })
    };
    let legacy = Some(MigCap {
        pgsize: Some(4096),
        max_bitmap_size: None,
    });
    let offered = |h: &mut H, p| match h.call(p).unwrap() {
        Reply::Version(v) => v.capabilities.unwrap().migration,
        other => panic!("{other:?}"),
    };
    assert_eq!(offered(&mut h, proposal(legacy)), None, "does not migrate");
    let mut m = H::new();
    assert_eq!(offered(&mut m, proposal(None)), None, "not proposed");
    assert_eq!(
        offered(&mut m, proposal(legacy)),
        Some(MigCap {
            pgsize: Some(4096),
            max_bitmap_size: Some(1 << 20),
        })
    );
}

/// DMA logging through the server, on a local (mmapped) and a remote region: the
/// pages the model writes are reported once, START forgets earlier writes, REPORT
/// without logging or with bad arguments fails, a too-small argsz gets the size needed
/// and clears nothing, START twice is EBUSY, an unmapped region's pages survive, and
/// STOP or a disconnect ends logging.
#[test]
fn dma_logging() {
    let mut h = H::new();
    h.map(0x10_0000, 0x10_0000, Some(memfd(0x10_0000)));
    h.map(0x20_0000, 0x10_0000, None);
    assert_eq!(
        h.report(0x10_0000, 0x1000, 4096),
        Err(EINVAL),
        "not started"
    );
    assert_eq!(h.dma(0x10_0000), 0, "before START");
    assert_eq!(h.logging_start(1024, vec![]), Ok(4096), "at least 4 KiB");
    assert_eq!(h.logging_start(4096, vec![]), Err(EBUSY));
    assert_eq!(h.report(0x10_0000, 0x20_0000, 4096).unwrap(), vec![0; 8]);
    assert_eq!(h.dma(0x10_3000), 0);
    assert_eq!(h.dma(0x10_4ffc), 0, "across two pages");
    assert_eq!(h.dma(0x20_0000 + 65 * 4096), 0, "remote region");
    assert_eq!(
        h.dma(0x30_0000),
        EFAULT,
        "unmapped: nothing written, nothing logged"
    );
    let mut small = DeviceFeature::logging_report(0x10_0000, 0x20_0000, 4096);
    small.argsz = 8 + 24;
    let r = h.feature(small).unwrap();
    assert_eq!(r.argsz, 8 + 24 + 64, "the size needed");
    assert!(matches!(r.data, FeatureData::LoggingReport { ref bitmap, .. } if bitmap.is_empty()));
    let bitmap = h.report(0x10_0000, 0x20_0000, 4096).unwrap();
    let mut want = vec![0u64; 8];
    want[0] = 0b11_1000;
    want[5] = 0b10; // page 256 + 65 = 321: word 5, bit 1
    assert_eq!(bitmap, want);
    assert_eq!(
        h.report(0x10_0000, 0x20_0000, 4096).unwrap(),
        vec![0; 8],
        "cleared"
    );
    assert_eq!(h.report(0x10_0800, 0x1000, 4096), Err(EINVAL), "unaligned");
    assert_eq!(h.report(0, 1 << 40, 4096), Err(libc::E2BIG as Errno));
    // A region unmapped after the device wrote it still reports.
    assert_eq!(h.dma(0x20_0000), 0);
    h.call(Request::DmaUnmap(DmaUnmap::region(0x20_0000, 0x10_0000)))
        .unwrap();
    assert_eq!(h.report(0x20_0000, 64 * 4096, 4096).unwrap(), vec![1]);
    let stop = DeviceFeature::request(FEATURE_DMA_LOGGING_STOP, FeatureOp::Set, FeatureData::None);
    h.feature(stop.clone()).unwrap();
    assert!(!h.s.dma_logging());
    h.feature(stop).unwrap();
    assert_eq!(h.report(0x10_0000, 0x1000, 4096), Err(EINVAL), "stopped");
    h.logging_start(
        4096,
        vec![LoggingRange {
            iova: 0x10_0000,
            length: 0x1000,
        }],
    )
    .unwrap();
    h.s.client_disconnected();
    assert!(!h.s.dma_logging(), "a disconnect ends logging");
}
