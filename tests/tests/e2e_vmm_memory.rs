//! The device VM's VMM offers guest memory the relay must not map (docs/security.md,
//! "Device VM's VMM → relay"): memory whose file can shrink under the relay's mapping
//! would let that VMM make the relay die of SIGBUS. The loopback VMM plays such a VMM
//! with its test-only `--unsealed-memory`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::logs::{spawn_logged, Log};
use vfu_tests::procfs::{settle_fds, steady_fd_count};
use vfu_tests::{connect_served, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(20);
/// gpio's register BAR.
const BAR2: u32 = 2;

/// Starts `bin` with `args`, its standard error (RUST_LOG=info) in `log`.
fn start_logged(name: &str, bin: &str, args: &[&str], log: &Path) -> Proc {
    spawn_logged(name, bin, args, "info", log)
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
    let relay_log = Log::new(relay_log);
    let mut relay = start_gpio_relay(&dir, &[]);
    relay_log
        .wait_for("waiting for the device VM's VMM", TIMEOUT)
        .unwrap();
    // (A starting relay still opens and closes some fds.)
    let before = steady_fd_count(relay.pid(), Duration::from_millis(300), TIMEOUT);

    let guest_log = Log::new(dir.join("guest-unsealed.log"));
    let mut refused = start_guest(&frontend, &["--unsealed-memory"], &guest_log.path);
    let code = exit_code(&mut refused);
    assert_ne!(code, Some(0), "the loopback VMM gave up");
    assert!(
        guest_log.text().contains("SET_MEM_TABLE"),
        "refused at SET_MEM_TABLE: {}",
        guest_log.text()
    );
    let refusal = "refused the device VM's VMM: its guest memory region 0 (guest address 0x0, 67108864 bytes) is not a memfd sealed against shrinking (F_SEAL_SHRINK)";
    if let Err(e) = relay_log.wait_for(refusal, TIMEOUT) {
        panic!("no refusal logged: {e}: {}", relay_log.text());
    }
    assert!(relay_log
        .text()
        .contains("unsealed_vmm_memory (--unsealed-vmm-memory)"));
    assert!(relay.is_running(), "the relay stays up");
    let mut client = Client::connect(&gpio, Duration::from_secs(5)).unwrap();
    let e = client.negotiate(Capabilities::default()).unwrap_err();
    assert!(e.to_string().contains(&libc::ENODEV.to_string()), "{e}");
    drop(client);
    if let Err(now) = settle_fds(relay.pid(), before, TIMEOUT) {
        panic!("the relay holds {now} fds, {before} before the refused VMM");
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
    let relay_log = Log::new(relay_log);
    assert!(
        !relay_log.text().contains("refused"),
        "{}",
        relay_log.text()
    );
}
