//! A PCI function as Linux shows it in sysfs: configuration space, driver binding,
//! BARs (mmapped resource files) and its UIO device.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

/// The driver that gives userspace a PCI function without an IOMMU.
pub const UIO_DRIVER: &str = "uio_pci_generic";

/// Something about the PCI function is not as needed.
#[derive(Debug, Error)]
pub enum PciError {
    /// Not of the form `DDDD:BB:DD.F` (the domain may be left out).
    #[error("{0:?} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:04.0)")]
    BadAddress(String),
    /// No such function.
    #[error("no PCI function {0} (ls /sys/bus/pci/devices lists them)")]
    NotFound(String),
    /// A sysfs file could not be read or written.
    #[error("{path}: {source}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The function is not bound to the driver wanted and could not be bound here.
    #[error(
        "{bdf} is bound to {driver:?}, not {wanted}, and binding it failed ({reason}); as root run:\n  \
         {load}\n  \
         echo {wanted} > /sys/bus/pci/devices/{bdf}/driver_override\n  \
         echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind   # if bound\n  \
         echo {bdf} > /sys/bus/pci/drivers_probe"
    )]
    NotBound {
        /// The function.
        bdf: String,
        /// Its driver, if any.
        driver: Option<String>,
        /// The driver wanted.
        wanted: &'static str,
        /// The command that loads it.
        load: &'static str,
        /// What failed.
        reason: String,
    },
    /// A BAR cannot be mapped.
    #[error("BAR {bar} of {bdf}: {reason}")]
    Bar {
        /// The function.
        bdf: String,
        /// The BAR.
        bar: u8,
        /// Why.
        reason: String,
    },
}

