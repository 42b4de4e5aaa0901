//! Who may connect (issue 8, `docs/security.md`): socket modes and groups, the
//! SO_PEERCRED allow-lists of device and frontend sockets, one client per device socket,
//! and a relay that dropped privileges, with real processes: the relay, a loopback
//! device VM, and clients run as other users (`vfu-probe` under
//! `std::os::unix::process::CommandExt::uid`).
//!
//! Running clients as other users needs root; these tests run as root here and in CI.
//! Run as another user, the tests that need it say SKIPPED loudly and pass.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::logs::{spawn_logged, Log};
use vfu_tests::{
    binary, connect_served, control_socket, relay_ctl, start_loopback_guest, wait_for_socket, Proc,
    Scratch,
};

const BAR2: u32 = 2;
const TIMEOUT: Duration = Duration::from_secs(20);
/// The user and group `nobody` and `nogroup` of Debian (and most systems).
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// False, after a loud message, unless the tests run as root.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    // Straight to the standard error, past the test harness's capture.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "!!! SKIPPED: {test}: needs root (to run clients and device VMs as uid {NOBODY}, and to drop privileges)"
    );
    false
}

/// A copy of workspace binary `name` in `dir`, where user nobody may run it (the
/// build directory may not be reachable by other users).
fn runnable_copy(dir: &Scratch, name: &str) -> PathBuf {
    let to = dir.join(name);
    if !to.exists() {
        std::fs::copy(binary(name), &to).expect("copy binary");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    to
}

/// Starts the relay with `args`; its log (RUST_LOG=info) goes to `log`.
fn start_relay_logged(args: &[&str], log: &Path) -> Proc {
    spawn_logged("vfu-relay", "vfu-relay", args, "info", log)
}

/// Starts the relay on a configuration file `text` written to `dir/relay.toml`.
fn start_relay_config(dir: &Scratch, text: &str) -> (Proc, PathBuf) {
    let config = dir.join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.join("relay.log");
    let relay = start_relay_logged(&["--config", config.to_str().unwrap()], &log);
    (relay, log)
}

/// Waits until the relay's log holds `needle`.
fn wait_log(log: &Path, needle: &str) -> bool {
    Log::new(log.to_path_buf())
        .wait_for(needle, Duration::from_secs(10))
        .is_ok()
}

/// What `vfu-probe` said and its exit status.
#[derive(Debug)]
struct Probe {
    status: Option<i32>,
    word: String,
}

/// Runs `vfu-probe SOCKET` as `uid`:`gid`.
fn probe_as(dir: &Scratch, socket: &Path, uid: u32, gid: u32) -> Probe {
    let out = Command::new(runnable_copy(dir, "vfu-probe"))
        .arg(socket)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .expect("run vfu-probe");
    Probe {
        status: out.status.code(),
        word: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

/// Writes `v` to the device and reads it back.
fn round_trip(c: &mut Client, v: u8) {
    c.region_write(BAR2, 4, &[v]).expect("write");
    assert_eq!(c.region_read(BAR2, 4, 1).expect("read"), [v]);
}

/// The relay's `list --json` entry for `name`.
fn listed(control: &Path, name: &str) -> Value {
    let out = relay_ctl(control, &["list", "--json"]);
    assert!(out.ok, "list: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("list JSON");
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not listed: {}", out.stdout))
}

/// Mode bits, owner and group of a file.
fn stat(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Proves that the SO_PEERCRED allow-list of a device socket decides who is served,
/// whatever the socket file's mode lets connect: with every socket at mode 0666, a
/// client running as uid 65534 is closed at once on a device with the default list
/// (root and the relay's user), the refusal is logged with its uid, gid and pid, and
/// the device's client, connected meanwhile, goes on being served and the device does
/// not count the refused peer as a connection; the same uid is served on a device that
/// allows it by uid, another uid on a device that allows its primary group, and refused
/// there with another group.
#[test]
fn a_client_not_allowed_is_refused_and_an_allowed_one_served() {
    if !root_or_skip("a_client_not_allowed_is_refused_and_an_allowed_one_served") {
        return;
    }
    let dir = Scratch::new("access-peers");
    let (f, a, b, c) = (
        dir.join("f.sock"),
        dir.join("a.sock"),
        dir.join("b.sock"),
        dir.join("c.sock"),
    );
    let (_relay, log) = start_relay_config(
        &dir,
        &format!(
            r#"
frontend_socket = "{f}"
socket_mode = "0666"
[[device]]
name = "a"
socket = "{a}"
[[device]]
name = "b"
socket = "{b}"
allow_uids = ["nobody"]
[[device]]
name = "c"
socket = "{c}"
allow_gids = [{NOBODY}]
"#,
            f = f.display(),
            a = a.display(),
            b = b.display(),
            c = c.display()
        ),
    );
    assert!(wait_for_socket(&a, TIMEOUT), "relay never listened");
    let _guest = start_loopback_guest(&f, &[("a", "gpio"), ("b", "gpio"), ("c", "gpio")]);
    let mut first = connect_served(&a, TIMEOUT);
    round_trip(&mut first, 1);
    let control = control_socket(&f);
    let connections = listed(&control, "a")["connections"].clone();

    let p = probe_as(&dir, &a, NOBODY, NOBODY);
    assert_eq!((p.status, p.word.as_str()), (Some(2), "closed"), "{p:?}");
    assert!(
        wait_log(
            &log,
            &format!(
                "a: refused a client on {}: uid {NOBODY} gid {NOBODY} pid ",
                a.display()
            )
        ),
        "no refusal logged"
    );
    round_trip(&mut first, 2);
    let info = listed(&control, "a");
    assert_eq!(info["client"], true);
    assert_eq!(
        info["connections"], connections,
        "the refused peer reached the device: {info}"
    );

    let p = probe_as(&dir, &b, NOBODY, NOBODY);
    assert_eq!((p.status, p.word.as_str()), (Some(0), "served"), "{p:?}");
    let p = probe_as(&dir, &c, 12345, NOBODY);
    assert_eq!((p.status, p.word.as_str()), (Some(0), "served"), "{p:?}");
    let p = probe_as(&dir, &c, 12345, 12345);
    assert_eq!((p.status, p.word.as_str()), (Some(2), "closed"), "{p:?}");
    round_trip(&mut first, 3);
}

/// Proves that every socket file gets the mode and group the configuration gives it
/// (nothing else is ever observable, since they are set before listen(2)): by default
/// all are 0600 and root's; with `socket_mode`/`socket_group` the devices and the
/// frontend take them, a device's own keys win for it, the frontend's own keys win for
/// it, the control socket stays 0600, and `ctl add` takes the relay's defaults or the
/// options given; a user whom the mode leaves out cannot even connect.
#[test]
fn socket_files_have_the_configured_modes_and_groups() {
    let dir = Scratch::new("access-modes");
    let (f, a) = (dir.join("f0.sock"), dir.join("a0.sock"));
    let log = dir.join("relay0.log");
    let mut relay = start_relay_logged(
        &[
            "--frontend-socket",
            f.to_str().unwrap(),
            "--device",
            &format!("a={}", a.display()),
        ],
        &log,
    );
    assert!(wait_for_socket(&a, TIMEOUT), "relay never listened");
    // SAFETY: getters cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    for p in [&f, &a, &control_socket(&f)] {
        assert_eq!(stat(p), (0o600, uid, gid), "{}", p.display());
    }
    relay.stop();

    if !root_or_skip("socket_files_have_the_configured_modes_and_groups (groups)") {
        return;
    }
    let (f, a, b, d, e) = (
        dir.join("f.sock"),
        dir.join("a.sock"),
        dir.join("b.sock"),
        dir.join("d.sock"),
        dir.join("e.sock"),
    );
    let (_relay, _log) = start_relay_config(
        &dir,
        &format!(
            r#"
frontend_socket = "{f}"
socket_mode = "0660"
socket_group = "nogroup"
frontend_socket_mode = "0600"
frontend_socket_group = 0
[[device]]
name = "a"
socket = "{a}"
[[device]]
name = "b"
socket = "{b}"
socket_mode = "0640"
socket_group = "root"
"#,
            f = f.display(),
            a = a.display(),
            b = b.display()
        ),
    );
    assert!(wait_for_socket(&b, TIMEOUT), "relay never listened");
    assert_eq!(stat(&a), (0o660, 0, NOBODY));
    assert_eq!(stat(&b), (0o640, 0, 0));
    assert_eq!(stat(&f), (0o600, 0, 0));
    assert_eq!(stat(&control_socket(&f)), (0o600, 0, 0));
    let control = control_socket(&f);
    let out = relay_ctl(&control, &["add", &format!("d={}", d.display())]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(stat(&d), (0o660, 0, NOBODY));
    let out = relay_ctl(
        &control,
        &[
            "add",
            &format!("e={}", e.display()),
            "--socket-mode",
            "0604",
            "--socket-group",
            "root",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(stat(&e), (0o604, 0, 0));
    let e_access = &listed(&control, "e")["access"];
    assert_eq!(e_access["mode"], "0604");
    assert_eq!(e_access["group"], 0);
    // The mode keeps out whom it leaves out: nobody, not in group root, on b (0640).
    let p = probe_as(&dir, &b, NOBODY, NOBODY);
    assert_eq!((p.status, p.word.as_str()), (Some(3), "denied"), "{p:?}");
}

/// Proves that one client per device socket holds and that a second one cannot
/// disturb the first: while the first is served, twenty more connections (each sending
/// VERSION, some a burst of junk besides) are closed without an answer; the first
/// goes on round-tripping between them, is still the connected client, and the device
/// counted none of them as a connection; each refusal is logged; once the first leaves,
/// the next client is served.
#[test]
fn a_second_client_cannot_disturb_the_first() {
    let dir = Scratch::new("access-second");
    let (f, a) = (dir.join("f.sock"), dir.join("a.sock"));
    let log = dir.join("relay.log");
    let _relay = start_relay_logged(
        &[
            "--frontend-socket",
            f.to_str().unwrap(),
            "--device",
            &format!("a={}", a.display()),
        ],
        &log,
    );
    assert!(wait_for_socket(&a, TIMEOUT), "relay never listened");
    let _guest = start_loopback_guest(&f, &[("a", "gpio")]);
    let mut first = connect_served(&a, TIMEOUT);
    round_trip(&mut first, 0);
    let control = control_socket(&f);
    let connections = listed(&control, "a")["connections"].clone();
    for i in 0..20u8 {
        let mut second = Client::connect(&a, Duration::from_secs(5)).expect("connect");
        if i % 2 == 1 {
            use std::io::Write;
            let mut raw = std::os::unix::net::UnixStream::connect(&a).expect("connect");
            let _ = raw.write_all(&[0xa5; 65536]);
        }
        let e = second
            .negotiate(Capabilities::default())
            .expect_err("a second client was answered");
        let text = e.to_string();
        assert!(
            text.contains("closed") || text.contains("reset") || text.contains("Broken pipe"),
            "the second client was not simply closed: {text}"
        );
        round_trip(&mut first, i);
    }
    let info = listed(&control, "a");
    assert_eq!(info["client"], true);
    assert_eq!(info["connections"], connections, "{info}");
    assert!(
        wait_log(&log, "a: refused a second client (uid "),
        "no refusal logged"
    );
    drop(first);
    let mut next = connect_served(&a, TIMEOUT);
    round_trip(&mut next, 7);
}

/// Proves that a relay started as root with `--user nobody` drops privileges for good
/// (real, effective and saved ids 65534, no supplementary groups, its sockets owned by
/// nobody) and still does its work: serves a device end to end, takes `ctl add` of a
/// socket in a directory nobody may write to (and the client of that device is
/// served), refuses one in a directory only root may write to with the system's reason
/// while the other devices go on; and that, started again on the same paths, it
/// replaces the sockets it could not remove.
#[test]
fn a_relay_that_dropped_privileges_serves_and_adds_devices() {
    if !root_or_skip("a_relay_that_dropped_privileges_serves_and_adds_devices") {
        return;
    }
    let dir = Scratch::new("access-user");
    let open = dir.join("nobody-dir");
    std::fs::create_dir(&open).unwrap();
    std::os::unix::fs::chown(&open, Some(NOBODY), Some(NOBODY)).unwrap();
    let (f, a, b, c) = (
        dir.join("f.sock"),
        dir.join("a.sock"),
        open.join("b.sock"),
        dir.join("c.sock"),
    );
    let control = control_socket(&f);
    let args = [
        "--frontend-socket",
        f.to_str().unwrap(),
        "--device",
        &format!("a={}", a.display()),
        "--user",
        "nobody",
    ];
    let log = dir.join("relay.log");
    let mut relay = start_relay_logged(&args, &log);
    assert!(wait_for_socket(&a, TIMEOUT), "relay never listened");
    assert!(wait_log(
        &log,
        "dropped privileges: running as uid 65534 (nobody) gid 65534"
    ));
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "");
    for p in [&f, &a, &control] {
        assert_eq!(stat(p), (0o600, NOBODY, NOBODY), "{}", p.display());
    }

    let _guest = start_loopback_guest(&f, &[("a", "gpio"), ("b", "gpio"), ("c", "gpio")]);
    let mut ca = connect_served(&a, TIMEOUT);
    round_trip(&mut ca, 1);
    let out = relay_ctl(&control, &["add", &format!("b={}", b.display())]);
    assert!(out.ok, "add in nobody's directory: {}", out.stderr);
    assert_eq!(stat(&b), (0o600, NOBODY, NOBODY));
    let mut cb = connect_served(&b, TIMEOUT);
    round_trip(&mut cb, 2);
    let out = relay_ctl(&control, &["add", &format!("c={}", c.display())]);
    assert!(!out.ok, "add in root's directory succeeded");
    assert!(out.stderr.contains("ermission denied"), "{}", out.stderr);
    round_trip(&mut ca, 3);
    round_trip(&mut cb, 4);

    drop((ca, cb));
    assert_eq!(relay.stop(), Some(0));
    assert!(
        !b.exists(),
        "the socket in nobody's directory was not removed"
    );
    assert!(
        a.exists(),
        "nobody cannot remove a socket from root's directory"
    );
    let mut again = start_relay_logged(&args, &dir.join("relay2.log"));
    assert!(
        wait_for_socket(&a, TIMEOUT),
        "the stale socket was not replaced"
    );
    assert!(again.is_running());
}

/// Proves that the frontend socket's allow-list decides who may be the device VM's
/// VMM: a loopback device VM running as uid 65534 (the socket at mode 0666 lets it
/// connect) is refused and logged, and the relay carries on as if it had never come
/// (its client gets ENODEV, not a device VM that is not allowed); a device VM run by
/// root then serves; and a relay whose frontend allow-list names uid 65534 is served by
/// that same device VM.
#[test]
fn the_frontend_socket_refuses_a_vmm_not_allowed() {
    if !root_or_skip("the_frontend_socket_refuses_a_vmm_not_allowed") {
        return;
    }
    let dir = Scratch::new("access-frontend");
    let guest_bin = runnable_copy(&dir, "vfu-guest");
    let nobody_guest = |f: &Path, log: &Path| {
        let mut cmd = Command::new(&guest_bin);
        cmd.args(["--loopback", f.to_str().unwrap(), "--serve", "a=gpio"])
            .args(["--connect-timeout", "5"])
            .uid(NOBODY)
            .gid(NOBODY)
            .env("RUST_LOG", "info")
            .current_dir(&dir.path)
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap());
        Proc::spawn_command("vfu-guest (nobody)", cmd)
    };
    let (f, a) = (dir.join("f.sock"), dir.join("a.sock"));
    let log = dir.join("relay.log");
    let args = [
        "--frontend-socket",
        f.to_str().unwrap(),
        "--device",
        &format!("a={}", a.display()),
        "--socket-mode",
        "0666",
    ];
    let mut relay = start_relay_logged(&args, &log);
    assert!(wait_for_socket(&a, TIMEOUT), "relay never listened");
    let mut refused = nobody_guest(&f, &dir.join("guest-nobody.log"));
    assert!(
        wait_log(
            &log,
            &format!(
                "refused a device VM's VMM on {}: uid {NOBODY} gid {NOBODY} pid ",
                f.display()
            )
        ),
        "no refusal logged"
    );
    let mut client = Client::connect(&a, Duration::from_secs(5)).unwrap();
    let e = client.negotiate(Capabilities::default()).unwrap_err();
    assert!(e.to_string().contains(&libc::ENODEV.to_string()), "{e}");
    let info = listed(&control_socket(&f), "a");
    assert_eq!(info["device_vm"], "unknown", "{info}");
    refused.stop();
    drop(client);

    let _guest = start_loopback_guest(&f, &[("a", "gpio")]);
    let mut c = connect_served(&a, TIMEOUT);
    round_trip(&mut c, 5);
    drop(c);
    relay.stop();

    let mut args2 = args.to_vec();
    args2.extend(["--frontend-allow-uid", "nobody"]);
    let _relay2 = start_relay_logged(&args2, &dir.join("relay2.log"));
    assert!(wait_for_socket(&a, TIMEOUT), "relay never listened");
    let _allowed = nobody_guest(&f, &dir.join("guest-nobody2.log"));
    let mut c = connect_served(&a, TIMEOUT);
    round_trip(&mut c, 6);
}
