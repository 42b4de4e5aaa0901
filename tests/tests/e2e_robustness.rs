//! The relay under clients that misbehave, with real processes: replies that do not fit
//! a socket buffer, a client that never reads, a flooding neighbour, interrupt fds that
//! are not eventfds or are saturated. Each case checks the misbehaving client is
//! contained and another device on the same relay keeps working.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{
    encode_request, pci_irq, pci_region, Capabilities, IrqData, RegionAccess, RegionWrite, Request,
    SetIrqs, IRQ_SET_ACTION_TRIGGER,
};
use vfu_tests::{start_loopback_guest, start_relay, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A relay exporting gpio0 and gpio1, both served by one loopback device VM.
struct Two {
    _relay: Proc,
    _guest: Proc,
    a: PathBuf,
    b: PathBuf,
    _scratch: Scratch,
}

fn two(tag: &str) -> Two {
    let scratch = Scratch::new(tag);
    let frontend = scratch.join("frontend.sock");
    let a = scratch.join("gpio0.sock");
    let b = scratch.join("gpio1.sock");
    let relay = start_relay(&frontend, &[("gpio0", &a), ("gpio1", &b)]);
    assert!(wait_for_socket(&b, TIMEOUT));
    let guest = start_loopback_guest(&frontend, &[("gpio0", "gpio"), ("gpio1", "gpio")]);
    for p in [&a, &b] {
        let deadline = Instant::now() + TIMEOUT;
        while connect(p).is_err() {
            assert!(Instant::now() < deadline, "device never served");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Two {
        _relay: relay,
        _guest: guest,
        a,
        b,
        _scratch: scratch,
    }
}

fn connect(path: &Path) -> Result<Client, ClientError> {
    let mut c = Client::connect(path, TIMEOUT)?;
    c.negotiate(Capabilities::default())?;
    Ok(c)
}

/// A raw connection that has done VERSION, for sending without reading.
fn raw_versioned(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    let v = Request::Version(vfu_proto::vfio_user::Version {
        major: 0,
        minor: 0,
        capabilities: Some(Capabilities::default()),
    });
    s.write_all(&encode_request(0, &v, false)).unwrap();
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr).unwrap();
    let size = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    let mut rest = vec![0u8; size - 16];
    s.read_exact(&mut rest).unwrap();
    s
}

fn config_read(id: u16) -> Vec<u8> {
    encode_request(
        id,
        &Request::RegionRead(RegionAccess {
            offset: 0,
            region: pci_region::CONFIG,
            count: 256,
        }),
        false,
    )
}

/// 5000 pipelined requests whose replies (1.4 MB) are far more than a socket buffer:
/// every reply arrives once the client reads (the relay waits for writability).
#[test]
fn replies_larger_than_the_socket_buffer_all_arrive() {
    let t = two("rob-pipeline");
    let mut s = raw_versioned(&t.a);
    let n = 5000u16;
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for id in 1..=n {
                s.write_all(&config_read(id)).unwrap();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500)); // let replies pile up
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    for id in 1..=n {
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr)
            .unwrap_or_else(|e| panic!("reply {id}: {e}"));
        assert_eq!(u16::from_le_bytes([hdr[0], hdr[1]]), id, "replies in order");
        let size = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        let mut rest = vec![0u8; size - 16];
        s.read_exact(&mut rest).unwrap();
    }
    writer.join().unwrap();
}

/// A client that sends requests and never reads its replies is dropped once its backlog
/// passes the relay's bound; the other device is not affected meanwhile.
#[test]
fn client_that_never_reads_is_dropped() {
    let t = two("rob-noread");
    let s = raw_versioned(&t.a);
    let flood = std::thread::spawn(move || {
        let mut s = s;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut id = 1u16;
        while Instant::now() < deadline {
            if s.write_all(&config_read(id)).is_err() {
                return true; // the relay closed the connection
            }
            id = id.wrapping_add(1);
        }
        false
    });
    let mut other = connect(&t.b).unwrap();
    for _ in 0..100 {
        assert_eq!(other.region_read(2, 0, 1).unwrap(), [0]);
    }
    assert!(
        flood.join().unwrap(),
        "the relay dropped the client that never reads"
    );
}

/// One client floods posted writes; the other device's client still gets its reads
/// answered promptly (per-channel budgets, round-robin over channels).
#[test]
fn flooding_neighbour_does_not_starve_others() {
    let t = two("rob-flood");
    let mut flooder = connect(&t.a).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let flood = std::thread::spawn(move || {
        let big = vec![0u8; 512 << 10];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            // Rejected by the device (beyond BAR2), but each one crosses the tunnel.
            let req = Request::RegionWrite(RegionWrite {
                offset: 0,
                region: 2,
                data: big.clone(),
            });
            if flooder.post(&req).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut other = connect(&t.b).unwrap();
    let start = Instant::now();
    let mut done = 0;
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        other.region_read(2, 0, 1).unwrap();
        worst = worst.max(t.elapsed());
        done += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    // Before per-channel fairness a read waited behind the whole flood (59 reads in
    // 5 s, waits growing with the backlog); now it waits behind at most the flood
    // messages already queued, so no read waits long. The count is only a floor: next
    // to this flood a read takes 20 to 50 ms (2 s gives 43 to 52 reads on this machine,
    // fewer when the whole suite runs at once), so the bound on the worst wait is the
    // property under test.
    assert!(done >= 20, "only {done} reads in 2 s next to a flood");
    assert!(
        worst < Duration::from_secs(1),
        "a read waited {worst:?} behind the flood"
    );
}

fn set_irqs(c: &mut Client, data: IrqData, fds: Vec<OwnedFd>) -> Result<(), ClientError> {
    let req = Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: pci_irq::INTX,
        start: 0,
        count: 1,
        data,
    });
    c.request(&req, fds).map(|_| ())
}

/// An interrupt "eventfd" that is a pipe is refused (EINVAL); a real eventfd whose
/// counter is saturated and that is blocking does not stall the relay when the device
/// triggers it: the other device keeps answering.
#[test]
fn bad_interrupt_fds_are_contained() {
    let t = two("rob-irqfd");
    let mut c = connect(&t.a).unwrap();
    let mut p = [0; 2];
    // SAFETY: pipe(2) writes two new fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: both are new and owned here.
    let (_r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    match set_irqs(&mut c, IrqData::EventFd { assign: true }, vec![w]) {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::EINVAL as u32),
        other => panic!("a pipe as eventfd: {other:?}"),
    }
    // SAFETY: eventfd(2) returns a new fd (blocking) that we own.
    let e = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
    let max = (u64::MAX - 1).to_ne_bytes();
    // SAFETY: writes 8 bytes from a local array.
    assert_eq!(
        unsafe { libc::write(e.as_raw_fd(), max.as_ptr() as *const _, 8) },
        8
    );
    set_irqs(
        &mut c,
        IrqData::EventFd { assign: true },
        vec![e.try_clone().unwrap()],
    )
    .unwrap();
    set_irqs(&mut c, IrqData::None, vec![]).unwrap();
    let mut other = connect(&t.b).unwrap();
    assert_eq!(
        other.region_read(pci_region::CONFIG, 0, 2).unwrap(),
        [0x4f, 0x49]
    );
}