/// Normalises a PCI address to `DDDD:BB:DD.F`.
pub fn parse_bdf(s: &str) -> Result<String, PciError> {
    let bad = || PciError::BadAddress(s.to_string());
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let (rest, func) = full.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let [domain, bus, dev] = parts[..] else {
        return Err(bad());
    };
    let hex = |p: &str, width: usize, max: u32| {
        (p.len() == width && p.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(p, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
    };
    let (Some(d), Some(b), Some(v)) =
        (hex(domain, 4, 0xffff), hex(bus, 2, 0xff), hex(dev, 2, 0x1f))
    else {
        return Err(bad());
    };
    let f = hex(func, 1, 7).ok_or_else(bad)?;
    Ok(format!("{d:04x}:{b:02x}:{v:02x}.{f:x}"))
}

/// One PCI function under a sysfs root (`/sys` on a real system).
#[derive(Debug, Clone)]
pub struct PciDevice {
    sysfs: PathBuf,
    bdf: String,
    dir: PathBuf,
}

fn sysfs_err(path: &Path) -> impl FnOnce(std::io::Error) -> PciError + '_ {
    move |source| PciError::Sysfs {
        path: path.to_path_buf(),
        source,
    }
}

impl PciDevice {
    /// The function at `bdf` under `sysfs`.
    pub fn open(sysfs: &Path, bdf: &str) -> Result<Self, PciError> {
        let bdf = parse_bdf(bdf)?;
        let dir = sysfs.join("bus/pci/devices").join(&bdf);
        if !dir.exists() {
            return Err(PciError::NotFound(bdf));
        }
        Ok(Self {
            sysfs: sysfs.to_path_buf(),
            bdf,
            dir,
        })
    }

    /// Its address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    fn read_hex(&self, name: &str) -> Result<u32, PciError> {
        let path = self.dir.join(name);
        let s = std::fs::read_to_string(&path).map_err(sysfs_err(&path))?;
        let s = s.trim().trim_start_matches("0x");
        u32::from_str_radix(s, 16).map_err(|e| PciError::Sysfs {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Vendor and device IDs.
    pub fn id(&self) -> Result<(u16, u16), PciError> {
        Ok((
            self.read_hex("vendor")? as u16,
            self.read_hex("device")? as u16,
        ))
    }

    /// The configuration space as far as this process may read it (256 bytes at least
    /// for root; 64 for others).
    pub fn config(&self) -> Result<Vec<u8>, PciError> {
        let path = self.dir.join("config");
        std::fs::read(&path).map_err(sysfs_err(&path))
    }

    /// The configuration space file, open for reading and writing (to keep open for
    /// frequent accesses).
    pub fn open_config(&self) -> Result<File, PciError> {
        let path = self.dir.join("config");
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(sysfs_err(&path))
    }

    /// Writes configuration space bytes at `offset`.
    pub fn write_config(&self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let path = self.dir.join("config");
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(sysfs_err(&path))?;
        f.write_all_at(data, offset).map_err(sysfs_err(&path))
    }

    /// The driver bound now, if any.
    pub fn driver(&self) -> Option<String> {
        let link = std::fs::read_link(self.dir.join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), String> {
        std::fs::write(path, value)
            .map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
    }

    /// Binds the function to uio_pci_generic (driver_override, unbind, probe) unless it
    /// is already; says exactly what it did.
    pub fn bind_uio(&self) -> Result<(), PciError> {
        self.bind(UIO_DRIVER, "modprobe uio_pci_generic")
    }

    /// Binds the function to `driver` (driver_override, unbind, probe) unless it is
    /// already; `load` is the command that loads the driver, for the error message.
    pub fn bind(&self, driver: &'static str, load: &'static str) -> Result<(), PciError> {
        let before = self.driver();
        if before.as_deref() == Some(driver) {
            return Ok(());
        }
        let fail = |reason: String| PciError::NotBound {
            bdf: self.bdf.clone(),
            driver: before.clone(),
            wanted: driver,
            load,
            reason,
        };
        if !self.sysfs.join("bus/pci/drivers").join(driver).exists() {
            return Err(fail(format!("the {driver} module is not loaded")));
        }
        self.write(&self.dir.join("driver_override"), driver)
            .map_err(fail)?;
        if let Some(old) = &before {
            info!("{}: unbinding from {old}", self.bdf);
            self.write(&self.dir.join("driver/unbind"), &self.bdf)
                .map_err(fail)?;
        }
        self.write(&self.sysfs.join("bus/pci/drivers_probe"), &self.bdf)
            .map_err(fail)?;
        match self.driver() {
            Some(d) if d == driver => {
                info!("{}: bound to {driver} (driver_override)", self.bdf);
                Ok(())
            }
            other => Err(fail(format!(
                "after probing it is bound to {other:?} (dmesg says why)"
            ))),
        }
    }

    /// The function's UIO device node (`/dev/uioN`), once bound to uio_pci_generic.
    pub fn uio_node(&self, dev: &Path) -> Result<PathBuf, PciError> {
        let path = self.dir.join("uio");
        let mut entries = std::fs::read_dir(&path)
            .map_err(sysfs_err(&path))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("uio"))
            .collect::<Vec<_>>();
        entries.sort();
        let name = entries.into_iter().next().ok_or_else(|| PciError::Sysfs {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no uio device"),
        })?;
        Ok(dev.join(name))
    }

    /// Maps BAR `bar` (its `resourceN` file) read-write.
    pub fn map_bar(&self, bar: u8) -> Result<Mmio, PciError> {
        let err = |reason: String| PciError::Bar {
            bdf: self.bdf.clone(),
            bar,
            reason,
        };
        let path = self.dir.join(format!("resource{bar}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let len = usize::try_from(len).map_err(|_| err("too large".into()))?;
        if len == 0 {
            return Err(err("not a memory BAR".into()));
        }
        Mmio::map(&file, len).map_err(|e| err(format!("mmap: {e}")))
    }
}

/// A mapped BAR: device registers, accessed with volatile loads and stores of their
/// width. Accesses outside it are ignored (reads give 0); offsets come from
/// capabilities checked against its length.
#[derive(Debug)]
pub struct Mmio {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value; device registers are accessed with
// volatile operations only, which are safe from any thread.
unsafe impl Send for Mmio {}
// SAFETY: as above.
unsafe impl Sync for Mmio {}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping created in `map`, which nothing else refers to.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

macro_rules! accessors {
    ($($read:ident $write:ident $t:ty),*) => {$(
        /// Volatile read at `offset` (0 outside the mapping or misaligned).
        pub fn $read(&self, offset: u64) -> $t {
            match self.at::<$t>(offset) {
                // SAFETY: `at` checked that the access lies inside the mapping and is
                // aligned.
                Some(p) => unsafe { std::ptr::read_volatile(p) },
                None => 0,
            }
        }
        /// Volatile write at `offset` (ignored outside the mapping or misaligned).
        pub fn $write(&self, offset: u64, value: $t) {
            if let Some(p) = self.at::<$t>(offset) {
                // SAFETY: as in the read.
                unsafe { std::ptr::write_volatile(p, value) }
            }
        }
    )*};
}

impl Mmio {
    fn map(file: &File, len: usize) -> std::io::Result<Self> {
        Self::map_fd(file.as_raw_fd(), 0, len)
    }

    /// Maps `len` bytes of `fd` at `offset` read-write (a resource file, or a VFIO
    /// device fd at a region's offset).
    pub(super) fn map_fd(fd: RawFd, offset: u64, len: usize) -> std::io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of an fd the caller opened read-write, at an
        // address the kernel picks; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Reserves `len` bytes of address space and maps only `areas` (offset, length
    /// inside the region) of `fd` at `offset` into it; the rest stays inaccessible
    /// (PROT_NONE), so callers must keep their accesses inside the areas.
    pub(super) fn map_fd_areas(
        fd: RawFd,
        offset: u64,
        len: usize,
        areas: &[(u64, u64)],
    ) -> std::io::Result<Self> {
        // SAFETY: an anonymous, inaccessible reservation at an address the kernel
        // picks; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // From here on, dropping `mmio` unmaps the whole reservation.
        let mmio = Self {
            ptr: ptr as *mut u8,
            len,
        };
        for &(at, size) in areas {
            let inside = at.checked_add(size).is_some_and(|end| end <= len as u64);
            let file_off = offset
                .checked_add(at)
                .and_then(|o| libc::off_t::try_from(o).ok());
            let (true, Some(file_off)) = (inside, file_off) else {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            };
            // SAFETY: replaces pages of our own reservation (checked to lie inside it)
            // with a shared mapping of the fd; the result is checked.
            let p = unsafe {
                libc::mmap(
                    mmio.ptr.add(at as usize) as *mut libc::c_void,
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    file_off,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(mmio)
    }

    /// Where it is mapped (for memory the driver reads with volatile copies, like a
    /// shared memory region).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never, once mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at<T>(&self, offset: u64) -> Option<*mut T> {
        let off = usize::try_from(offset).ok()?;
        let end = off.checked_add(std::mem::size_of::<T>())?;
        if end > self.len || off % std::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: off + size_of::<T>() <= len, inside the mapping.
        Some(unsafe { self.ptr.add(off) } as *mut T)
    }

    accessors!(read8 write8 u8, read16 write16 u16, read32 write32 u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses are normalised (domain added, lower case); anything else is refused.
    #[test]
    fn bdf_parsing() {
        assert_eq!(parse_bdf("00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(parse_bdf("0000:0A:1f.7").unwrap(), "0000:0a:1f.7");
        for bad in [
            "",
            "4.0",
            "00:04",
            "0000:00:20.0",
            "00:04.8",
            "x0:04.0",
            "0:00:04.0",
            "0000:00:04.0.1",
        ] {
            assert!(parse_bdf(bad).is_err(), "{bad:?}");
        }
    }

    /// A region mapped in parts (a sparse mmap around an MSI-X table) shows the file
    /// at the parts' offsets, at the right place in one range of addresses.
    #[test]
    fn map_in_areas() {
        let page = 4096usize;
        // SAFETY: creates a memfd with a static, NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vfu-areas".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a new fd owned by nobody else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut data = vec![0u8; 4 * page];
        for (i, chunk) in data.chunks_mut(page).enumerate() {
            chunk[0] = i as u8 + 1;
        }
        file.write_all_at(&data, 0).unwrap();
        // The region starts at page 1 of the file; its pages 0 and 2 are mappable.
        let mmio = Mmio::map_fd_areas(
            file.as_raw_fd(),
            page as u64,
            3 * page,
            &[(0, page as u64), (2 * page as u64, page as u64)],
        )
        .unwrap();
        assert_eq!(mmio.len(), 3 * page);
        assert_eq!(mmio.read8(0), 2);
        assert_eq!(mmio.read8(2 * page as u64), 4);
        mmio.write8(2 * page as u64 + 1, 0xab);
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 3 * page as u64 + 1).unwrap();
        assert_eq!(b, [0xab], "shared with the file");
        assert!(Mmio::map_fd_areas(file.as_raw_fd(), 0, page, &[(0, 2 * page as u64)]).is_err());
    }

    /// Against a fake sysfs: IDs are read, a missing function is named, and binding to
    /// a driver that is not loaded fails with the exact commands to run.
    #[test]
    fn fake_sysfs() {
        let root = std::env::temp_dir().join(format!("vfu-sysfs-{}", std::process::id()));
        let dir = root.join("bus/pci/devices/0000:00:04.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vendor"), "0x1af4\n").unwrap();
        std::fs::write(dir.join("device"), "0x105a\n").unwrap();
        let dev = PciDevice::open(&root, "00:04.0").unwrap();
        assert_eq!(dev.id().unwrap(), (0x1af4, 0x105a));
        assert_eq!(dev.driver(), None);
        assert!(matches!(
            PciDevice::open(&root, "00:05.0"),
            Err(PciError::NotFound(b)) if b == "0000:00:05.0"
        ));
        let err = dev.bind_uio().unwrap_err().to_string();
        assert!(err.contains("module is not loaded"), "{err}");
        assert!(
            err.contains(
                "echo uio_pci_generic > /sys/bus/pci/devices/0000:00:04.0/driver_override"
            ),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
