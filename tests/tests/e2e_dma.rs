//! DMA and interrupts end to end, with real processes: the `dma-engine` model in a
//! loopback device VM behind the relay copies client memory, on each of the three
//! paths:
//! - window: the loopback VMM supports vhost-user SHMEM, the client passes fds; the
//!   device VM reads and writes the client's memory in place;
//! - copy (relay mapping): the loopback VMM without SHMEM (`--no-shmem`); the relay
//!   copies from its own mapping of the client's fds;
//! - copy (client messages): the client maps without fds; the relay turns the device's
//!   requests into vfio-user DMA_READ / DMA_WRITE to the client.
//!
//! Data is checked byte for byte, with a CRC32C computed here; faults touch nothing;
//! MSI-X vectors reach the client's eventfd, masking holds them pending, de-assignment
//! silences them; a DMA_UNMAP queued behind a running operation takes effect after it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{
    pci_irq, pci_region, Capabilities, DmaMap, DmaUnmap, IrqData, Request, SetIrqs,
    IRQ_SET_ACTION_TRIGGER,
};
use vfu_tests::{start_relay, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
/// Source region: read-only to the device.
const SRC: u64 = 0x10_0000;
/// Destination region: read-write; the completion record at its end.
const DST: u64 = 0x20_0000;
const COMPLETION: u64 = DST + MIB;
const DST_SIZE: u64 = MIB + 4096;
const BAR0: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Window,
    CopyMapped,
    CopyMessages,
}

/// The client's memory: a memfd (fd paths) or a buffer it serves DMA from.
enum Memory {
    File(File),
    Buffer(Arc<Mutex<Vec<u8>>>),
}

impl Memory {
    /// `Memory` covering IOVA [SRC, SRC + 2 MiB + 4 KiB): SRC at offset 0, DST at 1 MiB.
    fn offset(iova: u64) -> u64 {
        iova - SRC
    }
    fn write(&self, iova: u64, data: &[u8]) {
        let off = Self::offset(iova);
        match self {
            Memory::File(f) => f.write_all_at(data, off).unwrap(),
            Memory::Buffer(b) => {
                b.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(data)
            }
        }
    }
    fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        let off = Self::offset(iova);
        let mut out = vec![0; len];
        match self {
            Memory::File(f) => f.read_exact_at(&mut out, off).unwrap(),
            Memory::Buffer(b) => {
                out.copy_from_slice(&b.lock().unwrap()[off as usize..off as usize + len])
            }
        }
        out
    }
}

struct Setup {
    _relay: Proc,
    guest: Proc,
    client: Client,
    memory: Memory,
    irq: OwnedFd,
    _scratch: Scratch,
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vfu-dma-client".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd(2) returns a new fd that we own.
    unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }
}

fn fired(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local from a non-blocking eventfd we own.
        if unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) } == 8 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn cfg_read(c: &mut Client, off: u64, len: u32) -> u32 {
    let b = c.region_read(pci_region::CONFIG, off, len).unwrap();
    let mut v = [0u8; 4];
    v[..b.len()].copy_from_slice(&b);
    u32::from_le_bytes(v)
}

/// Offset of capability `id` in config space.
fn find_cap(c: &mut Client, id: u32) -> u64 {
    let mut at = cfg_read(c, 0x34, 1) as u64;
    while at != 0 {
        let h = cfg_read(c, at, 2);
        if h & 0xff == id {
            return at;
        }
        at = u64::from((h >> 8) & 0xfc);
    }
    panic!("capability {id:#x} not found");
}

fn reg_write(c: &mut Client, off: u64, v: u64, width: usize) {
    c.region_write(BAR0, off, &v.to_le_bytes()[..width])
        .unwrap();
}

