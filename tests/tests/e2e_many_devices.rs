//! Many devices over one tunnel (issue 5, "Many devices").

use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::{start_loopback_guest, start_relay, wait_for_socket, Scratch};

const DEVICES: usize = 16;
const BAR2: u32 = 2;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Proves that 16 devices exported by one relay and served by one device VM over one
/// tunnel work at the same time without cross-talk: 16 clients, each in its own
/// thread, write their own values to their device (posted and acknowledged writes) and
/// read back only their own, 300 rounds each.
#[test]
fn sixteen_devices_concurrent_clients_no_cross_talk() {
    let scratch = Scratch::new("many");
    let frontend = scratch.join("frontend.sock");
    let names: Vec<String> = (0..DEVICES).map(|i| format!("gpio{i}")).collect();
    let sockets: Vec<_> = names
        .iter()
        .map(|n| scratch.join(&format!("{n}.sock")))
        .collect();
    let devices: Vec<(&str, &std::path::Path)> = names
        .iter()
        .zip(&sockets)
        .map(|(n, s)| (n.as_str(), s.as_path()))
        .collect();
    let _relay = start_relay(&frontend, &devices);
    for s in &sockets {
        assert!(wait_for_socket(s, TIMEOUT));
    }
    let serve: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "gpio")).collect();
    let _guest = start_loopback_guest(&frontend, &serve);

    let workers: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(d, socket)| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + TIMEOUT;
                let mut c = loop {
                    if let Ok(mut c) = Client::connect(&socket, Duration::from_secs(2)) {
                        if c.negotiate(Capabilities::default()).is_ok()
                            && c.region_read(BAR2, 4, 1).is_ok()
                        {
                            break c;
                        }
                    }
                    assert!(Instant::now() < deadline, "device {d} never served");
                    std::thread::sleep(Duration::from_millis(20));
                };
                for round in 0..300u32 {
                    let v = (d as u32 * 16 + round % 16) as u8;
                    if round % 2 == 0 {
                        c.region_write_posted(BAR2, 4, &[v]).unwrap();
                    } else {
                        c.region_write(BAR2, 4, &[v]).unwrap();
                    }
                    let got = c.region_read(BAR2, 4, 1).unwrap();
                    assert_eq!(got, [v], "device {d}, round {round}: its own value");
                }
            })
        })
        .collect();
    for (d, w) in workers.into_iter().enumerate() {
        assert!(w.join().is_ok(), "client of device {d} failed");
    }
}
