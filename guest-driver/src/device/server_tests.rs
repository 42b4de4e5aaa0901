//! DeviceServer over typed requests: every command, the error cases, reset, the DMA
//! table and DMA access (mmapped, window and remote regions), SET_IRQS validation,
//! MSI / MSI-X emulation and delivery into a recording sink.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vfu_proto::tunnel::Slot;
use vfu_proto::vfio_user::{
    pci_irq, pci_region, CountWidth, DeviceFeature, DmaAccess, DmaMap, DmaUnmap, FeatureData,
    FeatureOp, GetInfoRequest, Header, IrqData, MigDataRead, MultiWrite, RegionAccess, RegionWrite,
    Reply, Request, SetIrqs, Version, FEATURE_MIGRATION, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::device::dma::tests::{memfd, memfd_named, pread, pwrite, MemRemote};
use crate::device::errno::{EEXIST, EFAULT, ENOENT};
use crate::device::irq::tests::{IrqEvent, RecordingIrqs};
use crate::device::{BarDesc, BarKind, Capability, IrqDelivery, MsixDesc, PcieDeviceType};

/// BAR 0 register offsets of the test model that make it act on its context.
/// Write u16 `index << 8 | vector`: raise_irq; index 0xff: raise_interrupt(vector).
const RAISE: u64 = 0x1000;
const LOWER: u64 = 0x1008;
/// Write u64 IOVA: the model copies 8 bytes from IOVA to IOVA + 8 by DMA and leaves
/// the errno (0: success) in DMA_RESULT.
const DMA_COPY: u64 = 0x1010;
const DMA_RESULT: u64 = 0x1018;
/// Where the MSI-X table and PBA are in BAR 0.
const MSIX_TABLE: u64 = 0x2000;
const MSIX_PBA: u64 = 0x3000;

/// A model with every kind of BAR, INTx, 4 MSI, 8 MSI-X vectors and PM, PCIe and
/// vendor capabilities. BARs are plain memory; config bytes it owns are memory too.
struct TestModel {
    bar0: Vec<u8>,
    bar2: Vec<u8>,
    bar3: Vec<u8>,
    config: Vec<u8>,
    resets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    deliveries: Arc<Mutex<Vec<IrqDelivery>>>,
    /// Offsets of the BAR 0 accesses the model saw.
    bar0_seen: Arc<Mutex<Vec<u64>>>,
}

impl TestModel {
    fn new() -> Self {
        Self {
            bar0: vec![0; 0x4000],
            bar2: vec![0; 0x20],
            bar3: vec![0; 0x1000],
            config: vec![0; 4096],
            resets: Default::default(),
            deliveries: Default::default(),
            bar0_seen: Default::default(),
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
            table_offset: MSIX_TABLE as u32,
            pba_bar: 0,
            pba_offset: MSIX_PBA as u32,
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
        if bar == 0 {
            self.bar0_seen.lock().unwrap().push(offset);
        }
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
        if bar == 0 {
            self.bar0_seen.lock().unwrap().push(offset);
        }
        if bar == 0 && offset == RAISE && data.len() == 2 {
            let d = if data[1] == 0xff {
                ctx.raise_interrupt(u32::from(data[0]))
            } else {
                ctx.raise_irq(u32::from(data[1]), u32::from(data[0]))
            };
            self.deliveries.lock().unwrap().push(d);
            return Ok(());
        }
        if bar == 0 && offset == DMA_COPY && data.len() == 8 {
            let iova = u64::from_le_bytes(data.try_into().unwrap());
            let mut buf = [0u8; 8];
            let mut dma = ctx.dma();
            let r = dma
                .read(iova, &mut buf)
                .and_then(|()| dma.write(iova.wrapping_add(8), &buf));
            let errno = r.err().unwrap_or(0);
            let o = DMA_RESULT as usize;
            self.bar0[o..o + 4].copy_from_slice(&errno.to_le_bytes());
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
    deliveries: Arc<Mutex<Vec<IrqDelivery>>>,
    bar0_seen: Arc<Mutex<Vec<u64>>>,
    /// Client memory behind remote regions (IOVA 0 up).
    remote: MemRemote,
    id: u16,
}

impl Harness {
    fn new() -> Self {
        let model = TestModel::new();
        let resets = model.resets.clone();
        let deliveries = model.deliveries.clone();
        let bar0_seen = model.bar0_seen.clone();
        let rec = RecordingIrqs::default();
        let s = DeviceServer::new(Box::new(model), Box::new(rec.clone()));
        Self {
            s,
            rec,
            resets,
            deliveries,
            bar0_seen,
            remote: MemRemote::default(),
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
        match self.s.handle(&h, req, fds, &mut self.remote) {
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

    /// A request through the tunnel carrying `slots` eventfd slots.
    fn tunnel(&mut self, req: Request, slots: usize) -> Result<Reply, Errno> {
        self.tunnel_slots(req, &vec![Slot::eventfd(); slots])
    }

    fn tunnel_slots(&mut self, req: Request, slots: &[Slot]) -> Result<Reply, Errno> {
        let h = self.header(&req, false);
        match self.s.handle_tunnel(&h, req, slots, &mut self.remote) {
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

    fn raise(&mut self, index: u32, vector: u32) -> IrqDelivery {
        self.write(0, RAISE, &[vector as u8, index as u8]).unwrap();
        self.deliveries.lock().unwrap().pop().unwrap()
    }

    /// The model copies 8 bytes at `iova` to `iova + 8` by DMA; its errno.
    fn dma_copy(&mut self, iova: u64) -> Errno {
        self.write(0, DMA_COPY, &iova.to_le_bytes()).unwrap();
        let b = self.read(0, DMA_RESULT, 4).unwrap();
        u32::from_le_bytes(b.try_into().unwrap())
    }

    /// Whether the model saw a BAR 0 access at or past the MSI-X table.
    fn model_saw_msix(&self) -> bool {
        self.bar0_seen
            .lock()
            .unwrap()
            .iter()
            .any(|&o| o >= MSIX_TABLE)
    }

    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        self.write(pci_region::CONFIG, off, data).unwrap();
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

/// The server can move to another thread (the tunnel driver and direct mode may run it
/// anywhere), windows and mmapped regions included.
#[test]
fn server_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<DeviceServer>();
    assert_send::<DmaTable>();
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

/// DMA_MAP / DMA_UNMAP through the server: fds are kept with the map (and mmapped),
/// overlaps are EEXIST, unknown unmaps ENOENT, UNMAP_ALL and a client disconnect empty
/// the table; the unmap reply echoes the request; DMA_MAP in tunnel mode has no fd.
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
        h.call_fds(Request::DmaMap(map(0x10000, 0x2000)), vec![memfd(0x2000)]),
        Ok(Reply::DmaMap)
    );
    assert_eq!(h.call(Request::DmaMap(map(0x11000, 0x1000))), Err(EEXIST));
    assert_eq!(
        h.call_fds(
            Request::DmaMap(map(0x20000, 0x1000)),
            vec![memfd(0x1000), memfd(0x1000)]
        ),
        Err(EINVAL)
    );
    assert_eq!(
        h.tunnel(Request::DmaMap(map(0x20000, 0x1000)), 0),
        Ok(Reply::DmaMap)
    );
    let regions: Vec<_> =
        h.s.dma_regions()
            .map(|r| (r.address, r.fd.is_some(), r.is_local()))
            .collect();
    assert_eq!(
        regions,
        vec![(0x10000, true, true), (0x20000, false, false)]
    );
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

/// Whether a mapping of the memfd called `name` is in this process's address space.
fn mapped(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.contains(&format!("/memfd:{name} ")))
}

/// Direct mode end to end through the server: a DMA_MAP with an fd is mmapped, the
/// model's DMA reads what the client put in the file and its writes land there (the
/// region is local: the remote path is never used); the mapping is gone from the
/// address space when DMA_UNMAP, UNMAP_ALL or the client's disconnect has been
/// handled, i.e. before any reply.
#[test]
fn direct_mode_maps_and_unmaps() {
    let mut h = Harness::new();
    let name = format!("vfu-unmap-{}", std::process::id());
    let fd = memfd_named(0x3000, &name);
    pwrite(&fd, 0x1000, b"12345678");
    let mut m = DmaMap {
        read: true,
        write: true,
        offset: 0x1000,
        address: 0x40000,
        size: 0x2000,
    };
    h.call_fds(Request::DmaMap(m), vec![fd.try_clone().unwrap()])
        .unwrap();
    assert!(mapped(&name));
    assert_eq!(h.dma_copy(0x40000), 0);
    assert_eq!(pread(&fd, 0x1008, 8), b"12345678");
    assert_eq!(h.dma_copy(0x41ffc), EFAULT, "runs past the region");
    assert!(h.remote.calls.is_empty());
    let dirty: Vec<u64> = h.s.dma_regions().flat_map(|r| r.dirty_pages()).collect();
    assert_eq!(dirty, vec![0x40000]);
    h.s.clear_dma_dirty();
    assert!(h.s.dma_regions().all(|r| r.dirty_pages().is_empty()));
    h.call(Request::DmaUnmap(DmaUnmap::region(0x40000, 0x2000)))
        .unwrap();
    assert!(!mapped(&name), "munmapped before the reply");
    assert_eq!(h.dma_copy(0x40000), EFAULT);
    for end in 0..2 {
        h.call_fds(Request::DmaMap(m), vec![fd.try_clone().unwrap()])
            .unwrap();
        assert!(mapped(&name));
        if end == 0 {
            h.call(Request::DmaUnmap(DmaUnmap::all())).unwrap();
        } else {
            h.s.client_disconnected();
        }
        assert!(!mapped(&name));
    }
    // Read-only map: the model's write faults and the file is untouched.
    m.write = false;
    h.call_fds(Request::DmaMap(m), vec![fd.try_clone().unwrap()])
        .unwrap();
    pwrite(&fd, 0x1000, b"abcdefgh");
    assert_eq!(h.dma_copy(0x40000), EFAULT);
    assert_eq!(pread(&fd, 0x1008, 8), b"12345678");
}

/// Regions mapped without an fd are remote: the model's DMA goes through the
/// DmaRemote given to `handle`, with the IOVAs the model used.
#[test]
fn remote_regions_use_the_transport() {
    let mut h = Harness::new();
    h.remote.mem = vec![0; 0x3000];
    h.remote.mem[0x2000..0x2008].copy_from_slice(b"remote!!");
    let m = DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: 0x2000,
        size: 0x1000,
    };
    h.call(Request::DmaMap(m)).unwrap();
    assert_eq!(h.dma_copy(0x2000), 0);
    assert_eq!(&h.remote.mem[0x2008..0x2010], b"remote!!");
    assert_eq!(h.remote.calls, vec![(false, 0x2000, 8), (true, 0x2008, 8)]);
    // The public region_write has no remote path: the copy faults.
    h.s.region_write(0, DMA_COPY, &0x2000u64.to_le_bytes())
        .unwrap();
    assert_eq!(h.read(0, DMA_RESULT, 4).unwrap(), EFAULT.to_le_bytes());
}

/// Tunnel DMA_MAP slots: no slot or no windows set is remote; a DMA_WINDOW slot with
/// windows set is a local region at base + offset (the model's DMA lands in the shared
/// memory); flags that differ from the DMA_MAP's, a window past the end of the shared
/// memory, two slots, a slot of another type are EINVAL, and so are window slots on
/// SET_IRQS and slots on commands that take none; set_windows with another area turns
/// window regions remote.
#[test]
fn tunnel_windows() {
    let mut shm = vec![0u8; 0x4000];
    let mut h = Harness::new();
    let m = |address: u64, read, write| DmaMap {
        read,
        write,
        offset: 0,
        address,
        size: 0x1000,
    };
    let win = |offset, read, write| Slot::window(offset, read, write);
    // Before set_windows: a window slot still maps, remotely.
    assert_eq!(
        h.tunnel_slots(
            Request::DmaMap(m(0x1000, true, true)),
            &[win(0, true, true)]
        ),
        Ok(Reply::DmaMap)
    );
    // SAFETY: `shm` is declared before `h` and outlives the server; the test reads it
    // only after the server's writes.
    unsafe { h.s.set_windows(shm.as_mut_ptr(), shm.len()) };
    shm[0x1000..0x1008].copy_from_slice(b"windowed");
    let ok = h.tunnel_slots(
        Request::DmaMap(m(0x10000, true, true)),
        &[win(0x1000, true, true)],
    );
    assert_eq!(ok, Ok(Reply::DmaMap));
    h.tunnel_slots(
        Request::DmaMap(m(0x20000, true, false)),
        &[win(0x3000, true, false)],
    )
    .unwrap();
    h.tunnel(Request::DmaMap(m(0x30000, true, true)), 0)
        .unwrap();
    let bad: Vec<(DmaMap, Vec<Slot>)> = vec![
        (m(0x40000, true, true), vec![win(0, true, false)]),
        (m(0x40000, true, false), vec![win(0, true, true)]),
        (m(0x40000, true, true), vec![win(0x3800, true, true)]),
        (m(0x40000, true, true), vec![win(u64::MAX, true, true)]),
        (
            m(0x40000, true, true),
            vec![win(0, true, true), win(0x1000, true, true)],
        ),
        (m(0x40000, true, true), vec![Slot::eventfd()]),
    ];
    for (map, slots) in bad {
        assert_eq!(
            h.tunnel_slots(Request::DmaMap(map), &slots),
            Err(EINVAL),
            "{slots:?}"
        );
    }
    let locality: Vec<_> =
        h.s.dma_regions()
            .map(|r| (r.address, r.is_local()))
            .collect();
    assert_eq!(
        locality,
        vec![
            (0x1000, false),
            (0x10000, true),
            (0x20000, true),
            (0x30000, false)
        ]
    );
    assert_eq!(h.dma_copy(0x10000), 0);
    assert!(h.remote.calls.is_empty());
    assert_eq!(h.dma_copy(0x20000), EFAULT, "read-only window");
    let set = SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: pci_irq::MSI,
        start: 0,
        count: 1,
        data: IrqData::EventFd { assign: true },
    };
    assert_eq!(
        h.tunnel_slots(Request::DeviceSetIrqs(set.clone()), &[win(0, true, true)]),
        Err(EINVAL)
    );
    assert_eq!(
        h.tunnel_slots(Request::DeviceReset, &[Slot::eventfd()]),
        Err(EINVAL)
    );
    assert_eq!(
        h.tunnel_slots(Request::DeviceSetIrqs(set), &[Slot::eventfd()]),
        Ok(Reply::DeviceSetIrqs)
    );
    // Another area: window regions become remote.
    let mut other = vec![0u8; 0x1000];
    // SAFETY: `other` outlives the server's use of it: the next call resets windows.
    unsafe { h.s.set_windows(other.as_mut_ptr(), other.len()) };
    // SAFETY: no windows any more.
    unsafe { h.s.set_windows(std::ptr::null_mut(), 0) };
    assert!(h.s.dma_regions().all(|r| !r.is_local()));
    drop(h);
    assert_eq!(&shm[0x1000..0x1010], b"windowedwindowed");
    assert_eq!(shm[0x3000], 0);
    drop(other);
}

/// SET_IRQS validation: bad index, start or range, count 0 other than disable-all,
/// fd count mismatch, fds without DATA_EVENTFD, non-trigger actions on ERR/REQ and
/// unmask eventfds are all EINVAL.
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
        h.set_irqs(IRQ_SET_ACTION_MASK, pci_irq::ERR, 0, 1, IrqData::None),
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
        g.handle(&hdr, req, Vec::new(), &mut NoRemote),
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

/// MSI: dropped (Disabled) while the capability is not enabled and beyond the
/// enabled vector count; per-vector mask bits set the pending bit instead of
/// signalling, and unmasking delivers and clears it; disabling and re-enabling MSI
/// keeps a pending vector until it can be delivered; vectors that do not exist are
/// Invalid.
#[test]
fn msi_enable_and_masks() {
    let mut h = Harness::new();
    let msi = h.cap(0x05);
    assert_eq!(h.raise(1, 0), IrqDelivery::Disabled);
    // Enable with 2 of the 4 vectors (MME = 1).
    h.cfg_write(msi + 2, &[0x11]);
    assert_eq!(h.raise(1, 2), IrqDelivery::Disabled, "beyond MME");
    h.cfg_write(msi + 16, &[0b0010, 0, 0, 0]);
    assert_eq!(h.raise(1, 1), IrqDelivery::Pending);
    assert_eq!(h.raise(1, 0), IrqDelivery::Signalled);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(1, 0)]);
    assert_eq!(
        h.read(pci_region::CONFIG, msi + 20, 1).unwrap(),
        vec![0b0010]
    );
    // Disabled while pending: kept; unmasked while disabled: still kept.
    h.cfg_write(msi + 2, &[0x10]);
    h.cfg_write(msi + 16, &[0, 0, 0, 0]);
    assert!(h.rec.take().is_empty());
    h.cfg_write(msi + 2, &[0x11]);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(1, 1)]);
    assert_eq!(h.read(pci_region::CONFIG, msi + 20, 1).unwrap(), vec![0]);
    assert_eq!(h.raise(1, 4), IrqDelivery::Invalid);
    assert_eq!(h.raise(7, 0), IrqDelivery::Invalid);
    assert!(h.rec.take().is_empty());
}

/// MSI-X emulation: table and PBA accesses are answered by the library (the model's
/// BAR memory never sees them); entries read back as written, with read-only bits;
/// the PBA ignores writes. A vector is dropped while MSI-X is disabled; the function
/// mask and a vector's mask bit hold it pending (PBA bit set) and clearing the last
/// mask delivers it and clears the bit; reset restores the table.
#[test]
fn msix_table_and_pba() {
    let mut h = Harness::new();
    let msix = h.cap(0x11);
    let entry = |v: u64| MSIX_TABLE + 16 * v;
    h.write(0, entry(2), &0x1_fee0_1003u64.to_le_bytes())
        .unwrap();
    h.write(0, entry(2) + 8, &0x0000_0001_0000_4042u64.to_le_bytes())
        .unwrap();
    assert_eq!(
        h.read(0, entry(2), 8).unwrap(),
        0x1_fee0_1000u64.to_le_bytes(),
        "address bits 1:0 read-only"
    );
    assert_eq!(h.read(0, entry(2) + 12, 4).unwrap(), vec![1, 0, 0, 0]);
    assert!(!h.model_saw_msix());
    assert_eq!(h.raise(2, 2), IrqDelivery::Disabled, "MSI-X not enabled");
    h.cfg_write(msix + 3, &[0x80]);
    assert_eq!(h.raise(2, 2), IrqDelivery::Pending, "vector masked");
    assert_eq!(h.raise(2, 3), IrqDelivery::Signalled);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(2, 3)]);
    assert_eq!(h.read(0, MSIX_PBA, 8).unwrap(), 0b100u64.to_le_bytes());
    h.write(0, MSIX_PBA, &[0; 8]).unwrap();
    assert_eq!(
        h.read(0, MSIX_PBA, 4).unwrap(),
        vec![0b100, 0, 0, 0],
        "read-only"
    );
    // Function mask, then unmask the vector: still held by the function mask.
    h.cfg_write(msix + 3, &[0xc0]);
    assert_eq!(h.raise(2, 5), IrqDelivery::Pending);
    h.write(0, entry(2) + 12, &[0, 0, 0, 0]).unwrap();
    assert!(h.rec.take().is_empty());
    h.cfg_write(msix + 3, &[0x80]);
    assert_eq!(
        h.rec.take(),
        vec![IrqEvent::Trigger(2, 2), IrqEvent::Trigger(2, 5)]
    );
    assert_eq!(h.read(0, MSIX_PBA, 8).unwrap(), [0; 8]);
    // Reset: table back to zero, unmasked.
    h.write(0, entry(1) + 12, &[1, 0, 0, 0]).unwrap();
    h.call(Request::DeviceReset).unwrap();
    assert_eq!(h.read(0, entry(1) + 8, 8).unwrap(), [0; 8]);
    assert_eq!(h.read(0, entry(2), 8).unwrap(), [0; 8]);
    assert!(!h.model_saw_msix());
}

