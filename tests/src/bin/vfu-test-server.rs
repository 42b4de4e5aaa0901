//! `vfu-test-server SOCKET`: a small PCI device served by the `vfio_user` crate's
//! `Server` (crates.io), an unmodified vfio-user server for the bridge's tests
//! (`vfu-guest --bridge NAME=SOCKET`). It serves one client at a time and takes the
//! next when one leaves; device state (registers, buffer, BAR 2) outlives clients,
//! DMA maps and interrupt eventfds do not (as the spec says of a disconnect).
//!
//! BAR 0 (8 KiB, registers at 0, a 4 KiB buffer at 0x1000):
//!
//! | offset | register |
//! |---|---|
//! | 0x00 | ID, reads `0x5646_5531` |
//! | 0x04 | SCRATCH, read-write |
//! | 0x08 | DMA_ADDR (64-bit: low word, then high word at 0x0c) |
//! | 0x10 | DMA_LEN (at most 4096) |
//! | 0x14 | DMA_CMD: write 1 = copy client memory at DMA_ADDR into the buffer, 2 = copy the buffer to client memory; then MSI-X vector 0 fires. 3 and 4 do the same in-band without checking the maps first (a server that misbehaves: the client's side must refuse) |
//! | 0x18 | DMA_STATUS: 0, or the errno of the last DMA |
//! | 0x1c | DMA_PATH: how the last DMA went: 1 through the fd the client mapped (mmap), 2 in-band (DMA_READ / DMA_WRITE on the socket) |
//! | 0x20 | IRQ_RAISE: write a vector: signals MSI-X vector's eventfd |
//! | 0x24 | NUM_MAPS: DMA maps held now |
//! | 0x28 | NUM_IRQ_FDS: interrupt eventfds held now |
//! | 0x2c | CLIENTS: connections accepted so far |
//!
//! BAR 2: 16 KiB of memory the client may mmap (the region's fd, one sparse area), or
//! read and write with REGION_READ / REGION_WRITE. Config space (region 7): 256 bytes,
//! vendor 0x1af4, device 0x10f0. IRQs: INTx (1), MSI (1), MSI-X (4).
//!
//! The crate has no API for a server's DMA_READ / DMA_WRITE (its server only takes
//! DMA_MAP's fd), so for memory mapped without an fd this program sends them on the
//! crate's connection itself, from inside the REGION_WRITE callback (the crate's loop
//! is waiting for that callback, so nothing else reads the socket meanwhile), and
//! reads the reply that comes next, as libvfio-user does.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};
use vfu_proto::transport::{Frame, Limits, MessageReader};
use vfu_proto::vfio_user::{
    encode_request, pci_irq, CountWidth, DmaAccess, DmaWrite, Reply, Request, IRQ_INFO_EVENTFD,
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};

const BAR0_SIZE: u64 = 0x2000;
const BUF: u64 = 0x1000;
const BUF_SIZE: usize = 4096;
const BAR2_SIZE: u64 = 0x4000;
const ID: u32 = 0x5646_5531;

/// Path of the last DMA.
const PATH_MMAP: u32 = 1;
const PATH_IN_BAND: u32 = 2;

struct Map {
    size: u64,
    write: bool,
    /// The client's fd and the offset of the map in it.
    fd: Option<(File, u64)>,
}

struct Device {
    socket: PathBuf,
    scratch: u32,
    dma_addr: u64,
    dma_len: u32,
    dma_status: u32,
    dma_path: u32,
    buf: Vec<u8>,
    bar2: File,
    config: [u8; 256],
    maps: BTreeMap<u64, Map>,
    irqs: BTreeMap<(u32, u32), File>,
    clients: u32,
    next_id: u16,
}

fn io_err(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}

