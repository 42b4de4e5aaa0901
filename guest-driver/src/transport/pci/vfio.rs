//! A PCI function through VFIO (`vfio-pci`), with the few VFIO ioctls the transport
//! needs written on `vfio-bindings` and libc: container, group, device fd, BAR
//! mappings, configuration space, and MSI-X vectors signalled on eventfds.
//!
//! Only the no-IOMMU model is implemented: the device VM has no virtual IOMMU, the
//! group is `/dev/vfio/noiommu-N`, and the device is given physical addresses (read
//! from /proc/self/pagemap), exactly as with uio_pci_generic. A vIOMMU (type1) differs
//! in two places only, both behind [`IommuModel`]: the IOMMU type the container is set
//! to, and where the device addresses of the driver's memory come from (type1 would
//! map the hugepages with `VFIO_IOMMU_MAP_DMA` and hand out IOVAs).
//!
//! Kernel structures are decoded once, here, into [`DeviceInfo`], [`RegionInfo`] and
//! [`IrqInfo`]; nothing else in the driver sees them.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vfio_bindings::bindings::vfio as sys;

use super::caps::{BarRange, MsixCap};
use super::hugepages::HugeMemory;
use super::sysfs::Mmio;

/// The sysfs parameter that turns no-IOMMU mode on (kernels built with
/// `CONFIG_VFIO_NOIOMMU=y`).
pub const NOIOMMU_PARAM: &str = "module/vfio/parameters/enable_unsafe_noiommu_mode";
/// The name the kernel gives the IOMMU groups it makes up in no-IOMMU mode.
pub const NOIOMMU_GROUP_NAME: &str = "vfio-noiommu";
/// The driver to bind.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// How to turn no-IOMMU mode on, for error messages.
const ENABLE_NOIOMMU: &str = "load vfio with `modprobe vfio enable_unsafe_noiommu_mode=1`, or \
     `echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode` before binding vfio-pci";