/// DEVICE_SET_IRQS on MSI and MSI-X: MASK / UNMASK (DATA_NONE and DATA_BOOL) hold and
/// release vectors; eventfd assignment and de-assignment reach the sink; count 0
/// disables the index, dropping its client masks and pending bits; a client
/// disconnect drops the masks too.
#[test]
fn set_irqs_masks_msi_msix() {
    let mut h = Harness::new();
    let (msi, msix) = (h.cap(0x05), h.cap(0x11));
    h.cfg_write(msi + 2, &[0x21]);
    h.cfg_write(msix + 3, &[0x80]);
    h.assign(pci_irq::MSIX, 0, 8);
    h.assign(pci_irq::MSI, 0, 4);
    h.set_irqs(
        IRQ_SET_ACTION_MASK,
        pci_irq::MSIX,
        2,
        3,
        IrqData::Bool(vec![1, 0, 1]),
    )
    .unwrap();
    h.set_irqs(IRQ_SET_ACTION_MASK, pci_irq::MSI, 1, 1, IrqData::None)
        .unwrap();
    h.rec.take();
    assert_eq!(h.raise(2, 2), IrqDelivery::Pending);
    assert_eq!(h.raise(2, 3), IrqDelivery::Signalled);
    assert_eq!(h.raise(2, 4), IrqDelivery::Pending);
    assert_eq!(h.raise(1, 1), IrqDelivery::Pending);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(2, 3)]);
    h.set_irqs(IRQ_SET_ACTION_UNMASK, pci_irq::MSIX, 4, 1, IrqData::None)
        .unwrap();
    h.set_irqs(IRQ_SET_ACTION_UNMASK, pci_irq::MSI, 0, 4, IrqData::None)
        .unwrap();
    assert_eq!(
        h.rec.take(),
        vec![IrqEvent::Trigger(2, 4), IrqEvent::Trigger(1, 1)]
    );
    // De-assign one MSI-X vector, then disable the whole index: vector 2 stays
    // pending until then, and is forgotten with its mask.
    h.set_irqs(
        IRQ_SET_ACTION_TRIGGER,
        pci_irq::MSIX,
        7,
        1,
        IrqData::EventFd { assign: false },
    )
    .unwrap();
    h.set_irqs(IRQ_SET_ACTION_TRIGGER, pci_irq::MSIX, 0, 0, IrqData::None)
        .unwrap();
    assert_eq!(
        h.rec.take(),
        vec![IrqEvent::Deassign(2, 7, 1), IrqEvent::Deassign(2, 0, 8)]
    );
    assert_eq!(h.read(0, MSIX_PBA, 1).unwrap(), vec![0]);
    assert_eq!(h.raise(2, 2), IrqDelivery::Signalled, "mask dropped");
    // A client mask does not outlive the client.
    h.set_irqs(IRQ_SET_ACTION_MASK, pci_irq::MSI, 0, 1, IrqData::None)
        .unwrap();
    h.s.client_disconnected();
    h.rec.take();
    assert_eq!(h.raise(1, 0), IrqDelivery::Signalled);
    // Masks on INTx keep their meaning; ERR/REQ take none.
    assert_eq!(
        h.set_irqs(IRQ_SET_ACTION_MASK, pci_irq::REQ, 0, 1, IrqData::None),
        Err(EINVAL)
    );
}

