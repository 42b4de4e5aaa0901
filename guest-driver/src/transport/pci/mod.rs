//! The tunnel device as a modern virtio-pci function inside a real device VM, driven
//! from userspace without an IOMMU (virtio 1.2, section 4.1): registers through the
//! mmapped BARs the virtio capabilities point to, and DMA memory from hugepages with
//! physical addresses. Two kernel drivers give the function to userspace:
//!
//! - `uio_pci_generic`: BARs and configuration space through sysfs, one INTx for every
//!   queue through the UIO device (acknowledged through the ISR, unmasked through the
//!   command register);
//! - `vfio-pci` in no-IOMMU mode ([`vfio`]): BARs and configuration space through the
//!   VFIO device, an MSI-X vector per queue signalled on its own eventfd.

mod caps;
mod hugepages;
mod sysfs;
pub mod vfio;

pub use caps::{BarRange, CapsError, MsixCap, VirtioCaps};
pub use hugepages::{HugeMemory, HugeMemoryError};
pub use sysfs::{parse_bdf, Mmio, PciDevice, PciError, UIO_DRIVER};

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use vfio::{IommuModel, NoIommu, VfioDevice, VfioFacts, VFIO_DRIVER};

use super::{Transport, TransportError};
use crate::virtqueue::SharedMemory;

/// Offsets in the common configuration structure.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Length of the structure.
    pub const LEN: u64 = 0x38;
}

/// Device status bits.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const FAILED: u8 = 128;

/// "No MSI-X vector": the device interrupts through INTx and the ISR.
const NO_VECTOR: u16 = 0xffff;

/// PCI command register bits.
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
const CMD_INTX_DISABLE: u16 = 1 << 10;

/// The virtio vendor ID.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// PCI device ID of the tunnel device (virtio device ID 56, `docs/tunnel.md`).
pub const TUNNEL_DEVICE: u16 = 0x1040 + 56;
/// PCI device ID of virtio-fs, which carries the tunnel in compatibility mode
/// (`vhost-user-fs-pci`).
pub const FS_DEVICE: u16 = 0x105a;
/// The virtio-fs tag that marks a `vhost-user-fs-pci` as the tunnel (QEMU's
/// `tag=` property); other virtio-fs devices are left alone.
pub const FS_TAG_PREFIX: &str = "vfu";

/// The tag of a virtio-fs function (the first 36 bytes of its device configuration),
/// read through its BAR without touching the device's state.
fn fs_tag(device: &PciDevice) -> Option<String> {
    let caps = VirtioCaps::parse(&device.config().ok()?).ok()?;
    let cfg = caps.device?;
    let bar = device.map_bar(cfg.bar).ok()?;
    let tag: Vec<u8> = (0..36u64)
        .map(|i| bar.read8(cfg.offset + i))
        .take_while(|&b| b != 0)
        .collect();
    Some(String::from_utf8_lossy(&tag).into_owned())
}

/// Finds the tunnel device: a function with the tunnel's PCI ID, or a virtio-fs
/// function whose tag starts with [`FS_TAG_PREFIX`] (compatibility mode). Exactly one
/// must be there.
pub fn find_tunnel(sysfs: &Path) -> Result<String, TransportError> {
    let dir = sysfs.join("bus/pci/devices");
    let err = |e: String| TransportError::Connect {
        what: "the tunnel device".into(),
        source: std::io::Error::other(e),
    };
    let entries = std::fs::read_dir(&dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let mut found = Vec::new();
    let mut seen = Vec::new();
    for entry in entries.flatten() {
        let bdf = entry.file_name().to_string_lossy().into_owned();
        let Ok(device) = PciDevice::open(sysfs, &bdf) else {
            continue;
        };
        match device.id() {
            Ok((VIRTIO_VENDOR, TUNNEL_DEVICE)) => found.push(bdf),
            Ok((VIRTIO_VENDOR, FS_DEVICE)) => match fs_tag(&device) {
                Some(tag) if tag.starts_with(FS_TAG_PREFIX) => found.push(bdf),
                tag => seen.push(format!("{bdf} (virtio-fs, tag {tag:?})")),
            },
            _ => {}
        }
    }
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(err(format!(
            "no PCI function {VIRTIO_VENDOR:04x}:{TUNNEL_DEVICE:04x}, nor a virtio-fs {VIRTIO_VENDOR:04x}:{FS_DEVICE:04x} with a tag starting with {FS_TAG_PREFIX:?}{}",
            if seen.is_empty() {
                String::new()
            } else {
                format!(" (seen: {})", seen.join(", "))
            }
        ))),
        _ => Err(err(format!(
            "several tunnel devices ({}): name one with --pci BDF",
            found.join(", ")
        ))),
    }
}

