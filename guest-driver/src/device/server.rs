//! [`DeviceServer`]: answers every vfio-user request for one [`DeviceModel`].
//!
//! What it answers:
//!
//! | command | answer |
//! |---|---|
//! | VERSION | major 0 (another major: `EINVAL`), minor 0, this server's capabilities |
//! | DEVICE_GET_INFO | PCI and RESET, 9 regions, 5 IRQ indexes |
//! | DEVICE_GET_REGION_INFO | BARs as described, config space 256 or 4096 bytes, ROM and VGA size 0; index >= 9 `EINVAL`; the argsz retry rule |
//! | DEVICE_GET_REGION_IO_FDS | no sub-regions for a valid index, else `EINVAL` |
//! | DEVICE_GET_IRQ_INFO | as Linux vfio-pci: INTx (maskable, automasked), MSI, MSI-X, ERR (PCI Express only), REQ; index >= 5 `EINVAL` |
//! | DEVICE_SET_IRQS | see [`super::irq`] |
//! | REGION_READ / REGION_WRITE | config space emulation; BARs after bounds, width and alignment checks (`EINVAL`): the MSI-X table and PBA emulation ([`super::msix`]), the model for the rest |
//! | REGION_WRITE_MULTI | each write in order; the first failure is the answer |
//! | DEVICE_RESET | config space and interrupt state to power-on, then the model's reset |
//! | DMA_MAP / DMA_UNMAP | the map table ([`super::dma`]): with an fd (direct mode) the memory is mmapped here; with a `DMA_WINDOW` slot (tunnel) it is the window in shared memory region 0 ([`DeviceServer::set_windows`]); otherwise it is reached through the transport's [`DmaRemote`]. An unmapped region's memory is unmapped before the reply |
//! | DMA_READ / DMA_WRITE | `EINVAL`: those go from server to client |
//! | DEVICE_FEATURE MIGRATION, MIG_DEVICE_STATE | for a model that migrates ([`DeviceModel::save`]): STOP_COPY supported; the state machine of [`super::migration`]; else `EOPNOTSUPP` |
//! | DEVICE_FEATURE DMA_LOGGING_START/STOP/REPORT | [`super::dirty_log`], for every model |
//! | DEVICE_FEATURE, other features | `EOPNOTSUPP`; an operation (GET, SET, PROBE) the feature does not have, or data that does not fit it, `EINVAL` |
//! | MIG_DATA_READ / MIG_DATA_WRITE | the migration stream ([`super::migration::stream`]) in STOP_COPY / RESUMING, else `EINVAL`; more than the client's (read) or this server's (write) `max_data_xfer_size` `EINVAL`; `EOPNOTSUPP` for a model that does not migrate |
//!
//! BAR accesses reach the model whatever the command register's memory and I/O enable
//! bits say: clients address BARs by region, not by bus address, as with vfio-pci.
//!
//! While the device is stopped (migration states STOP, STOP_COPY, RESUMING) the model
//! gets no call but `save`/`restore` (and `reset`, on a reset): a region access that
//! would reach it (BAR bytes outside the MSI-X table and PBA, config bytes the
//! library does not emulate) fails with `EINVAL`, as libvfio-user fails region
//! accesses in stop-and-copy, and its event fd is neither offered nor serviced
//! ([`DeviceServer::event_fd`] is `None`). What the library answers itself keeps
//! working, as Linux requires of a stopped device ("must accept and respond to
//! interaction to support external subsystems in the STOP state, for example PCI
//! MSI-X and PCI config space"): config space, the MSI-X table and PBA, SET_IRQS, DMA
//! maps, information requests. Interrupts are held meanwhile: a configuration change
//! that would release one leaves it pending, and it is delivered when the device runs
//! again. Any reset (DEVICE_RESET, FLR) brings the device back to RUNNING, as in Linux
//! VFIO.
//!
//! The server is single-threaded: a model's DMA through a remote path happens inside
//! the request (or [`DeviceServer::service`] call) that caused it, with the
//! [`DmaRemote`] the transport passed for it.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use log::{debug, info, warn};
use vfu_proto::tunnel::{Slot, SlotType};
use vfu_proto::vfio_user::{
    pci_irq, pci_region, Capabilities, DeviceFeature, DeviceInfo, DmaMap, FeatureData, FeatureOp,
    GetInfoRequest, Header, IoFdLayout, IrqInfo, MigDataRead, MigDataReadReply, MigDataWrite,
    MigState, Migration as MigrationCap, RegionInfo, RegionIoFds, RegionReadReply, Reply, Request,
    Version, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DEFAULT_PGSIZES, DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION, FEATURE_MIG_DEVICE_STATE, MIGRATION_STOP_COPY,
    REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};

use super::dirty_log::DirtyLog;
use super::dma::{
    DmaBacking, DmaRegion, DmaRemote, DmaTable, LocalMemory, NoRemote, DMA_PAGE_SIZE,
};
use super::errno::{Errno, EINVAL, EOPNOTSUPP};
use super::irq::{IrqFds, IrqSink, IrqState};
use super::migration::stream::{self, StreamError};
use super::migration::{self, Migration};
use super::pci_config::{ConfigSpace, WriteEffects};
use super::{lspci, DeviceContext, DeviceDescription, DeviceModel};