/// A VFIO failure, saying what to do about it where something can be done.
#[derive(Debug, Error)]
pub enum VfioError {
    /// No `/dev/vfio/vfio`.
    #[error(
        "{0} does not exist: the vfio module is not loaded (modprobe vfio-pci) or /dev is not \
         devtmpfs"
    )]
    NoDevVfio(PathBuf),
    /// The kernel has no no-IOMMU support at all.
    #[error(
        "this kernel's vfio has no no-IOMMU mode (built without CONFIG_VFIO_NOIOMMU, as \
         Debian's is; /sys/{NOIOMMU_PARAM} is missing): use a vfio.ko built with it \
         (scripts/device-vm/build-image.sh builds one) or --pci-driver uio"
    )]
    NoIommuUnsupported,
    /// No-IOMMU mode exists but is off.
    #[error("vfio's no-IOMMU mode is not enabled: {ENABLE_NOIOMMU}")]
    NoIommuDisabled,
    /// The function is behind a real IOMMU: it needs the type1 model, not here yet.
    #[error(
        "{bdf} is in IOMMU group {group} of a real (virtual) IOMMU: vfu-guest drives vfio only \
         without an IOMMU for now (the relay has no IOTLB support); boot without the vIOMMU or \
         use --pci-driver uio"
    )]
    BehindIommu {
        /// The function.
        bdf: String,
        /// Its group.
        group: u32,
    },
    /// The function has no IOMMU group although it is bound to vfio-pci.
    #[error("{0} has no IOMMU group (is it bound to vfio-pci?)")]
    NoGroup(String),
    /// Opening the group or the device was refused for lack of CAP_SYS_RAWIO.
    #[error(
        "{what}: permission denied: no-IOMMU VFIO needs CAP_SYS_RAWIO (run vfu-guest as root)"
    )]
    NoRawio {
        /// What was refused.
        what: String,
    },
    /// The group has devices bound to drivers other than vfio.
    #[error(
        "IOMMU group {0} is not viable: every device in it must be bound to vfio-pci (or to no \
         driver); see /sys/kernel/iommu_groups/{0}/devices"
    )]
    NotViable(u32),
    /// The kernel speaks another VFIO API.
    #[error("VFIO API version {0}, expected {expected}", expected = sys::VFIO_API_VERSION)]
    ApiVersion(i32),
    /// The device is not what a vfio-pci device should be.
    #[error("{0}")]
    Device(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VfioError {
    let what = what.into();
    move |source| VfioError::Io { what, source }
}

/// The ioctl numbers: `_IO(VFIO_TYPE, VFIO_BASE + n)`, no size or direction bits.
mod nr {
    use super::sys;

    const fn io(n: u32) -> libc::c_ulong {
        (((sys::VFIO_TYPE as u32) << 8) | (sys::VFIO_BASE + n)) as libc::c_ulong
    }
    pub const GET_API_VERSION: libc::c_ulong = io(0);
    pub const CHECK_EXTENSION: libc::c_ulong = io(1);
    pub const SET_IOMMU: libc::c_ulong = io(2);
    pub const GROUP_GET_STATUS: libc::c_ulong = io(3);
    pub const GROUP_SET_CONTAINER: libc::c_ulong = io(4);
    pub const GROUP_GET_DEVICE_FD: libc::c_ulong = io(6);
    pub const DEVICE_GET_INFO: libc::c_ulong = io(7);
    pub const DEVICE_GET_REGION_INFO: libc::c_ulong = io(8);
    pub const DEVICE_GET_IRQ_INFO: libc::c_ulong = io(9);
    pub const DEVICE_SET_IRQS: libc::c_ulong = io(10);
}

/// `ioctl(fd, request, arg)` with an integer argument; the result or the errno.
fn ioctl_val(fd: RawFd, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: the VFIO ioctls called this way take an integer (or nothing), not a
    // pointer; a bad fd or request only fails.
    let r = unsafe { libc::ioctl(fd, request as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `ioctl(fd, request, buf)` on a buffer the kernel reads and may write back, whose
/// first u32 is `argsz` (the VFIO convention).
fn ioctl_buf(fd: RawFd, request: libc::c_ulong, buf: &mut [u64]) -> std::io::Result<i32> {
    // SAFETY: `buf` is valid, 8-byte aligned memory of `argsz` bytes (callers set argsz
    // to at most its length); the kernel reads and writes only within argsz.
    let r = unsafe { libc::ioctl(fd, request as _, buf.as_mut_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A buffer of `bytes` (rounded up to 8) for an argsz-headed structure: argsz, then
/// the u32 fields `words`, then `tail`, then zeros.
fn argbuf_with(bytes: usize, words: &[u32], tail: &[u8]) -> Vec<u64> {
    let mut raw = vec![0u8; bytes.div_ceil(8) * 8];
    let mut at = 0;
    for w in std::iter::once(bytes as u32).chain(words.iter().copied()) {
        raw[at..at + 4].copy_from_slice(&w.to_ne_bytes());
        at += 4;
    }
    raw[at..at + tail.len()].copy_from_slice(tail);
    raw.chunks(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunks")))
        .collect()
}

fn argbuf(bytes: usize, words: &[u32]) -> Vec<u64> {
    argbuf_with(bytes, words, &[])
}

fn as_bytes(buf: &[u64]) -> Vec<u8> {
    buf.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// What `VFIO_DEVICE_GET_INFO` says about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Regions (BARs 0-5, ROM, config, VGA, ...).
    pub regions: u32,
    /// Interrupt indexes (INTx, MSI, MSI-X, ...).
    pub irqs: u32,
}

impl DeviceInfo {
    /// Decodes `struct vfio_device_info` and checks it is a PCI device with the
    /// configuration region and the MSI-X interrupt index.
    pub fn decode(raw: &[u8]) -> Result<Self, VfioError> {
        let flags = u32_at(raw, 4).unwrap_or(0);
        let info = Self {
            regions: u32_at(raw, 8).unwrap_or(0),
            irqs: u32_at(raw, 12).unwrap_or(0),
        };
        if flags & sys::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioError::Device(format!(
                "not a vfio-pci device (flags {flags:#x})"
            )));
        }
        if info.regions <= sys::VFIO_PCI_CONFIG_REGION_INDEX
            || info.irqs <= sys::VFIO_PCI_MSIX_IRQ_INDEX
        {
            return Err(VfioError::Device(format!(
                "a vfio-pci device with {} regions and {} interrupt indexes: too few",
                info.regions, info.irqs
            )));
        }
        Ok(info)
    }
}

/// A part of a region that can be mmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapArea {
    /// Offset inside the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// What `VFIO_DEVICE_GET_REGION_INFO` says about a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// Length in bytes (0: the region does not exist, e.g. an unused BAR).
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// The parts that can be mmapped: the whole region, some of it (a sparse mmap
    /// capability, e.g. around an MSI-X table), or nothing.
    pub mmap: Vec<MmapArea>,
}

impl RegionInfo {
    /// Decodes `struct vfio_region_info` and its capability chain (`raw` is the whole
    /// buffer the kernel filled, argsz bytes).
    pub fn decode(raw: &[u8]) -> Result<Self, VfioError> {
        let bad = |what: &str| VfioError::Device(format!("region info: {what}"));
        let flags = u32_at(raw, 4).ok_or_else(|| bad("short"))?;
        let index = u32_at(raw, 8).ok_or_else(|| bad("short"))?;
        let cap_offset = u32_at(raw, 12).ok_or_else(|| bad("short"))?;
        let size = u64_at(raw, 16).ok_or_else(|| bad("short"))?;
        let offset = u64_at(raw, 24).ok_or_else(|| bad("short"))?;
        let mut mmap = if flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0 {
            vec![MmapArea { offset: 0, size }]
        } else {
            Vec::new()
        };
        if flags & sys::VFIO_REGION_INFO_FLAG_CAPS != 0 && cap_offset != 0 {
            let mut at = cap_offset as usize;
            let mut budget = 16;
            while at != 0 {
                if budget == 0 || at < 32 {
                    return Err(bad("capability chain loops"));
                }
                budget -= 1;
                let id = u16_at(raw, at).ok_or_else(|| bad("capability outside the buffer"))?;
                let next = u32_at(raw, at + 4).ok_or_else(|| bad("capability outside"))?;
                if u32::from(id) == sys::VFIO_REGION_INFO_CAP_SPARSE_MMAP
                    && flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0
                {
                    let n = u32_at(raw, at + 8).ok_or_else(|| bad("sparse mmap header"))?;
                    mmap = (0..n as usize)
                        .map(|i| {
                            let a = at + 16 + 16 * i;
                            Some(MmapArea {
                                offset: u64_at(raw, a)?,
                                size: u64_at(raw, a + 8)?,
                            })
                        })
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad("sparse mmap areas outside the buffer"))?;
                    mmap.retain(|a| a.size > 0);
                }
                at = next as usize;
            }
        }
        if mmap
            .iter()
            .any(|a| a.offset.checked_add(a.size).is_none_or(|end| end > size))
        {
            return Err(bad("an mmap area outside the region"));
        }
        Ok(Self {
            index,
            size,
            offset,
            read: flags & sys::VFIO_REGION_INFO_FLAG_READ != 0,
            write: flags & sys::VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap,
        })
    }

    /// Whether `offset..offset + len` of the region lies inside one mmappable area.
    pub fn mappable(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        self.mmap
            .iter()
            .any(|a| a.offset <= offset && end <= a.offset + a.size)
    }
}

/// What `VFIO_DEVICE_GET_IRQ_INFO` says about an interrupt index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// The index (INTx 0, MSI 1, MSI-X 2).
    pub index: u32,
    /// Vectors.
    pub count: u32,
    /// Can signal an eventfd.
    pub eventfd: bool,
}

impl IrqInfo {
    /// Decodes `struct vfio_irq_info`.
    pub fn decode(raw: &[u8]) -> Result<Self, VfioError> {
        let short = || VfioError::Device("irq info: short".into());
        let flags = u32_at(raw, 4).ok_or_else(short)?;
        Ok(Self {
            index: u32_at(raw, 8).ok_or_else(short)?,
            count: u32_at(raw, 12).ok_or_else(short)?,
            eventfd: flags & sys::VFIO_IRQ_INFO_EVENTFD != 0,
        })
    }
}

/// The body of `VFIO_DEVICE_SET_IRQS` that makes vectors `0..fds.len()` of `index`
/// signal `fds` (eventfds), or with no fds, turns the index off.
pub fn irq_set(index: u32, fds: &[RawFd]) -> Vec<u64> {
    let header = std::mem::size_of::<sys::vfio_irq_set>();
    let flags = if fds.is_empty() {
        sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER
    } else {
        sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER
    };
    let data: Vec<u8> = fds.iter().flat_map(|fd| fd.to_ne_bytes()).collect();
    argbuf_with(
        header + data.len(),
        &[flags, index, 0, fds.len() as u32],
        &data,
    )
}

/// How many MSI-X vectors the driver may use: the function's MSI-X capability and
/// VFIO's MSI-X interrupt info must agree that there are some, signalling eventfds,
/// and the table and pending bit array must not share bytes with the virtio
/// structures the driver maps (VFIO keeps them out of BAR mappings).
pub fn msix_vectors(
    cap: Option<&MsixCap>,
    irq: &IrqInfo,
    structures: &[BarRange],
) -> Result<u16, VfioError> {
    let cap =
        cap.ok_or_else(|| VfioError::Device("the function has no MSI-X capability".into()))?;
    if irq.count == 0 || !irq.eventfd {
        return Err(VfioError::Device(format!(
            "VFIO offers {} MSI-X vectors{}",
            irq.count,
            if irq.eventfd {
                ""
            } else {
                " without eventfd signalling"
            }
        )));
    }
    for s in structures {
        for (what, r) in [("table", &cap.table), ("pending bit array", &cap.pba)] {
            if r.overlaps(s) {
                return Err(VfioError::Device(format!(
                    "the MSI-X {what} ({r:?}) overlaps a virtio structure ({s:?})"
                )));
            }
        }
    }
    if u32::from(cap.table_size) != irq.count {
        log::warn!(
            "MSI-X table of {} vectors, VFIO reports {}: using the fewer",
            cap.table_size,
            irq.count
        );
    }
    Ok(cap
        .table_size
        .min(u16::try_from(irq.count).unwrap_or(u16::MAX)))
}

/// The IOMMU model of a container: what `VFIO_SET_IOMMU` selects, what the group's
/// device node is called, and where the device addresses of the driver's memory come
/// from. [`NoIommu`] is the one there is; a type1 model (vIOMMU) would map the
/// hugepages with `VFIO_IOMMU_MAP_DMA` in [`IommuModel::dma_runs`] and return IOVAs.
pub trait IommuModel {
    /// Its name, for messages.
    fn name(&self) -> &'static str;
    /// The argument of `VFIO_CHECK_EXTENSION` and `VFIO_SET_IOMMU`.
    fn iommu_type(&self) -> u32;
    /// The device node of IOMMU group `group` under `/dev/vfio`.
    fn group_node(&self, group: u32) -> String;
    /// `(local pointer, length, device address)` runs of `memory`, once the device may
    /// reach it.
    fn dma_runs(
        &self,
        container: &Container,
        memory: &HugeMemory,
    ) -> Result<Vec<(*mut u8, usize, u64)>, VfioError>;
}

/// No IOMMU: the device sees physical memory, so the device addresses are the physical
/// addresses of the hugepages.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIommu;

impl IommuModel for NoIommu {
    fn name(&self) -> &'static str {
        "no-IOMMU"
    }
    fn iommu_type(&self) -> u32 {
        sys::VFIO_NOIOMMU_IOMMU
    }
    fn group_node(&self, group: u32) -> String {
        format!("noiommu-{group}")
    }
    fn dma_runs(
        &self,
        _container: &Container,
        memory: &HugeMemory,
    ) -> Result<Vec<(*mut u8, usize, u64)>, VfioError> {
        Ok(memory.physical_runs().to_vec())
    }
}

/// A VFIO container (`/dev/vfio/vfio`).
#[derive(Debug)]
pub struct Container {
    fd: File,
}

impl Container {
    /// Opens the container and checks the API version and that `model` is supported.
    pub fn open(dev: &Path, model: &dyn IommuModel) -> Result<Self, VfioError> {
        let path = dev.join("vfio/vfio");
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => VfioError::NoDevVfio(path.clone()),
                _ => VfioError::Io {
                    what: format!("opening {}", path.display()),
                    source: e,
                },
            })?;
        let version = ioctl_val(fd.as_raw_fd(), nr::GET_API_VERSION, 0)
            .map_err(io_err("VFIO_GET_API_VERSION"))?;
        if version != sys::VFIO_API_VERSION as i32 {
            return Err(VfioError::ApiVersion(version));
        }
        let has = ioctl_val(
            fd.as_raw_fd(),
            nr::CHECK_EXTENSION,
            model.iommu_type().into(),
        )
        .map_err(io_err("VFIO_CHECK_EXTENSION"))?;
        if has != 1 {
            return Err(if model.iommu_type() == sys::VFIO_NOIOMMU_IOMMU {
                VfioError::NoIommuDisabled
            } else {
                VfioError::Device(format!(
                    "the kernel does not offer the {} IOMMU",
                    model.name()
                ))
            });
        }
        Ok(Self { fd })
    }
}