/// raise_interrupt picks MSI-X when it is enabled, else MSI, else INTx (asserted until
/// lowered).
#[test]
fn raise_interrupt_picks_the_enabled_kind() {
    let mut h = Harness::new();
    let (msi, msix) = (h.cap(0x05), h.cap(0x11));
    h.assign(pci_irq::INTX, 0, 1);
    h.rec.take();
    assert_eq!(h.raise(0xff, 1), IrqDelivery::Signalled);
    assert_eq!(h.rec.take(), vec![IrqEvent::Trigger(0, 0)]);
    h.write(0, LOWER, &[0]).unwrap();
    h.cfg_write(msi + 2, &[0x21]);
    assert_eq!(h.raise(0xff, 1), IrqDelivery::Signalled);
    h.cfg_write(msix + 3, &[0x80]);
    assert_eq!(h.raise(0xff, 1), IrqDelivery::Signalled);
    assert_eq!(h.raise(0xff, 9), IrqDelivery::Invalid);
    assert_eq!(
        h.rec.take(),
        vec![IrqEvent::Trigger(1, 1), IrqEvent::Trigger(2, 1)]
    );
}

/// A bulk BAR holding the MSI-X table and PBA: one large access covering model bytes,
/// the table and the PBA is split, each part going to its owner.
#[test]
fn bulk_bar_accesses_are_split() {
    struct Bulk(Vec<u8>);
    impl DeviceModel for Bulk {
        fn describe(&self) -> DeviceDescription {
            let mut d = DeviceDescription::new(1, 2, 0);
            d.bars[0] = Some(BarDesc {
                size: 0x1000,
                kind: BarKind::Mmio32,
                prefetchable: false,
                min_access: 4,
                max_access: 0x1000,
            });
            d.msix = Some(MsixDesc {
                vectors: 2,
                table_bar: 0,
                table_offset: 0x100,
                pba_bar: 0,
                pba_offset: 0x200,
            });
            d
        }
        fn bar_read(
            &mut self,
            _: &mut DeviceContext<'_>,
            _: u8,
            off: u64,
            data: &mut [u8],
        ) -> Result<(), Errno> {
            let o = off as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
            Ok(())
        }
        fn bar_write(
            &mut self,
            _: &mut DeviceContext<'_>,
            _: u8,
            off: u64,
            data: &[u8],
        ) -> Result<(), Errno> {
            let o = off as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn reset(&mut self, _: &mut DeviceContext<'_>) {}
    }
    let mut s = DeviceServer::new(
        Box::new(Bulk(vec![0; 0x1000])),
        Box::new(RecordingIrqs::default()),
    );
    s.region_write(0, 0, &[0xff; 0x400]).unwrap();
    let back = s.region_read(0, 0, 0x400).unwrap();
    assert!(back[..0x100].iter().all(|b| *b == 0xff));
    // Entry 0: address 0xfffffffc, upper and data all ones, control 1.
    assert_eq!(
        &back[0x100..0x110],
        &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]
    );
    assert!(back[0x120..0x200].iter().all(|b| *b == 0xff));
    assert_eq!(&back[0x200..0x208], &[0; 8], "PBA");
    assert!(back[0x208..].iter().all(|b| *b == 0xff));
    let ranges = [(0x100, 0x120), (0x120, 0x128)];
    assert_eq!(
        split_runs(0xf8, 0x38, &ranges),
        vec![
            (0, 8, false),
            (8, 0x28, true),
            (0x28, 0x30, true),
            (0x30, 0x38, false)
        ]
    );
    assert_eq!(split_runs(0, 4, &ranges), vec![(0, 4, false)]);
    assert_eq!(split_runs(0x104, 4, &ranges), vec![(0, 4, true)]);
    assert_eq!(split_runs(u64::MAX - 3, 4, &ranges), vec![(0, 4, false)]);
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
        h.s.handle(&hdr, req, Vec::new(), &mut NoRemote),
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
        h.s.handle(&hdr, req, Vec::new(), &mut NoRemote),
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
        reqs in proptest::collection::vec(
            (arb_request(), any::<bool>(), 0usize..3, any::<bool>()),
            1..40,
        ),
        with_windows in any::<bool>(),
    ) {
        let mut shm = vec![0u8; 0x10000];
        let mut h = Harness::new();
        if with_windows {
            // SAFETY: `shm` is declared before `h`, so it outlives the server; nothing
            // else touches it.
            unsafe { h.s.set_windows(shm.as_mut_ptr(), shm.len()) };
        }
        for (req, tunnel, slots, window) in reqs {
            let hdr = h.header(&req, false);
            let resp = if tunnel {
                let slots: Vec<Slot> = (0..slots)
                    .map(|i| if i == 0 && window { Slot::window(0, true, true) } else { Slot::eventfd() })
                    .collect();
                h.s.handle_tunnel(&hdr, req, &slots, &mut h.remote)
            } else {
                h.s.handle(&hdr, req, Vec::new(), &mut h.remote)
            };
            prop_assert!(!matches!(resp, Response::NoReply));
        }
        let _ = h.s.lspci();
    }
}