/// Most fds this server accepts in one message (its `max_msg_fds`).
pub const MAX_MSG_FDS: u32 = 16;
/// Largest data transfer this server accepts (its `max_data_xfer_size`).
pub const MAX_DATA_XFER_SIZE: u32 = DEFAULT_MAX_DATA_XFER_SIZE;

/// What to send back for one request.
#[derive(Debug)]
pub enum Response {
    /// A successful reply, with the fds that go with it.
    Reply {
        /// The reply.
        reply: Reply,
        /// Fds to send with it.
        fds: Vec<OwnedFd>,
    },
    /// An error reply carrying this errno.
    Error(Errno),
    /// Nothing: the request had NO_REPLY set.
    NoReply,
}

/// Answers the vfio-user requests of one client for one device model.
pub struct DeviceServer {
    model: Box<dyn DeviceModel>,
    desc: DeviceDescription,
    config: ConfigSpace,
    irqs: IrqState,
    dma: DmaTable,
    caps: Capabilities,
    client_caps: Capabilities,
    windows: Option<Windows>,
    /// The model saves and restores its state ([`DeviceModel::save`]).
    migratable: bool,
    mig: Migration,
    /// DMA logging, while the client runs it.
    dirty_log: Option<DirtyLog>,
}

/// Where the tunnel's shared memory region 0 is mapped in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Windows {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer names process-wide shared memory that `set_windows`'s caller
// keeps mapped (from any thread) until the next `set_windows` or the server's drop;
// it is only dereferenced through volatile copies.
unsafe impl Send for Windows {}

/// What came with a request in place of nothing: fds (direct mode) or slots (tunnel).
enum Attached<'s> {
    Fds(Vec<OwnedFd>),
    Slots(&'s [Slot]),
}

/// Splits `len` bytes at `offset` into runs that lie entirely inside or entirely
/// outside `ranges` (`start..end` pairs): `(from, to, inside)`, relative to `offset`.
fn split_runs(offset: u64, len: usize, ranges: &[(u64, u64)]) -> Vec<(usize, usize, bool)> {
    let mut cuts = vec![0, len];
    for &(s, e) in ranges {
        for edge in [s, e] {
            if let Some(rel) = edge.checked_sub(offset) {
                if rel > 0 && rel < len as u64 {
                    cuts.push(rel as usize);
                }
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| {
            let at = offset.saturating_add(w[0] as u64);
            let inside = ranges.iter().any(|&(s, e)| at >= s && at < e);
            (w[0], w[1], inside)
        })
        .collect()
}

impl std::fmt::Debug for DeviceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceServer")
            .field("desc", &self.desc)
            .field("dma_maps", &self.dma.len())
            .finish_non_exhaustive()
    }
}

impl DeviceServer {
    /// A server for `model`, signalling interrupts into `irqs`.
    ///
    /// The model's description is sanitized: parts that are invalid are left out and
    /// logged ([`DeviceDescription::sanitized`]).
    pub fn new(model: Box<dyn DeviceModel>, irqs: Box<dyn IrqSink>) -> Self {
        let (desc, errors) = model.describe().sanitized();
        for e in &errors {
            log::error!(
                "device {:04x}:{:04x}: invalid description, left out: {e}",
                desc.vendor_id,
                desc.device_id
            );
        }
        let config = ConfigSpace::new(&desc);
        let counts = [
            u32::from(desc.intx),
            desc.msi_vectors,
            desc.msix.map_or(0, |m| u32::from(m.vectors)),
            u32::from(desc.is_pcie()),
            1,
        ];
        let caps = Capabilities {
            max_msg_fds: Some(MAX_MSG_FDS),
            max_data_xfer_size: Some(MAX_DATA_XFER_SIZE),
            pgsizes: Some(DEFAULT_PGSIZES),
            max_dma_maps: Some(DEFAULT_MAX_DMA_MAPS),
            twin_socket: None,
            write_multiple: Some(true),
            migration: None,
        };
        let migratable = model.save().is_some();
        Self {
            model,
            config,
            irqs: IrqState::new(irqs, counts, desc.msix),
            dma: DmaTable::new(DEFAULT_MAX_DMA_MAPS as usize),
            desc,
            caps,
            client_caps: Capabilities::default(),
            windows: None,
            migratable,
            mig: Migration::new(),
            dirty_log: None,
        }
    }

    /// The (sanitized) description the server presents.
    pub fn description(&self) -> &DeviceDescription {
        &self.desc
    }

    /// Capabilities this server states in its VERSION reply (and, when the client
    /// proposes the legacy `migration` object and the model migrates, `migration`
    /// with the dirty page size and the largest bitmap).
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Whether the model migrates ([`DeviceModel::save`] gives its state).
    pub fn migratable(&self) -> bool {
        self.migratable
    }

    /// The migration state (RUNNING unless a client moved it).
    pub fn migration_state(&self) -> MigState {
        self.mig.state()
    }

    /// Whether DMA logging runs.
    pub fn dma_logging(&self) -> bool {
        self.dirty_log.is_some()
    }

    /// Capabilities the client stated in its VERSION request (defaults before it).
    pub fn client_capabilities(&self) -> Capabilities {
        self.client_caps
    }

