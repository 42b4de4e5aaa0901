//! Devices added and removed while the relay runs (issue 5, "Many devices"): through
//! the control socket (`vfu-relay ctl`) and by SIGHUP with an edited `--config` file,
//! with real processes: the relay, a loopback device VM serving `a`, `b` and `c`, and
//! vfio-user clients, one of them busy on another device the whole time.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::{
    binary, control_socket, relay_ctl, start_loopback_guest, start_relay, start_relay_with,
    try_connect_ready, try_start_loopback_guest_with, wait_for_socket, CtlOutput, Proc, Scratch,
};

const BAR2: u32 = 2;
const TIMEOUT: Duration = Duration::from_secs(20);
const SERVE: [(&str, &str); 3] = [("a", "gpio"), ("b", "gpio"), ("c", "gpio")];

/// A client on `socket` whose device answers (the device VM serves it).
fn served_client(socket: &Path) -> Client {
    try_connect_ready(socket, Duration::from_secs(5), TIMEOUT, |c| {
        c.region_read(BAR2, 4, 1).map(|_| ())
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Writes `v` to the device and reads it back.
fn round_trip(c: &mut Client, v: u8) -> Result<(), String> {
    c.region_write(BAR2, 4, &[v])
        .map_err(|e| format!("write: {e}"))?;
    match c.region_read(BAR2, 4, 1) {
        Ok(got) if got == [v] => Ok(()),
        Ok(got) => Err(format!("read back {got:?}, wrote {v}")),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// A client that streams requests on one device in its own thread until stopped;
/// every request must succeed.
struct Streamer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    thread: JoinHandle<()>,
}

impl Streamer {
    fn start(socket: &Path) -> Self {
        let mut c = served_client(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let (s, r, f) = (stop.clone(), rounds.clone(), failure.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = round_trip(&mut c, n as u8) {
                    *f.lock().unwrap() = Some(format!("round {n}: {e}"));
                    return;
                }
                n += 1;
                r.store(n, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            rounds,
            failure,
            thread,
        }
    }

    fn check(&self) {
        if let Some(e) = self.failure.lock().unwrap().as_ref() {
            panic!("the streaming client failed: {e}");
        }
    }

    /// Waits until the client has done `n` more rounds: its traffic goes on across
    /// whatever was just done to the other devices.
    fn wait_progress(&self, n: u64) {
        let target = self.rounds.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + TIMEOUT;
        while self.rounds.load(Ordering::Relaxed) < target {
            self.check();
            assert!(Instant::now() < deadline, "the streaming client stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let Self {
            rounds,
            failure,
            thread,
            ..
        } = self;
        thread.join().expect("streaming thread");
        if let Some(e) = failure.lock().unwrap().as_ref() {
            panic!("the streaming client failed: {e}");
        }
        rounds.load(Ordering::Relaxed)
    }
}

fn ctl_ok(control: &Path, args: &[&str]) -> String {
    let out = relay_ctl(control, args);
    assert!(out.ok, "ctl {args:?} failed: {}", out.stderr);
    out.stdout
}

/// Runs a command that must fail with a message on stderr; returns the message.
fn ctl_err(control: &Path, args: &[&str]) -> String {
    let CtlOutput { ok, stdout, stderr } = relay_ctl(control, args);
    assert!(!ok, "ctl {args:?} succeeded: {stdout}");
    assert!(stderr.starts_with("vfu-relay ctl: "), "{args:?}: {stderr}");
    stderr
}

/// One device as `list --json` shows it.
#[derive(Debug, PartialEq)]
struct Listed {
    name: String,
    channel: u64,
    socket: PathBuf,
    client: bool,
    served: String,
}

/// `list --json`: whether the device VM is connected, and the devices.
fn list(control: &Path) -> (bool, Vec<Listed>) {
    let out = ctl_ok(control, &["list", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("list --json prints JSON");
    let devices = v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| Listed {
            name: d["name"].as_str().unwrap().to_string(),
            channel: d["channel"].as_u64().unwrap(),
            socket: PathBuf::from(d["socket"].as_str().unwrap()),
            client: d["client"].as_bool().unwrap(),
            served: d["device_vm"].as_str().unwrap().to_string(),
        })
        .collect();
    (v["device_vm"].as_bool().unwrap(), devices)
}

fn names(devices: &[Listed]) -> Vec<(&str, u64)> {
    devices
        .iter()
        .map(|d| (d.name.as_str(), d.channel))
        .collect()
}

/// Waits until `list` satisfies `ok`.
fn wait_list(control: &Path, what: &str, ok: impl Fn(bool, &[Listed]) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (vm, devices) = list(control);
        if ok(vm, &devices) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: list shows {devices:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Proves, while a client streams write-then-read requests on device `a`, that:
/// - device `b` added at run time gets the next channel id and works at once for a
///   client (the device VM was asked to serve it without restarting anything);
/// - removing `b` while its client is connected disconnects that client (its next
///   request fails), removes the socket file, and `list` no longer shows it;
/// - `b` added again gets a new channel id (3: ids are never reused) and works;
/// - a device the device VM does not serve (`d`) can be added: `list` says so, its
///   client gets an error, and it can be removed;
/// - bad commands (duplicate name or socket path, the frontend or control socket,
///   bad names, a missing '=', a directory that does not exist, an unknown device,
///   no relay on the control socket) fail with a clear message and a non-zero exit
///   status, and change nothing;
/// - the client on `a` sees none of it: every one of its requests succeeds, and it
///   makes progress between every two steps.
#[test]
fn add_and_remove_devices_while_another_streams() {
    add_and_remove_while_another_streams(1);
}

/// Proves the same with two queue pairs, so two switch threads: `a` (channel 1) is
/// thread 1's, the first `b` (channel 2) thread 0's, the second (channel 3) thread
/// 1's again. Thread 0 serves the control socket and adds and removes the devices of
/// both threads while thread 1 serves `a`'s client.
#[test]
fn add_and_remove_devices_of_another_switch_thread() {
    add_and_remove_while_another_streams(2);
}

fn add_and_remove_while_another_streams(pairs: u16) {
    let scratch = Scratch::new(&format!("runtime-devices-{pairs}"));
    let frontend = scratch.join("frontend.sock");
    let control = control_socket(&frontend);
    let (a, b, d) = (
        scratch.join("a.sock"),
        scratch.join("b.sock"),
        scratch.join("d.sock"),
    );
    let pairs = pairs.to_string();
    let _relay = start_relay_with(None, &frontend, &[("a", &a)], &["--queue-pairs", &pairs]);
    assert!(wait_for_socket(&a, TIMEOUT));
    assert!(wait_for_socket(&control, TIMEOUT));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&control).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the control socket is private");
    let _guest = try_start_loopback_guest_with(None, &frontend, &SERVE, &["--queue-pairs", &pairs])
        .unwrap_or_else(|e| panic!("{e}"));
    let streamer = Streamer::start(&a);
    streamer.wait_progress(50);

    // Add b and use it.
    let out = ctl_ok(&control, &["add", &format!("b={}", b.display())]);
    assert!(out.contains("added b (channel 2)"), "{out}");
    let mut cb = served_client(&b);
    round_trip(&mut cb, 0x5a).unwrap();
    streamer.wait_progress(50);
    let (vm, devices) = list(&control);
    assert!(vm, "the device VM is connected");
    assert_eq!(names(&devices), [("a", 1), ("b", 2)]);
    assert!(devices.iter().all(|d| d.client && d.served == "served"));
    let table = ctl_ok(&control, &["list"]);
    assert!(
        table.starts_with("device VM: connected\nNAME") && table.contains(&b.display().to_string()),
        "{table}"
    );

    // Remove b under its client.
    let out = ctl_ok(&control, &["remove", "b"]);
    assert_eq!(out.trim(), "removed b");
    assert!(
        round_trip(&mut cb, 1).is_err(),
        "b's client sees its device go"
    );
    assert!(!b.exists(), "b's socket file is removed");
    assert!(UnixStream::connect(&b).is_err());
    streamer.wait_progress(50);
    assert_eq!(names(&list(&control).1), [("a", 1)]);
    let e = ctl_err(&control, &["remove", "b"]);
    assert!(e.contains("no device named \"b\""), "{e}");

    // Add b again: a new channel, a working device.
    let out = ctl_ok(&control, &["add", &format!("b={}", b.display())]);
    assert!(out.contains("added b (channel 3)"), "{out}");
    let mut cb = served_client(&b);
    round_trip(&mut cb, 0xa5).unwrap();
    streamer.wait_progress(50);

    // Bad commands.
    let other = scratch.join("other.sock");
    let long = format!("{}={}", "x".repeat(65), other.display());
    let refusals: [(Vec<String>, &str); 8] = [
        (
            vec!["add".into(), format!("a={}", other.display())],
            "a device named \"a\" exists already",
        ),
        (
            vec!["add".into(), format!("x={}", a.display())],
            "is in use by the relay already",
        ),
        (
            vec!["add".into(), format!("x={}", frontend.display())],
            "is in use by the relay already",
        ),
        (
            vec!["add".into(), format!("x={}", control.display())],
            "is in use by the relay already",
        ),
        (vec!["add".into(), long], "must be 1 to 64 bytes"),
        (vec!["add".into(), "x".into()], "expected NAME=SOCKET"),
        (
            vec!["add".into(), "x=/nonexistent-vfu-dir/x.sock".into()],
            "No such file or directory",
        ),
        (
            vec!["remove".into(), "nope".into()],
            "no device named \"nope\"",
        ),
    ];
    for (args, expected) in &refusals {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = ctl_err(&control, &args);
        assert!(e.contains(expected), "{args:?}: {e}");
    }
    assert!(!other.exists());
    let e = ctl_err(&scratch.join("no-relay.ctl"), &["list"]);
    assert!(e.contains("no relay listens on"), "{e}");
    assert_eq!(names(&list(&control).1), [("a", 1), ("b", 3)]);
    streamer.wait_progress(50);

    // A device the device VM does not serve.
    ctl_ok(&control, &["add", &format!("d={}", d.display())]);
    wait_list(&control, "d refused by the device VM", |_, devs| {
        devs.iter()
            .any(|x| x.name == "d" && x.served == "not-served")
    });
    let mut cd = Client::connect(&d, Duration::from_secs(5)).unwrap();
    assert!(
        cd.negotiate(Capabilities::default()).is_err(),
        "a client of a device nobody serves gets an error"
    );
    ctl_ok(&control, &["remove", "d"]);
    round_trip(&mut cb, 0x11).unwrap();
    streamer.wait_progress(50);

    let rounds = streamer.finish();
    assert!(
        rounds >= 300,
        "the client on a kept going ({rounds} rounds)"
    );
}

/// Proves that a device VM that connects after devices were added and removed brings
/// up exactly the current set, and so does a device VM that restarts after more
/// changes made while no device VM was connected: removed devices stay gone, added
/// ones are served, the clients of the unchanged ones keep their connections.
#[test]
fn device_vm_brings_up_the_current_set() {
    let scratch = Scratch::new("runtime-devices-later");
    let frontend = scratch.join("frontend.sock");
    let control = control_socket(&frontend);
    let (a, b, c) = (
        scratch.join("a.sock"),
        scratch.join("b.sock"),
        scratch.join("c.sock"),
    );
    let _relay = start_relay(&frontend, &[("a", &a), ("b", &b)]);
    assert!(wait_for_socket(&control, TIMEOUT));
    let (vm, devices) = list(&control);
    assert!(!vm, "no device VM yet");
    assert!(devices.iter().all(|d| d.served == "unknown"));
    ctl_ok(&control, &["add", &format!("c={}", c.display())]);
    ctl_ok(&control, &["remove", "a"]);

    let mut guest = start_loopback_guest(&frontend, &SERVE);
    let mut cb = served_client(&b);
    let mut cc = served_client(&c);
    wait_list(&control, "b and c served", |vm, devs| {
        vm && devs.iter().all(|d| d.served == "served")
    });
    assert_eq!(names(&list(&control).1), [("b", 2), ("c", 3)]);
    assert!(!a.exists());

    // Changes while the device VM is down.
    guest.kill();
    wait_list(&control, "device VM gone", |vm, _| !vm);
    ctl_ok(&control, &["remove", "b"]);
    ctl_ok(&control, &["add", &format!("a={}", a.display())]);
    assert!(
        round_trip(&mut cb, 1).is_err(),
        "b's client is disconnected"
    );
    let _guest = start_loopback_guest(&frontend, &SERVE);
    let _ca = served_client(&a);
    let deadline = Instant::now() + TIMEOUT;
    while round_trip(&mut cc, 2).is_err() {
        assert!(
            Instant::now() < deadline,
            "c's client works again on the same connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_list(&control, "c and a served", |vm, devs| {
        vm && devs.iter().all(|d| d.served == "served")
    });
    assert_eq!(names(&list(&control).1), [("c", 3), ("a", 4)]);
}

fn write_config(path: &Path, frontend: &Path, devices: &[(&str, &Path)]) {
    let mut text = format!("frontend_socket = \"{}\"\n", frontend.display());
    for (name, socket) in devices {
        text.push_str(&format!(
            "[[device]]\nname = \"{name}\"\nsocket = \"{}\"\n",
            socket.display()
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn sighup(p: &Proc) {
    // SAFETY: kill(2) on the child process this test started.
    unsafe { libc::kill(p.pid() as libc::pid_t, libc::SIGHUP) };
}

/// Proves that SIGHUP applies the edited `--config` file's devices as a difference:
/// an added device is served, an unchanged one keeps its client connection (the same
/// connection works after the reload), a removed one disconnects its client, one
/// whose socket moved is served on the new path; a broken file changes nothing and
/// the relay keeps running.
#[test]
fn sighup_applies_the_config_file() {
    let scratch = Scratch::new("runtime-devices-hup");
    let frontend = scratch.join("frontend.sock");
    let control = control_socket(&frontend);
    let file = scratch.join("relay.toml");
    let (a, b, b2) = (
        scratch.join("a.sock"),
        scratch.join("b.sock"),
        scratch.join("b2.sock"),
    );
    write_config(&file, &frontend, &[("a", &a)]);
    let cfg = file.display().to_string();
    let mut relay = Proc::spawn("vfu-relay", &binary("vfu-relay"), &["--config", &cfg]);
    assert!(wait_for_socket(&control, TIMEOUT));
    let _guest = start_loopback_guest(&frontend, &SERVE);
    let mut ca = served_client(&a);

    write_config(&file, &frontend, &[("a", &a), ("b", &b)]);
    sighup(&relay);
    wait_list(&control, "b added", |_, devs| devs.len() == 2);
    let mut cb = served_client(&b);
    round_trip(&mut ca, 3).expect("a's client is untouched by the reload");
    round_trip(&mut cb, 4).unwrap();

    write_config(&file, &frontend, &[("b", &b2)]);
    sighup(&relay);
    wait_list(&control, "a removed, b moved", |_, devs| {
        devs.len() == 1 && devs[0].socket == b2
    });
    assert!(
        round_trip(&mut ca, 5).is_err(),
        "a's client is disconnected"
    );
    assert!(round_trip(&mut cb, 6).is_err(), "b's old client too");
    assert!(!a.exists() && !b.exists());
    let mut cb2 = served_client(&b2);
    round_trip(&mut cb2, 7).unwrap();

    std::fs::write(&file, "this is not toml").unwrap();
    sighup(&relay);
    std::thread::sleep(Duration::from_millis(300));
    assert!(relay.is_running());
    assert_eq!(names(&list(&control).1), [("b", 3)]);
    round_trip(&mut cb2, 8).unwrap();
}
