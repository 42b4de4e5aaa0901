//! The device VM's VMM offers guest memory the relay must not map (docs/security.md,
//! "Device VM's VMM → relay"): memory whose file can shrink under the relay's mapping
//! would let that VMM make the relay die of SIGBUS. The loopback VMM plays such a VMM
//! with its test-only `--unsealed-memory`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::{binary, connect_served, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(20);
/// gpio's register BAR.
const BAR2: u32 = 2;

/// Starts `bin` with `args`, its standard error (RUST_LOG=info) in `log`.
fn start_logged(name: &str, bin: &str, args: &[&str], log: &Path) -> Proc {
    let mut cmd = Command::new(binary(bin));
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(File::create(log).expect("log file"));
    Proc::spawn_command(name, cmd)
}

/// A loopback device VM serving gpio0, with `extra` options.
fn start_guest(frontend: &Path, extra: &[&str], log: &Path) -> Proc {
    let mut args = vec![
        "--loopback",
        frontend.to_str().unwrap(),
        "--serve",
        "gpio0=gpio",
        "--connect-timeout",
        "5",
    ];
    args.extend(extra);
    start_logged("vfu-guest (loopback)", "vfu-guest", &args, log)
}

/// Waits until `p` exits; its exit code.
fn exit_code(p: &mut Proc) -> Option<i32> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(code) = p.exited() {
            return code;
        }
        assert!(Instant::now() < deadline, "{} did not exit", p.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits until `log` holds `needle`.
fn wait_log(log: &Path, needle: &str) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if read(log).contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn fds(p: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The fds of `p` once the count held for 300 ms (a starting relay still opens and
/// closes some).
fn settled_fds(p: &Proc) -> usize {
    let mut last = fds(p);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = fds(p);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The frontend socket, the device `gpio0`'s socket and the relay's log in `dir`.
fn paths(dir: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("frontend.sock"),
        dir.join("gpio0.sock"),
        dir.join("relay.log"),
    )
}

/// A relay (with `extra` options) exporting `gpio0`, its log in `dir`, once it listens.
fn start_gpio_relay(dir: &Scratch, extra: &[&str]) -> Proc {
    let (frontend, gpio, relay_log) = paths(dir);
    let device = format!("gpio0={}", gpio.display());
    let mut args = vec![
        "--frontend-socket",
        frontend.to_str().unwrap(),
        "--device",
        &device,
    ];
    args.extend_from_slice(extra);
    let relay = start_logged("vfu-relay", "vfu-relay", &args, &relay_log);
    assert!(wait_for_socket(&gpio, TIMEOUT), "relay never listened");
    relay
}

/// A gpio output written and read back.
fn round_trip(c: &mut Client, v: u8) {
    c.region_write(BAR2, 4, &[v]).expect("write");
    assert_eq!(c.region_read(BAR2, 4, 1).expect("read"), [v]);
}

/// Proves that a device VM's VMM whose guest memory is not sealed against shrinking is
/// refused: its SET_MEM_TABLE fails (the loopback VMM gives up at that step), the
/// relay logs why and names `unsealed_vmm_memory`, stays up, serves no client through
/// that VMM (ENODEV), and holds no descriptor more once it is gone (the memory file the
/// library mapped went with the connection); a VMM with sealed memory then serves the
/// device as usual.
#[test]
fn a_vmm_offering_unsealed_memory_is_refused_and_the_next_served() {
    let dir = Scratch::new("vmm-unsealed");
    let (frontend, gpio, relay_log) = paths(&dir);
    let mut relay = start_gpio_relay(&dir, &[]);
    assert!(wait_log(&relay_log, "waiting for the device VM's VMM"));
    let before = settled_fds(&relay);

    let guest_log = dir.join("guest-unsealed.log");
    let mut refused = start_guest(&frontend, &["--unsealed-memory"], &guest_log);
    let code = exit_code(&mut refused);
    assert_ne!(code, Some(0), "the loopback VMM gave up");
    assert!(
        read(&guest_log).contains("SET_MEM_TABLE"),
        "refused at SET_MEM_TABLE: {}",
        read(&guest_log)
    );
    assert!(
        wait_log(
            &relay_log,
            "refused the device VM's VMM: its guest memory region 0 (guest address 0x0, 67108864 bytes) is not a memfd sealed against shrinking (F_SEAL_SHRINK)"
        ),
        "no refusal logged: {}",
        read(&relay_log)
    );
    assert!(read(&relay_log).contains("unsealed_vmm_memory (--unsealed-vmm-memory)"));
    assert!(relay.is_running(), "the relay stays up");
    let mut client = Client::connect(&gpio, Duration::from_secs(5)).unwrap();
    let e = client.negotiate(Capabilities::default()).unwrap_err();
    assert!(e.to_string().contains(&libc::ENODEV.to_string()), "{e}");
    drop(client);
    let deadline = Instant::now() + TIMEOUT;
    while fds(&relay) != before {
        assert!(
            Instant::now() < deadline,
            "the relay holds {} fds, {before} before the refused VMM",
            fds(&relay)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let _guest = start_guest(&frontend, &[], &dir.join("guest.log"));
    let mut c = connect_served(&gpio, TIMEOUT);
    round_trip(&mut c, 0x5a);
    assert!(relay.is_running());
}

/// Proves that `--unsealed-vmm-memory` trusts the device VM's VMM: the same VMM, with
/// memory that is not sealed, is served, and nothing is refused.
#[test]
fn unsealed_vmm_memory_trusts_the_vmm() {
    let dir = Scratch::new("vmm-unsealed-trusted");
    let (frontend, gpio, relay_log) = paths(&dir);
    let _relay = start_gpio_relay(&dir, &["--unsealed-vmm-memory"]);
    let _guest = start_guest(&frontend, &["--unsealed-memory"], &dir.join("guest.log"));
    let mut c = connect_served(&gpio, TIMEOUT);
    round_trip(&mut c, 0xa5);
    assert!(
        !read(&relay_log).contains("refused"),
        "{}",
        read(&relay_log)
    );
}