/// A structure in a mapped BAR.
#[derive(Debug, Clone)]
struct Regs {
    bar: Arc<Mmio>,
    base: u64,
}

impl Regs {
    fn read8(&self, off: u64) -> u8 {
        self.bar.read8(self.base + off)
    }
    fn read16(&self, off: u64) -> u16 {
        self.bar.read16(self.base + off)
    }
    fn read32(&self, off: u64) -> u32 {
        self.bar.read32(self.base + off)
    }
    fn write8(&self, off: u64, v: u8) {
        self.bar.write8(self.base + off, v)
    }
    fn write16(&self, off: u64, v: u16) {
        self.bar.write16(self.base + off, v)
    }
    fn write32(&self, off: u64, v: u32) {
        self.bar.write32(self.base + off, v)
    }
    fn write64(&self, off: u64, v: u64) {
        // 64-bit fields are written as two 32-bit halves, low first (section 4.1.3.1).
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

fn setup(step: &'static str) -> impl FnOnce(String) -> TransportError {
    move |reason| TransportError::Setup { step, reason }
}

/// The kernel driver that gives vfu-guest the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciDriver {
    /// `uio_pci_generic`: INTx.
    Uio,
    /// `vfio-pci` in no-IOMMU mode: MSI-X on eventfds.
    Vfio,
}

impl PciDriver {
    /// The kernel driver's name.
    pub fn kernel_name(self) -> &'static str {
        match self {
            PciDriver::Uio => UIO_DRIVER,
            PciDriver::Vfio => VFIO_DRIVER,
        }
    }
}

/// What `--pci-driver` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverChoice {
    /// uio_pci_generic.
    Uio,
    /// vfio-pci (no-IOMMU).
    Vfio,
    /// The driver the function is bound to if it is one of the two; else vfio-pci when
    /// it is loaded with no-IOMMU mode on; else uio_pci_generic.
    #[default]
    Auto,
}

impl std::str::FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uio" | UIO_DRIVER => Ok(Self::Uio),
            "vfio" | VFIO_DRIVER => Ok(Self::Vfio),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("{s:?}: expected uio, vfio or auto")),
        }
    }
}

/// The driver `choice` comes to for a function bound now to `bound`, and why.
pub fn choose_driver(
    choice: DriverChoice,
    bound: Option<&str>,
    vfio: &VfioFacts,
    bdf: &str,
) -> (PciDriver, String) {
    match choice {
        DriverChoice::Uio => (PciDriver::Uio, "asked for (--pci-driver uio)".into()),
        DriverChoice::Vfio => (PciDriver::Vfio, "asked for (--pci-driver vfio)".into()),
        DriverChoice::Auto => match bound {
            Some(VFIO_DRIVER) => (PciDriver::Vfio, format!("{bdf} is bound to it")),
            Some(UIO_DRIVER) => (PciDriver::Uio, format!("{bdf} is bound to it")),
            _ => match vfio.usable(bdf) {
                Ok(()) => (
                    PciDriver::Vfio,
                    "vfio-pci is loaded with no-IOMMU mode on".into(),
                ),
                Err(e) => (PciDriver::Uio, format!("vfio-pci is not usable: {e}")),
            },
        },
    }
}

/// Where to find things on the system (a test may point these elsewhere).
#[derive(Debug, Clone)]
pub struct PciOptions {
    /// The sysfs mount (`/sys`).
    pub sysfs: std::path::PathBuf,
    /// Device nodes (`/dev`).
    pub dev: std::path::PathBuf,
    /// Bytes of hugepage memory for rings and buffers.
    pub memory: usize,
    /// The kernel driver to drive the function through.
    pub driver: DriverChoice,
}

impl Default for PciOptions {
    fn default() -> Self {
        Self {
            sysfs: "/sys".into(),
            dev: "/dev".into(),
            memory: 64 << 20,
            driver: DriverChoice::Auto,
        }
    }
}

/// How the function's configuration space and BARs are reached.
enum Access {
    Sysfs,
    Vfio(VfioDevice),
}