/// The facts that decide whether vfio can drive a function, read from sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioFacts {
    /// `/sys/bus/pci/drivers/vfio-pci` exists (the module is loaded).
    pub driver_loaded: bool,
    /// The no-IOMMU parameter: `None` when the kernel has none, else its value.
    pub noiommu: Option<bool>,
    /// The function's IOMMU group and that group's name, if it has one.
    pub group: Option<(u32, String)>,
}

impl VfioFacts {
    /// Reads them for `bdf` under `sysfs`.
    pub fn read(sysfs: &Path, bdf: &str) -> Self {
        let noiommu = std::fs::read_to_string(sysfs.join(NOIOMMU_PARAM))
            .ok()
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"));
        let group = std::fs::read_link(sysfs.join("bus/pci/devices").join(bdf).join("iommu_group"))
            .ok()
            .and_then(|link| {
                let n: u32 = link.file_name()?.to_str()?.parse().ok()?;
                let name =
                    std::fs::read_to_string(sysfs.join(format!("kernel/iommu_groups/{n}/name")))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default();
                Some((n, name))
            });
        Self {
            driver_loaded: sysfs.join("bus/pci/drivers").join(VFIO_DRIVER).exists(),
            noiommu,
            group,
        }
    }

    /// Whether vfio in no-IOMMU mode can take `bdf`; if not, why.
    pub fn usable(&self, bdf: &str) -> Result<(), VfioError> {
        match &self.group {
            Some((_, name)) if name == NOIOMMU_GROUP_NAME => return Ok(()),
            Some((group, _)) => {
                return Err(VfioError::BehindIommu {
                    bdf: bdf.to_string(),
                    group: *group,
                })
            }
            None => {}
        }
        if !self.driver_loaded {
            return Err(VfioError::Device(format!(
                "the {VFIO_DRIVER} module is not loaded (modprobe vfio-pci; for no-IOMMU mode \
                 first `modprobe vfio enable_unsafe_noiommu_mode=1`)"
            )));
        }
        match self.noiommu {
            None => Err(VfioError::NoIommuUnsupported),
            Some(false) => Err(VfioError::NoIommuDisabled),
            Some(true) => Ok(()),
        }
    }
}