    /// The client's DMA maps.
    pub fn dma_regions(&self) -> impl Iterator<Item = &DmaRegion> {
        self.dma.iter()
    }

    /// Forgets the dirty pages recorded in every DMA region.
    pub fn clear_dma_dirty(&mut self) {
        self.dma.clear_dirty();
    }

    /// Tells the server where the tunnel's shared memory region 0 (the DMA windows) is
    /// mapped in this process: `len` bytes at `base` (a null `base` or a `len` of 0:
    /// no windows). A DMA_MAP with a `DMA_WINDOW` slot then becomes a local region at
    /// `base + offset`. Regions mapped through an earlier, different setting become
    /// remote (reached through the copy path).
    ///
    /// # Safety
    ///
    /// `len` bytes at `base` must stay reserved for the shared memory until the next
    /// call of this method or the server's drop, and every window a `DMA_WINDOW` slot
    /// announces (`offset..offset + size`) must be mapped there, readable and (when
    /// the slot says WRITE) writable, from the DMA_MAP that announces it until the
    /// server has handled the DMA_UNMAP, UNMAP_ALL or client disconnect that withdraws
    /// it (the relay's obligation, `docs/tunnel.md` section 7). Every other access to
    /// that memory from this process must be volatile (the relay, the client and other
    /// VMs may access it in any way). The server reads a window only when the DMA_MAP
    /// grants reads, and writes it only when the DMA_MAP grants writes.
    pub unsafe fn set_windows(&mut self, base: *mut u8, len: usize) {
        let new = NonNull::new(base)
            .filter(|_| len > 0)
            .map(|base| Windows { base, len });
        if new != self.windows {
            self.dma.demote_windows();
            self.windows = new;
        }
    }

    /// One vfio-user request from the client, with the fds that came with it (direct
    /// mode). `remote` reaches client memory mapped without an fd (vfio-user DMA_READ /
    /// DMA_WRITE to the client) while the model handles the request.
    ///
    /// With `header.no_reply` the work is done and [`Response::NoReply`] returned (a
    /// failure is logged).
    pub fn handle(
        &mut self,
        header: &Header,
        request: Request,
        fds: Vec<OwnedFd>,
        remote: &mut dyn DmaRemote,
    ) -> Response {
        let result = self.dispatch(request, Attached::Fds(fds), remote);
        Self::respond(header, result)
    }

    /// One request that came through the tunnel, where fds are replaced by slots
    /// (`docs/tunnel.md`, section 7): a DMA_MAP may carry one `DMA_WINDOW` slot (its
    /// flags must equal the DMA_MAP's READ/WRITE permissions, and the window must lie
    /// inside the region given to [`set_windows`](Self::set_windows); else `EINVAL`);
    /// without windows set, or without a slot, the region is remote. A SET_IRQS with
    /// DATA_EVENTFD carries one `EVENTFD` slot per vector (the sink's
    /// [`IrqSink::assign_slots`] is called instead of `set_eventfds`). Any other slot
    /// is `EINVAL`. `remote` is the tunnel's copy path. Otherwise as
    /// [`handle`](Self::handle).
    pub fn handle_tunnel(
        &mut self,
        header: &Header,
        request: Request,
        slots: &[Slot],
        remote: &mut dyn DmaRemote,
    ) -> Response {
        let result = self.dispatch(request, Attached::Slots(slots), remote);
        Self::respond(header, result)
    }

    fn respond(header: &Header, result: Result<(Reply, Vec<OwnedFd>), Errno>) -> Response {
        if header.no_reply {
            if let Err(e) = result {
                warn!(
                    "command {} (msg {}, no reply wanted) failed: errno {e}",
                    header.command, header.msg_id
                );
            }
            return Response::NoReply;
        }
        match result {
            Ok((reply, fds)) => Response::Reply { reply, fds },
            Err(e) => Response::Error(e),
        }
    }

    /// The client disconnected: every DMA map is dropped and every IRQ assignment
    /// cleared (their fds closed); the device state is kept.
    pub fn client_disconnected(&mut self) {
        info!(
            "client disconnected: dropping {} DMA maps and the IRQ assignments",
            self.dma.len()
        );
        self.dma.clear();
        self.irqs.client_gone();
        self.client_caps = Capabilities::default();
        // The log describes this client's memory; the migration state is device state
        // and stays.
        self.dirty_log = None;
    }