impl Device {
    fn reg_read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => ID,
            0x04 => self.scratch,
            0x08 => self.dma_addr as u32,
            0x0c => (self.dma_addr >> 32) as u32,
            0x10 => self.dma_len,
            0x18 => self.dma_status,
            0x1c => self.dma_path,
            0x24 => self.maps.len() as u32,
            0x28 => self.irqs.len() as u32,
            0x2c => self.clients,
            _ => 0,
        }
    }

    fn reg_write(&mut self, offset: u64, v: u32) {
        match offset {
            0x04 => self.scratch = v,
            0x08 => self.dma_addr = (self.dma_addr & !0xffff_ffff) | u64::from(v),
            0x0c => self.dma_addr = (self.dma_addr & 0xffff_ffff) | u64::from(v) << 32,
            0x10 => self.dma_len = v.min(BUF_SIZE as u32),
            0x14 => {
                let result = match v {
                    3 | 4 => {
                        self.dma_path = PATH_IN_BAND;
                        let (addr, len) = (self.dma_addr, self.dma_len as usize);
                        self.in_band(addr, len, v == 4)
                    }
                    _ => self.dma(v == 2),
                };
                self.dma_status = match result {
                    Ok(()) => 0,
                    Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
                };
                self.raise(0);
            }
            0x20 => self.raise(v),
            _ => {}
        }
    }

    fn raise(&self, vector: u32) {
        if let Some(f) = self.irqs.get(&(pci_irq::MSIX, vector)) {
            let _ = (&*f).write(&1u64.to_ne_bytes());
        }
    }

    /// The map holding `len` bytes at `iova`.
    fn map_of(&self, iova: u64, len: u64) -> Option<(u64, &Map)> {
        let (&start, map) = self.maps.range(..=iova).next_back()?;
        (iova + len <= start + map.size).then_some((start, map))
    }

    /// DMA between the buffer and client memory: `to_client` writes client memory.
    fn dma(&mut self, to_client: bool) -> std::io::Result<()> {
        let (addr, len) = (self.dma_addr, self.dma_len as usize);
        let (start, map) = self.map_of(addr, len as u64).ok_or(io_err(libc::EFAULT))?;
        if to_client && !map.write {
            return Err(io_err(libc::EPERM));
        }
        let path = if map.fd.is_some() {
            PATH_MMAP
        } else {
            PATH_IN_BAND
        };
        if let Some((file, offset)) = &map.fd {
            let at = offset + (addr - start);
            let prot = if map.write {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            // SAFETY: a new shared mapping of the client's fd, checked, unmapped below;
            // the copies stay within the `len` bytes mapped.
            unsafe {
                let page = at & !0xfff;
                let span = (at - page) as usize + len;
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    span,
                    prot,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    page as i64,
                );
                if p == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                let mem = (p as *mut u8).add((at - page) as usize);
                if to_client {
                    std::ptr::copy_nonoverlapping(self.buf.as_ptr(), mem, len);
                } else {
                    std::ptr::copy_nonoverlapping(mem, self.buf.as_mut_ptr(), len);
                }
                libc::munmap(p, span);
            }
            self.dma_path = path;
            return Ok(());
        }
        self.dma_path = path;
        self.in_band(addr, len, to_client)
    }

    /// DMA_READ / DMA_WRITE on the client's connection; the reply is the next message.
    fn in_band(&mut self, addr: u64, len: usize, to_client: bool) -> std::io::Result<()> {
        let fd = connection_fd(&self.socket).ok_or(io_err(libc::ENOTCONN))?;
        // SAFETY: the fd is the crate's open connection, which outlives this call; the
        // stream is never dropped (so the fd is not closed here).
        let sock = ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let req = if to_client {
            Request::DmaWrite(DmaWrite {
                address: addr,
                data: self.buf[..len].to_vec(),
                width: CountWidth::U64,
            })
        } else {
            Request::DmaRead(DmaAccess {
                address: addr,
                count: len as u64,
                width: CountWidth::U64,
            })
        };
        (&*sock).write_all(&encode_request(id, &req, false))?;
        let mut reader = MessageReader::new(Limits::DEFAULT);
        let msg = match reader.read(&sock) {
            Ok(Some(Frame::Message(m))) => m,
            _ => return Err(io_err(libc::EIO)),
        };
        if msg.header.msg_id != id {
            return Err(io_err(libc::EPROTO));
        }
        if let Some(e) = msg.header.error {
            return Err(io_err(e as i32));
        }
        match Reply::decode(msg.header.command, &msg.payload, 0) {
            Ok(Reply::DmaRead(r)) if !to_client && r.data.len() == len => {
                self.buf[..len].copy_from_slice(&r.data);
                Ok(())
            }
            Ok(Reply::DmaWrite(_)) if to_client => Ok(()),
            _ => Err(io_err(libc::EIO)),
        }
    }
}

/// The accepted connection on `socket`: a connected (not listening) socket of this
/// process whose local address is that path.
fn connection_fd(socket: &Path) -> Option<RawFd> {
    for entry in std::fs::read_dir("/proc/self/fd").ok()? {
        let Some(fd) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: plain queries on a descriptor number into local, correctly sized
        // buffers; a stale number only makes them fail.
        unsafe {
            let mut listening: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len,
            ) != 0
                || listening != 0
            {
                continue;
            }
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            let mut alen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut alen) != 0
                || addr.sun_family != libc::AF_UNIX as libc::sa_family_t
            {
                continue;
            }
            let path: Vec<u8> = addr
                .sun_path
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            if path == socket.as_os_str().as_bytes() {
                return Some(fd);
            }
        }
    }
    None
}