/// A PCI function opened through VFIO: its group in a container set to the IOMMU
/// model, and the device fd.
#[derive(Debug)]
pub struct VfioDevice {
    // Drop order: the device, then the group, then the container.
    device: File,
    _group: File,
    container: Container,
    bdf: String,
    info: DeviceInfo,
    config: RegionInfo,
}

impl VfioDevice {
    /// Opens `bdf` (bound to vfio-pci) under the IOMMU model.
    pub fn open(
        sysfs: &Path,
        dev: &Path,
        bdf: &str,
        model: &dyn IommuModel,
    ) -> Result<Self, VfioError> {
        let facts = VfioFacts::read(sysfs, bdf);
        let (group, _) = facts
            .group
            .clone()
            .ok_or_else(|| VfioError::NoGroup(bdf.to_string()))?;
        facts.usable(bdf)?;
        let container = Container::open(dev, model)?;
        let node = dev.join("vfio").join(model.group_node(group));
        let group_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => VfioError::NoRawio {
                    what: format!("opening {}", node.display()),
                },
                _ => VfioError::Io {
                    what: format!("opening {}", node.display()),
                    source: e,
                },
            })?;
        let mut status = argbuf(std::mem::size_of::<sys::vfio_group_status>(), &[]);
        ioctl_buf(group_file.as_raw_fd(), nr::GROUP_GET_STATUS, &mut status)
            .map_err(io_err("VFIO_GROUP_GET_STATUS"))?;
        let flags = u32_at(&as_bytes(&status), 4).unwrap_or(0);
        if flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable(group));
        }
        let container_fd: RawFd = container.fd.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) through the
        // pointer, which points at a live local.
        let r = unsafe {
            libc::ioctl(
                group_file.as_raw_fd(),
                nr::GROUP_SET_CONTAINER as _,
                &container_fd as *const RawFd,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) => VfioError::NoRawio {
                    what: "VFIO_GROUP_SET_CONTAINER".into(),
                },
                _ => VfioError::Io {
                    what: "VFIO_GROUP_SET_CONTAINER".into(),
                    source: e,
                },
            });
        }
        ioctl_val(
            container.fd.as_raw_fd(),
            nr::SET_IOMMU,
            model.iommu_type().into(),
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => VfioError::NoRawio {
                what: format!("VFIO_SET_IOMMU({})", model.name()),
            },
            _ => VfioError::Io {
                what: format!("VFIO_SET_IOMMU({})", model.name()),
                source: e,
            },
        })?;
        let name = CString::new(bdf).map_err(|_| VfioError::Device(format!("{bdf:?}")))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string through the
        // pointer, which `name` keeps alive; it returns a new fd or fails.
        let fd = unsafe {
            libc::ioctl(
                group_file.as_raw_fd(),
                nr::GROUP_GET_DEVICE_FD as _,
                name.as_ptr(),
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) => VfioError::NoRawio {
                    what: format!("VFIO_GROUP_GET_DEVICE_FD({bdf})"),
                },
                _ => VfioError::Io {
                    what: format!("VFIO_GROUP_GET_DEVICE_FD({bdf})"),
                    source: e,
                },
            });
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut raw = argbuf(std::mem::size_of::<sys::vfio_device_info>(), &[]);
        ioctl_buf(device.as_raw_fd(), nr::DEVICE_GET_INFO, &mut raw)
            .map_err(io_err("VFIO_DEVICE_GET_INFO"))?;
        let info = DeviceInfo::decode(&as_bytes(&raw))?;
        let config = region_info(&device, sys::VFIO_PCI_CONFIG_REGION_INDEX)?;
        if config.size < 256 || !config.read || !config.write {
            return Err(VfioError::Device(format!(
                "configuration region of {} bytes (read {}, write {})",
                config.size, config.read, config.write
            )));
        }
        Ok(Self {
            device,
            _group: group_file,
            container,
            bdf: bdf.to_string(),
            info,
            config,
        })
    }

    /// What the device reported.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The container (for the IOMMU model's DMA mappings).
    pub fn container(&self) -> &Container {
        &self.container
    }

    /// A region's info.
    pub fn region(&self, index: u32) -> Result<RegionInfo, VfioError> {
        region_info(&self.device, index)
    }

    /// The first `len` bytes of the configuration space.
    pub fn read_config(&self, len: usize) -> Result<Vec<u8>, VfioError> {
        let len = len.min(self.config.size as usize);
        let mut buf = vec![0u8; len];
        self.device
            .read_exact_at(&mut buf, self.config.offset)
            .map_err(io_err(format!(
                "reading the configuration space of {}",
                self.bdf
            )))?;
        Ok(buf)
    }

    /// Writes configuration space bytes at `offset`.
    pub fn write_config(&self, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        self.device
            .write_all_at(data, self.config.offset + offset)
            .map_err(io_err(format!(
                "writing the configuration space of {} at {offset:#x}",
                self.bdf
            )))
    }

    /// Maps BAR `bar`; the parts of it that cannot be mmapped (a sparse mmap
    /// capability) are left inaccessible, so callers check [`RegionInfo::mappable`]
    /// for what they touch.
    pub fn map_bar(&self, bar: u8) -> Result<(Mmio, RegionInfo), VfioError> {
        let info = self.region(u32::from(bar))?;
        if info.size == 0 {
            return Err(VfioError::Device(format!("BAR {bar} does not exist")));
        }
        if info.mmap.is_empty() {
            return Err(VfioError::Device(format!(
                "BAR {bar} cannot be mmapped (an I/O BAR?)"
            )));
        }
        let len = usize::try_from(info.size)
            .map_err(|_| VfioError::Device(format!("BAR {bar} is too large")))?;
        let whole = info.mmap
            == [MmapArea {
                offset: 0,
                size: info.size,
            }];
        let mmio = if whole {
            Mmio::map_fd(self.device.as_raw_fd(), info.offset, len)
        } else {
            Mmio::map_fd_areas(
                self.device.as_raw_fd(),
                info.offset,
                len,
                &info
                    .mmap
                    .iter()
                    .map(|a| (a.offset, a.size))
                    .collect::<Vec<_>>(),
            )
        }
        .map_err(io_err(format!("mmap of BAR {bar} of {}", self.bdf)))?;
        Ok((mmio, info))
    }

    /// The MSI-X interrupt index.
    pub fn msix_info(&self) -> Result<IrqInfo, VfioError> {
        let mut raw = argbuf(
            std::mem::size_of::<sys::vfio_irq_info>(),
            &[0, sys::VFIO_PCI_MSIX_IRQ_INDEX],
        );
        ioctl_buf(self.device.as_raw_fd(), nr::DEVICE_GET_IRQ_INFO, &mut raw)
            .map_err(io_err("VFIO_DEVICE_GET_IRQ_INFO(MSI-X)"))?;
        IrqInfo::decode(&as_bytes(&raw))
    }

    /// Enables MSI-X vectors `0..fds.len()`, each signalling its eventfd; with no fds,
    /// disables MSI-X.
    pub fn set_msix(&self, fds: &[RawFd]) -> Result<(), VfioError> {
        let mut buf = irq_set(sys::VFIO_PCI_MSIX_IRQ_INDEX, fds);
        ioctl_buf(self.device.as_raw_fd(), nr::DEVICE_SET_IRQS, &mut buf).map_err(io_err(
            format!("VFIO_DEVICE_SET_IRQS(MSI-X, {} vectors)", fds.len()),
        ))?;
        Ok(())
    }
}

