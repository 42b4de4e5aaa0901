//! Interop with the `vfio_user` crate from crates.io (rust-vmm), an independent
//! implementation: its Client against a small server built on vfu-proto, and a client
//! built on vfu-proto against its Server, over real UNIX sockets with real fds.
//!
//! The crate is lax (it ignores the ERROR flag, inverts `resettable`, and has DMA_UNMAP
//! flag bits off by one; see `docs/protocol.md`), so these tests stay on the commands it
//! implements correctly and check behaviour on our side of the wire.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfu_proto::transport::{Frame, Limits, MessageReader, MessageWriter};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, encode_request, pci_irq, Capabilities, DeviceInfo, DmaMap,
    DmaUnmap, GetInfoRequest, Header, IrqData, IrqInfo, RegionAccess, RegionInfo, RegionReadReply,
    RegionWrite, Reply, Request, SetIrqs, Version, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET,
    IRQ_INFO_EVENTFD, IRQ_SET_ACTION_TRIGGER, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::EventFd;

const BAR0_SIZE: usize = 4096;
const MSIX_VECTORS: u32 = 4;

fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfu-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// A memfd holding `content` at `offset`, standing in for guest memory.
fn memfd_with(offset: u64, content: &[u8]) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"vfu-interop".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(offset + 0x1000).unwrap();
    f.write_all_at(content, offset).unwrap();
    f
}

fn eventfd_count(e: &EventFd) -> u64 {
    e.read().unwrap()
}

// ---- a small vfio-user server on vfu-proto ----------------------------------------

/// What the vfu-proto test server saw, for the test to check.
#[derive(Default)]
struct Seen {
    dma: HashMap<u64, (u64, File)>,
    unmapped: Vec<u64>,
    irq_fds: usize,
    resets: usize,
}

/// A device with BAR0 as 4 KiB of memory and MSI-X with 4 vectors; everything a client
/// asks is answered from the typed decoders.
fn serve_one_client(listener: UnixListener, seen: Arc<Mutex<Seen>>) {
    let (sock, _) = listener.accept().unwrap();
    let limits = Limits {
        max_msg_fds: 8,
        ..Limits::DEFAULT
    };
    let mut reader = MessageReader::new(limits);
    let mut writer = MessageWriter::new(limits);
    let mut bar0 = vec![0u8; BAR0_SIZE];
    loop {
        let msg = match reader.read(&sock) {
            Ok(Some(Frame::Message(m))) => m,
            Ok(Some(Frame::Rejected(r))) => {
                let e = encode_error_reply(&r.header, r.error.errno());
                writer.send_blocking(&sock, e, vec![]).unwrap();
                continue;
            }
            Ok(None) => unreachable!("blocking socket"),
            Err(_) => return, // client went away
        };
        let h = msg.header;
        let req = match Request::decode(h.command, &msg.payload, msg.fds.len()) {
            Ok(r) => r,
            Err(e) => {
                writer
                    .send_blocking(&sock, encode_error_reply(&h, e.errno()), vec![])
                    .unwrap();
                continue;
            }
        };
        let mut fds = msg.fds.into_iter();
        let reply = match req {
            Request::Version(_) => Reply::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Some(Capabilities {
                    max_msg_fds: Some(8),
                    max_data_xfer_size: Some(1 << 20),
                    ..Default::default()
                }),
            }),
            Request::DeviceGetInfo(_) => Reply::DeviceGetInfo(DeviceInfo {
                argsz: DeviceInfo::SIZE,
                flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
                num_regions: 9,
                num_irqs: pci_irq::COUNT,
            }),
            Request::DeviceGetRegionInfo(g) => {
                let info = match g.index {
                    0 => RegionInfo::new(
                        0,
                        REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE,
                        BAR0_SIZE as u64,
                    ),
                    i => RegionInfo::new(i, 0, 0),
                };
                Reply::DeviceGetRegionInfo(info.reply_for(g.argsz).0)
            }
            Request::DeviceGetIrqInfo(g) => Reply::DeviceGetIrqInfo(IrqInfo {
                argsz: IrqInfo::SIZE,
                flags: IRQ_INFO_EVENTFD,
                index: g.index,
                count: if g.index == pci_irq::MSIX {
                    MSIX_VECTORS
                } else {
                    0
                },
            }),
            Request::RegionRead(a) => {
                let r = a.offset as usize..a.offset as usize + a.count as usize;
                Reply::RegionRead(RegionReadReply {
                    offset: a.offset,
                    region: a.region,
                    data: bar0[r].to_vec(),
                })
            }
            Request::RegionWrite(w) => {
                let at = w.offset as usize;
                bar0[at..at + w.data.len()].copy_from_slice(&w.data);
                Reply::RegionWrite(w.access())
            }
            Request::DmaMap(m) => {
                let fd: OwnedFd = fds.next().expect("the crate client always sends an fd");
                seen.lock()
                    .unwrap()
                    .dma
                    .insert(m.address, (m.offset, File::from(fd)));
                Reply::DmaMap
            }
            Request::DmaUnmap(u) => {
                seen.lock().unwrap().unmapped.push(u.address);
                Reply::DmaUnmap(u)
            }
            Request::DeviceSetIrqs(s) => {
                for fd in fds.by_ref() {
                    // Raise the interrupt once through every eventfd we were given.
                    File::from(fd).write_all(&1u64.to_ne_bytes()).unwrap();
                    seen.lock().unwrap().irq_fds += 1;
                }
                assert_eq!(s.index, pci_irq::MSIX);
                Reply::DeviceSetIrqs
            }
            Request::DeviceReset => {
                bar0.fill(0);
                seen.lock().unwrap().resets += 1;
                Reply::DeviceReset
            }
            _ => {
                writer
                    .send_blocking(&sock, encode_error_reply(&h, libc::ENOSYS as u32), vec![])
                    .unwrap();
                continue;
            }
        };
        if !h.no_reply {
            writer
                .send_blocking(&sock, encode_reply(h.msg_id, &reply), vec![])
                .unwrap();
        }
    }
}