impl Access {
    fn config(&self, device: &PciDevice) -> Result<Vec<u8>, String> {
        match self {
            Access::Sysfs => device.config().map_err(|e| e.to_string()),
            Access::Vfio(v) => v.read_config(4096).map_err(|e| e.to_string()),
        }
    }

    fn write_config(&self, device: &PciDevice, offset: u64, data: &[u8]) -> Result<(), String> {
        match self {
            Access::Sysfs => device.write_config(offset, data).map_err(|e| e.to_string()),
            Access::Vfio(v) => v.write_config(offset, data).map_err(|e| e.to_string()),
        }
    }

    /// Maps a BAR; with VFIO, `ranges` (the structures used in it) must lie in its
    /// mmappable parts.
    fn map_bar(&self, device: &PciDevice, bar: u8, ranges: &[BarRange]) -> Result<Mmio, String> {
        match self {
            Access::Sysfs => device.map_bar(bar).map_err(|e| e.to_string()),
            Access::Vfio(v) => {
                let (mmio, info) = v.map_bar(bar).map_err(|e| e.to_string())?;
                match ranges
                    .iter()
                    .find(|r| r.bar == bar && !info.mappable(r.offset, r.len))
                {
                    Some(r) => Err(format!(
                        "BAR {bar}: {r:?} is not in a part VFIO lets us mmap ({:?})",
                        info.mmap
                    )),
                    None => Ok(mmio),
                }
            }
        }
    }
}

/// How the device interrupts the driver.
enum Interrupts {
    /// uio_pci_generic: one INTx for every queue.
    Intx {
        uio: File,
        /// The configuration space: uio_pci_generic masks INTx (the command
        /// register's Interrupt Disable bit) on each interrupt, and the driver unmasks
        /// it here.
        config: File,
        isr: Regs,
    },
    /// vfio-pci: MSI-X, queue `i` on vector `i % vectors.len()`, each vector on its
    /// eventfd.
    Msix {
        vectors: Vec<EventFd>,
        // Last: closing it turns MSI-X off and releases the function.
        _vfio: VfioDevice,
    },
}

impl Interrupts {
    fn vector_of(&self, queue: u16) -> u16 {
        match self {
            Interrupts::Intx { .. } => NO_VECTOR,
            Interrupts::Msix { vectors, .. } => queue % vectors.len() as u16,
        }
    }
}

/// The virtio-pci transport.
pub struct PciTransport {
    // `memory` before `huge`: allocations must go before the mapping does.
    memory: SharedMemory,
    _huge: HugeMemory,
    device: PciDevice,
    driver: PciDriver,
    common: Regs,
    notify: Regs,
    notify_multiplier: u32,
    shm: Option<(*mut u8, usize)>,
    irq: Interrupts,
    /// Notification address of each queue set up.
    notify_at: Vec<Option<u64>>,
    device_features: u64,
    queues: u16,
    max_queue_size: u16,
}

// SAFETY: `shm` points into a BAR mapping owned (through `Regs`' Arc<Mmio>) by this
// value; everything else is Send.
unsafe impl Send for PciTransport {}