/// `VFIO_DEVICE_GET_REGION_INFO`, again with a larger buffer when the region has
/// capabilities.
fn region_info(device: &File, index: u32) -> Result<RegionInfo, VfioError> {
    let base = std::mem::size_of::<sys::vfio_region_info>();
    let mut raw = argbuf(base, &[0, index]);
    ioctl_buf(device.as_raw_fd(), nr::DEVICE_GET_REGION_INFO, &mut raw)
        .map_err(io_err(format!("VFIO_DEVICE_GET_REGION_INFO({index})")))?;
    let argsz = u32_at(&as_bytes(&raw), 0).unwrap_or(0) as usize;
    if argsz > base && argsz <= 64 << 10 {
        raw = argbuf(argsz, &[0, index]);
        ioctl_buf(device.as_raw_fd(), nr::DEVICE_GET_REGION_INFO, &mut raw)
            .map_err(io_err(format!("VFIO_DEVICE_GET_REGION_INFO({index})")))?;
    }
    RegionInfo::decode(&as_bytes(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl numbers are those of <linux/vfio.h> (_IO(';', 100 + n)).
    #[test]
    fn ioctl_numbers() {
        assert_eq!(nr::GET_API_VERSION, 0x3b64);
        assert_eq!(nr::CHECK_EXTENSION, 0x3b65);
        assert_eq!(nr::SET_IOMMU, 0x3b66);
        assert_eq!(nr::GROUP_GET_STATUS, 0x3b67);
        assert_eq!(nr::GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(nr::GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(nr::DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(nr::DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(nr::DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(nr::DEVICE_SET_IRQS, 0x3b6e);
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    fn region(flags: u32, cap_offset: u32, size: u64, offset: u64) -> Vec<u8> {
        let mut b = words(&[32, flags, 4, cap_offset]);
        b.extend(size.to_ne_bytes());
        b.extend(offset.to_ne_bytes());
        b
    }

    /// A plain mmappable BAR is one area; a BAR whose MSI-X table is cut out by a
    /// sparse mmap capability (behind another capability) is the areas around it; an
    /// I/O BAR has none; areas past the region and chains that loop are refused.
    #[test]
    fn region_info_decoding() {
        use sys::{
            VFIO_REGION_INFO_FLAG_CAPS as CAPS, VFIO_REGION_INFO_FLAG_MMAP as MMAP,
            VFIO_REGION_INFO_FLAG_READ as R, VFIO_REGION_INFO_FLAG_WRITE as W,
        };
        let plain = RegionInfo::decode(&region(R | W | MMAP, 0, 0x4000, 4 << 40)).unwrap();
        assert_eq!(
            plain,
            RegionInfo {
                index: 4,
                size: 0x4000,
                offset: 4 << 40,
                read: true,
                write: true,
                mmap: vec![MmapArea {
                    offset: 0,
                    size: 0x4000
                }],
            }
        );
        assert!(plain.mappable(0x3000, 0x1000));
        assert!(!plain.mappable(0x3000, 0x1001));

        // Capability 3 (MSI-X mappable, 8 bytes) at 32, then sparse mmap at 40 with two
        // areas around a table at 0x1000..0x2000.
        let mut b = region(R | W | MMAP | CAPS, 32, 0x4000, 0);
        b.extend(words(&[3 | 1 << 16, 40]));
        b.extend(words(&[1 | 1 << 16, 0, 2, 0]));
        for (o, s) in [(0u64, 0x1000u64), (0x2000, 0x2000)] {
            b.extend(o.to_ne_bytes());
            b.extend(s.to_ne_bytes());
        }
        let sparse = RegionInfo::decode(&b).unwrap();
        assert_eq!(
            sparse.mmap,
            vec![
                MmapArea {
                    offset: 0,
                    size: 0x1000
                },
                MmapArea {
                    offset: 0x2000,
                    size: 0x2000
                }
            ]
        );
        assert!(sparse.mappable(0x2000, 0x38));
        assert!(!sparse.mappable(0x1800, 4), "inside the MSI-X table");
        assert!(!sparse.mappable(0xff0, 0x20), "across the hole");

        let io = RegionInfo::decode(&region(R | W, 0, 0x20, 0)).unwrap();
        assert!(io.mmap.is_empty());

        let mut past = region(R | MMAP | CAPS, 32, 0x1000, 0);
        past.extend(words(&[1 | 1 << 16, 0, 1, 0]));
        past.extend(0x800u64.to_ne_bytes());
        past.extend(0x1000u64.to_ne_bytes());
        assert!(RegionInfo::decode(&past).is_err());

        let mut looping = region(R | MMAP | CAPS, 32, 0x1000, 0);
        looping.extend(words(&[3 | 1 << 16, 32]));
        assert!(RegionInfo::decode(&looping).is_err());
        assert!(RegionInfo::decode(&[0u8; 12]).is_err());
    }

    /// Device info must be PCI with the config region and MSI-X; IRQ info keeps the
    /// count and whether it signals eventfds.
    #[test]
    fn device_and_irq_info_decoding() {
        let pci = words(&[24, sys::VFIO_DEVICE_FLAGS_PCI | 1, 9, 5, 0, 0]);
        assert_eq!(
            DeviceInfo::decode(&pci).unwrap(),
            DeviceInfo {
                regions: 9,
                irqs: 5
            }
        );
        assert!(DeviceInfo::decode(&words(&[24, 1, 9, 5, 0, 0])).is_err());
        assert!(DeviceInfo::decode(&words(&[24, sys::VFIO_DEVICE_FLAGS_PCI, 9, 2, 0, 0])).is_err());
        let msix = IrqInfo::decode(&words(&[16, sys::VFIO_IRQ_INFO_EVENTFD | 8, 2, 3])).unwrap();
        assert_eq!(
            msix,
            IrqInfo {
                index: 2,
                count: 3,
                eventfd: true
            }
        );
        assert!(!IrqInfo::decode(&words(&[16, 0, 2, 3])).unwrap().eventfd);
    }

    /// SET_IRQS: eventfd trigger for vectors 0..n with the fds after the header;
    /// without fds, DATA_NONE with count 0 (disable).
    #[test]
    fn irq_set_layout() {
        let b = as_bytes(&irq_set(2, &[7, 9, 11]));
        let head = std::mem::size_of::<sys::vfio_irq_set>();
        assert_eq!(head, 20);
        assert_eq!(u32_at(&b, 0), Some(32), "argsz");
        assert_eq!(
            u32_at(&b, 4),
            Some(sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER)
        );
        assert_eq!(
            (u32_at(&b, 8), u32_at(&b, 12), u32_at(&b, 16)),
            (Some(2), Some(0), Some(3))
        );
        assert_eq!(
            (u32_at(&b, 20), u32_at(&b, 24), u32_at(&b, 28)),
            (Some(7), Some(9), Some(11))
        );
        let off = as_bytes(&irq_set(2, &[]));
        assert_eq!(u32_at(&off, 0), Some(20));
        assert_eq!(
            u32_at(&off, 4),
            Some(sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER)
        );
        assert_eq!(u32_at(&off, 16), Some(0));
    }

    /// MSI-X needs the capability, vectors with eventfds, and a table clear of the
    /// virtio structures.
    #[test]
    fn msix_checks() {
        let cap = MsixCap {
            table_size: 3,
            table: BarRange {
                bar: 1,
                offset: 0,
                len: 48,
            },
            pba: BarRange {
                bar: 1,
                offset: 0x800,
                len: 8,
            },
        };
        let irq = IrqInfo {
            index: 2,
            count: 3,
            eventfd: true,
        };
        let common = BarRange {
            bar: 4,
            offset: 0,
            len: 0x38,
        };
        assert_eq!(msix_vectors(Some(&cap), &irq, &[common]).unwrap(), 3);
        assert_eq!(
            msix_vectors(Some(&cap), &IrqInfo { count: 2, ..irq }, &[common]).unwrap(),
            2
        );
        assert!(msix_vectors(None, &irq, &[common]).is_err());
        assert!(msix_vectors(Some(&cap), &IrqInfo { count: 0, ..irq }, &[]).is_err());
        assert!(msix_vectors(
            Some(&cap),
            &IrqInfo {
                eventfd: false,
                ..irq
            },
            &[]
        )
        .is_err());
        let in_table = BarRange {
            bar: 1,
            offset: 0x20,
            len: 4,
        };
        let e = msix_vectors(Some(&cap), &irq, &[common, in_table]).unwrap_err();
        assert!(e.to_string().contains("MSI-X table"), "{e}");
        let in_pba = BarRange {
            bar: 1,
            offset: 0x800,
            len: 1,
        };
        let e = msix_vectors(Some(&cap), &irq, &[in_pba]).unwrap_err();
        assert!(e.to_string().contains("pending bit array"), "{e}");
    }

    /// Whether vfio can take the function, and the errors that say what to do.
    #[test]
    fn usability() {
        let bdf = "0000:00:03.0";
        let ok = VfioFacts {
            driver_loaded: true,
            noiommu: Some(true),
            group: None,
        };
        assert!(ok.usable(bdf).is_ok());
        let bound = VfioFacts {
            group: Some((0, NOIOMMU_GROUP_NAME.into())),
            ..ok.clone()
        };
        assert!(bound.usable(bdf).is_ok());
        let off = VfioFacts {
            noiommu: Some(false),
            ..ok.clone()
        };
        let e = off.usable(bdf).unwrap_err().to_string();
        assert!(
            e.contains("modprobe vfio enable_unsafe_noiommu_mode=1"),
            "{e}"
        );
        assert!(
            e.contains("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"),
            "{e}"
        );
        let absent = VfioFacts {
            noiommu: None,
            ..ok.clone()
        };
        assert!(matches!(
            absent.usable(bdf),
            Err(VfioError::NoIommuUnsupported)
        ));
        let unloaded = VfioFacts {
            driver_loaded: false,
            ..ok.clone()
        };
        assert!(unloaded
            .usable(bdf)
            .unwrap_err()
            .to_string()
            .contains("modprobe vfio-pci"));
        let iommu = VfioFacts {
            group: Some((3, String::new())),
            ..ok
        };
        assert!(matches!(
            iommu.usable(bdf),
            Err(VfioError::BehindIommu { group: 3, .. })
        ));
    }

    /// The facts are read from sysfs: the parameter, the group link and its name.
    #[test]
    fn facts_from_sysfs() {
        let root = std::env::temp_dir().join(format!("vfu-vfio-facts-{}", std::process::id()));
        let dev = root.join("bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&dev).unwrap();
        assert_eq!(
            VfioFacts::read(&root, "0000:00:03.0"),
            VfioFacts {
                driver_loaded: false,
                noiommu: None,
                group: None
            }
        );
        std::fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci")).unwrap();
        std::fs::create_dir_all(root.join("module/vfio/parameters")).unwrap();
        std::fs::write(root.join(NOIOMMU_PARAM), "Y\n").unwrap();
        std::fs::create_dir_all(root.join("kernel/iommu_groups/0")).unwrap();
        std::fs::write(root.join("kernel/iommu_groups/0/name"), "vfio-noiommu\n").unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/0", dev.join("iommu_group"))
            .unwrap();
        assert_eq!(
            VfioFacts::read(&root, "0000:00:03.0"),
            VfioFacts {
                driver_loaded: true,
                noiommu: Some(true),
                group: Some((0, NOIOMMU_GROUP_NAME.into()))
            }
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
