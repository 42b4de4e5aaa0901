//! Poll mode, end to end: vfu-relay and the loopback vfu-guest with `--poll-us`, a real
//! vfio-user client. Poll mode must serve exactly as event mode does, keep the
//! device VM's interrupts off while it polls, and sleep once the poll window has passed
//! (an idle relay costs no CPU).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vfu_tests::{binary, connect_served, start_relay_with, wait_for_socket, Proc, Scratch};

const TIMEOUT: Duration = Duration::from_secs(20);
const BAR2: u32 = 2;
const ROUNDS: usize = 500;

/// A loopback vfu-guest whose standard output (the `VFU-GUEST WAKEUPS` markers) is read
/// line by line.
fn start_guest(frontend: &Path, extra: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut cmd = Command::new(binary("vfu-guest"));
    cmd.arg("--loopback")
        .arg(frontend)
        .args(["--serve", "gpio0=gpio"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Ok(level) = std::env::var("VFU_TEST_LOG") {
        cmd.env("RUST_LOG", level).stderr(Stdio::inherit());
    }
    let mut child = cmd.spawn().expect("start vfu-guest");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let proc = Proc::spawn_command_child("vfu-guest (loopback)", child);
    (proc, rx)
}

/// Queue interrupts counted in the next `VFU-GUEST WAKEUPS interrupts=N ...` line.
fn next_interrupt_count(lines: &mpsc::Receiver<String>) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Some(rest) = line.strip_prefix("VFU-GUEST WAKEUPS ") {
            let n = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("interrupts="))
                .and_then(|n| n.parse().ok());
            return n.unwrap_or_else(|| panic!("unreadable marker {line:?}"));
        }
    }
    panic!("no VFU-GUEST WAKEUPS line from the guest");
}

/// A relay serving `gpio0` and a loopback guest serving it with `gpio`, each with its
/// own extra options; the guest's output lines come on the receiver.
struct Setup {
    relay: Proc,
    guest: Proc,
    lines: mpsc::Receiver<String>,
    device: std::path::PathBuf,
    _scratch: Scratch,
}

fn setup(tag: &str, relay_extra: &[&str], guest_extra: &[&str]) -> Setup {
    let scratch = Scratch::new(tag);
    let frontend = scratch.join("frontend.sock");
    let device = scratch.join("gpio0.sock");
    let relay = start_relay_with(None, &frontend, &[("gpio0", &device)], relay_extra);
    assert!(wait_for_socket(&device, TIMEOUT), "relay did not start");
    let (guest, lines) = start_guest(&frontend, guest_extra);
    Setup {
        relay,
        guest,
        lines,
        device,
        _scratch: scratch,
    }
}

/// ROUNDS checked round trips and posted writes; returns when the client left.
fn exercise(device: &Path) {
    let mut c = connect_served(device, TIMEOUT);
    for i in 0..ROUNDS {
        let v = (i % 251) as u8;
        c.region_write(BAR2, 0, &[v]).expect("write");
        assert_eq!(c.region_read(BAR2, 0, 1).expect("read"), [v], "round {i}");
    }
    for i in 0..ROUNDS {
        c.region_write_posted(BAR2, 0, &[(i % 256) as u8])
            .expect("posted write");
    }
    let last = ((ROUNDS - 1) % 256) as u8;
    assert_eq!(
        c.region_read(BAR2, 0, 1).expect("read after posted writes"),
        [last],
        "every posted write was applied, in order"
    );
}

/// The scheduler state letters (`R`, `S`, ...) of every thread of `pid`.
fn thread_states(pid: u32) -> Vec<char> {
    let dir = format!("/proc/{pid}/task");
    let mut states = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("task directory").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // The state follows the command name, which is in parentheses.
        if let Some(state) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
        {
            states.push(state);
        }
    }
    states
}

/// Whether no thread of `pid` runs in any of `samples` looks 20 ms apart.
fn all_asleep(pid: u32, samples: usize) -> bool {
    (0..samples).all(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !thread_states(pid).contains(&'R')
    })
}

/// Poll mode on both sides serves round trips and posted writes with every value
/// checked; while it polls, the device VM's interrupts stay off (the driver counts
/// far fewer interrupts than messages, where event mode takes one per round trip at
/// least); once the poll window has passed with nothing to do, every thread of the
/// relay and of the device VM sleeps.
#[test]
fn poll_mode_serves_with_interrupts_off_and_sleeps_when_idle() {
    // A window long enough that a slow CI machine keeps polling between messages.
    let window = "1500000";
    let Setup {
        relay,
        guest,
        lines,
        device,
        _scratch,
    } = setup("poll", &["--poll-us", window], &["--poll-us", window]);

    exercise(&device);
    let interrupts = next_interrupt_count(&lines);
    assert!(
        interrupts < (ROUNDS / 10) as u64,
        "{interrupts} interrupts for {ROUNDS} round trips and {ROUNDS} posted writes: \
         the relay notified the polling driver"
    );

    // Idle: the window passes, then both sleep.
    let deadline = Instant::now() + Duration::from_secs(3 * 1500 / 1000 + 10);
    let mut asleep = false;
    while Instant::now() < deadline && !asleep {
        std::thread::sleep(Duration::from_millis(200));
        asleep = all_asleep(relay.pid(), 5) && all_asleep(guest.pid(), 5);
    }
    assert!(
        asleep,
        "relay threads {:?}, guest threads {:?}: still running after the poll window",
        thread_states(relay.pid()),
        thread_states(guest.pid())
    );

    // And asleep, they are woken by notifications again.
    exercise(&device);
    next_interrupt_count(&lines);
}

/// Event mode for comparison, and the proof that the count above means something: the
/// same work takes at least one interrupt per round trip.
#[test]
fn event_mode_takes_an_interrupt_per_round_trip() {
    let s = setup("event", &[], &[]);
    exercise(&s.device);
    let interrupts = next_interrupt_count(&s.lines);
    assert!(
        interrupts >= ROUNDS as u64,
        "{interrupts} interrupts for {ROUNDS} round trips in event mode"
    );
}

/// The relay polls while the device VM does not (and the other way round): each side's
/// notifications are its own business, so mixed modes serve the same.
#[test]
fn mixed_modes_serve() {
    for (relay_poll, guest_poll) in [("1000000", "0"), ("0", "1000000")] {
        let s = setup(
            "poll-mixed",
            &["--poll-us", relay_poll],
            &["--poll-us", guest_poll],
        );
        exercise(&s.device);
        next_interrupt_count(&s.lines);
    }
}