impl ServerBackend for Device {
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), std::io::Error> {
        match region {
            0 if offset >= BUF && offset + data.len() as u64 <= BAR0_SIZE => {
                let at = (offset - BUF) as usize;
                data.copy_from_slice(&self.buf[at..at + data.len()]);
            }
            0 if offset & 3 == 0 && data.len() <= 4 => {
                let v = self.reg_read(offset).to_le_bytes();
                data.copy_from_slice(&v[..data.len()]);
            }
            2 if offset + data.len() as u64 <= BAR2_SIZE => {
                self.bar2.read_exact_at(data, offset)?
            }
            7 if offset + data.len() as u64 <= 256 => {
                data.copy_from_slice(&self.config[offset as usize..offset as usize + data.len()])
            }
            _ => return Err(io_err(libc::EINVAL)),
        }
        Ok(())
    }

    fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), std::io::Error> {
        match region {
            0 if offset >= BUF && offset + data.len() as u64 <= BAR0_SIZE => {
                let at = (offset - BUF) as usize;
                self.buf[at..at + data.len()].copy_from_slice(data);
            }
            0 if offset & 3 == 0 && data.len() == 4 => self.reg_write(
                offset,
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            ),
            2 if offset + data.len() as u64 <= BAR2_SIZE => self.bar2.write_all_at(data, offset)?,
            7 => {} // config space writes are ignored
            _ => return Err(io_err(libc::EINVAL)),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        if self.maps.contains_key(&address) {
            return Err(io_err(libc::EEXIST));
        }
        self.maps.insert(
            address,
            Map {
                size,
                write: flags.contains(DmaMapFlags::WRITE),
                fd: fd.map(|f| (f, offset)),
            },
        );
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), std::io::Error> {
        // The crate reads UNMAP_ALL (0x2 on the wire) as its bit 1; take either.
        if flags.bits() & 0x6 != 0 {
            self.maps.clear();
            return Ok(());
        }
        match self.maps.get(&address) {
            Some(m) if m.size == size => {
                self.maps.remove(&address);
                Ok(())
            }
            _ => Err(io_err(libc::ENOENT)),
        }
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        self.scratch = 0;
        self.dma_addr = 0;
        self.dma_len = 0;
        self.dma_status = 0;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        if flags & IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(()); // masking is not modelled
        }
        if flags & IRQ_SET_DATA_NONE != 0 && count == 0 {
            self.irqs.retain(|&(i, _), _| i != index);
        } else if flags & IRQ_SET_DATA_EVENTFD != 0 {
            if !fds.is_empty() && fds.len() != count as usize {
                return Err(io_err(libc::EINVAL));
            }
            for v in start..start + count {
                self.irqs.remove(&(index, v));
            }
            for (i, f) in fds.into_iter().enumerate() {
                self.irqs.insert((index, start + i as u32), f);
            }
        } else if flags & IRQ_SET_DATA_NONE != 0 {
            for v in start..start + count {
                if let Some(f) = self.irqs.get(&(index, v)) {
                    let _ = (&*f).write(&1u64.to_ne_bytes());
                }
            }
        }
        Ok(())
    }
}

fn region(index: u32, flags: u32, size: u64) -> ServerRegion {
    ServerRegion {
        region_info: vfio_region_info {
            argsz: 32,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: memfd_create with a valid C string; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"vfu-test-server-bar2".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nobody else.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size)?;
    Ok(f)
}

fn main() {
    let Some(socket) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: vfu-test-server SOCKET");
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(&socket);
    let bar2 = memfd(BAR2_SIZE).expect("memfd for BAR 2");
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let mut regions: Vec<ServerRegion> = (0..9).map(|i| region(i, 0, 0)).collect();
    regions[0] = region(0, rw, BAR0_SIZE);
    regions[2] = region(2, rw | VFIO_REGION_INFO_FLAG_MMAP, BAR2_SIZE);
    regions[2].sparse_areas = vec![SparseArea {
        area: vfio_region_sparse_mmap_area {
            offset: 0,
            size: BAR2_SIZE,
        },
    }];
    regions[2].mmap_fd = Some(bar2.as_raw_fd());
    regions[7] = region(7, rw, 256);
    let irqs = vec![
        IrqInfo {
            index: pci_irq::INTX,
            flags: IRQ_INFO_EVENTFD,
            count: 1,
        },
        IrqInfo {
            index: pci_irq::MSI,
            flags: IRQ_INFO_EVENTFD,
            count: 1,
        },
        IrqInfo {
            index: pci_irq::MSIX,
            flags: IRQ_INFO_EVENTFD,
            count: 4,
        },
    ];
    let mut config = [0u8; 256];
    config[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    config[2..4].copy_from_slice(&0x10f0u16.to_le_bytes());
    // `resettable` is inverted in the crate: false makes it announce RESET.
    let server = Server::new(&socket, false, irqs, regions).expect("listen on the socket");
    let mut dev = Device {
        socket: socket.clone(),
        scratch: 0,
        dma_addr: 0,
        dma_len: 0,
        dma_status: 0,
        dma_path: 0,
        buf: vec![0; BUF_SIZE],
        bar2,
        config,
        maps: BTreeMap::new(),
        irqs: BTreeMap::new(),
        clients: 0,
        next_id: 0x8000,
    };
    eprintln!("vfu-test-server: listening on {}", socket.display());
    loop {
        dev.clients += 1;
        if let Err(e) = server.run(&mut dev) {
            eprintln!("vfu-test-server: connection ended: {e}");
        }
        // A client that leaves takes its maps and interrupt assignments with it.
        dev.maps.clear();
        dev.irqs.clear();
    }
}
