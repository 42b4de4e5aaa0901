//! DeviceServer over typed requests: every command, the error cases, reset, the DMA
//! table, SET_IRQS validation and delivery into a recording sink.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use proptest::prelude::*;
use vfu_proto::vfio_user::{
    pci_irq, pci_region, CountWidth, DeviceFeature, DmaAccess, DmaMap, DmaUnmap, FeatureData,
    FeatureOp, GetInfoRequest, Header, IrqData, MigDataRead, MultiWrite, RegionAccess, RegionWrite,
    Reply, Request, SetIrqs, Version, FEATURE_MIGRATION, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::device::errno::{EEXIST, ENOENT};
use crate::device::irq::tests::{IrqEvent, RecordingIrqs};
use crate::device::{BarDesc, BarKind, Capability, MsixDesc, PcieDeviceType};

/// BAR 0 register offsets of the test model that make it act on its context.
const RAISE: u64 = 0x1000; // write u16: index << 8 | vector
const LOWER: u64 = 0x1008;

/// A model with every kind of BAR, INTx, 4 MSI, 8 MSI-X vectors and PM, PCIe and
/// vendor capabilities. BARs are plain memory; config bytes it owns are memory too.
struct TestModel {
    bar0: Vec<u8>,
    bar2: Vec<u8>,
    bar3: Vec<u8>,
    config: Vec<u8>,
    resets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TestModel {
    fn new() -> Self {
        Self {
            bar0: vec![0; 0x4000],
            bar2: vec![0; 0x20],
            bar3: vec![0; 0x1000],
            config: vec![0; 4096],
            resets: Default::default(),
        }
    }

    fn mem(&mut self, bar: u8) -> Result<&mut Vec<u8>, Errno> {
        match bar {
            0 => Ok(&mut self.bar0),
            2 => Ok(&mut self.bar2),
            3 => Ok(&mut self.bar3),
            _ => Err(EINVAL),
        }
    }
}

impl DeviceModel for TestModel {
    fn describe(&self) -> DeviceDescription {
        let mut d = DeviceDescription::new(0x1af4, 0x10ff, 0x05_8000);
        d.bars[0] = Some(BarDesc::mmio64(0x4000, false));
        d.bars[2] = Some(BarDesc::io(0x20));
        d.bars[3] = Some(BarDesc {
            size: 0x1000,
            kind: BarKind::Mmio32,
            prefetchable: true,
            min_access: 4,
            max_access: 0x1000,
        });
        d.intx = true;
        d.msi_vectors = 4;
        d.msix = Some(MsixDesc {
            vectors: 8,
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        });
        d.capabilities = vec![
            Capability::Pm,
            Capability::PciExpress(PcieDeviceType::Endpoint),
            Capability::Vendor(vec![1, 2, 3]),
        ];
        d
    }

    fn bar_read(
        &mut self,
        _ctx: &mut DeviceContext<'_>,
        bar: u8,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        let m = self.mem(bar)?;
        let o = offset as usize;
        data.copy_from_slice(&m[o..o + data.len()]);
        Ok(())
    }

    fn bar_write(
        &mut self,
        ctx: &mut DeviceContext<'_>,
        bar: u8,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno> {
        if bar == 0 && offset == RAISE && data.len() == 2 {
            ctx.raise_irq(u32::from(data[1]), u32::from(data[0]));
            return Ok(());
        }
        if bar == 0 && offset == LOWER {
            ctx.lower_intx();
            return Ok(());
        }
        let m = self.mem(bar)?;
        let o = offset as usize;
        m[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn reset(&mut self, _ctx: &mut DeviceContext<'_>) {
        self.resets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.bar0.fill(0);
    }

    fn config_read(
        &mut self,
        _ctx: &mut DeviceContext<'_>,
        offset: u16,
        data: &mut [u8],
    ) -> Result<(), Errno> {
        let o = usize::from(offset);
        data.copy_from_slice(&self.config[o..o + data.len()]);
        Ok(())
    }

    fn config_write(
        &mut self,
        _ctx: &mut DeviceContext<'_>,
        offset: u16,
        data: &[u8],
    ) -> Result<(), Errno> {
        let o = usize::from(offset);
        self.config[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

struct Harness {
    s: DeviceServer,
    rec: RecordingIrqs,
    resets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    id: u16,
}

impl Harness {
    fn new() -> Self {
        let model = TestModel::new();
        let resets = model.resets.clone();
        let rec = RecordingIrqs::default();
        let s = DeviceServer::new(Box::new(model), Box::new(rec.clone()));
        Self {
            s,
            rec,
            resets,
            id: 0,
        }
    }

    fn header(&mut self, req: &Request, no_reply: bool) -> Header {
        self.id = self.id.wrapping_add(1);
        let mut h = Header::command(self.id, req.command() as u16, 0);
        h.no_reply = no_reply;
        h
    }

    fn call_fds(&mut self, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, Errno> {
        let h = self.header(&req, false);
        match self.s.handle(&h, req, fds) {
            Response::Reply { reply, fds } => {
                assert!(fds.is_empty());
                Ok(reply)
            }
            Response::Error(e) => Err(e),
            Response::NoReply => panic!("reply expected"),
        }
    }

    fn call(&mut self, req: Request) -> Result<Reply, Errno> {
        self.call_fds(req, Vec::new())
    }

    fn tunnel(&mut self, req: Request, slots: usize) -> Result<Reply, Errno> {
        let h = self.header(&req, false);
        match self.s.handle_tunnel(&h, req, slots) {
            Response::Reply { reply, .. } => Ok(reply),
            Response::Error(e) => Err(e),
            Response::NoReply => panic!("reply expected"),
        }
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, Errno> {
        match self.call(Request::RegionRead(RegionAccess {
            offset,
            region,
            count,
        }))? {
            Reply::RegionRead(r) => {
                assert_eq!((r.offset, r.region), (offset, region));
                Ok(r.data)
            }
            other => panic!("{other:?}"),
        }
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match self.call(Request::RegionWrite(RegionWrite {
            offset,
            region,
            data: data.to_vec(),
        }))? {
            Reply::RegionWrite(a) => {
                assert_eq!(a.count as usize, data.len());
                Ok(())
            }
            other => panic!("{other:?}"),
        }
    }

    fn cfg16(&mut self, off: u64) -> u16 {
        let b = self.read(pci_region::CONFIG, off, 2).unwrap();
        u16::from_le_bytes([b[0], b[1]])
    }

    fn set_irqs(
        &mut self,
        action: u32,
        index: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<Reply, Errno> {
        self.set_irqs_fds(action, index, start, count, data, Vec::new())
    }

    fn set_irqs_fds(
        &mut self,
        action: u32,
        index: u32,
        start: u32,
        count: u32,
        data: IrqData,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, Errno> {
        self.call_fds(
            Request::DeviceSetIrqs(SetIrqs {
                action,
                index,
                start,
                count,
                data,
            }),
            fds,
        )
    }

    /// Assigns vectors through the tunnel form (slots, no fds).
    fn assign(&mut self, index: u32, start: u32, count: u32) {
        let req = Request::DeviceSetIrqs(SetIrqs {
            action: IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
            data: IrqData::EventFd { assign: true },
        });
        assert_eq!(self.tunnel(req, count as usize), Ok(Reply::DeviceSetIrqs));
    }

    fn raise(&mut self, index: u32, vector: u32) {
        self.write(0, RAISE, &[vector as u8, index as u8]).unwrap();
    }

    fn cap(&self, id: u8) -> u64 {
        self.s
            .config
            .layout()
            .all
            .iter()
            .find(|c| c.1 == id)
            .map(|c| c.0 as u64)
            .unwrap()
    }
}

fn fd() -> OwnedFd {
    let e = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: `into_raw_fd` gives up the only owner of the fresh eventfd.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}

fn info(index: u32) -> GetInfoRequest {
    GetInfoRequest { argsz: 32, index }
}

/// VERSION: 0.x is answered with 0.0 and the server's capabilities (16 fds, 1 MiB,
/// 4 KiB pages, write_multiple); another major is EINVAL; the client's capabilities
/// are kept until it disconnects.
#[test]
fn version() {
    let mut h = Harness::new();
    let v = Version {
        major: 0,
        minor: 7,
        capabilities: Some(vfu_proto::vfio_user::Capabilities {
            max_msg_fds: Some(8),
            ..Default::default()
        }),
    };
    match h.call(Request::Version(v)).unwrap() {
        Reply::Version(r) => {
            assert_eq!((r.major, r.minor), (0, 0));
            let c = r.capabilities.unwrap();
            assert_eq!(c, h.s.capabilities());
            assert_eq!(c.max_msg_fds, Some(16));
            assert_eq!(c.max_data_xfer_size, Some(1 << 20));
            assert_eq!(c.pgsizes, Some(4096));
            assert_eq!(c.max_dma_maps, Some(65535));
            assert_eq!(c.write_multiple, Some(true));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.s.client_capabilities().max_msg_fds, Some(8));
    let bad = Version {
        major: 1,
        minor: 0,
        capabilities: None,
    };
    assert_eq!(h.call(Request::Version(bad)), Err(EINVAL));
    h.s.client_disconnected();
    assert_eq!(h.s.client_capabilities().max_msg_fds, None);
}

/// GET_INFO, GET_REGION_INFO for every index (BAR sizes and flags, 4096-byte config
/// for PCIe, size-0 ROM/VGA/unused BARs, EINVAL past 9), GET_REGION_IO_FDS and
/// GET_IRQ_INFO as Linux vfio-pci reports them.
#[test]
fn info_commands() {
    let mut h = Harness::new();
    match h.call(Request::DeviceGetInfo(info(0))).unwrap() {
        Reply::DeviceGetInfo(i) => {
            assert_eq!(i.flags, 3);
            assert_eq!((i.num_regions, i.num_irqs, i.argsz), (9, 5, 16));
        }
        other => panic!("{other:?}"),
    }
    let sizes = [0x4000, 0, 0x20, 0x1000, 0, 0, 0, 4096, 0];
    for (i, size) in sizes.iter().enumerate() {
        match h
            .call(Request::DeviceGetRegionInfo(info(i as u32)))
            .unwrap()
        {
            Reply::DeviceGetRegionInfo(r) => {
                assert_eq!((r.index, r.size, r.argsz), (i as u32, *size, 32));
                let rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
                assert_eq!(r.flags, if *size > 0 { rw } else { 0 });
                assert!(r.caps.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.call(Request::DeviceGetRegionInfo(info(9))), Err(EINVAL));
    assert_eq!(
        h.call(Request::DeviceGetRegionInfo(info(u32::MAX))),
        Err(EINVAL)
    );
    match h.call(Request::DeviceGetRegionIoFds(info(0))).unwrap() {
        Reply::DeviceGetRegionIoFds(f) => {
            assert_eq!((f.count, f.argsz), (0, 16));
            assert!(f.sub_regions.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.call(Request::DeviceGetRegionIoFds(info(9))), Err(EINVAL));
    let expect = [
        (
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            1,
        ),
        (IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE, 4),
        (IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE, 8),
        (IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE, 1),
        (IRQ_INFO_EVENTFD, 1),
    ];
    for (i, (flags, count)) in expect.iter().enumerate() {
        match h.call(Request::DeviceGetIrqInfo(info(i as u32))).unwrap() {
            Reply::DeviceGetIrqInfo(r) => {
                assert_eq!(
                    (r.index, r.flags, r.count),
                    (i as u32, *flags, *count),
                    "{i}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.call(Request::DeviceGetIrqInfo(info(5))), Err(EINVAL));
}

/// Region accesses: BARs reach the model; bounds, overflow, width, alignment, the
/// transfer limit, the upper half of a 64-bit BAR, ROM, VGA and unknown regions are
/// EINVAL; zero-length accesses succeed; bulk BARs take large accesses.
#[test]
fn region_access_checks() {
    let mut h = Harness::new();
    h.write(0, 8, &0x1122_3344_5566_7788u64.to_le_bytes())
        .unwrap();
    assert_eq!(
        h.read(0, 8, 8).unwrap(),
        0x1122_3344_5566_7788u64.to_le_bytes()
    );
    assert_eq!(h.read(0, 12, 2).unwrap(), vec![0x44, 0x33]);
    h.write(2, 0x1f, &[9]).unwrap();
    assert_eq!(h.read(2, 0x1c, 4).unwrap(), vec![0, 0, 0, 9]);
    assert_eq!(
        h.read(2, 0x1c, 8),
        Err(EINVAL),
        "wider than the I/O BAR takes"
    );
    assert_eq!(h.read(0, 0x3ffc, 8), Err(EINVAL), "past the end");
    assert_eq!(h.read(0, u64::MAX, 1), Err(EINVAL), "offset overflow");
    assert_eq!(h.read(0, 2, 4), Err(EINVAL), "unaligned");
    assert_eq!(h.read(0, 0, 3), Err(EINVAL), "odd width");
    assert_eq!(h.read(0, 0, 16), Err(EINVAL), "wider than 8");
    assert_eq!(h.read(1, 0, 4), Err(EINVAL), "upper half of BAR 0");
    for r in [4, 5, 6, 8, 9, 100] {
        assert_eq!(h.read(r, 0, 4), Err(EINVAL), "region {r}");
        assert_eq!(h.write(r, 0, &[0; 4]), Err(EINVAL), "region {r}");
    }
    assert_eq!(h.read(0, 0, 0).unwrap(), Vec::<u8>::new());
    assert_eq!(h.write(0, 0x4000, &[]), Ok(()));
    assert_eq!(h.read(0, 0x4001, 0), Err(EINVAL));
    // Bulk BAR: any multiple of 4 up to the size.
    h.write(3, 4, &[7; 12]).unwrap();
    assert_eq!(h.read(3, 0, 0x1000).unwrap()[4..16], [7; 12]);
    assert_eq!(h.read(3, 2, 4), Err(EINVAL));
    assert_eq!(h.read(3, 0, 6), Err(EINVAL));
    // Transfer limit.
    assert_eq!(h.read(pci_region::CONFIG, 0, (1 << 20) + 1), Err(EINVAL));
    // Config space bounds.
    assert_eq!(h.read(pci_region::CONFIG, 4095, 2), Err(EINVAL));
    assert_eq!(h.read(pci_region::CONFIG, 4095, 1).unwrap(), vec![0]);
}

/// Config space through REGION_READ/WRITE: the emulated header and capabilities,
/// device-specific bytes (after the capabilities, and the extended space) handled by
/// the model, and an access straddling both split correctly.
#[test]
fn config_space_dispatch() {
    let mut h = Harness::new();
    assert_eq!(
        h.read(pci_region::CONFIG, 0, 4).unwrap(),
        vec![0xf4, 0x1a, 0xff, 0x10]
    );
    // The two padding bytes of the vendor capability (3 + 3 bytes) are emulated,
    // read-only 0.
    let vendor = h.cap(0x09);
    h.write(pci_region::CONFIG, vendor + 4, &[0xaa, 0xbb, 0xcc, 0xdd])
        .unwrap();
    assert_eq!(
        h.read(pci_region::CONFIG, vendor + 4, 4).unwrap(),
        vec![2, 3, 0, 0]
    );
    // After the last capability (MSI-X, 12 bytes) the bytes are the model's.
    let end = h.cap(0x11) + 12;
    h.write(pci_region::CONFIG, end - 2, &[0xaa, 0xbb, 0xcc, 0xdd])
        .unwrap();
    assert_eq!(
        h.read(pci_region::CONFIG, end - 2, 4).unwrap(),
        vec![0, 0, 0xcc, 0xdd]
    );
    h.write(pci_region::CONFIG, 0x100, &[1, 2, 3, 4]).unwrap();
    assert_eq!(
        h.read(pci_region::CONFIG, 0x100, 4).unwrap(),
        vec![1, 2, 3, 4]
    );
    // Command register: memory enable is writable, BAR 0 sizing through the region.
    h.write(pci_region::CONFIG, 4, &[0x06, 0x00]).unwrap();
    assert_eq!(h.cfg16(4), 0x0006);
    h.write(pci_region::CONFIG, 0x10, &[0xff; 8]).unwrap();
    assert_eq!(
        h.read(pci_region::CONFIG, 0x10, 8).unwrap(),
        vec![0x04, 0xc0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
    );
    // BAR accesses work whatever the enable bits say.
    h.write(pci_region::CONFIG, 4, &[0, 0]).unwrap();
    assert!(h.read(0, 0, 4).is_ok());
}

/// DEVICE_RESET and a function level reset written to the PCIe capability both call
/// the model's reset and return config space to power-on values (command, BARs,
/// interrupt line, INTx level), keeping IRQ assignments.
#[test]
fn reset_and_flr() {
    let mut h = Harness::new();
    h.assign(pci_irq::INTX, 0, 1);
    h.write(pci_region::CONFIG, 4, &[0x07, 0x04]).unwrap();
    h.write(pci_region::CONFIG, 0x18, &[0xff; 4]).unwrap();
    h.write(pci_region::CONFIG, 0x3c, &[5]).unwrap();
    h.write(0, 0, &[1]).unwrap();
    assert_eq!(h.call(Request::DeviceReset), Ok(Reply::DeviceReset));
    assert_eq!(h.resets.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(h.cfg16(4), 0);
    assert_eq!(
        h.read(pci_region::CONFIG, 0x18, 4).unwrap(),
        vec![1, 0, 0, 0]
    );
    assert_eq!(h.read(pci_region::CONFIG, 0x3c, 1).unwrap(), vec![0]);
    assert_eq!(h.read(0, 0, 1).unwrap(), vec![0]);
    let pcie = h.cap(0x10);
    h.write(pci_region::CONFIG, 4, &[0x02, 0x00]).unwrap();
    h.write(pci_region::CONFIG, pcie + 8, &[0x00, 0x80])
        .unwrap();
    assert_eq!(h.resets.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(h.cfg16(4), 0);
    // The INTx eventfd is still assigned after the resets.
    h.rec.take();
    h.raise(pci_irq::INTX, 0);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(0, 0)]);
}

/// DMA_MAP / DMA_UNMAP through the server: fds are kept with the map, overlaps are
/// EEXIST, unknown unmaps ENOENT, UNMAP_ALL and a client disconnect empty the table;
/// the unmap reply echoes the request; DMA_MAP in tunnel mode has no fd.
#[test]
fn dma_map_rules() {
    let mut h = Harness::new();
    let map = |address, size| DmaMap {
        read: true,
        write: false,
        offset: 0,
        address,
        size,
    };
    assert_eq!(
        h.call_fds(Request::DmaMap(map(0x10000, 0x2000)), vec![fd()]),
        Ok(Reply::DmaMap)
    );
    assert_eq!(h.call(Request::DmaMap(map(0x11000, 0x1000))), Err(EEXIST));
    assert_eq!(
        h.call_fds(Request::DmaMap(map(0x20000, 0x1000)), vec![fd(), fd()]),
        Err(EINVAL)
    );
    assert_eq!(
        h.tunnel(Request::DmaMap(map(0x20000, 0x1000)), 0),
        Ok(Reply::DmaMap)
    );
    let regions: Vec<_> =
        h.s.dma_regions()
            .map(|r| (r.address, r.fd.is_some()))
            .collect();
    assert_eq!(regions, vec![(0x10000, true), (0x20000, false)]);
    let u = DmaUnmap::region(0x10000, 0x1000);
    assert_eq!(h.call(Request::DmaUnmap(u)), Err(ENOENT));
    let u = DmaUnmap::region(0x10000, 0x2000);
    assert_eq!(h.call(Request::DmaUnmap(u)), Ok(Reply::DmaUnmap(u)));
    assert_eq!(
        h.call(Request::DmaUnmap(DmaUnmap::all())),
        Ok(Reply::DmaUnmap(DmaUnmap::all()))
    );
    assert_eq!(h.s.dma_regions().count(), 0);
    h.call(Request::DmaMap(map(0x10000, 0x1000))).unwrap();
    h.s.client_disconnected();
    assert_eq!(h.s.dma_regions().count(), 0);
}

/// SET_IRQS validation: bad index, start or range, count 0 other than disable-all,
/// fd count mismatch, fds without DATA_EVENTFD, mask/unmask on MSI, non-trigger
/// actions on ERR/REQ and unmask eventfds are all EINVAL.
#[test]
fn set_irqs_validation() {
    let mut h = Harness::new();
    let trig = IRQ_SET_ACTION_TRIGGER;
    assert_eq!(h.set_irqs(trig, 5, 0, 1, IrqData::None), Err(EINVAL));
    assert_eq!(
        h.set_irqs(trig, pci_irq::MSI, 4, 1, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs(trig, pci_irq::MSI, 2, 3, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs(trig, pci_irq::MSI, u32::MAX, 2, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs(IRQ_SET_ACTION_MASK, pci_irq::MSI, 0, 0, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs_fds(
            trig,
            pci_irq::MSI,
            0,
            2,
            IrqData::EventFd { assign: true },
            vec![fd()]
        ),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs_fds(trig, pci_irq::MSI, 0, 1, IrqData::None, vec![fd()]),
        Err(EINVAL)
    );
    // An fd that is not an eventfd.
    let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let ev = IrqData::EventFd { assign: true };
    assert_eq!(
        h.set_irqs_fds(trig, pci_irq::MSI, 0, 1, ev, vec![file]),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs(IRQ_SET_ACTION_MASK, pci_irq::MSI, 0, 1, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs(IRQ_SET_ACTION_UNMASK, pci_irq::REQ, 0, 1, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs(trig, pci_irq::REQ, 0, 2, IrqData::None),
        Err(EINVAL)
    );
    assert_eq!(
        h.set_irqs_fds(
            IRQ_SET_ACTION_UNMASK,
            pci_irq::INTX,
            0,
            1,
            IrqData::EventFd { assign: true },
            vec![fd()]
        ),
        Err(EINVAL)
    );
    // The gpio-like device without PCIe has no ERR vector at all.
    let mut g = DeviceServer::new(
        Box::new(crate::models::gpio::Gpio::new()),
        Box::new(RecordingIrqs::default()),
    );
    let hdr = Header::command(1, 8, 0);
    let req = Request::DeviceSetIrqs(SetIrqs {
        action: trig,
        index: pci_irq::ERR,
        start: 0,
        count: 0,
        data: IrqData::None,
    });
    assert!(matches!(
        g.handle(&hdr, req, Vec::new()),
        Response::Error(22)
    ));
    assert!(h.rec.take().is_empty());
}

/// Assignment goes to the sink as fds (direct) or slots (tunnel); de-assignment and
/// disable-all go the same way; DATA_NONE/DATA_BOOL triggers signal the selected
/// vectors.
#[test]
fn set_irqs_assign_and_trigger() {
    let mut h = Harness::new();
    let trig = IRQ_SET_ACTION_TRIGGER;
    let ev = IrqData::EventFd { assign: true };
    assert_eq!(
        h.set_irqs_fds(trig, pci_irq::MSI, 1, 3, ev.clone(), vec![fd(), fd(), fd()]),
        Ok(Reply::DeviceSetIrqs)
    );
    h.set_irqs(trig, pci_irq::MSI, 3, 1, IrqData::EventFd { assign: false })
        .unwrap();
    h.assign(pci_irq::MSIX, 0, 8);
    h.tunnel(
        Request::DeviceSetIrqs(SetIrqs {
            action: trig,
            index: pci_irq::MSIX,
            start: 0,
            count: 0,
            data: IrqData::None,
        }),
        0,
    )
    .unwrap();
    h.set_irqs(trig, pci_irq::MSI, 0, 0, IrqData::None).unwrap();
    assert_eq!(
        h.rec.take(),
        vec![
            IrqEvent::Assign(1, 1, 3, 3),
            IrqEvent::Deassign(1, 3, 1),
            IrqEvent::Slots(2, 0, 8, true),
            IrqEvent::Slots(2, 0, 8, false),
            IrqEvent::Deassign(1, 0, 4),
        ]
    );
    h.set_irqs(trig, pci_irq::MSI, 1, 3, IrqData::None).unwrap();
    h.set_irqs(trig, pci_irq::MSI, 0, 4, IrqData::Bool(vec![1, 0, 0, 2]))
        .unwrap();
    h.set_irqs(trig, pci_irq::REQ, 0, 1, IrqData::None).unwrap();
    assert_eq!(
        h.rec.take(),
        vec![
            IrqEvent::Trigger(1, 1),
            IrqEvent::Trigger(1, 2),
            IrqEvent::Trigger(1, 3),
            IrqEvent::Trigger(1, 0),
            IrqEvent::Trigger(1, 3),
            IrqEvent::Trigger(4, 0),
        ]
    );
}

/// INTx: automasked after a signal, held while masked, disabled by the command
/// register or unassigned, and delivered when unmasked, re-enabled or assigned while
/// still asserted; the status register's INTx bit follows the level.
#[test]
fn intx_delivery_rules() {
    let mut h = Harness::new();
    let unmask = |h: &mut Harness| {
        h.set_irqs(IRQ_SET_ACTION_UNMASK, 0, 0, 1, IrqData::None)
            .unwrap();
    };
    h.raise(0, 0);
    assert!(h.rec.take().is_empty(), "not assigned yet");
    assert_ne!(h.cfg16(6) & 0x08, 0, "status shows INTx");
    h.assign(0, 0, 1);
    assert_eq!(
        h.rec.take(),
        vec![IrqEvent::Slots(0, 0, 1, true), IrqEvent::Trigger(0, 0)]
    );
    h.raise(0, 0);
    assert!(h.rec.take().is_empty(), "automasked");
    unmask(&mut h);
    assert_eq!(
        h.rec.take(),
        vec![IrqEvent::Trigger(0, 0)],
        "still asserted"
    );
    h.write(0, LOWER, &[0]).unwrap();
    assert_eq!(h.cfg16(6) & 0x08, 0);
    unmask(&mut h);
    assert!(h.rec.take().is_empty());
    // Explicit MASK holds an edge until UNMASK.
    h.set_irqs(IRQ_SET_ACTION_MASK, 0, 0, 1, IrqData::Bool(vec![1]))
        .unwrap();
    h.raise(0, 0);
    assert!(h.rec.take().is_empty());
    unmask(&mut h);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(0, 0)]);
    h.write(0, LOWER, &[0]).unwrap();
    unmask(&mut h);
    // INTx disable in the command register holds it; clearing the bit delivers.
    h.write(pci_region::CONFIG, 5, &[0x04]).unwrap();
    h.raise(0, 0);
    assert!(h.rec.take().is_empty());
    h.write(pci_region::CONFIG, 5, &[0x00]).unwrap();
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(0, 0)]);
    // A client-side trigger (DATA_NONE) signals it directly.
    h.set_irqs(IRQ_SET_ACTION_TRIGGER, 0, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(0, 0)]);
}

/// MSI per-vector masks set the pending bit instead of signalling, and unmasking
/// delivers; the MSI-X function mask holds vectors until cleared; vectors that do not
/// exist are ignored.
#[test]
fn msi_and_msix_masking() {
    let mut h = Harness::new();
    let msi = h.cap(0x05);
    let msix = h.cap(0x11);
    h.write(pci_region::CONFIG, msi + 16, &[0b0100, 0, 0, 0])
        .unwrap();
    h.raise(1, 2);
    h.raise(1, 1);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(1, 1)]);
    assert_eq!(
        h.read(pci_region::CONFIG, msi + 20, 1).unwrap(),
        vec![0b0100]
    );
    h.write(pci_region::CONFIG, msi + 16, &[0, 0, 0, 0])
        .unwrap();
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(1, 2)]);
    assert_eq!(h.read(pci_region::CONFIG, msi + 20, 1).unwrap(), vec![0]);
    h.write(pci_region::CONFIG, msix + 3, &[0xc0]).unwrap();
    h.raise(2, 5);
    assert!(h.rec.take().is_empty());
    h.write(pci_region::CONFIG, msix + 3, &[0x80]).unwrap();
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(2, 5)]);
    h.raise(2, 8);
    h.raise(1, 4);
    h.raise(7, 0);
    assert!(h.rec.take().is_empty());
}

/// REGION_WRITE_MULTI applies every write in order and reports the count; a failing
/// entry ends it with that entry's error, the earlier ones staying applied.
#[test]
fn write_multi() {
    let mut h = Harness::new();
    let w = |offset, region, byte| MultiWrite {
        offset,
        region,
        count: 1,
        data: [byte, 0, 0, 0, 0, 0, 0, 0],
    };
    let ok = vec![w(0, 0, 1), w(1, 0, 2), w(0x10, 2, 3)];
    assert_eq!(
        h.call(Request::RegionWriteMulti(ok)),
        Ok(Reply::RegionWriteMulti { wr_cnt: 3 })
    );
    assert_eq!(h.read(0, 0, 2).unwrap(), vec![1, 2]);
    let bad = vec![w(2, 0, 9), w(0, 6, 1), w(3, 0, 9)];
    assert_eq!(h.call(Request::RegionWriteMulti(bad)), Err(EINVAL));
    assert_eq!(h.read(0, 2, 2).unwrap(), vec![9, 0]);
}

/// NO_REPLY: the work is done and nothing is answered, even on failure; unsupported
/// commands get EOPNOTSUPP, server-to-client ones EINVAL, and fds on a command that
/// takes none EINVAL.
#[test]
fn no_reply_and_unsupported() {
    let mut h = Harness::new();
    let req = Request::RegionWrite(RegionWrite {
        offset: 4,
        region: 0,
        data: vec![0x5a],
    });
    let hdr = h.header(&req, true);
    assert!(matches!(
        h.s.handle(&hdr, req, Vec::new()),
        Response::NoReply
    ));
    assert_eq!(h.read(0, 4, 1).unwrap(), vec![0x5a]);
    let req = Request::RegionRead(RegionAccess {
        offset: 0,
        region: 9,
        count: 4,
    });
    let hdr = h.header(&req, true);
    assert!(matches!(
        h.s.handle(&hdr, req, Vec::new()),
        Response::NoReply
    ));
    let feature = DeviceFeature::request(FEATURE_MIGRATION, FeatureOp::Get, FeatureData::None);
    assert_eq!(
        h.call(Request::DeviceFeature(feature)),
        Err(libc::EOPNOTSUPP as u32)
    );
    let mig = MigDataRead {
        argsz: 8 + 16,
        size: 16,
    };
    assert_eq!(
        h.call(Request::MigDataRead(mig)),
        Err(libc::EOPNOTSUPP as u32)
    );
    let dma = DmaAccess {
        address: 0,
        count: 8,
        width: CountWidth::U64,
    };
    assert_eq!(h.call(Request::DmaRead(dma)), Err(EINVAL));
    assert_eq!(h.call_fds(Request::DeviceReset, vec![fd()]), Err(EINVAL));
}

/// The lspci rendering shows identity, BARs with sizes, every capability and the
/// IRQ counts as a client would see them.
#[test]
fn lspci_rendering() {
    let mut h = Harness::new();
    let text = h.s.lspci();
    for needle in [
        "Memory controller [058000]: Device 1af4:10ff (rev 00)",
        "Region 0: Memory at 0 (64-bit, non-prefetchable) [size=16K]",
        "Region 2: I/O ports at 0000 [size=32]",
        "Region 3: Memory at 0 (32-bit, prefetchable) [size=4K]",
        "Capabilities: [40] Power Management version 3",
        "Express (v2) Endpoint",
        "Vendor Specific Information: Len=06",
        "MSI: Enable- Count=1/4 Maskable+ 64bit+",
        "MSI-X: Enable- Count=8 Masked-",
        "Vector table: BAR=0 offset=00002000",
        "IRQ INTx: 1 vector [eventfd maskable automasked]",
        "IRQ MSI-X: 8 vectors [eventfd noresize]",
        "Config space: 4096 bytes",
        "Interrupt: pin A",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let mut g = DeviceServer::new(
        Box::new(crate::models::gpio::Gpio::new()),
        Box::new(RecordingIrqs::default()),
    );
    let text = g.lspci();
    assert!(
        text.contains("Unassigned class [ff0000]: Device 494f:0dc8"),
        "{text}"
    );
    assert!(
        text.contains("Region 2: I/O ports at 0000 [size=256]"),
        "{text}"
    );
    assert!(!text.contains("Capabilities"), "{text}");
}

/// An invalid description is sanitized instead of failing the server.
#[test]
fn invalid_description_is_sanitized() {
    struct Bad;
    impl DeviceModel for Bad {
        fn describe(&self) -> DeviceDescription {
            let mut d = DeviceDescription::new(1, 2, 3);
            d.bars[0] = Some(BarDesc::mmio32(3));
            d.msi_vectors = 5;
            d
        }
        fn bar_read(
            &mut self,
            _: &mut DeviceContext<'_>,
            _: u8,
            _: u64,
            _: &mut [u8],
        ) -> Result<(), Errno> {
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
    let mut s = DeviceServer::new(Box::new(Bad), Box::new(RecordingIrqs::default()));
    assert_eq!(s.description().bars[0], None);
    assert_eq!(s.description().msi_vectors, 0);
    assert_eq!(s.region_read(0, 0, 1), Err(EINVAL));
}

fn arb_request() -> impl Strategy<Value = Request> {
    let region = prop_oneof![0u32..10, any::<u32>()];
    let offset = prop_oneof![0u64..0x5000, any::<u64>()];
    prop_oneof![
        (region.clone(), offset.clone(), 0u32..0x2000).prop_map(|(region, offset, count)| {
            Request::RegionRead(RegionAccess {
                offset,
                region,
                count,
            })
        }),
        (
            region,
            offset,
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(region, offset, data)| Request::RegionWrite(RegionWrite {
                offset,
                region,
                data
            })),
        (
            prop_oneof![Just(8u32), Just(16), Just(32)],
            0u32..6,
            0u32..10,
            0u32..10,
            0u8..4
        )
            .prop_map(|(action, index, start, count, kind)| {
                let data = match kind {
                    0 => IrqData::None,
                    1 => IrqData::Bool(vec![1; count as usize]),
                    2 => IrqData::EventFd { assign: true },
                    _ => IrqData::EventFd { assign: false },
                };
                Request::DeviceSetIrqs(SetIrqs {
                    action,
                    index,
                    start,
                    count,
                    data,
                })
            }),
        (any::<u64>(), 1u64..0x10000).prop_map(|(address, size)| Request::DmaMap(DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: address & !0xfff,
            size,
        })),
        (any::<u64>(), any::<u64>()).prop_map(|(a, s)| Request::DmaUnmap(DmaUnmap::region(a, s))),
        (0u32..12)
            .prop_map(|index| Request::DeviceGetRegionInfo(GetInfoRequest { argsz: 32, index })),
        (0u32..7).prop_map(|index| Request::DeviceGetIrqInfo(GetInfoRequest { argsz: 16, index })),
        Just(Request::DeviceReset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random sequences of typed requests, in direct and tunnel form, never panic and
    /// always produce a reply or an error.
    #[test]
    fn random_requests_never_panic(
        reqs in proptest::collection::vec((arb_request(), any::<bool>(), 0usize..3), 1..40)
    ) {
        let mut h = Harness::new();
        for (req, tunnel, slots) in reqs {
            let hdr = h.header(&req, false);
            let resp = if tunnel {
                h.s.handle_tunnel(&hdr, req, slots)
            } else {
                h.s.handle(&hdr, req, Vec::new())
            };
            prop_assert!(!matches!(resp, Response::NoReply));
        }
        let _ = h.s.lspci();
    }
}
