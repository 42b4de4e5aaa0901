//! What `/proc` says about a process of a test (the relay, a device VM): its open fds,
//! its memory mappings and its memory, for the checks that nothing leaked.

use std::time::{Duration, Instant};

/// The number of fds process `pid` holds (0 when it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The number of memory mappings of process `pid` (0 when it is gone).
pub fn map_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// A `kB` field of `/proc/<pid>/status` (`field` with its colon, e.g. `"VmRSS:"`), in
/// KiB; 0 when the process or the field is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The resident memory of process `pid` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Waits up to `wait` until process `pid` holds exactly `want` fds (polling every
/// 10 ms); fails with the number it holds at the end.
pub fn settle_fds(pid: u32, want: usize, wait: Duration) -> Result<(), usize> {
    let deadline = Instant::now() + wait;
    loop {
        let n = fd_count(pid);
        if n == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(n);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number of fds process `pid` holds once it stopped changing: two counts
/// `interval` apart agree, or `wait` has passed (then the last count).
pub fn steady_fd_count(pid: u32, interval: Duration, wait: Duration) -> usize {
    let mut last = fd_count(pid);
    let deadline = Instant::now() + wait;
    loop {
        std::thread::sleep(interval);
        let n = fd_count(pid);
        if n == last || Instant::now() > deadline {
            return n;
        }
        last = n;
    }
}
