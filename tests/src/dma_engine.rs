//! A vfio-user client's view of the `dma-engine` model behind the relay, shared by the
//! DMA end-to-end tests and the DMA benchmark: the three DMA paths, the client memory,
//! register access.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{
    pci_irq, pci_region, Capabilities, DmaMap, IrqData, Request, SetIrqs, IRQ_SET_ACTION_TRIGGER,
};

use crate::{try_binary, try_start_relay_with, wait_for_socket, Proc, Scratch};

/// How long setup steps may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Source region: read-only to the device.
pub const SRC: u64 = 0x10_0000;
/// Destination region: read-write; the completion record at its end.
pub const DST: u64 = 0x20_0000;
/// The completion record.
pub const COMPLETION: u64 = DST + MIB;
/// Size of the destination region.
pub const DST_SIZE: u64 = MIB + 4096;
/// Size of the client memory [`Memory`] addresses: the source region, then the
/// destination region with the completion record.
pub const MEMORY_SIZE: u64 = 2 * MIB + 4096;
/// The register BAR.
pub const BAR0: u32 = 0;

/// How the device VM reaches the client's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Windows in the tunnel's shared memory (zero copy).
    Window,
    /// The relay reads and writes the client's memory (no SHMEM) straight into and out
    /// of the driver's buffers (DIRECT_DATA).
    CopyFd,
    /// As `CopyFd`, with a driver that does not take DIRECT_DATA: the data travels in
    /// tunnel messages.
    CopyFdInMessages,
    /// The client mapped without fds: DMA_READ / DMA_WRITE to the client.
    CopyMessages,
}

impl Path {
    /// Every path.
    pub const ALL: [Path; 4] = [
        Path::Window,
        Path::CopyFd,
        Path::CopyFdInMessages,
        Path::CopyMessages,
    ];

    /// A name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Path::Window => "window",
            Path::CopyFd => "copy (client fd)",
            Path::CopyFdInMessages => "copy (client fd, no DIRECT_DATA)",
            Path::CopyMessages => "copy (client messages)",
        }
    }
}

/// The client's memory: a memfd (fd paths) or a buffer it serves DMA from.
pub enum Memory {
    File(File),
    Buffer(Arc<Mutex<Vec<u8>>>),
}