impl PciTransport {
    /// Opens the virtio-pci function at `bdf` through the driver `options.driver`
    /// comes to, binding it if it is not (or saying exactly how to), resets it and
    /// reads its features.
    pub fn open(bdf: &str, options: &PciOptions) -> Result<Self, TransportError> {
        let connect = |e: String| TransportError::Connect {
            what: format!("PCI function {bdf}"),
            source: std::io::Error::other(e),
        };
        let device = PciDevice::open(&options.sysfs, bdf).map_err(|e| connect(e.to_string()))?;
        let (vendor, id) = device.id().map_err(|e| connect(e.to_string()))?;
        if vendor != VIRTIO_VENDOR || id < 0x1040 {
            return Err(connect(format!(
                "{vendor:04x}:{id:04x} is not a modern virtio device (1af4:1040 and up)"
            )));
        }
        if id == FS_DEVICE {
            match fs_tag(&device) {
                Some(tag) if tag.starts_with(FS_TAG_PREFIX) => {
                    info!(
                        "{}: virtio-fs with tag {tag:?}: the tunnel in compatibility mode",
                        device.bdf()
                    )
                }
                tag => warn!(
                    "{}: virtio-fs with tag {tag:?}, not starting with {FS_TAG_PREFIX:?}: taken \
                     because it was named",
                    device.bdf()
                ),
            }
        }
        let facts = VfioFacts::read(&options.sysfs, device.bdf());
        let (driver, why) = choose_driver(
            options.driver,
            device.driver().as_deref(),
            &facts,
            device.bdf(),
        );
        info!(
            "{}: driving it through {} ({why})",
            device.bdf(),
            driver.kernel_name()
        );
        let model = NoIommu;
        let access = match driver {
            PciDriver::Uio => {
                device.bind_uio().map_err(|e| connect(e.to_string()))?;
                Access::Sysfs
            }
            PciDriver::Vfio => {
                // Refuse before binding what could not work after it.
                if device.driver().as_deref() != Some(VFIO_DRIVER) {
                    facts
                        .usable(device.bdf())
                        .map_err(|e| connect(e.to_string()))?;
                }
                device
                    .bind(
                        VFIO_DRIVER,
                        "modprobe vfio enable_unsafe_noiommu_mode=1 && modprobe vfio-pci",
                    )
                    .map_err(|e| connect(e.to_string()))?;
                Access::Vfio(
                    VfioDevice::open(&options.sysfs, &options.dev, device.bdf(), &model)
                        .map_err(|e| connect(e.to_string()))?,
                )
            }
        };
        let config = access.config(&device).map_err(connect)?;
        let caps = VirtioCaps::parse(&config).map_err(|e| {
            connect(format!(
                "{e} (the capabilities need 256 bytes of config space: run as root)"
            ))
        })?;
        // Memory decoding and bus mastering on (uio_pci_generic leaves them to us);
        // INTx allowed with uio (with vfio, the driver does not use INTx).
        let cmd = u16::from_le_bytes([config[4], config[5]]) | CMD_MEMORY | CMD_BUS_MASTER;
        let cmd = match driver {
            PciDriver::Uio => cmd & !CMD_INTX_DISABLE,
            PciDriver::Vfio => cmd,
        };
        access
            .write_config(&device, 4, &cmd.to_le_bytes())
            .map_err(connect)?;

        let mut used = vec![caps.common, caps.notify, caps.isr];
        used.extend(
            caps.shared_memory
                .iter()
                .filter(|s| s.id == 0)
                .map(|s| s.range),
        );
        let mut bars: [Option<Arc<Mmio>>; 6] = Default::default();
        let mut regs = |r: BarRange, min_len: u64| -> Result<Regs, TransportError> {
            let slot = &mut bars[usize::from(r.bar)];
            if slot.is_none() {
                *slot = Some(Arc::new(
                    access.map_bar(&device, r.bar, &used).map_err(connect)?,
                ));
            }
            let bar = slot.clone().expect("just mapped");
            let end = r.offset.checked_add(r.len.max(min_len));
            if r.len < min_len || end.is_none_or(|e| e > bar.len() as u64) {
                return Err(connect(format!(
                    "a virtio structure ({r:?}) does not fit BAR {} of {} bytes",
                    r.bar,
                    bar.len()
                )));
            }
            Ok(Regs {
                bar,
                base: r.offset,
            })
        };
        let common_regs = regs(caps.common, common::LEN)?;
        let notify = regs(caps.notify, 2)?;
        let isr = regs(caps.isr, 1)?;
        let shm = match caps.shared_memory.iter().find(|s| s.id == 0) {
            Some(s) => {
                let r = regs(s.range, 1)?;
                let len = usize::try_from(s.range.len).unwrap_or(0);
                let ptr = r.bar.as_ptr().wrapping_add(r.base as usize);
                Some((ptr, len))
            }
            None => None,
        };

        // Reset, then ACKNOWLEDGE and DRIVER.
        common_regs.write8(common::DEVICE_STATUS, 0);
        let deadline = Instant::now() + Duration::from_secs(1);
        while common_regs.read8(common::DEVICE_STATUS) != 0 {
            if Instant::now() > deadline {
                return Err(connect("the device did not finish its reset in 1 s".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        common_regs.write8(common::DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
        // No configuration-change interrupts: the driver does not use them.
        common_regs.write16(common::CONFIG_MSIX_VECTOR, NO_VECTOR);
        let mut device_features = 0u64;
        for half in 0..2u32 {
            common_regs.write32(common::DEVICE_FEATURE_SELECT, half);
            device_features |= u64::from(common_regs.read32(common::DEVICE_FEATURE)) << (32 * half);
        }
        let queues = common_regs.read16(common::NUM_QUEUES);
        common_regs.write16(common::QUEUE_SELECT, 0);
        let max_queue_size = common_regs.read16(common::QUEUE_SIZE);

        let huge = HugeMemory::allocate(options.memory)
            .map_err(|e| TransportError::Memory(std::io::Error::other(e.to_string())))?;
        let (irq, memory, node) = match access {
            Access::Sysfs => {
                let uio_node = device
                    .uio_node(&options.dev)
                    .map_err(|e| connect(e.to_string()))?;
                let uio = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&uio_node)
                    .map_err(|e| connect(format!("{}: {e}", uio_node.display())))?;
                let config_file = device.open_config().map_err(|e| connect(e.to_string()))?;
                // SAFETY: `memory` is dropped before `_huge` (field order).
                let memory = unsafe { huge.shared() };
                let irq = Interrupts::Intx {
                    uio,
                    config: config_file,
                    isr,
                };
                (irq, memory, uio_node.display().to_string())
            }
            Access::Vfio(vfio) => {
                let msix = vfio.msix_info().map_err(|e| connect(e.to_string()))?;
                let available = vfio::msix_vectors(caps.msix.as_ref(), &msix, &used)
                    .map_err(|e| connect(e.to_string()))?;
                // A vector per queue (the configuration vector stays NO_VECTOR);
                // queues share vectors round-robin if there are fewer.
                let n = available.min(queues.max(1));
                let vectors = (0..n)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| connect(format!("eventfd: {e}")))?;
                let fds: Vec<RawFd> = vectors.iter().map(|e| e.as_raw_fd()).collect();
                vfio.set_msix(&fds).map_err(|e| connect(e.to_string()))?;
                let runs = model
                    .dma_runs(vfio.container(), &huge)
                    .map_err(|e| connect(e.to_string()))?;
                // SAFETY: every run lies in `huge`'s mapping, and `memory` is dropped
                // before `_huge` (field order).
                let memory = unsafe { SharedMemory::new(&runs) };
                let node = format!(
                    "{}, {} of {available} MSI-X vectors",
                    model.name(),
                    vectors.len()
                );
                (
                    Interrupts::Msix {
                        vectors,
                        _vfio: vfio,
                    },
                    memory,
                    node,
                )
            }
        };
        info!(
            "{}: virtio device {vendor:04x}:{id:04x} on {} ({node}), {queues} queues of up to \
             {max_queue_size}, features {device_features:#x}, {} MiB of hugepages in {} run(s){}",
            device.bdf(),
            driver.kernel_name(),
            huge.len() >> 20,
            huge.runs(),
            if shm.is_some() {
                ", shared memory region 0"
            } else {
                ""
            }
        );
        Ok(Self {
            memory,
            _huge: huge,
            device,
            driver,
            common: common_regs,
            notify,
            notify_multiplier: caps.notify_multiplier,
            shm,
            irq,
            notify_at: vec![None; usize::from(queues)],
            device_features,
            queues,
            max_queue_size,
        })
    }

    /// The driver in use and how the device interrupts, as `key=value` words:
    /// `driver=uio_pci_generic interrupts=intx` or
    /// `driver=vfio-pci interrupts=msix vectors=N`.
    pub fn summary(&self) -> String {
        match &self.irq {
            Interrupts::Intx { .. } => {
                format!("driver={} interrupts=intx", self.driver.kernel_name())
            }
            Interrupts::Msix { vectors, .. } => format!(
                "driver={} interrupts=msix vectors={}",
                self.driver.kernel_name(),
                vectors.len()
            ),
        }
    }

    /// The function's address.
    pub fn bdf(&self) -> &str {
        self.device.bdf()
    }

    fn status(&self) -> u8 {
        self.common.read8(common::DEVICE_STATUS)
    }

    fn set_status(&self, bits: u8) {
        self.common
            .write8(common::DEVICE_STATUS, self.status() | bits);
    }

    /// Clears the command register's Interrupt Disable bit (bit 2 of byte 5), which
    /// uio_pci_generic sets in its interrupt handler.
    fn unmask_intx(&self) {
        use std::os::unix::fs::FileExt;
        let Interrupts::Intx { config, .. } = &self.irq else {
            return;
        };
        let mut high = [0u8; 1];
        if config.read_exact_at(&mut high, 5).is_ok() && high[0] & 0x04 != 0 {
            high[0] &= !0x04;
            if let Err(e) = config.write_all_at(&high, 5) {
                warn!("{}: unmasking INTx: {e}", self.device.bdf());
            }
        }
    }

    fn fail(&self, step: &'static str, reason: String) -> TransportError {
        self.set_status(FAILED);
        setup(step)(reason)
    }
}

impl Drop for PciTransport {
    fn drop(&mut self) {
        // Reset: the device stops using our memory before it is unmapped.
        self.common.write8(common::DEVICE_STATUS, 0);
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.status() != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        info!("{}: device reset", self.device.bdf());
    }
}

impl Transport for PciTransport {
    fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    fn max_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn negotiate(&mut self, wanted: u64) -> Result<u64, TransportError> {
        let features = self.device_features & wanted;
        for half in 0..2u32 {
            self.common.write32(common::DRIVER_FEATURE_SELECT, half);
            self.common
                .write32(common::DRIVER_FEATURE, (features >> (32 * half)) as u32);
        }
        self.set_status(FEATURES_OK);
        if self.status() & FEATURES_OK == 0 {
            return Err(self.fail(
                "FEATURES_OK",
                format!("the device refused features {features:#x}"),
            ));
        }
        Ok(features)
    }

    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        (desc, avail, used): (u64, u64, u64),
    ) -> Result<(), TransportError> {
        if index >= self.queues {
            return Err(self.fail("queue setup", format!("queue {index} of {}", self.queues)));
        }
        self.common.write16(common::QUEUE_SELECT, index);
        let max = self.common.read16(common::QUEUE_SIZE);
        if max == 0 || size > max {
            return Err(self.fail(
                "queue setup",
                format!("queue {index}: size {size}, device allows {max}"),
            ));
        }
        self.common.write16(common::QUEUE_SIZE, size);
        let vector = self.irq.vector_of(index);
        self.common.write16(common::QUEUE_MSIX_VECTOR, vector);
        let accepted = self.common.read16(common::QUEUE_MSIX_VECTOR);
        if vector != NO_VECTOR && accepted != vector {
            return Err(self.fail(
                "queue setup",
                format!("queue {index}: the device did not take MSI-X vector {vector} (reads {accepted:#x})"),
            ));
        }
        self.common.write64(common::QUEUE_DESC, desc);
        self.common.write64(common::QUEUE_DRIVER, avail);
        self.common.write64(common::QUEUE_DEVICE, used);
        let off = u64::from(self.common.read16(common::QUEUE_NOTIFY_OFF));
        let at = off * u64::from(self.notify_multiplier);
        if at + 2 > self.notify.bar.len() as u64 - self.notify.base {
            return Err(self.fail(
                "queue setup",
                format!("queue {index}: notify offset {at:#x} outside the BAR"),
            ));
        }
        self.notify_at[usize::from(index)] = Some(at);
        self.common.write16(common::QUEUE_ENABLE, 1);
        Ok(())
    }

    fn start(&mut self) -> Result<(), TransportError> {
        self.set_status(DRIVER_OK);
        self.unmask_intx();
        if self.status() & FAILED != 0 {
            return Err(setup("DRIVER_OK")("the device failed".into()));
        }
        Ok(())
    }

    fn notify(&self, index: u16) {
        match self.notify_at.get(usize::from(index)).copied().flatten() {
            Some(at) => self.notify.write16(at, index),
            None => warn!("notify of queue {index}, which is not set up"),
        }
    }

    fn interrupt_fd(&self, index: u16) -> RawFd {
        match &self.irq {
            // One INTx for every queue.
            Interrupts::Intx { uio, .. } => uio.as_raw_fd(),
            Interrupts::Msix { vectors, .. } => {
                vectors[usize::from(self.irq.vector_of(index))].as_raw_fd()
            }
        }
    }

    fn ack_interrupt(&self, index: u16) {
        match &self.irq {
            Interrupts::Intx { uio, isr, .. } => {
                let mut count = [0u8; 4];
                let _ = std::io::Read::read(&mut &*uio, &mut count);
                // Reading the ISR status acknowledges the device's interrupt and lowers
                // INTx; then INTx is unmasked again (uio_pci_generic masks it in its
                // handler, and has no irqcontrol: writes to the UIO device do not
                // unmask).
                let _ = isr.read8(0);
                self.unmask_intx();
            }
            // MSI-X is edge-triggered and needs no acknowledgement at the device:
            // clearing the eventfd is all.
            Interrupts::Msix { vectors, .. } => {
                let _ = vectors[usize::from(self.irq.vector_of(index))].read();
            }
        }
    }

    fn shared_memory(&self) -> Option<(*mut u8, usize)> {
        self.shm
    }
}

#[cfg(test)]
mod tests {
    use super::caps::testing::*;
    use super::*;

    /// A fake sysfs function: IDs, a configuration space with the virtio capabilities
    /// (device configuration at BAR 4 + 0x2000) and BAR 4 holding `tag`.
    fn function(root: &Path, bdf: &str, device: u16, tag: &str) {
        let dir = root.join("bus/pci/devices").join(bdf);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vendor"), "0x1af4\n").unwrap();
        std::fs::write(dir.join("device"), format!("{device:#06x}\n")).unwrap();
        let config = space(&[
            vcap(COMMON, 4, 0, 0, 0x38, &[]),
            vcap(ISR, 4, 0, 0x1000, 1, &[]),
            vcap(DEVICE, 4, 0, 0x2000, 0x28, &[]),
            vcap(NOTIFY, 4, 0, 0x3000, 0x1000, &4u32.to_le_bytes()),
        ]);
        std::fs::write(dir.join("config"), config).unwrap();
        let mut bar = vec![0u8; 0x4000];
        bar[0x2000..0x2000 + tag.len()].copy_from_slice(tag.as_bytes());
        std::fs::write(dir.join("resource4"), bar).unwrap();
    }

    /// `--pci-driver auto` keeps the driver the function is bound to, else takes vfio
    /// when it is usable, else uio, and says why; explicit choices are kept.
    #[test]
    fn driver_choice() {
        let bdf = "0000:00:03.0";
        let usable = VfioFacts {
            driver_loaded: true,
            noiommu: Some(true),
            group: None,
        };
        let off = VfioFacts {
            noiommu: Some(false),
            ..usable.clone()
        };
        let auto = DriverChoice::Auto;
        assert_eq!(choose_driver(auto, None, &usable, bdf).0, PciDriver::Vfio);
        assert_eq!(
            choose_driver(auto, Some("virtio-pci"), &usable, bdf).0,
            PciDriver::Vfio
        );
        let (d, why) = choose_driver(auto, None, &off, bdf);
        assert_eq!(d, PciDriver::Uio);
        assert!(why.contains("no-IOMMU mode is not enabled"), "{why}");
        assert_eq!(
            choose_driver(auto, Some(UIO_DRIVER), &usable, bdf).0,
            PciDriver::Uio
        );
        assert_eq!(
            choose_driver(auto, Some(VFIO_DRIVER), &off, bdf).0,
            PciDriver::Vfio
        );
        assert_eq!(
            choose_driver(DriverChoice::Vfio, None, &off, bdf).0,
            PciDriver::Vfio
        );
        assert_eq!(
            choose_driver(DriverChoice::Uio, None, &usable, bdf).0,
            PciDriver::Uio
        );
        assert_eq!("vfio".parse::<DriverChoice>(), Ok(DriverChoice::Vfio));
        assert!("vfio-noiommu".parse::<DriverChoice>().is_err());
    }

    /// `--pci auto` takes the virtio-fs function tagged "vfu..." and leaves a real
    /// virtio-fs alone; with two candidates it refuses and names them; with none it
    /// says what it looked for and what it saw.
    #[test]
    fn finds_the_tunnel_by_id_and_tag() {
        let root = std::env::temp_dir().join(format!("vfu-find-{}", std::process::id()));
        function(&root, "0000:00:03.0", FS_DEVICE, "shared-docs");
        let none = find_tunnel(&root).unwrap_err().to_string();
        assert!(
            none.contains("0000:00:03.0 (virtio-fs, tag Some(\"shared-docs\"))"),
            "{none}"
        );
        function(&root, "0000:00:04.0", FS_DEVICE, "vfu-tunnel");
        assert_eq!(find_tunnel(&root).unwrap(), "0000:00:04.0");
        function(&root, "0000:00:05.0", TUNNEL_DEVICE, "");
        let two = find_tunnel(&root).unwrap_err().to_string();
        assert!(two.contains("0000:00:04.0, 0000:00:05.0"), "{two}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
