//! The socket bridge end to end, with real processes: vfu-relay, a loopback device VM
//! (`vfu-guest --loopback ... --bridge dev0=inner.sock --serve gpio0=gpio`), an
//! unmodified vfio-user server on the `vfio_user` crate (`vfu-test-server`, see its
//! module documentation for its registers) listening on `inner.sock`, and vfio-user
//! clients (vfu-proto's) on the relay's sockets.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{
    pci_irq, pci_region, Capabilities, DmaUnmap, GetInfoRequest, IrqData, Reply, Request, SetIrqs,
    DEVICE_FLAGS_PCI, IRQ_SET_ACTION_TRIGGER, REGION_INFO_FLAG_MMAP,
};
use vfu_tests::dma_engine::{eventfd, fired, map, memfd};
use vfu_tests::{binary, start_relay, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(10);
const ENODEV: u32 = libc::ENODEV as u32;

/// Registers of vfu-test-server's BAR 0.
const ID: u64 = 0x00;
const SCRATCH: u64 = 0x04;
const DMA_ADDR: u64 = 0x08;
const DMA_LEN: u64 = 0x10;
const DMA_CMD: u64 = 0x14;
const DMA_STATUS: u64 = 0x18;
const DMA_PATH: u64 = 0x1c;
const IRQ_RAISE: u64 = 0x20;
const NUM_MAPS: u64 = 0x24;
const NUM_IRQ_FDS: u64 = 0x28;
const BUF: u64 = 0x1000;
const PATH_MMAP: u32 = 1;
const PATH_IN_BAND: u32 = 2;

/// Client memory mapped with an fd (the relay gives the device VM a window onto it).
const WIN_IOVA: u64 = 0x10_0000;
/// Client memory mapped without an fd (the relay's copy path; the client serves it).
const COPY_IOVA: u64 = 0x20_0000;
const MAP_SIZE: u64 = 0x2000;

struct Rig {
    scratch: Scratch,
    _relay: Proc,
    _guest: Proc,
    inner: Proc,
    inner_sock: PathBuf,
    dev0: PathBuf,
    gpio0: PathBuf,
}

fn start_inner(path: &Path) -> Proc {
    let p = Proc::spawn(
        "vfu-test-server",
        &binary("vfu-test-server"),
        &[path.to_str().unwrap()],
    );
    // Wait for the socket file, not a connection (the server would count it a client).
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "vfu-test-server never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

fn rig(tag: &str) -> Rig {
    rig_with(tag, true, &[])
}

/// The processes; the inner server only with `inner_now`; `guest_extra` options for
/// vfu-guest.
fn rig_with(tag: &str, inner_now: bool, guest_extra: &[&str]) -> Rig {
    let scratch = Scratch::new(tag);
    let frontend = scratch.join("frontend.sock");
    let dev0 = scratch.join("dev0.sock");
    let gpio0 = scratch.join("gpio0.sock");
    let inner_sock = scratch.join("inner.sock");
    let inner = if inner_now {
        start_inner(&inner_sock)
    } else {
        // A stand-in that exits at once: the server is not there.
        Proc::spawn("true", Path::new("/bin/true"), &[])
    };
    let relay = start_relay(&frontend, &[("dev0", &dev0), ("gpio0", &gpio0)]);
    assert!(wait_for_socket(&dev0, TIMEOUT));
    let bridge = format!("dev0={}", inner_sock.display());
    let mut args = vec![
        "--loopback",
        frontend.to_str().unwrap(),
        "--bridge",
        &bridge,
        "--serve",
        "gpio0=gpio",
    ];
    args.extend_from_slice(guest_extra);
    let guest = Proc::spawn("vfu-guest", &binary("vfu-guest"), &args);
    Rig {
        scratch,
        _relay: relay,
        _guest: guest,
        inner,
        inner_sock,
        dev0,
        gpio0,
    }
}

/// A client that said VERSION through the relay (retrying until the device VM serves).
fn client(path: &Path) -> Client {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(mut c) = Client::connect(path, TIMEOUT) {
            if c.negotiate(Capabilities {
                max_msg_fds: Some(16),
                ..Default::default()
            })
            .is_ok()
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "{} never served", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rd(c: &mut Client, off: u64) -> Result<u32, ClientError> {
    let b = c.region_read(0, off, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn wr(c: &mut Client, off: u64, v: u32) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

/// The gpio model's vendor ID, through its own channel.
fn gpio_alive(g: &mut Client) {
    let b = g
        .region_read(pci_region::CONFIG, 0, 2)
        .expect("gpio0 answers");
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x494f);
}

/// Runs a DMA of vfu-test-server: `to_client` writes client memory; returns
/// (DMA_STATUS, DMA_PATH).
fn dma(c: &mut Client, iova: u64, len: u32, to_client: bool) -> (u32, u32) {
    wr(c, DMA_ADDR, iova as u32);
    wr(c, DMA_ADDR + 4, (iova >> 32) as u32);
    wr(c, DMA_LEN, len);
    wr(c, DMA_CMD, if to_client { 2 } else { 1 });
    (rd(c, DMA_STATUS).unwrap(), rd(c, DMA_PATH).unwrap())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn assign_msix(c: &mut Client, fds: Vec<OwnedFd>) {
    let req = Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: pci_irq::MSIX,
        start: 0,
        count: fds.len() as u32,
        data: IrqData::EventFd { assign: true },
    });
    c.request(&req, fds).expect("SET_IRQS");
}

/// DMA both ways on one path, checked byte for byte: the server reads client memory
/// into its buffer, then writes a new buffer back to client memory.
fn dma_round_trip(
    c: &mut Client,
    iova: u64,
    path: u32,
    put: &dyn Fn(u64, &[u8]),
    get: &dyn Fn(u64, usize) -> Vec<u8>,
    seed: u8,
) {
    let out = pattern(seed, 4096);
    put(iova, &out);
    assert_eq!(
        dma(c, iova, 4096, false),
        (0, path),
        "read of client memory at {iova:#x}"
    );
    assert_eq!(
        c.region_read(0, BUF, 4096).unwrap(),
        out,
        "the server read it byte for byte"
    );
    let back = pattern(seed ^ 0x5a, 4096);
    c.region_write(0, BUF, &back).unwrap();
    assert_eq!(
        dma(c, iova + 4096, 4096, true),
        (0, path),
        "write to client memory"
    );
    assert_eq!(
        get(iova + 4096, 4096),
        back,
        "the server wrote it byte for byte"
    );
}

/// Proves, through relay, tunnel and bridge to an unmodified server on the `vfio_user`
/// crate: VERSION without migration and within the tunnel's limits; device and region
/// info, with the mmap-able BAR 2 offered without fd, MMAP flag or sparse areas and
/// still readable and writable in-band, and no ioeventfds; register round trips; MSI-X eventfds (two
/// vectors, which the bridge hands a one-fd server in two messages) firing on the
/// client's eventfd for the right vector; DMA both ways checked byte for byte through
/// a window the server maps itself from an fd (DMA_PATH 1), and through the copy path
/// with in-band DMA_READ / DMA_WRITE (DMA_PATH 2); DMA_UNMAP reaching the server. Then
/// the server is killed: the client's requests fail with ENODEV in bounded time, not a
/// hang; restarted, the next request connects again and the new server has the
/// client's remaining map and eventfds (in-band DMA and interrupts work at once). When
/// the client leaves, the server is left with no maps and no eventfds but keeps its
/// registers for the next client. The gpio0 channel of the same device VM answers
/// throughout.
#[test]
fn bridged_server_end_to_end() {
    let mut r = rig("bridge");
    let mut g = client(&r.gpio0);
    gpio_alive(&mut g);
    let mut c = client(&r.dev0);
    let caps = c.server_caps;
    assert_eq!(caps.migration, None, "migration is not relayed");
    assert!(caps.max_data_xfer_size() <= 1 << 20);

    let info = c.device_info().unwrap();
    assert_ne!(info.flags & DEVICE_FLAGS_PCI, 0);
    assert_eq!((info.num_regions, info.num_irqs), (9, 3));
    let (bar0, fd) = c.region_info(0).unwrap();
    assert_eq!((bar0.size, fd.is_none()), (0x2000, true));
    let (bar2, fd) = c.region_info(2).unwrap();
    assert_eq!(bar2.size, 0x4000);
    assert!(fd.is_none(), "no fd crosses the tunnel");
    assert_eq!(bar2.flags & REGION_INFO_FLAG_MMAP, 0, "nothing to mmap");
    assert!(bar2.caps.is_empty(), "no sparse areas");
    let io_fds = Request::DeviceGetRegionIoFds(GetInfoRequest {
        argsz: 16,
        index: 2,
    });
    match c.request(&io_fds, vec![]).expect("REGION_IO_FDS").0 {
        Reply::DeviceGetRegionIoFds(r) => assert_eq!((r.count, r.sub_regions.len()), (0, 0)),
        other => panic!("{other:?}"),
    }
    c.region_write(2, 0x100, b"through the bridge").unwrap();
    assert_eq!(c.region_read(2, 0x100, 18).unwrap(), b"through the bridge");

    assert_eq!(rd(&mut c, ID).unwrap(), 0x5646_5531);
    wr(&mut c, SCRATCH, 0xfeed_f00d);
    assert_eq!(rd(&mut c, SCRATCH).unwrap(), 0xfeed_f00d);

    let irq = [eventfd(), eventfd()];
    assign_msix(&mut c, irq.iter().map(|e| e.try_clone().unwrap()).collect());
    assert_eq!(rd(&mut c, NUM_IRQ_FDS).unwrap(), 2);
    wr(&mut c, IRQ_RAISE, 1);
    assert!(
        fired(&irq[1], Duration::from_secs(5)),
        "vector 1 reached the client"
    );
    assert!(
        !fired(&irq[0], Duration::from_millis(100)),
        "vector 0 did not fire"
    );

    // Window path: a sealed memfd, which the relay maps into the device VM.
    let win: File = memfd(MAP_SIZE);
    map(&mut c, WIN_IOVA, MAP_SIZE, 0, true, Some(&win));
    let put_win = |iova: u64, d: &[u8]| win.write_all_at(d, iova - WIN_IOVA).unwrap();
    let get_win = |iova: u64, n: usize| {
        let mut b = vec![0; n];
        win.read_exact_at(&mut b, iova - WIN_IOVA).unwrap();
        b
    };
    dma_round_trip(&mut c, WIN_IOVA, PATH_MMAP, &put_win, &get_win, 1);
    assert!(
        fired(&irq[0], Duration::from_secs(5)),
        "DMA completion interrupt"
    );

    // Copy path: no fd; the relay asks the client, which serves this buffer.
    let mem = Arc::new(Mutex::new(vec![0u8; MAP_SIZE as usize]));
    c.serve_dma(COPY_IOVA, mem.clone());
    map(&mut c, COPY_IOVA, MAP_SIZE, 0, true, None);
    let put_mem = |iova: u64, d: &[u8]| {
        let at = (iova - COPY_IOVA) as usize;
        mem.lock().unwrap()[at..at + d.len()].copy_from_slice(d)
    };
    let get_mem = |iova: u64, n: usize| {
        let at = (iova - COPY_IOVA) as usize;
        mem.lock().unwrap()[at..at + n].to_vec()
    };
    dma_round_trip(&mut c, COPY_IOVA, PATH_IN_BAND, &put_mem, &get_mem, 2);
    assert_eq!(rd(&mut c, NUM_MAPS).unwrap(), 2);

    c.request(
        &Request::DmaUnmap(DmaUnmap::region(WIN_IOVA, MAP_SIZE)),
        vec![],
    )
    .expect("DMA_UNMAP");
    assert_eq!(rd(&mut c, NUM_MAPS).unwrap(), 1, "the server unmapped it");
    gpio_alive(&mut g);

    // The server dies: errors, promptly; gpio0 unaffected.
    r.inner.kill();
    for _ in 0..3 {
        let t = Instant::now();
        match rd(&mut c, ID) {
            Err(ClientError::Errno(e)) => assert_eq!(e, ENODEV),
            other => panic!("a dead server's device answered {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(3), "an error, not a hang");
        gpio_alive(&mut g);
    }

    // It comes back: the next request reconnects, and the client's setup is there.
    r.inner = start_inner(&r.inner_sock);
    let deadline = Instant::now() + TIMEOUT;
    while rd(&mut c, ID).is_err() {
        assert!(Instant::now() < deadline, "the bridge never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rd(&mut c, NUM_MAPS).unwrap(),
        1,
        "the copy-path map was handed over"
    );
    assert_eq!(
        rd(&mut c, NUM_IRQ_FDS).unwrap(),
        2,
        "the eventfds were handed over"
    );
    dma_round_trip(&mut c, COPY_IOVA, PATH_IN_BAND, &put_mem, &get_mem, 3);
    let _ = fired(&irq[0], Duration::from_millis(0));
    wr(&mut c, IRQ_RAISE, 1);
    assert!(
        fired(&irq[1], Duration::from_secs(5)),
        "interrupts after the restart"
    );
    wr(&mut c, SCRATCH, 0x1234_5678);

    // The client leaves: the server keeps its state, loses the maps and eventfds.
    drop(c);
    let mut c2 = client(&r.dev0);
    assert_eq!(rd(&mut c2, NUM_MAPS).unwrap(), 0, "unmapped at disconnect");
    assert_eq!(
        rd(&mut c2, NUM_IRQ_FDS).unwrap(),
        0,
        "interrupts disabled at disconnect"
    );
    assert_eq!(
        rd(&mut c2, SCRATCH).unwrap(),
        0x1234_5678,
        "device state kept"
    );
    gpio_alive(&mut g);
    drop(r.scratch);
}

/// Proves that without vhost-user SHMEM (no windows) memory the client maps with an fd
/// reaches the server without one: its DMA goes in-band (DMA_PATH 2) through the
/// relay's copy path, byte for byte both ways; and that the bridge checks the server's
/// DMA against the client's maps and their permissions.
#[test]
fn without_windows_dma_goes_in_band() {
    let r = rig_with("bridge-noshm", true, &["--no-shmem"]);
    let mut c = client(&r.dev0);
    let f: File = memfd(MAP_SIZE);
    map(&mut c, WIN_IOVA, MAP_SIZE, 0, true, Some(&f));
    let put = |iova: u64, d: &[u8]| f.write_all_at(d, iova - WIN_IOVA).unwrap();
    let get = |iova: u64, n: usize| {
        let mut b = vec![0; n];
        f.read_exact_at(&mut b, iova - WIN_IOVA).unwrap();
        b
    };
    dma_round_trip(&mut c, WIN_IOVA, PATH_IN_BAND, &put, &get, 7);

    // A server that does not check: the bridge refuses a DMA_READ outside every map
    // and a DMA_WRITE to read-only memory (EFAULT), and writes nothing.
    let ro: File = memfd(MAP_SIZE);
    map(&mut c, 0x40_0000, MAP_SIZE, 0, false, Some(&ro));
    let raw = |c: &mut Client, iova: u64, cmd: u32| {
        wr(c, DMA_ADDR, iova as u32);
        wr(c, DMA_ADDR + 4, 0);
        wr(c, DMA_LEN, 64);
        wr(c, DMA_CMD, cmd);
        rd(c, DMA_STATUS).unwrap()
    };
    let efault = libc::EFAULT as u32;
    assert_eq!(raw(&mut c, 0x90_0000, 3), efault, "read outside the maps");
    c.region_write(0, BUF, &[0xab; 64]).unwrap();
    assert_eq!(
        raw(&mut c, 0x40_0000, 4),
        efault,
        "write to read-only memory"
    );
    let mut b = vec![0xffu8; 64];
    ro.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![0; 64], "nothing written");
    assert_eq!(raw(&mut c, 0x40_0000, 3), 0, "reading it is allowed");
}

/// Proves that a server that is not there yet gives the client an error (ENODEV, in
/// bounded time) instead of a hang, and that the device works as soon as it is there.
#[test]
fn a_server_that_starts_late() {
    let mut r = rig_with("bridge-late", false, &[]);
    // Once gpio0 answers, the device VM serves dev0 too: errors come from the bridge.
    let mut g = client(&r.gpio0);
    gpio_alive(&mut g);
    let deadline = Instant::now() + TIMEOUT;
    let mut c = loop {
        if let Ok(c) = Client::connect(&r.dev0, TIMEOUT) {
            break c;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = Instant::now();
    match c.negotiate(Capabilities::default()) {
        Err(ClientError::Errno(e)) => assert_eq!(e, ENODEV),
        other => panic!("VERSION without a server: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(c);
    r.inner = start_inner(&r.inner_sock);
    let mut c = client(&r.dev0);
    assert_eq!(rd(&mut c, ID).unwrap(), 0x5646_5531);
}