impl Memory {
    /// `Memory` covering IOVA [SRC, SRC + 2 MiB + 4 KiB): SRC at offset 0, DST at 1 MiB.
    fn offset(iova: u64) -> u64 {
        iova - SRC
    }
    /// Writes client memory at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) {
        let off = Self::offset(iova);
        match self {
            Memory::File(f) => f.write_all_at(data, off).unwrap(),
            Memory::Buffer(b) => {
                b.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(data)
            }
        }
    }
    /// Reads client memory at `iova`.
    pub fn read(&self, iova: u64, len: usize) -> Vec<u8> {
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

/// Relay, device VM serving `dma-engine` as `dma0`, and a connected client with the
/// source and destination regions mapped and MSI-X vector 0 on `irq`.
pub struct Setup {
    /// The relay.
    pub relay: Proc,
    /// The loopback device VM.
    pub guest: Proc,
    /// The client.
    pub client: Client,
    /// The client's memory.
    pub memory: Memory,
    /// The eventfd of MSI-X vector 0.
    pub irq: OwnedFd,
    cpu: Option<usize>,
    path: Path,
    guest_options: Vec<String>,
    frontend: std::path::PathBuf,
    _scratch: Scratch,
}

/// Client memory as QEMU's `memory-backend-memfd` makes it: a memfd of `len` bytes
/// sealed against shrinking, which the relay gives windows onto.
pub fn memfd(len: u64) -> File {
    try_memfd(len).expect("sealed memfd")
}

/// [`memfd`], failing with the error instead of panicking.
pub fn try_memfd(len: u64) -> std::io::Result<File> {
    let f = try_memfd_named(c"vfu-dma-client", len, libc::MFD_ALLOW_SEALING)?;
    // SAFETY: F_ADD_SEALS on a memfd we own.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Client memory the relay gives no window onto: a memfd of `len` bytes without seals
/// (`vfu-dma-unsealed`), which it reads and writes with pread/pwrite (the copy path).
pub fn unsealed_memfd(len: u64) -> File {
    memfd_named(c"vfu-dma-unsealed", len, 0)
}

/// A memfd named `name` of `len` bytes, not sealed.
pub fn memfd_named(name: &std::ffi::CStr, len: u64, flags: libc::c_uint) -> File {
    try_memfd_named(name, len, flags).expect("memfd")
}

/// [`memfd_named`], failing with the error instead of panicking.
pub fn try_memfd_named(
    name: &std::ffi::CStr,
    len: u64,
    flags: libc::c_uint,
) -> std::io::Result<File> {
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

pub fn eventfd() -> OwnedFd {
    try_eventfd().expect("eventfd")
}

/// A non-blocking eventfd, failing with the error instead of panicking.
pub fn try_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd(2) has no memory effects.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fired(fd: &OwnedFd, timeout: Duration) -> bool {
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

pub fn cfg_read(c: &mut Client, off: u64, len: u32) -> u32 {
    try_cfg_read(c, off, len).unwrap()
}

/// [`cfg_read`] of at most 4 bytes, failing with the error instead of panicking.
pub fn try_cfg_read(c: &mut Client, off: u64, len: u32) -> Result<u32, ClientError> {
    let b = c.region_read(pci_region::CONFIG, off, len.min(4))?;
    let mut v = [0u8; 4];
    v[..b.len()].copy_from_slice(&b);
    Ok(u32::from_le_bytes(v))
}

/// Offset of capability `id` in config space.
pub fn find_cap(c: &mut Client, id: u32) -> u64 {
    try_find_cap(c, id).unwrap_or_else(|e| panic!("{e}"))
}

/// [`find_cap`], failing with a message instead of panicking.
pub fn try_find_cap(c: &mut Client, id: u32) -> Result<u64, String> {
    lookup_cap(c, id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("capability {id:#x} not found"))
}

/// Offset of capability `id` in config space, `None` when the list has none, failing
/// with the client's error.
pub fn lookup_cap(c: &mut Client, id: u32) -> Result<Option<u64>, ClientError> {
    let mut at = u64::from(try_cfg_read(c, 0x34, 1)?);
    // At most 48 capabilities fit in the 192 bytes after the header.
    for _ in 0..48 {
        if at == 0 {
            break;
        }
        let h = try_cfg_read(c, at, 2)?;
        if h & 0xff == id {
            return Ok(Some(at));
        }
        at = u64::from((h >> 8) & 0xfc);
    }
    Ok(None)
}

pub fn reg_write(c: &mut Client, off: u64, v: u64, width: usize) {
    c.region_write(BAR0, off, &v.to_le_bytes()[..width])
        .unwrap();
}

pub fn reg_read(c: &mut Client, off: u64) -> u32 {
    let b = c.region_read(BAR0, off, 4).unwrap();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub fn map(c: &mut Client, iova: u64, size: u64, offset: u64, write: bool, fd: Option<&File>) {
    try_map(c, iova, size, offset, write, fd).expect("DMA_MAP");
}

/// [`map`], failing with the error instead of panicking.
pub fn try_map(
    c: &mut Client,
    iova: u64,
    size: u64,
    offset: u64,
    write: bool,
    fd: Option<&File>,
) -> Result<(), ClientError> {
    let req = Request::DmaMap(DmaMap {
        read: true,
        write,
        offset: if fd.is_some() { offset } else { 0 },
        address: iova,
        size,
    });
    let fds = match fd {
        Some(f) => vec![OwnedFd::from(f.try_clone()?)],
        None => Vec::new(),
    };
    c.request(&req, fds).map(|_| ())
}

pub fn setup(tag: &str, path: Path) -> Setup {
    setup_on(None, tag, path)
}

/// [`setup`] with the relay and the device VM pinned to `cpu`.
pub fn setup_on(cpu: Option<usize>, tag: &str, path: Path) -> Setup {
    setup_with(cpu, tag, path, &[])
}

/// [`setup_on`] with extra vfu-relay options.
pub fn setup_with(cpu: Option<usize>, tag: &str, path: Path, relay_options: &[&str]) -> Setup {
    try_setup(cpu, tag, path, relay_options, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// [`setup_with`] with extra vfu-guest options as well, failing with a message instead
/// of panicking.
pub fn try_setup(
    cpu: Option<usize>,
    tag: &str,
    path: Path,
    relay_options: &[&str],
    guest_options: &[&str],
) -> Result<Setup, String> {
    let scratch = Scratch::try_new(tag).map_err(|e| format!("scratch directory: {e}"))?;
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("dma0.sock");
    let mut relay = try_start_relay_with(cpu, &frontend, &[("dma0", &device)], relay_options)?;
    if !wait_for_socket(&device, TIMEOUT) {
        return Err(format!("vfu-relay did not serve dma0{}", relay.exit_note()));
    }
    let guest_options: Vec<String> = guest_options.iter().map(|o| o.to_string()).collect();
    let mut guest = start_guest(cpu, &frontend, path, &guest_options)?;
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
        let notes = guest.exit_note() + &relay.exit_note();
        if !notes.is_empty() || Instant::now() > deadline {
            return Err(format!("the device VM never served dma0{notes}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let e = |what: &str| {
        let what = what.to_string();
        move |e: ClientError| format!("{what}: {e}")
    };
    let total = MEMORY_SIZE;
    let memory = match path {
        Path::CopyMessages => {
            let buf = Arc::new(Mutex::new(vec![0u8; total as usize]));
            client.serve_dma(SRC, buf.clone());
            try_map(&mut client, SRC, MIB, 0, false, None).map_err(e("DMA_MAP"))?;
            try_map(&mut client, DST, DST_SIZE, 0, true, None).map_err(e("DMA_MAP"))?;
            Memory::Buffer(buf)
        }
        _ => {
            let f = try_memfd(total).map_err(|e| format!("memfd: {e}"))?;
            try_map(&mut client, SRC, MIB, 0, false, Some(&f)).map_err(e("DMA_MAP"))?;
            try_map(&mut client, DST, DST_SIZE, MIB, true, Some(&f)).map_err(e("DMA_MAP"))?;
            Memory::File(f)
        }
    };
    try_enable(&mut client)?;
    let irq = try_eventfd().map_err(|e| format!("eventfd: {e}"))?;
    let irq2 = irq.try_clone().map_err(|e| format!("eventfd: {e}"))?;
    try_set_irq(&mut client, Some(irq2)).map_err(e("SET_IRQS"))?;
    Ok(Setup {
        relay,
        guest,
        client,
        memory,
        irq,
        cpu,
        path,
        guest_options,
        frontend,
        _scratch: scratch,
    })
}

/// Starts a loopback device VM serving `dma0` with dma-engine, set up for `path`, with
/// `extra` options.
fn start_guest(
    cpu: Option<usize>,
    frontend: &std::path::Path,
    path: Path,
    extra: &[String],
) -> Result<Proc, String> {
    let mut args = vec!["--loopback".to_string(), frontend.display().to_string()];
    args.extend(["--serve".into(), "dma0=dma-engine".into()]);
    if matches!(path, Path::CopyFd | Path::CopyFdInMessages) {
        args.push("--no-shmem".into());
    }
    if path == Path::CopyFdInMessages {
        args.push("--no-direct-data".into());
    }
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = try_binary("vfu-guest")?;
    Proc::try_spawn_on(cpu, "vfu-guest", &bin, &args)
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// Memory and bus master on; MSI-X on.
pub fn enable(client: &mut Client) {
    try_enable(client).unwrap_or_else(|e| panic!("{e}"))
}

/// [`enable`], failing with a message instead of panicking.
pub fn try_enable(client: &mut Client) -> Result<(), String> {
    try_enable_client(client).map_err(|e| format!("enabling the device: {e}"))
}

/// [`enable`], failing with the client's error (for callers that tell errors apart by
/// kind); a device without MSI-X is [`ClientError::BadReply`].
pub fn try_enable_client(client: &mut Client) -> Result<(), ClientError> {
    let cmd = try_cfg_read(client, 4, 2)? | 0x6;
    client.region_write(pci_region::CONFIG, 4, &(cmd as u16).to_le_bytes())?;
    let msix = lookup_cap(client, 0x11)?
        .ok_or_else(|| ClientError::BadReply("no MSI-X capability".into()))?;
    let ctl = try_cfg_read(client, msix + 2, 2)? | 0x8000;
    client.region_write(pci_region::CONFIG, msix + 2, &(ctl as u16).to_le_bytes())
}

impl Setup {
    /// Starts a new loopback device VM (after the old one was killed) and waits until
    /// it serves the device: the client's requests succeed again.
    pub fn restart_device_vm(&mut self) {
        self.guest.kill();
        self.guest = start_guest(self.cpu, &self.frontend, self.path, &self.guest_options)
            .unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + TIMEOUT;
        while self.client.region_read(BAR0, 0, 4).is_err() {
            assert!(
                Instant::now() < deadline,
                "the device never came back after the device VM restarted"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn set_irq(c: &mut Client, fd: Option<OwnedFd>) {
    try_set_irq(c, fd).expect("SET_IRQS");
}

/// [`set_irq`], failing with the error instead of panicking.
pub fn try_set_irq(c: &mut Client, fd: Option<OwnedFd>) -> Result<(), ClientError> {
    let req = Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: pci_irq::MSIX,
        start: 0,
        count: 1,
        data: IrqData::EventFd {
            assign: fd.is_some(),
        },
    });
    c.request(&req, fd.into_iter().collect()).map(|_| ())
}

/// Programs and starts one operation; returns STATUS.
pub fn run(c: &mut Client, src: u64, dst: u64, len: u32) -> u32 {
    try_start_copy(c, src, dst, COMPLETION, u64::from(len)).unwrap();
    reg_read(c, 0x28)
}

/// Programs one copy of `len` bytes from `src` to `dst`, its completion record at
/// `completion`, and starts it (the device copies inside the START write), failing with
/// the client's error.
pub fn try_start_copy(
    c: &mut Client,
    src: u64,
    dst: u64,
    completion: u64,
    len: u64,
) -> Result<(), ClientError> {
    for (off, v, width) in [
        (0x08, src, 8),
        (0x10, dst, 8),
        (0x18, completion, 8),
        (0x20, len, 4),
        (0x24, 1, 4),
    ] {
        c.region_write(BAR0, off, &v.to_le_bytes()[..width])?;
    }
    Ok(())
}

/// [`try_start_copy`], then reads STATUS and acknowledges the completion (INTR_STATUS,
/// write-1-to-clear); returns STATUS.
pub fn try_copy(
    c: &mut Client,
    src: u64,
    dst: u64,
    completion: u64,
    len: u64,
) -> Result<u32, ClientError> {
    try_start_copy(c, src, dst, completion, len)?;
    let st = c.region_read(BAR0, 0x28, 4)?;
    c.region_write(BAR0, 0x34, &1u32.to_le_bytes())?;
    Ok(u32::from_le_bytes([st[0], st[1], st[2], st[3]]))
}

/// CRC32C (Castagnoli), bit by bit: independent of the model's table.
pub fn crc32c(data: &[u8]) -> u32 {
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

/// The completion record: status, CRC, length, sequence number.
pub fn completion(m: &Memory) -> [u32; 4] {
    let b = m.read(COMPLETION, 16);
    std::array::from_fn(|i| {
        u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}
