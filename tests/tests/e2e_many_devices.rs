//! Many devices over one tunnel (issue 5, "Many devices").

use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::{start_loopback_guest, wait_for_socket, Scratch};

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
    let (names, sockets, _relay) = gpio_relay(&scratch, DEVICES, &[]);
    let serve: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "gpio")).collect();
    let _guest = start_loopback_guest(&frontend, &serve);

    checked_gpio_clients(&sockets, 300);
}

/// A relay (with `extra` options) exporting `n` devices `gpio0`... on sockets in
/// `scratch`, its frontend socket `frontend.sock` there; their names and sockets, once
/// every socket exists.
fn gpio_relay(
    scratch: &Scratch,
    n: usize,
    extra: &[&str],
) -> (Vec<String>, Vec<std::path::PathBuf>, vfu_tests::Proc) {
    let names: Vec<String> = (0..n).map(|i| format!("gpio{i}")).collect();
    let sockets: Vec<_> = names
        .iter()
        .map(|n| scratch.join(&format!("{n}.sock")))
        .collect();
    let devices: Vec<(&str, &std::path::Path)> = names
        .iter()
        .zip(&sockets)
        .map(|(n, s)| (n.as_str(), s.as_path()))
        .collect();
    let relay = vfu_tests::start_relay_with(None, &scratch.join("frontend.sock"), &devices, extra);
    for s in &sockets {
        assert!(wait_for_socket(s, TIMEOUT));
    }
    (names, sockets, relay)
}