    /// The model's event fd ([`DeviceModel::event_fd`]), to poll; `None` while the
    /// device is stopped (migration), so that what the fd announces waits until the
    /// device runs again. Serving loops ask again on every round.
    pub fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.mig.stopped() {
            return None;
        }
        self.model.event_fd()
    }

    /// Lets the model do the work its event fd announced ([`DeviceModel::service`]);
    /// its DMA to remote regions goes through `remote` ([`NoRemote`] when there is no
    /// client). Nothing happens while the device is stopped.
    pub fn service(&mut self, remote: &mut dyn DmaRemote) {
        if self.mig.stopped() {
            return;
        }
        let mut ctx = DeviceContext::new(&mut self.config, &mut self.irqs, &mut self.dma, remote);
        self.model.service(&mut ctx);
    }

    /// Device reset, as DEVICE_RESET (the model reaches only local DMA regions during
    /// it).
    pub fn reset(&mut self) {
        self.reset_with(&mut NoRemote);
    }

    fn reset_with(&mut self, remote: &mut dyn DmaRemote) {
        if self.mig.state() != MigState::Running {
            info!("reset: migration state {} -> RUNNING", self.mig.state());
            self.mig.enter(MigState::Running);
        }
        self.config.reset();
        self.irqs.device_reset(&mut self.config);
        let mut ctx = DeviceContext::new(&mut self.config, &mut self.irqs, &mut self.dma, remote);
        self.model.reset(&mut ctx);
    }

    /// An lspci-like description of the device as a client sees it: config space read
    /// through REGION_READ, region and IRQ information.
    pub fn lspci(&mut self) -> String {
        let size = self.config.size();
        let config = self.region_read(pci_region::CONFIG, 0, size as u32);
        let regions: Vec<RegionInfo> = (0..pci_region::COUNT)
            .filter_map(|i| self.region_info(i).ok())
            .collect();
        let irqs: Vec<IrqInfo> = (0..pci_irq::COUNT)
            .filter_map(|i| self.irqs.info(i))
            .collect();
        lspci::render(&config.unwrap_or_default(), &regions, &irqs)
    }

    fn dispatch(
        &mut self,
        request: Request,
        attached: Attached<'_>,
        remote: &mut dyn DmaRemote,
    ) -> Result<(Reply, Vec<OwnedFd>), Errno> {
        let takes_fds = matches!(request, Request::DmaMap(_) | Request::DeviceSetIrqs(_));
        let has_any = match &attached {
            Attached::Fds(v) => !v.is_empty(),
            Attached::Slots(s) => !s.is_empty(),
        };
        if !takes_fds && has_any {
            warn!(
                "{} came with fds or slots; rejected",
                request.command().name()
            );
            return Err(EINVAL);
        }
        let reply = match request {
            Request::Version(v) => self.version(v)?,
            Request::DmaMap(m) => {
                match attached {
                    Attached::Fds(v) if v.len() > 1 => return Err(EINVAL),
                    Attached::Fds(v) => self.dma.map(&m, v.into_iter().next())?,
                    Attached::Slots(slots) => self.map_tunnel(&m, slots)?,
                }
                Reply::DmaMap
            }
            Request::DmaUnmap(u) => {
                if let Some(log) = &mut self.dirty_log {
                    // The client may ask for the pages after it unmapped them.
                    let gone = self
                        .dma
                        .iter()
                        .filter(|r| u.all || (r.address == u.address && r.size == u.size));
                    log.keep(gone.flat_map(|r| r.dirty_pages()));
                }
                self.dma.unmap(&u)?;
                Reply::DmaUnmap(u)
            }
            Request::DeviceGetInfo(_) => Reply::DeviceGetInfo(DeviceInfo {
                argsz: DeviceInfo::SIZE,
                flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
                num_regions: pci_region::COUNT,
                num_irqs: pci_irq::COUNT,
            }),
            Request::DeviceGetRegionInfo(GetInfoRequest { argsz, index }) => {
                let (info, _with_fd) = self.region_info(index)?.reply_for(argsz);
                Reply::DeviceGetRegionInfo(info)
            }
            Request::DeviceGetRegionIoFds(GetInfoRequest { index, .. }) => {
                if index >= pci_region::COUNT {
                    return Err(EINVAL);
                }
                Reply::DeviceGetRegionIoFds(RegionIoFds {
                    argsz: RegionIoFds::FIXED,
                    index,
                    count: 0,
                    sub_regions: Vec::new(),
                    layout: IoFdLayout::Spec40,
                })
            }
            Request::DeviceGetIrqInfo(GetInfoRequest { index, .. }) => {
                Reply::DeviceGetIrqInfo(self.irqs.info(index).ok_or(EINVAL)?)
            }
            Request::DeviceSetIrqs(s) => {
                let fds = match attached {
                    Attached::Fds(v) => IrqFds::Direct(v),
                    Attached::Slots(slots) => {
                        if slots.iter().any(|s| s.slot_type != SlotType::EventFd) {
                            warn!("SET_IRQS with a slot that is not an eventfd; rejected");
                            return Err(EINVAL);
                        }
                        IrqFds::Slots(slots.len())
                    }
                };
                self.irqs.set_irqs(&mut self.config, &s, fds)?;
                Reply::DeviceSetIrqs
            }
            Request::RegionRead(a) => {
                let data = self.region_read_with(a.region, a.offset, a.count, remote)?;
                Reply::RegionRead(RegionReadReply {
                    offset: a.offset,
                    region: a.region,
                    data,
                })
            }
            Request::RegionWrite(w) => {
                self.region_write_with(w.region, w.offset, &w.data, remote)?;
                Reply::RegionWrite(w.access())
            }
            Request::RegionWriteMulti(writes) => {
                for w in &writes {
                    self.region_write_with(w.region, w.offset, w.bytes(), remote)?;
                }
                Reply::RegionWriteMulti {
                    wr_cnt: writes.len() as u64,
                }
            }
            Request::DeviceReset => {
                self.reset_with(remote);
                Reply::DeviceReset
            }
            Request::DmaRead(_) | Request::DmaWrite(_) => {
                warn!("the client sent a server-to-client command; rejected");
                return Err(EINVAL);
            }
            Request::DeviceFeature(f) => self.feature(f)?,
            Request::MigDataRead(r) => self.mig_data_read(r)?,
            Request::MigDataWrite(w) => self.mig_data_write(w)?,
        };
        Ok((reply, Vec::new()))
    }

    /// DMA_MAP through the tunnel: no slot (remote), or one DMA_WINDOW slot.
    fn map_tunnel(&mut self, m: &DmaMap, slots: &[Slot]) -> Result<(), Errno> {
        let slot = match slots {
            [] => return self.dma.map_backed(m, None, DmaBacking::Remote),
            [s] if s.slot_type == SlotType::DmaWindow => s,
            _ => {
                warn!("DMA_MAP with slots other than one DMA_WINDOW; rejected");
                return Err(EINVAL);
            }
        };
        // The flags a window slot carries for exactly this map's permissions.
        let want = Slot::window(0, m.read, m.write).flags;
        if slot.flags != want {
            warn!(
                "DMA_MAP {:#x}+{:#x}: window flags {:#x} do not match the map's {want:#x}",
                m.address, m.size, slot.flags
            );
            return Err(EINVAL);
        }
        let Some(w) = self.windows else {
            return self.dma.map_backed(m, None, DmaBacking::Remote);
        };
        let offset = slot.value;
        let end = offset.checked_add(m.size).ok_or(EINVAL)?;
        if end > w.len as u64 {
            warn!(
                "DMA_MAP {:#x}+{:#x}: window at {offset:#x} beyond the {:#x} bytes of shared memory",
                m.address, m.size, w.len
            );
            return Err(EINVAL);
        }
        let (at, len) = (
            usize::try_from(offset).map_err(|_| EINVAL)?,
            usize::try_from(m.size).map_err(|_| EINVAL)?,
        );
        // SAFETY: `at + len <= w.len` (checked above), inside the region that
        // `set_windows`'s caller guarantees.
        let ptr = unsafe { NonNull::new_unchecked(w.base.as_ptr().add(at)) };
        // SAFETY: `set_windows`'s caller guarantees that this announced window is
        // mapped with the slot's permissions (equal to the DMA_MAP's, checked above)
        // until the region is removed from the table, which happens before the reply
        // to its DMA_UNMAP, on UNMAP_ALL, on disconnect, on the next `set_windows`
        // (demoted to remote first) or with the server; it is accessed only with
        // volatile copies, reads and writes only as the DMA_MAP allows.
        let mem = unsafe { LocalMemory::window(ptr, len, offset) };
        self.dma.map_backed(m, None, DmaBacking::Local(mem))
    }

    fn version(&mut self, v: Version) -> Result<Reply, Errno> {
        if v.major != 0 {
            warn!(
                "client proposes version {}.{}; only 0.x is spoken",
                v.major, v.minor
            );
            return Err(EINVAL);
        }
        self.client_caps = v.capabilities.unwrap_or_default();
        let mut caps = self.caps;
        if self.migratable && self.client_caps.migration.is_some() {
            // The legacy object, for clients that still look for it: the granularity
            // of the dirty log and the largest bitmap one reply carries.
            caps.migration = Some(MigrationCap {
                pgsize: Some(DMA_PAGE_SIZE),
                max_bitmap_size: Some(u64::from(MAX_DATA_XFER_SIZE)),
            });
        }
        Ok(Reply::Version(Version {
            major: 0,
            minor: 0,
            capabilities: Some(caps),
        }))
    }

    /// DEVICE_FEATURE: migration and DMA logging.
    fn feature(&mut self, f: DeviceFeature) -> Result<Reply, Errno> {
        let (get, set) = match f.feature {
            FEATURE_MIGRATION if self.migratable => (true, false),
            FEATURE_MIG_DEVICE_STATE if self.migratable => (true, true),
            FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP => (false, true),
            FEATURE_DMA_LOGGING_REPORT => (true, false),
            other => {
                debug!("DEVICE_FEATURE {other}: not supported");
                return Err(EOPNOTSUPP);
            }
        };
        match f.op {
            // The reply to a probe repeats the request.
            FeatureOp::Probe { get: g, set: s } if (g && !get) || (s && !set) => {
                return Err(EINVAL)
            }
            FeatureOp::Probe { .. } => return Ok(Reply::DeviceFeature(f)),
            FeatureOp::Get if !get => return Err(EINVAL),
            FeatureOp::Set if !set => return Err(EINVAL),
            _ => {}
        }
        // A GET reply of a fixed size must fit the client's argsz.
        let get_reply = |data: FeatureData| {
            let mut reply = DeviceFeature {
                argsz: 0,
                feature: f.feature,
                op: FeatureOp::Get,
                data,
            };
            reply.argsz = reply.payload_len() as u32;
            if reply.argsz > f.argsz {
                return Err(EINVAL);
            }
            Ok(Reply::DeviceFeature(reply))
        };
        match (f.feature, &f.data) {
            (FEATURE_MIGRATION, FeatureData::None) => get_reply(FeatureData::Migration {
                flags: MIGRATION_STOP_COPY,
            }),
            (FEATURE_MIG_DEVICE_STATE, FeatureData::None) => get_reply(FeatureData::MigState {
                state: self.mig.state(),
                data_fd: -1,
            }),
            (FEATURE_MIG_DEVICE_STATE, FeatureData::MigState { state, .. }) => {
                self.set_mig_state(*state)?;
                Ok(Reply::DeviceFeature(f))
            }
            (FEATURE_DMA_LOGGING_START, FeatureData::LoggingStart { page_size, ranges }) => {
                if self.dirty_log.is_some() {
                    warn!("DMA_LOGGING_START while logging runs; refused");
                    return Err(super::errno::EBUSY);
                }
                let log = DirtyLog::start(*page_size, ranges).inspect_err(|_| {
                    warn!(
                        "DMA_LOGGING_START: page size {page_size:#x} or one of {} ranges refused",
                        ranges.len()
                    )
                })?;
                let chosen = log.page_size();
                // Logging starts now: what was written before is not reported.
                self.dma.clear_dirty();
                self.dirty_log = Some(log);
                info!(
                    "DMA logging started: {} range(s), {chosen:#x}-byte pages",
                    ranges.len()
                );
                let mut reply = f.clone();
                reply.data = FeatureData::LoggingStart {
                    page_size: chosen,
                    ranges: ranges.clone(),
                };
                Ok(Reply::DeviceFeature(reply))
            }
            (FEATURE_DMA_LOGGING_STOP, FeatureData::None) => {
                if self.dirty_log.take().is_some() {
                    info!("DMA logging stopped");
                }
                Ok(Reply::DeviceFeature(f))
            }
            (
                FEATURE_DMA_LOGGING_REPORT,
                FeatureData::LoggingReport {
                    iova,
                    length,
                    page_size,
                    ..
                },
            ) => self.logging_report(&f, *iova, *length, *page_size),
            _ => {
                warn!(
                    "DEVICE_FEATURE {}: data that does not fit the feature",
                    f.feature
                );
                Err(EINVAL)
            }
        }
    }

    /// DMA_LOGGING_REPORT. A reply whose bitmap does not fit the client's argsz
    /// carries no bitmap and states the argsz needed (the spec's rule for replies),
    /// and clears nothing.
    fn logging_report(
        &mut self,
        f: &DeviceFeature,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Reply, Errno> {
        let Some(log) = &mut self.dirty_log else {
            warn!("DMA_LOGGING_REPORT without logging; refused");
            return Err(EINVAL);
        };
        let max = u64::from(MAX_DATA_XFER_SIZE);
        let bitmap_len = DirtyLog::bitmap_len(iova, length, page_size, max)?;
        let needed = DeviceFeature::FIXED as usize + 24 + bitmap_len;
        let bitmap = if needed > f.argsz as usize {
            Vec::new()
        } else {
            log.report(&mut self.dma, iova, length, page_size, max)?
        };
        Ok(Reply::DeviceFeature(DeviceFeature {
            argsz: needed as u32,
            feature: f.feature,
            op: FeatureOp::Get,
            data: FeatureData::LoggingReport {
                iova,
                length,
                page_size,
                bitmap,
            },
        }))
    }

    /// MIG_DEVICE_STATE SET: every arc of the path to `to`, in order (see
    /// [`super::migration`]). On a failed arc the device stays where it got to.
    fn set_mig_state(&mut self, to: MigState) -> Result<(), Errno> {
        let from = self.mig.state();
        let path = migration::path(from, to).inspect_err(|_| {
            warn!("migration: {from} -> {to} is not a transition this device makes")
        })?;
        for next in path {
            let at = self.mig.state();
            match (at, next) {
                (MigState::Running, MigState::Stop) => {
                    self.irqs.hold();
                    self.mig.enter(next);
                }
                (MigState::Stop, MigState::Running) => {
                    self.mig.enter(next);
                    self.irqs.release(&mut self.config);
                }
                (MigState::Stop, MigState::StopCopy) => {
                    let stream = self.save_stream()?;
                    info!("migration: saved {} bytes of device state", stream.len());
                    self.mig.begin_save(stream);
                }
                (MigState::StopCopy, MigState::Stop) => {
                    if self.mig.pending() > 0 {
                        debug!(
                            "migration: {} bytes of state were not read",
                            self.mig.pending()
                        );
                    }
                    self.mig.enter(next);
                }
                (MigState::Stop, MigState::Resuming) => self.mig.enter(next),
                (MigState::Resuming, MigState::Stop) => {
                    let data = self.mig.take_incoming();
                    if let Err(e) = self.load_stream(&data) {
                        warn!("migration: RESUMING -> STOP: {e}; the device keeps its state");
                        return Err(e.errno());
                    }
                    info!("migration: loaded {} bytes of device state", data.len());
                    self.mig.enter(next);
                }
                _ => {
                    log::error!("migration: no arc {at} -> {next}");
                    return Err(EINVAL);
                }
            }
            debug!("migration: {at} -> {next}");
        }
        Ok(())
    }

    /// The device's state as a migration stream: the library's part and the model's.
    fn save_stream(&self) -> Result<Vec<u8>, Errno> {
        let Some(model) = self.model.save() else {
            warn!("migration: the model gave no state to save");
            return Err(EOPNOTSUPP);
        };
        let msix = self.irqs.msix_table();
        Ok(stream::encode(&stream::DeviceState {
            vendor_id: self.desc.vendor_id,
            device_id: self.desc.device_id,
            config: self.config.state(),
            intx_asserted: self.config.intx_level(),
            msix_vectors: msix.map_or(0, |t| t.vectors() as u16),
            msix_table: msix.map_or(&[][..], |t| t.table_bytes()),
            msix_pending: msix.map_or_else(Vec::new, |t| t.pending_words().to_vec()),
            model: &model,
        }))
    }

    /// Loads a migration stream: everything is checked, and the model has taken its
    /// part, before the library's part is applied; a refused stream changes nothing.
    fn load_stream(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let s = stream::decode(bytes, self.desc.vendor_id, self.desc.device_id)?;
        self.config
            .check_state(s.config)
            .map_err(|d| StreamError::section("config", d))?;
        self.irqs
            .check_msix_state(s.msix_vectors, s.msix_table, &s.msix_pending)
            .map_err(|d| StreamError::section("interrupt", d))?;
        self.model.restore(s.model).map_err(StreamError::Model)?;
        self.config.set_state(s.config, s.intx_asserted);
        self.irqs.set_msix_state(s.msix_table, &s.msix_pending);
        Ok(())
    }

    /// MIG_DATA_READ: the next bytes of the saved stream.
    fn mig_data_read(&mut self, r: MigDataRead) -> Result<Reply, Errno> {
        if !self.migratable {
            return Err(EOPNOTSUPP);
        }
        let max = self
            .client_caps
            .max_data_xfer_size()
            .min(MAX_DATA_XFER_SIZE);
        if r.size > max {
            warn!(
                "MIG_DATA_READ of {} bytes, over the transfer size {max}",
                r.size
            );
            return Err(EINVAL);
        }
        let data = self
            .mig
            .read(r.size as usize)
            .inspect_err(|_| warn!("MIG_DATA_READ in state {}; refused", self.mig.state()))?;
        Ok(Reply::MigDataRead(MigDataReadReply {
            argsz: 8 + data.len() as u32,
            data,
        }))
    }

    /// MIG_DATA_WRITE: more of the stream being resumed.
    fn mig_data_write(&mut self, w: MigDataWrite) -> Result<Reply, Errno> {
        if !self.migratable {
            return Err(EOPNOTSUPP);
        }
        if w.data.len() > MAX_DATA_XFER_SIZE as usize {
            warn!(
                "MIG_DATA_WRITE of {} bytes, over the transfer size",
                w.data.len()
            );
            return Err(EINVAL);
        }
        self.mig.write(&w.data).inspect_err(|e| {
            warn!(
                "MIG_DATA_WRITE of {} bytes in state {}: errno {e}",
                w.data.len(),
                self.mig.state()
            )
        })?;
        Ok(Reply::MigDataWrite)
    }

    /// Size of region `index` (0 for a region that does not exist).
    fn region_size(&self, index: u32) -> u64 {
        match index {
            0..=5 => self.desc.bars[index as usize].map_or(0, |b| b.size),
            pci_region::CONFIG => self.config.size() as u64,
            _ => 0,
        }
    }

    /// DEVICE_GET_REGION_INFO of `index` (the full reply).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Errno> {
        if index >= pci_region::COUNT {
            return Err(EINVAL);
        }
        let size = self.region_size(index);
        let flags = if size > 0 {
            REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
        } else {
            0
        };
        Ok(RegionInfo::new(index, flags, size))
    }

    /// Checks a region access and returns the BAR number for a BAR (`None` for the
    /// config space).
    fn check_access(&self, region: u32, offset: u64, count: usize) -> Result<Option<u8>, Errno> {
        if count > MAX_DATA_XFER_SIZE as usize {
            return Err(EINVAL);
        }
        let size = self.region_size(region);
        let end = offset.checked_add(count as u64).ok_or(EINVAL)?;
        if size == 0 || end > size {
            return Err(EINVAL);
        }
        match region {
            0..=5 => {
                let bar = self.desc.bars[region as usize].ok_or(EINVAL)?;
                if count != 0 && !bar.access_ok(offset, count) {
                    return Err(EINVAL);
                }
                Ok(Some(region as u8))
            }
            pci_region::CONFIG => Ok(None),
            _ => Err(EINVAL),
        }
    }

    /// REGION_READ: `count` bytes at `offset` of region `region` (the model reaches
    /// only local DMA regions during it).
    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, Errno> {
        self.region_read_with(region, offset, count, &mut NoRemote)
    }

    /// REGION_WRITE: `data` at `offset` of region `region` (the model reaches only
    /// local DMA regions during it).
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.region_write_with(region, offset, data, &mut NoRemote)
    }

    fn region_read_with(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
        remote: &mut dyn DmaRemote,
    ) -> Result<Vec<u8>, Errno> {
        let count = count as usize;
        let target = self.check_access(region, offset, count)?;
        let mut data = vec![0u8; count];
        if count == 0 {
            return Ok(data);
        }
        match target {
            Some(bar) => self.bar_read(bar, offset, &mut data, remote)?,
            None => self.config_read(offset as usize, &mut data, remote)?,
        }
        Ok(data)
    }

    fn region_write_with(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
        remote: &mut dyn DmaRemote,
    ) -> Result<(), Errno> {
        let target = self.check_access(region, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        match target {
            Some(bar) => self.bar_write(bar, offset, data, remote),
            None => self.config_write(offset as usize, data, remote),
        }
    }

    /// A checked BAR read: MSI-X table and PBA bytes from the emulation, the rest from
    /// the model.
    fn bar_read(
        &mut self,
        bar: u8,
        offset: u64,
        out: &mut [u8],
        remote: &mut dyn DmaRemote,
    ) -> Result<(), Errno> {
        let ranges = self.irqs.msix_ranges(bar);
        let runs = split_runs(offset, out.len(), &ranges);
        self.check_model_runs(&runs, || format!("BAR {bar} access at {offset:#x}"))?;
        for (i, j, emulated) in runs {
            let at = offset + i as u64;
            let chunk = &mut out[i..j];
            if emulated {
                self.irqs.msix_read(bar, at, chunk);
            } else {
                let mut ctx =
                    DeviceContext::new(&mut self.config, &mut self.irqs, &mut self.dma, remote);
                self.model.bar_read(&mut ctx, bar, at, chunk)?;
            }
        }
        Ok(())
    }

    /// A checked BAR write: MSI-X table bytes to the emulation (PBA writes are
    /// ignored), the rest to the model.
    fn bar_write(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8],
        remote: &mut dyn DmaRemote,
    ) -> Result<(), Errno> {
        let ranges = self.irqs.msix_ranges(bar);
        let runs = split_runs(offset, data.len(), &ranges);
        self.check_model_runs(&runs, || format!("BAR {bar} access at {offset:#x}"))?;
        for (i, j, emulated) in runs {
            let at = offset + i as u64;
            let chunk = &data[i..j];
            if emulated {
                self.irqs.msix_write(&mut self.config, bar, at, chunk);
            } else {
                let mut ctx =
                    DeviceContext::new(&mut self.config, &mut self.irqs, &mut self.dma, remote);
                self.model.bar_write(&mut ctx, bar, at, chunk)?;
            }
        }
        Ok(())
    }

    /// While the device is stopped, an access with a run the model would handle is
    /// refused (`EINVAL`) before any byte is touched.
    fn check_model_runs(
        &self,
        runs: &[(usize, usize, bool)],
        what: impl FnOnce() -> String,
    ) -> Result<(), Errno> {
        if self.mig.stopped() && runs.iter().any(|r| !r.2) {
            warn!(
                "{} while the device is stopped ({}): the model's; refused",
                what(),
                self.mig.state()
            );
            return Err(EINVAL);
        }
        Ok(())
    }

    /// Splits `offset..offset + len` into runs of bytes that are all emulated, or all
    /// the model's: (start, end, emulated).
    fn config_runs(&self, offset: usize, len: usize) -> Vec<(usize, usize, bool)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < len {
            let owned = self.config.is_owned(offset + i);
            let mut j = i + 1;
            while j < len && self.config.is_owned(offset + j) == owned {
                j += 1;
            }
            runs.push((i, j, owned));
            i = j;
        }
        runs
    }

    fn config_read(
        &mut self,
        offset: usize,
        out: &mut [u8],
        remote: &mut dyn DmaRemote,
    ) -> Result<(), Errno> {
        let runs = self.config_runs(offset, out.len());
        self.check_model_runs(&runs, || format!("config space access at {offset:#x}"))?;
        for (i, j, owned) in runs {
            let chunk = &mut out[i..j];
            if owned {
                self.config.read(offset + i, chunk);
            } else {
                let at = u16::try_from(offset + i).map_err(|_| EINVAL)?;
                let mut ctx =
                    DeviceContext::new(&mut self.config, &mut self.irqs, &mut self.dma, remote);
                self.model.config_read(&mut ctx, at, chunk)?;
            }
        }
        Ok(())
    }

    fn config_write(
        &mut self,
        offset: usize,
        data: &[u8],
        remote: &mut dyn DmaRemote,
    ) -> Result<(), Errno> {
        let runs = self.config_runs(offset, data.len());
        self.check_model_runs(&runs, || format!("config space access at {offset:#x}"))?;
        let mut fx = WriteEffects::default();
        let mut result = Ok(());
        for (i, j, owned) in runs {
            let chunk = &data[i..j];
            if owned {
                fx.merge(self.config.write(offset + i, chunk));
            } else {
                let Ok(at) = u16::try_from(offset + i) else {
                    result = Err(EINVAL);
                    break;
                };
                let mut ctx =
                    DeviceContext::new(&mut self.config, &mut self.irqs, &mut self.dma, remote);
                if let Err(e) = self.model.config_write(&mut ctx, at, chunk) {
                    result = Err(e);
                    break;
                }
            }
        }
        // What was written stays written; carry out its effects even if the model
        // failed a later part.
        if fx.flr {
            info!("function level reset");
            self.reset_with(remote);
        } else {
            self.irqs.after_config_write(&mut self.config, fx);
        }
        result
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "server_migration_tests.rs"]
mod migration_tests;