fn reg_read(c: &mut Client, off: u64) -> u32 {
    let b = c.region_read(BAR0, off, 4).unwrap();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn map(c: &mut Client, iova: u64, size: u64, offset: u64, write: bool, fd: Option<&File>) {
    let req = Request::DmaMap(DmaMap {
        read: true,
        write,
        offset: if fd.is_some() { offset } else { 0 },
        address: iova,
        size,
    });
    let fds = fd
        .map(|f| vec![OwnedFd::from(f.try_clone().unwrap())])
        .unwrap_or_default();
    c.request(&req, fds).expect("DMA_MAP");
}

fn setup(tag: &str, path: Path) -> Setup {
    let scratch = Scratch::new(tag);
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("dma0.sock");
    let relay = start_relay(&frontend, &[("dma0", &device)]);
    assert!(wait_for_socket(&device, TIMEOUT));
    let mut args = vec!["--loopback".to_string(), frontend.display().to_string()];
    args.extend(["--serve".into(), "dma0=dma-engine".into()]);
    if path == Path::CopyMapped {
        args.push("--no-shmem".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let guest = Proc::spawn("vfu-guest", &vfu_tests::binary("vfu-guest"), &args);
    let deadline = Instant::now() + TIMEOUT;
    let mut client = loop {
        if let Ok(mut c) = Client::connect(&device, TIMEOUT) {
            if c.negotiate(Capabilities {
                max_msg_fds: Some(16),
                ..Default::default()
            })
            .is_ok()
            {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "device never served");
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = 2 * MIB + 4096;
    let memory = match path {
        Path::CopyMessages => {
            let buf = Arc::new(Mutex::new(vec![0u8; total as usize]));
            client.serve_dma(SRC, buf.clone());
            map(&mut client, SRC, MIB, 0, false, None);
            map(&mut client, DST, DST_SIZE, 0, true, None);
            Memory::Buffer(buf)
        }
        _ => {
            let f = memfd(total);
            map(&mut client, SRC, MIB, 0, false, Some(&f));
            map(&mut client, DST, DST_SIZE, MIB, true, Some(&f));
            Memory::File(f)
        }
    };
    // Memory and bus master on; MSI-X on, vector 0 to an eventfd.
    let cmd = cfg_read(&mut client, 4, 2) | 0x6;
    client
        .region_write(pci_region::CONFIG, 4, &(cmd as u16).to_le_bytes())
        .unwrap();
    let msix = find_cap(&mut client, 0x11);
    let ctl = cfg_read(&mut client, msix + 2, 2) | 0x8000;
    client
        .region_write(pci_region::CONFIG, msix + 2, &(ctl as u16).to_le_bytes())
        .unwrap();
    let irq = eventfd();
    set_irq(&mut client, Some(irq.try_clone().unwrap()));
    Setup {
        _relay: relay,
        guest,
        client,
        memory,
        irq,
        _scratch: scratch,
    }
}

fn set_irq(c: &mut Client, fd: Option<OwnedFd>) {
    let req = Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: pci_irq::MSIX,
        start: 0,
        count: 1,
        data: IrqData::EventFd {
            assign: fd.is_some(),
        },
    });
    c.request(&req, fd.into_iter().collect()).expect("SET_IRQS");
}

/// Programs and starts one operation; returns STATUS.
fn run(c: &mut Client, src: u64, dst: u64, len: u32) -> u32 {
    reg_write(c, 0x08, src, 8);
    reg_write(c, 0x10, dst, 8);
    reg_write(c, 0x18, COMPLETION, 8);
    reg_write(c, 0x20, u64::from(len), 4);
    reg_write(c, 0x24, 1, 4);
    reg_read(c, 0x28)
}

/// CRC32C (Castagnoli), bit by bit: independent of the model's table.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn completion(m: &Memory) -> [u32; 4] {
    let b = m.read(COMPLETION, 16);
    std::array::from_fn(|i| {
        u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

fn guest_maps_client_memory(guest: &Proc) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", guest.pid()))
        .map(|m| m.contains("memfd:vfu-dma-client"))
        .unwrap_or(false)
}

fn exercise(path: Path, tag: &str) {
    let mut s = setup(tag, path);
    let efault = libc::EFAULT as u32;
    assert_eq!(
        guest_maps_client_memory(&s.guest),
        path == Path::Window,
        "client memory is mapped into the device VM exactly on the window path"
    );
    let mut seq = 0;
    for len in [4096u32, 1 << 20] {
        let pattern: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(7) ^ (i >> 9)) as u8)
            .collect();
        s.memory.write(SRC, &pattern);
        s.memory.write(DST, &vec![0xee; len as usize]);
        let status = run(&mut s.client, SRC, DST, len);
        seq += 1;
        assert_eq!(status & 0xff, 1, "{path:?}: DONE for {len} bytes");
        assert!(
            s.memory.read(DST, len as usize) == pattern,
            "{path:?}: copied byte for byte"
        );
        assert_eq!(completion(&s.memory), [0, crc32c(&pattern), len, seq]);
        assert_eq!(reg_read(&mut s.client, 0x2c), crc32c(&pattern));
        assert!(
            fired(&s.irq, Duration::from_secs(5)),
            "{path:?}: MSI-X vector 0 fired"
        );
        reg_write(&mut s.client, 0x34, 1, 4);
    }

    // A destination in the read-only region: EFAULT, and the source stays as it was.
    let before = s.memory.read(SRC, 4096);
    let status = run(&mut s.client, SRC + 4096, SRC, 4096);
    seq += 1;
    assert_eq!(
        (status & 0xff, status >> 16),
        (2, efault),
        "{path:?}: write to read-only"
    );
    assert_eq!(
        s.memory.read(SRC, 4096),
        before,
        "{path:?}: nothing written"
    );
    assert_eq!(completion(&s.memory)[0], efault);
    assert!(
        fired(&s.irq, Duration::from_secs(5)),
        "an error completes with an interrupt too"
    );
    // A source outside every map, and one running past the end of the last map (the
    // source and destination maps are adjacent; a range may span both).
    assert_eq!(run(&mut s.client, 0x90_0000, DST, 16) >> 16, efault);
    assert_eq!(
        run(&mut s.client, DST + DST_SIZE - 8, DST, 16) >> 16,
        efault
    );
    seq += 2;
    assert!(fired(&s.irq, Duration::from_secs(5)));

    // MSI-X masking: vector 0 masked in the table, the interrupt waits in the PBA and is
    // delivered on unmask.
    reg_write(&mut s.client, 0x800 + 12, 1, 4);
    assert_eq!(run(&mut s.client, SRC, DST, 64) & 0xff, 1);
    seq += 1;
    assert!(
        !fired(&s.irq, Duration::from_millis(200)),
        "masked: no interrupt"
    );
    assert_eq!(reg_read(&mut s.client, 0xc00) & 1, 1, "pending bit set");
    reg_write(&mut s.client, 0x800 + 12, 0, 4);
    assert!(fired(&s.irq, Duration::from_secs(5)), "delivered on unmask");
    assert_eq!(reg_read(&mut s.client, 0xc00) & 1, 0, "pending bit cleared");

    // De-assigned eventfd: silence.
    set_irq(&mut s.client, None);
    assert_eq!(run(&mut s.client, SRC, DST, 64) & 0xff, 1);
    seq += 1;
    assert!(
        !fired(&s.irq, Duration::from_millis(200)),
        "de-assigned: no interrupt"
    );
    assert_eq!(reg_read(&mut s.client, 0x30), seq);

    // A DMA_UNMAP queued behind a running operation takes effect after it: the operation
    // completes on the mapped memory, the next one faults.
    s.memory.write(SRC, &[0x5a; 256]);
    reg_write(&mut s.client, 0x08, SRC, 8);
    reg_write(&mut s.client, 0x10, DST, 8);
    reg_write(&mut s.client, 0x20, 256, 4);
    s.client
        .post(&Request::RegionWrite(vfu_proto::vfio_user::RegionWrite {
            offset: 0x24,
            region: BAR0,
            data: 1u32.to_le_bytes().to_vec(),
        }))
        .unwrap();
    s.client
        .request(&Request::DmaUnmap(DmaUnmap::region(DST, DST_SIZE)), vec![])
        .expect("DMA_UNMAP");
    assert_eq!(
        reg_read(&mut s.client, 0x28) & 0xff,
        1,
        "the queued operation ran first"
    );
    assert_eq!(s.memory.read(DST, 256), vec![0x5a; 256]);
    assert_eq!(
        run(&mut s.client, SRC, DST, 16) >> 16,
        efault,
        "unmapped now"
    );
    if path == Path::Window {
        // The destination's window left the device VM with the unmap; the source's stays.
        assert!(guest_maps_client_memory(&s.guest));
    }
    match s
        .client
        .request(&Request::DmaUnmap(DmaUnmap::region(DST, DST_SIZE)), vec![])
    {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::ENOENT as u32),
        other => panic!("second unmap: {other:?}"),
    }
    s.client
        .request(&Request::DmaUnmap(DmaUnmap::all()), vec![])
        .expect("UNMAP_ALL");
    if path == Path::Window {
        assert!(
            !guest_maps_client_memory(&s.guest),
            "every window gone after UNMAP_ALL"
        );
    }
}

/// The window path: zero copy through vhost-user SHMEM windows.
#[test]
fn dma_engine_on_the_window_path() {
    exercise(Path::Window, "dma-window");
}

/// The copy path, served from the relay's own mapping of the client's fds.
#[test]
fn dma_engine_on_the_copy_path() {
    exercise(Path::CopyMapped, "dma-copy");
}

/// The copy path for memory mapped without fds: DMA_READ / DMA_WRITE to the client.
#[test]
fn dma_engine_through_client_messages() {
    exercise(Path::CopyMessages, "dma-messages");
}

/// Overlapping maps are refused (EEXIST), as are maps that are not page aligned
/// (EINVAL); the relay answers them before the device VM sees them.
#[test]
fn dma_map_rules() {
    let mut s = setup("dma-rules", Path::Window);
    let f = memfd(8192);
    let overlap = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: SRC + 4096,
        size: 4096,
    });
    match s
        .client
        .request(&overlap, vec![OwnedFd::from(f.try_clone().unwrap())])
    {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::EEXIST as u32),
        other => panic!("overlap: {other:?}"),
    }
    let odd = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: 0x900_0001,
        size: 4096,
    });
    match s.client.request(&odd, vec![]) {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::EINVAL as u32),
        other => panic!("misaligned: {other:?}"),
    }
    let _ = &s.memory;
}
