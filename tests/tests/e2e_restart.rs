//! The device VM goes away and comes back while clients stay connected (issue 5,
//! "Restarts"): the loopback VMM, which is the whole device VM, is killed with SIGKILL
//! in the middle of a client's traffic and started again.

use std::time::{Duration, Instant};

use vfu_tests::dma_engine::*;

/// Proves, on the window path and on the copy path, that:
/// - a client busy with requests when the device VM dies gets an error within a bounded
///   time (well under QEMU's 5 s), and new requests fail at once rather than hang;
/// - when a new device VM connects, the same client connection works again without
///   reconnecting, and without mapping its memory or assigning its interrupt eventfd
///   again: the relay gave the new device VM the client's DMA regions (with new
///   windows on the window path) and eventfd assignments, so a DMA copy lands byte for
///   byte and raises the interrupt on the eventfd assigned before the restart.
#[test]
fn device_vm_restart_keeps_clients_and_their_setup() {
    for (path, tag) in [
        (Path::Window, "restart-window"),
        (Path::CopyFd, "restart-copy"),
    ] {
        let mut s = setup(tag, path);
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 31 + (i >> 8)) as u8).collect();
        s.memory.write(SRC, &pattern);
        assert_eq!(
            run(&mut s.client, SRC, DST, 65536) & 0xff,
            1,
            "{path:?}: DONE"
        );
        assert!(
            fired(&s.irq, TIMEOUT),
            "{path:?}: interrupt before the restart"
        );

        // Kill the device VM while the client reads in a loop.
        let pid = s.guest.pid() as libc::pid_t;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: kill(2) on the child process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            Instant::now()
        });
        let mut reads = 0u32;
        let failed_at = loop {
            match s.client.region_read(BAR0, 0, 4) {
                Ok(_) => reads += 1,
                Err(_) => break Instant::now(),
            }
            assert!(reads < 10_000_000, "{path:?}: reads never failed");
        };
        let killed_at = killer.join().unwrap();
        assert!(reads > 0, "{path:?}: traffic ran before the kill");
        assert!(
            failed_at.saturating_duration_since(killed_at) < Duration::from_secs(2),
            "{path:?}: the client learned of the dead device VM within 2 s"
        );
        let t = Instant::now();
        assert!(s.client.region_read(BAR0, 0, 4).is_err());
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{path:?}: with no device VM a request fails at once"
        );

        s.restart_device_vm();
        if path == Path::Window {
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.guest.pid())).unwrap();
            assert!(
                maps.contains("memfd:vfu-dma-client"),
                "the new device VM has windows onto the client's memory again"
            );
        }
        // The device's registers are the new device VM's; the client's maps and its
        // eventfd are the relay's, given to it again.
        enable(&mut s.client);
        let _ = fired(&s.irq, Duration::ZERO);
        s.memory.write(DST, &vec![0; 65536]);
        assert_eq!(
            run(&mut s.client, SRC, DST, 65536) & 0xff,
            1,
            "{path:?}: DONE after the restart"
        );
        assert!(
            s.memory.read(DST, 65536) == pattern,
            "{path:?}: copied byte for byte after the restart"
        );
        assert!(
            fired(&s.irq, TIMEOUT),
            "{path:?}: the eventfd assigned before the restart fires"
        );
    }
}

/// Proves what `docs/operating.md` says of a relay restart: when the relay dies
/// (SIGKILL, so its sockets stay behind), the client sees its connection closed and
/// the loopback device VM stops with an error instead of serving nothing; a new relay
/// on the same paths (stale socket files included) and a new device VM bring the
/// device back, and the client recovers by reconnecting.
#[test]
fn relay_restart_is_a_disconnect_clients_recover_from() {
    use vfu_proto::client::Client;
    use vfu_proto::vfio_user::Capabilities;
    use vfu_tests::{start_loopback_guest, start_relay, wait_for_socket, Scratch};

    let scratch = Scratch::new("relay-restart");
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let connect = || -> Option<Client> {
        let mut c = Client::connect(&device, Duration::from_secs(1)).ok()?;
        c.negotiate(Capabilities::default()).ok()?;
        Some(c)
    };
    let served = |what: &str| -> Client {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(mut c) = connect() {
                if c.region_read(2, 0, 1).is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "{what}: device never served");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut relay = start_relay(&frontend, &[("gpio0", &device)]);
    assert!(wait_for_socket(&device, TIMEOUT));
    let mut guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    let mut c = served("first relay");

    relay.kill();
    assert!(
        c.region_read(2, 0, 1).is_err(),
        "the client sees the relay gone"
    );
    let deadline = Instant::now() + TIMEOUT;
    let code = loop {
        if let Some(code) = guest.exited() {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "the device VM noticed that the relay is gone"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(1), "the device VM stops with an error");

    let _relay = start_relay(&frontend, &[("gpio0", &device)]);
    let _guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    let mut c = served("second relay");
    assert!(c.region_read(2, 0, 1).is_ok());
}
