//! End to end through the tunnel, with real processes: vfu-relay, vfu-guest as the
//! loopback device VM serving the `gpio` model, and two independent vfio-user clients
//! (the `vfio_user` crate's and one on vfu-proto).

use std::path::Path;
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{
    pci_irq, pci_region, Capabilities, GetInfoRequest, RegionAccess, Request, DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use vfu_tests::{start_loopback_guest, start_relay, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(10);
const BAR2: u32 = 2;

/// A relay with device `gpio0` and a loopback device VM serving it with `gpio`.
struct Setup {
    _relay: Proc,
    _guest: Proc,
    device: std::path::PathBuf,
    _scratch: Scratch,
}

fn setup(tag: &str) -> Setup {
    let scratch = Scratch::new(tag);
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let relay = start_relay(&frontend, &[("gpio0", &device)]);
    assert!(
        wait_for_socket(&device, TIMEOUT),
        "relay did not create its device socket"
    );
    let guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    wait_until_served(&device);
    Setup {
        _relay: relay,
        _guest: guest,
        device,
        _scratch: scratch,
    }
}

/// Waits until a VERSION through the relay succeeds (the device VM is up and serves).
fn wait_until_served(device: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(mut c) = Client::connect(device, Duration::from_secs(2)) {
            if c.negotiate(Capabilities::default()).is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "device never became available");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn client(device: &Path) -> Client {
    let mut c = Client::connect(device, TIMEOUT).expect("connect");
    c.negotiate(Capabilities {
        max_msg_fds: Some(16),
        ..Default::default()
    })
    .expect("VERSION");
    c
}

fn config_u16(c: &mut Client, offset: u64) -> u16 {
    let b = c.region_read(pci_region::CONFIG, offset, 2).unwrap();
    u16::from_le_bytes([b[0], b[1]])
}

fn config_u32(c: &mut Client, offset: u64) -> u32 {
    let b = c.region_read(pci_region::CONFIG, offset, 4).unwrap();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The vfio_user crate's client sets up through the relay (VERSION, GET_INFO, every
/// REGION_INFO), reads the PCI IDs from config space, writes and reads BAR2, and resets.
#[test]
fn crate_client_through_relay() {
    let s = setup("e2e-crate");
    let mut c = vfio_user::Client::new(&s.device).expect("setup through the relay");
    let bar2 = c.region(BAR2).expect("BAR2 described");
    assert_eq!(bar2.size, 0x100);
    assert_eq!(
        bar2.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE),
        3
    );
    let mut ids = [0u8; 4];
    c.region_read(pci_region::CONFIG, 0, &mut ids).unwrap();
    assert_eq!(
        ids,
        [0x4f, 0x49, 0xc8, 0x0d],
        "vendor 0x494f, device 0x0dc8"
    );
    c.region_write(BAR2, 0, &[0xa5]).unwrap();
    let mut out = [0u8; 1];
    c.region_read(BAR2, 0, &mut out).unwrap();
    assert_eq!(out, [0xa5], "FET outputs 0-7 read back");
    c.reset().unwrap();
    c.region_read(BAR2, 0, &mut out).unwrap();
    assert_eq!(out, [0], "reset clears the outputs");
}

/// A vfu-proto client: device info, region info for every region, IRQ info, config space
/// (IDs, BAR2 sizing), BAR reads and writes, posted writes (in order with a later read),
/// and reset.
#[test]
fn proto_client_through_relay() {
    let s = setup("e2e-proto");
    let mut c = client(&s.device);
    let caps = c.server_caps;
    assert_eq!(
        caps.max_msg_fds(),
        16,
        "fds end at the relay: its own limit"
    );
    assert!(caps.max_data_xfer_size() >= 4096);

    let info = c.device_info().unwrap();
    assert_eq!(info.flags, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!(info.num_regions, pci_region::COUNT);
    for index in 0..info.num_regions {
        let (r, fd) = c.region_info(index).unwrap();
        assert_eq!(r.index, index);
        assert!(fd.is_none());
        let expected = match index {
            BAR2 => 0x100,
            pci_region::CONFIG => 256,
            _ => 0,
        };
        assert_eq!(r.size, expected, "region {index}");
    }
    let intx = c.irq_info(pci_irq::INTX).unwrap();
    assert_eq!(intx.count, 1);

    assert_eq!(config_u16(&mut c, 0), 0x494f);
    assert_eq!(config_u16(&mut c, 2), 0x0dc8);
    // BAR2 sizing: write all ones, read the size mask back.
    let bar2_reg = 0x10 + 4 * BAR2 as u64;
    let original = config_u32(&mut c, bar2_reg);
    c.region_write(pci_region::CONFIG, bar2_reg, &u32::MAX.to_le_bytes())
        .unwrap();
    let mask = config_u32(&mut c, bar2_reg);
    assert_eq!(mask & !0xf, !(0x100 - 1) & !0xf, "BAR2 decodes 256 bytes");
    c.region_write(pci_region::CONFIG, bar2_reg, &original.to_le_bytes())
        .unwrap();

    // Posted writes, then a read that must see the last one.
    for v in 0..50u8 {
        c.region_write_posted(BAR2, 4, &[v]).unwrap();
    }
    assert_eq!(c.region_read(BAR2, 4, 1).unwrap(), [49]);
    c.reset().unwrap();
    assert_eq!(c.region_read(BAR2, 4, 1).unwrap(), [0]);
}

/// Bad requests get error replies and the connection stays usable: unknown region,
/// offset beyond the region, count beyond max_data_xfer_size, a message larger than the
/// relay accepts, and an unknown command.
#[test]
fn bad_requests_get_errors_and_connection_survives() {
    let s = setup("e2e-bad");
    let mut c = client(&s.device);
    let read = |region, offset, count| {
        Request::RegionRead(RegionAccess {
            offset,
            region,
            count,
        })
    };
    fn errno<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u32 {
        match r {
            Err(ClientError::Errno(e)) => e,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }
    assert_eq!(
        errno(c.request(&read(20, 0, 4), vec![])),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.request(&read(BAR2, 0x100, 1), vec![])),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.request(&read(BAR2, u64::MAX, 2), vec![])),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.request(&read(BAR2, 0, 64 << 20), vec![])),
        libc::EINVAL as u32
    );
    let info = Request::DeviceGetRegionInfo(GetInfoRequest {
        argsz: 32,
        index: 99,
    });
    assert_eq!(errno(c.request(&info, vec![])), libc::EINVAL as u32);
    // A REGION_WRITE of 2 MiB: more than the relay takes in one message (skipped
    // without being buffered, answered E2BIG).
    let big = Request::RegionWrite(vfu_proto::vfio_user::RegionWrite {
        offset: 0,
        region: BAR2,
        data: vec![0; 2 << 20],
    });
    assert_eq!(errno(c.request(&big, vec![])), libc::E2BIG as u32);
    // Command 14 is not assigned (ENOSYS); a REGION_READ with a short payload is
    // malformed (EINVAL).
    assert_eq!(errno(c.call_raw(14, &[])), libc::ENOSYS as u32);
    assert_eq!(errno(c.call_raw(9, &[0; 10])), libc::EINVAL as u32);
    // Still usable.
    assert_eq!(config_u16(&mut c, 0), 0x494f);
}

/// A client disconnects and reconnects: the device keeps its state (the spec's rule),
/// and the new client negotiates again.
#[test]
fn client_reconnects_and_device_state_is_kept() {
    let s = setup("e2e-reconnect");
    let mut c = client(&s.device);
    c.region_write(BAR2, 0, &[0x3c]).unwrap();
    drop(c);
    let mut c = client(&s.device);
    assert_eq!(c.region_read(BAR2, 0, 1).unwrap(), [0x3c]);
    // A second concurrent client is refused, the first keeps working.
    let mut second = Client::connect(&s.device, Duration::from_secs(2)).unwrap();
    assert!(second.negotiate(Capabilities::default()).is_err());
    assert_eq!(c.region_read(BAR2, 0, 1).unwrap(), [0x3c]);
}

/// Without a device VM the relay answers at once with ENODEV instead of hanging; once a
/// device VM connects (the loopback VMM started after the relay), the same client
/// connection negotiates and works.
#[test]
fn requests_without_device_vm_fail_fast_then_succeed() {
    let scratch = Scratch::new("e2e-nodvm");
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let _relay = start_relay(&frontend, &[("gpio0", &device)]);
    assert!(wait_for_socket(&device, TIMEOUT));
    let mut c = Client::connect(&device, TIMEOUT).unwrap();
    let t = Instant::now();
    match c.negotiate(Capabilities::default()) {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::ENODEV as u32),
        other => panic!("expected ENODEV, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "answered without waiting"
    );
    let _guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    let deadline = Instant::now() + TIMEOUT;
    while c.negotiate(Capabilities::default()).is_err() {
        assert!(Instant::now() < deadline, "device VM never came");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(config_u16(&mut c, 0), 0x494f);
}

/// The device VM can start before the relay: vfu-guest waits for the frontend socket.
#[test]
fn device_vm_started_before_relay() {
    let scratch = Scratch::new("e2e-order");
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let mut guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(guest.is_running(), "vfu-guest waits for the relay");
    let _relay = start_relay(&frontend, &[("gpio0", &device)]);
    wait_until_served(&device);
    let mut c = client(&device);
    assert_eq!(config_u16(&mut c, 2), 0x0dc8);
}

/// A device the device VM does not serve gets ENODEV; the served one works.
#[test]
fn unserved_device_gets_enodev() {
    let scratch = Scratch::new("e2e-unserved");
    let frontend = scratch.join("frontend.sock");
    let served = scratch.join("gpio0.sock");
    let unserved = scratch.join("other.sock");
    let _relay = start_relay(&frontend, &[("gpio0", &served), ("other", &unserved)]);
    assert!(wait_for_socket(&unserved, TIMEOUT));
    let _guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    wait_until_served(&served);
    let mut c = Client::connect(&unserved, TIMEOUT).unwrap();
    match c.negotiate(Capabilities::default()) {
        Err(ClientError::Errno(e)) => assert_eq!(e, libc::ENODEV as u32),
        other => panic!("expected ENODEV, got {other:?}"),
    }
}

/// An interrupt crosses the tunnel: the client assigns an eventfd to INTx (the relay keeps
/// it; the device VM sees a slot), asks the device to trigger INTx (SET_IRQS DATA_NONE |
/// TRIGGER), and the eventfd fires; after de-assignment it no longer does.
#[test]
fn intx_eventfd_fires_through_relay() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use vfu_proto::vfio_user::{IrqData, SetIrqs, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK};
    let s = setup("e2e-irq");
    let mut c = client(&s.device);
    // SAFETY: eventfd(2) returns a new fd that we own.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(raw >= 0);
    // SAFETY: raw is a fresh fd owned by nobody else.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    let dup = efd.try_clone().unwrap();
    let set = |action, data, count| {
        Request::DeviceSetIrqs(SetIrqs {
            action,
            index: pci_irq::INTX,
            start: 0,
            count,
            data,
        })
    };
    c.request(
        &set(IRQ_SET_ACTION_TRIGGER, IrqData::EventFd { assign: true }, 1),
        vec![dup],
    )
    .expect("assign the INTx eventfd");
    c.request(&set(IRQ_SET_ACTION_TRIGGER, IrqData::None, 1), vec![])
        .expect("trigger INTx");
    let counter = wait_eventfd(&efd, Duration::from_secs(5));
    assert_eq!(counter, Some(1), "the client's eventfd fired");
    // De-assign (no fds), unmask (INTx masks itself when it fires), trigger: nothing.
    c.request(
        &set(
            IRQ_SET_ACTION_TRIGGER,
            IrqData::EventFd { assign: false },
            1,
        ),
        vec![],
    )
    .unwrap();
    c.request(&set(IRQ_SET_ACTION_UNMASK, IrqData::None, 1), vec![])
        .unwrap();
    c.request(&set(IRQ_SET_ACTION_TRIGGER, IrqData::None, 1), vec![])
        .unwrap();
    assert_eq!(wait_eventfd(&efd, Duration::from_millis(300)), None);
}

/// Reads an eventfd's counter, waiting up to `timeout`.
fn wait_eventfd(fd: &std::os::fd::OwnedFd, timeout: Duration) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    loop {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Generic vhost-user frontends (QEMU's `vhost-user-device`, Cloud Hypervisor's
/// `--generic-vhost-user`) require VHOST_USER_PROTOCOL_F_CONFIG and forward every
/// configuration-space access to the backend. This proves the relay offers CONFIG,
/// that its (empty) configuration space reads as zeros within its 256 bytes, that a
/// write is accepted and changes nothing, and that a device VM connecting after this frontend left is served.
#[test]
fn generic_frontend_reads_an_all_zero_config_space() {
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;

    let scratch = Scratch::new("generic-frontend");
    let frontend_path = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let _relay = start_relay(&frontend_path, &[("gpio0", &device)]);
    assert!(
        wait_for_socket(&frontend_path, TIMEOUT),
        "no frontend socket"
    );

    {
        let mut frontend = Frontend::connect(&frontend_path, 2).expect("connect as frontend");
        frontend.set_owner().expect("SET_OWNER");
        let features = frontend.get_features().expect("GET_FEATURES");
        assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES not offered");
        frontend.set_features(features).expect("SET_FEATURES");
        let protocol = frontend
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        assert!(
            protocol.contains(VhostUserProtocolFeatures::CONFIG),
            "CONFIG not offered: {protocol:?}"
        );
        frontend
            .set_protocol_features(
                VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK,
            )
            .expect("SET_PROTOCOL_FEATURES");

        let flags = VhostUserConfigFlags::WRITABLE;
        let (_, bytes) = frontend
            .get_config(0, 16, flags, &[0xff; 16])
            .expect("GET_CONFIG 0+16");
        assert_eq!(bytes, vec![0; 16]);
        let (_, bytes) = frontend
            .get_config(240, 16, flags, &[0xff; 16])
            .expect("GET_CONFIG 240+16");
        assert_eq!(bytes, vec![0; 16]);
        // A read past the 256 bytes gets the protocol's error answer (a reply without
        // payload): the backend's unit test covers it, since the vhost crate's
        // frontend waits for a payload that never comes instead of seeing that answer.
        frontend
            .set_config(0, flags, &[1, 2, 3, 4])
            .expect("SET_CONFIG is accepted (and ignored)");
        let (_, bytes) = frontend
            .get_config(0, 4, flags, &[0; 4])
            .expect("GET_CONFIG after SET_CONFIG");
        assert_eq!(bytes, vec![0; 4], "a config write changed the space");
    }

    // The relay takes the next frontend: a loopback device VM serves the device.
    let _guest = start_loopback_guest(&frontend_path, &[("gpio0", "gpio")]);
    wait_until_served(&device);
    let mut c = client(&device);
    assert_eq!(config_u16(&mut c, 0), 0x494f, "vendor id through the relay");
}

/// With systemd's `Type=notify` (deploy/systemd/vfu-relay.service), units ordered after
/// the relay start only once it said READY=1. This proves the relay says it only when
/// its frontend, device and control sockets all accept connections, with a status
/// line, and says STOPPING=1 on SIGTERM.
#[test]
fn relay_notifies_the_service_manager_when_its_sockets_listen() {
    use std::os::unix::net::{UnixDatagram, UnixStream};

    let scratch = Scratch::new("sd-notify");
    let notify = scratch.join("notify.sock");
    let listener = UnixDatagram::bind(&notify).expect("bind the notify socket");
    listener.set_read_timeout(Some(TIMEOUT)).unwrap();
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let mut relay = std::process::Command::new(vfu_tests::binary("vfu-relay"))
        .arg("--frontend-socket")
        .arg(&frontend)
        .arg("--device")
        .arg(format!("gpio0={}", device.display()))
        .env("NOTIFY_SOCKET", &notify)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start vfu-relay");

    let mut buf = [0u8; 512];
    let n = listener
        .recv(&mut buf)
        .expect("no notification from the relay");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.lines().any(|l| l == "READY=1"), "{text:?}");
    assert!(
        text.lines().any(|l| l.starts_with("STATUS=")),
        "no status line: {text:?}"
    );
    for socket in [&frontend, &device, &vfu_tests::control_socket(&frontend)] {
        assert!(
            UnixStream::connect(socket).is_ok(),
            "READY=1 came before {} listened",
            socket.display()
        );
    }

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(relay.id() as i32, libc::SIGTERM) };
    let mut stopping = false;
    while let Ok(n) = listener.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1")
        {
            stopping = true;
            break;
        }
    }
    let _ = relay.wait();
    assert!(stopping, "no STOPPING=1 on SIGTERM");
}