/// The crate's Client drives every command it has against a server built on vfu-proto:
/// setup (VERSION, GET_INFO, REGION_INFO for all 9 regions), BAR reads and writes, a
/// DMA map whose fd the server can read through, unmap, IRQ info, eventfds that the
/// server signals, and reset.
#[test]
fn crate_client_against_vfu_proto_server() {
    let path = socket_path("proto-server.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server_seen = seen.clone();
    let server = thread::spawn(move || serve_one_client(listener, server_seen));

    let mut client = vfio_user::Client::new(&path).expect("setup through vfu-proto server");
    let bar0 = client.region(0).expect("region 0 described");
    assert_eq!(bar0.size, BAR0_SIZE as u64);
    assert_eq!(bar0.flags, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE);
    assert_eq!(client.region(7).unwrap().size, 0);

    client.region_write(0, 0x10, b"hello vfu").unwrap();
    let mut back = [0u8; 9];
    client.region_read(0, 0x10, &mut back).unwrap();
    assert_eq!(&back, b"hello vfu");

    let mem = memfd_with(0x2000, b"guest memory");
    client
        .dma_map(0x2000, 0x8000_0000, 0x1000, mem.as_raw_fd())
        .unwrap();
    {
        let s = seen.lock().unwrap();
        let (offset, fd) = &s.dma[&0x8000_0000];
        let mut peek = [0u8; 12];
        fd.read_at(&mut peek, *offset).unwrap();
        assert_eq!(
            &peek, b"guest memory",
            "the server reads the client's memory"
        );
    }
    client.dma_unmap(0x8000_0000, 0x1000).unwrap();
    assert_eq!(seen.lock().unwrap().unmapped, vec![0x8000_0000]);

    let irq = client.get_irq_info(pci_irq::MSIX).unwrap();
    assert_eq!(irq.count, MSIX_VECTORS);
    let (e0, e1) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    client
        .set_irqs(
            pci_irq::MSIX,
            vfu_proto::vfio_user::IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            2,
            &[e0.as_raw_fd(), e1.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(eventfd_count(&e0), 1);
    assert_eq!(eventfd_count(&e1), 1);

    client.reset().unwrap();
    client.region_read(0, 0x10, &mut back).unwrap();
    assert_eq!(back, [0; 9], "reset cleared the BAR");
    assert_eq!(seen.lock().unwrap().resets, 1);

    client.shutdown().unwrap();
    drop(client);
    server.join().unwrap();
}

// ---- a small vfio-user client on vfu-proto ----------------------------------------

struct ProtoClient {
    sock: UnixStream,
    reader: MessageReader,
    writer: MessageWriter,
    next_id: u16,
}

impl ProtoClient {
    fn connect(path: &Path) -> Self {
        let limits = Limits {
            max_msg_fds: 16,
            ..Limits::DEFAULT
        };
        Self {
            sock: UnixStream::connect(path).unwrap(),
            reader: MessageReader::new(limits),
            writer: MessageWriter::new(limits),
            next_id: 0,
        }
    }

    /// Sends a request with fds and returns the decoded reply, or the errno of an error
    /// reply.
    fn call(&mut self, req: &Request, fds: Vec<OwnedFd>) -> Result<Reply, u32> {
        let id = self.next_id;
        self.send(encode_request(id, req, false), fds);
        self.receive(id)
    }

    fn send(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        self.next_id = self.next_id.wrapping_add(1);
        self.writer.send_blocking(&self.sock, bytes, fds).unwrap();
    }

    fn receive(&mut self, id: u16) -> Result<Reply, u32> {
        let Some(Frame::Message(m)) = self.reader.read(&self.sock).unwrap() else {
            panic!("reply rejected by the transport")
        };
        assert_eq!(m.header.msg_id, id, "reply matches its request");
        if let Some(errno) = m.header.error {
            return Err(errno);
        }
        Ok(Reply::decode(m.header.command, &m.payload, m.fds.len()).expect("valid reply"))
    }
}

/// Records what the crate's Server passed to its backend.
#[derive(Default)]
struct Backend {
    mem: Vec<u8>,
    dma: Vec<(u64, u64, Vec<u8>)>,
    unmaps: Vec<(u64, u64)>,
    resets: usize,
}

struct SharedBackend(Arc<Mutex<Backend>>);

impl vfio_user::ServerBackend for SharedBackend {
    fn region_read(&mut self, _region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let b = self.0.lock().unwrap();
        data.copy_from_slice(&b.mem[offset as usize..offset as usize + data.len()]);
        Ok(())
    }
    fn region_write(&mut self, _region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut b = self.0.lock().unwrap();
        b.mem[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn dma_map(
        &mut self,
        _flags: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let mut peek = vec![0u8; 12];
        fd.expect("fd passed").read_at(&mut peek, offset)?;
        self.0.lock().unwrap().dma.push((address, size, peek));
        Ok(())
    }
    fn dma_unmap(
        &mut self,
        _flags: vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> std::io::Result<()> {
        self.0.lock().unwrap().unmaps.push((address, size));
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        let mut b = self.0.lock().unwrap();
        b.mem.fill(0);
        b.resets += 1;
        Ok(())
    }
    fn set_irqs(
        &mut self,
        _index: u32,
        _flags: u32,
        _start: u32,
        _count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        for mut f in fds {
            f.write_all(&1u64.to_ne_bytes())?;
        }
        Ok(())
    }
}

/// A vfu-proto client against the crate's Server: every command the server implements,
/// with fds for DMA and interrupts, and an error reply for a command it does not know.
#[test]
fn vfu_proto_client_against_crate_server() {
    let path = socket_path("crate-server.sock");
    let region = vfio_user::ServerRegion {
        region_info: vfio_region_info {
            argsz: 32,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            index: 0,
            cap_offset: 0,
            size: BAR0_SIZE as u64,
            offset: 0,
        },
        sparse_areas: vec![],
        mmap_fd: None,
    };
    let irqs = vec![vfio_user::IrqInfo {
        index: 0,
        flags: IRQ_INFO_EVENTFD,
        count: 1,
    }];
    let server = vfio_user::Server::new(&path, true, irqs, vec![region]).unwrap();
    let backend = Arc::new(Mutex::new(Backend {
        mem: vec![0; BAR0_SIZE],
        ..Default::default()
    }));
    let mut shared = SharedBackend(backend.clone());
    let server_thread = thread::spawn(move || server.run(&mut shared));

    let mut c = ProtoClient::connect(&path);
    let version = Request::Version(Version {
        major: 0,
        minor: 0,
        capabilities: Some(Capabilities {
            max_msg_fds: Some(16),
            ..Default::default()
        }),
    });
    let Ok(Reply::Version(v)) = c.call(&version, vec![]) else {
        panic!("VERSION failed")
    };
    assert_eq!(v.major, 0);
    assert!(v.capabilities.is_some());

    let info = GetInfoRequest {
        argsz: DeviceInfo::SIZE,
        index: 0,
    };
    let Ok(Reply::DeviceGetInfo(d)) = c.call(&Request::DeviceGetInfo(info), vec![]) else {
        panic!("GET_INFO failed")
    };
    assert_eq!(d.flags, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!((d.num_regions, d.num_irqs), (1, 1));

    let ri = GetInfoRequest {
        argsz: 32,
        index: 0,
    };
    let Ok(Reply::DeviceGetRegionInfo(r)) = c.call(&Request::DeviceGetRegionInfo(ri), vec![])
    else {
        panic!("REGION_INFO failed")
    };
    assert_eq!(r.size, BAR0_SIZE as u64);

    let write = Request::RegionWrite(RegionWrite {
        offset: 0x40,
        region: 0,
        data: b"through the crate".to_vec(),
    });
    assert!(matches!(c.call(&write, vec![]), Ok(Reply::RegionWrite(a)) if a.count == 17));
    let read = Request::RegionRead(RegionAccess {
        offset: 0x40,
        region: 0,
        count: 17,
    });
    let Ok(Reply::RegionRead(data)) = c.call(&read, vec![]) else {
        panic!("REGION_READ failed")
    };
    assert_eq!(data.data, b"through the crate");

    let mem = memfd_with(0x3000, b"client pages");
    let map = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0x3000,
        address: 0x1_0000_0000,
        size: 0x1000,
    });
    assert_eq!(c.call(&map, vec![OwnedFd::from(mem)]), Ok(Reply::DmaMap));
    let unmap = DmaUnmap::region(0x1_0000_0000, 0x1000);
    assert_eq!(
        c.call(&Request::DmaUnmap(unmap), vec![]),
        Ok(Reply::DmaUnmap(unmap))
    );

    let efd = EventFd::new(libc::EFD_CLOEXEC).unwrap();
    let owned = owned_fd(efd.try_clone().unwrap());
    let set = Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: 0,
        start: 0,
        count: 1,
        data: IrqData::EventFd { assign: true },
    });
    assert_eq!(c.call(&set, vec![owned]), Ok(Reply::DeviceSetIrqs));
    assert_eq!(eventfd_count(&efd), 1, "the server signalled our eventfd");

    assert_eq!(
        c.call(&Request::DeviceReset, vec![]),
        Ok(Reply::DeviceReset)
    );

    // A command the crate does not know gets an error reply (the crate sends errno 0;
    // the ERROR flag is what matters). It has no payload: the crate would leave one
    // unread and lose sync.
    let id = c.next_id;
    c.send(Header::command(id, 19, 0).to_bytes().to_vec(), vec![]);
    assert!(c.receive(id).is_err());

    drop(c);
    server_thread.join().unwrap().unwrap();
    let b = backend.lock().unwrap();
    assert_eq!(
        b.dma,
        vec![(0x1_0000_0000, 0x1000, b"client pages".to_vec())]
    );
    assert_eq!(b.unmaps, vec![(0x1_0000_0000, 0x1000)]);
    assert_eq!(b.resets, 1);
    assert!(b.mem.iter().all(|&x| x == 0));
}

/// Takes over the fd of an `EventFd`.
fn owned_fd(e: EventFd) -> OwnedFd {
    use std::os::fd::IntoRawFd;
    // SAFETY: into_raw_fd hands over the only owner of the fd.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}