/// One client thread per socket, each writing its own values to its gpio device
/// (posted and acknowledged writes by turns) and reading back only its own, `rounds`
/// times; panics if any client fails.
fn checked_gpio_clients(sockets: &[std::path::PathBuf], rounds: u32) {
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
                for round in 0..rounds {
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

/// The relay's threads named `name`: (thread id, voluntary context switches so far).
fn threads_named(pid: u32, name: &str) -> Vec<(u32, u64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let tid = task.file_name().to_string_lossy().parse().unwrap_or(0);
        found.push((tid, switches));
    }
    found.sort();
    found
}

/// Proves that each queue pair has a worker thread and a switch thread of its own in
/// the relay, and that the work spreads over them: with 4 pairs offered and used, the
/// relay runs 4 tunnel queue workers (`vring_worker`) and 4 switch threads
/// (`vfu-switch-0` to `-3`, each owning the client sockets of the channels whose id
/// mod 4 is its number), 8 gpio devices (channels on every pair and thread) serve
/// checked traffic with no cross-talk, and every worker and every switch thread woke
/// many times for it (its pair's notifications, its clients' requests), not one of
/// them for all.
#[test]
fn each_queue_pair_has_its_own_worker_thread() {
    const PAIRS: usize = 4;
    let scratch = Scratch::new("pairs");
    let (sockets, relay, _guest) = many_pairs(&scratch, PAIRS, &[]);
    checked_gpio_clients(&sockets, 200);
    let workers = threads_named(relay.pid(), "vring_worker");
    assert_eq!(
        workers.len(),
        PAIRS,
        "one worker per queue pair: {workers:?}"
    );
    for (tid, switches) in &workers {
        assert!(
            *switches >= 50,
            "worker {tid} woke {switches} times: every pair's worker serves its pair ({workers:?})"
        );
    }
    for k in 0..PAIRS {
        let name = format!("vfu-switch-{k}");
        let threads = threads_named(relay.pid(), &name);
        assert_eq!(threads.len(), 1, "one {name}: {threads:?}");
        let (tid, switches) = threads[0];
        assert!(
            switches >= 50,
            "{name} ({tid}) woke {switches} times: every switch thread serves its clients"
        );
    }
}

/// Proves that in poll mode every queue pair is polled: each of 4 switch threads
/// turns off the notifications of its own pair's queue and polls it, and checked
/// traffic on 8 devices (channels on every pair) still flows with no cross-talk. A
/// pair whose notifications were turned off by one thread and polled by none would
/// stall its devices.
#[test]
fn poll_mode_polls_every_queue_pair() {
    const PAIRS: usize = 4;
    let scratch = Scratch::new("pairs-poll");
    let poll = ["--poll-us", "100000"];
    let (sockets, relay, _guest) = many_pairs(&scratch, PAIRS, &poll);
    checked_gpio_clients(&sockets, 200);
    for k in 0..PAIRS {
        let name = format!("vfu-switch-{k}");
        assert_eq!(threads_named(relay.pid(), &name).len(), 1, "one {name}");
    }
}

/// A relay offering `pairs` queue pairs with `2 * pairs` gpio devices, and a loopback
/// device VM that uses every pair and serves them all; both with `extra` options.
fn many_pairs(
    scratch: &Scratch,
    pairs: usize,
    extra: &[&str],
) -> (Vec<std::path::PathBuf>, vfu_tests::Proc, vfu_tests::Proc) {
    let frontend = scratch.join("frontend.sock");
    let devices = 2 * pairs;
    let pairs = pairs.to_string();
    let mut relay_args = vec!["--queue-pairs", &pairs];
    relay_args.extend(extra);
    let (names, sockets, relay) = gpio_relay(scratch, devices, &relay_args);
    let mut args = vec![
        "--loopback".to_string(),
        frontend.display().to_string(),
        "--queue-pairs".into(),
        pairs.clone(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    for n in &names {
        args.extend(["--serve".into(), format!("{n}=gpio")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let guest = vfu_tests::Proc::spawn("vfu-guest", &vfu_tests::binary("vfu-guest"), &args);
    (sockets, relay, guest)
}

/// Proves that a stuck device does not stall the others. Device `stuck` (dma-engine)
/// has a client that mapped its memory without fds and then stops reading its socket
/// after ringing the doorbell: the device's DMA_READ, which the relay forwards to that
/// client, stays unanswered (the relay's request timeout is raised to 60 s, so the
/// stall outlasts the test). While it is stuck, device `busy` (dma-engine on the copy
/// path, which waits for the relay on every DMA) copies 64 KiB twenty times, checked
/// byte for byte, and device `gpio0` answers 200 writes and reads. Then the stuck
/// client starts answering, and its operation completes with the right data: the
/// stall was contained, and nothing was lost.
#[test]
fn a_stuck_device_does_not_stall_the_others() {
    use vfu_tests::dma_engine::{self as de, Memory, COMPLETION, DST, MIB, SRC};
    use vfu_tests::Proc;

    let scratch = Scratch::new("stuck");
    let frontend = scratch.join("frontend.sock");
    let socks = ["stuck", "busy", "gpio0"].map(|n| scratch.join(&format!("{n}.sock")));
    let _relay = vfu_tests::start_relay_with(
        None,
        &frontend,
        &[
            ("stuck", &socks[0]),
            ("busy", &socks[1]),
            ("gpio0", &socks[2]),
        ],
        &["--request-timeout-ms", "60000"],
    );
    for s in &socks {
        assert!(wait_for_socket(s, TIMEOUT));
    }
    // No shared memory: every DMA of both dma-engines goes through the relay.
    let _guest = Proc::spawn(
        "vfu-guest",
        &vfu_tests::binary("vfu-guest"),
        &[
            "--loopback",
            &frontend.display().to_string(),
            "--no-shmem",
            "--serve",
            "stuck=dma-engine",
            "--serve",
            "busy=dma-engine",
            "--serve",
            "gpio0=gpio",
        ],
    );
    let connect = |socket: &std::path::Path| {
        let mut c = vfu_tests::connect_served(socket, TIMEOUT);
        c.set_timeout(Duration::from_secs(5)).unwrap();
        c
    };

    // Every client connects first; each request then has 5 s (QEMU's client timeout).
    let mut stuck = connect(&socks[0]);
    let mut busy_client = connect(&socks[1]);
    let mut gpio_client = connect(&socks[2]);

    // The stuck client: memory without fds, served only later.
    let len = 64 << 10;
    let pattern: Vec<u8> = (0..len).map(|i: usize| (i * 13 + (i >> 8)) as u8).collect();
    let stuck_mem =
        std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; (2 * MIB + 4096) as usize]));
    stuck_mem.lock().unwrap()[..len].copy_from_slice(&pattern);
    de::map(&mut stuck, SRC, MIB, 0, false, None);
    de::map(&mut stuck, DST, de::DST_SIZE, 0, true, None);
    de::enable(&mut stuck);
    de::reg_write(&mut stuck, 0x08, SRC, 8);
    de::reg_write(&mut stuck, 0x10, DST, 8);
    de::reg_write(&mut stuck, 0x18, COMPLETION, 8);
    de::reg_write(&mut stuck, 0x20, len as u64, 4);
    stuck
        .region_write_posted(0, 0x24, &1u32.to_le_bytes())
        .unwrap();
    assert!(
        stuck.wait_readable(TIMEOUT).unwrap(),
        "the relay asks the stuck client for its memory"
    );

    // Meanwhile the others work.
    let busy = std::thread::spawn(move || {
        let c = &mut busy_client;
        let mem = de::memfd(2 * MIB + 4096);
        de::map(c, SRC, MIB, 0, false, Some(&mem));
        de::map(c, DST, de::DST_SIZE, MIB, true, Some(&mem));
        de::enable(c);
        let mem = Memory::File(mem);
        for round in 0..20u32 {
            let data: Vec<u8> = (0..64 << 10)
                .map(|i: u32| (i ^ (round * 31)) as u8)
                .collect();
            mem.write(SRC, &data);
            let status = de::run(c, SRC, DST, data.len() as u32);
            assert_eq!(status & 0xff, 1, "busy: round {round} done");
            assert!(
                mem.read(DST, data.len()) == data,
                "busy: round {round} copied"
            );
        }
    });
    let gpio = std::thread::spawn(move || {
        let c = &mut gpio_client;
        for round in 0..200u32 {
            c.region_write(BAR2, 4, &[round as u8]).unwrap();
            assert_eq!(c.region_read(BAR2, 4, 1).unwrap(), [round as u8]);
        }
    });
    assert!(busy.join().is_ok(), "the busy dma-engine kept working");
    assert!(gpio.join().is_ok(), "the gpio kept working");
    assert!(
        stuck.wait_readable(Duration::ZERO).unwrap(),
        "the stuck device's request is still unanswered: the others worked during the stall"
    );

    // The stuck client comes back: its device finishes the copy it was given.
    stuck.serve_dma(SRC, stuck_mem.clone());
    let status = de::reg_read(&mut stuck, 0x28);
    assert_eq!(status & 0xff, 1, "the stuck device completed its copy");
    let memory = Memory::Buffer(stuck_mem);
    assert!(memory.read(DST, len) == pattern, "copied byte for byte");
    assert_eq!(
        de::completion(&memory),
        [0, de::crc32c(&pattern), len as u32, 1]
    );
}
