//! CPU time of an idle relay and device VM: after a burst of requests, once the poll
//! window has run out, how much of a core each process uses while nobody asks anything.

use std::time::Duration;

use crate::common::{online_cpus, posted_single, round_trips, Mode, Relayed};
use crate::table::{num, Table};

/// One process in one mode.
pub struct Row {
    /// Mode, with its poll window.
    pub mode: String,
    /// Whether the mode polls (adaptive) at all.
    pub adaptive: bool,
    /// "vfu-relay" or "vfu-guest (loopback)".
    pub process: String,
    /// CPU seconds (user + system, all threads, in clock ticks) over the idle window.
    pub cpu_s: f64,
    /// Seconds on a CPU (the scheduler's count, all threads, in nanoseconds) over the
    /// idle window; `None` without schedstat.
    pub run_s: Option<f64>,
    /// The idle window, seconds.
    pub window_s: f64,
}

impl Row {
    /// Percent of one core: the larger of the two counts (clock ticks miss short
    /// wake-ups that fall between two ticks; the scheduler's count does not).
    pub fn percent(&self) -> f64 {
        100.0 * self.cpu_s.max(self.run_s.unwrap_or(0.0)) / self.window_s
    }
}

/// User plus system CPU seconds of process `pid`, all its threads (fields 14 and 15 of
/// /proc/PID/stat, in clock ticks).
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // from the last ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: no field {n}"))
    };
    let ticks = field(14)? + field(15)?;
    let hz = clock_ticks().ok_or("sysconf(_SC_CLK_TCK) failed")?;
    Ok(ticks as f64 / hz)
}

/// Clock ticks per second.
fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then_some(hz as f64)
}

/// Seconds all threads of process `pid` spent on a CPU: the sum of the first field of
/// /proc/PID/task/*/schedstat (nanoseconds); `None` when the kernel has no schedstat.
/// Threads that exit are not counted: compare two readings only while none does.
pub fn run_seconds(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// Starts relay and device VM in `mode` (`poll_window`: its poll window, zero for
/// event mode), serves a burst, waits for the window to run out, and measures both
/// processes over `idle`.
pub fn measure(mode: &Mode, poll_window: Duration, idle: Duration) -> Result<Vec<Row>, String> {
    let servers = if online_cpus() > 1 { 1 } else { 0 };
    let mut stack = Relayed::start("bench-idle", Some(servers), 1, mode)?;
    let mut c = stack.connect(0)?;
    round_trips(&mut c, 2000)?;
    posted_single(&mut c, 20_000)?;
    // The poll window starts again at the last message; let it run out, with a margin.
    std::thread::sleep(poll_window + Duration::from_millis(500));
    let pids = [
        ("vfu-relay", stack.relay.pid()),
        ("vfu-guest (loopback)", stack.guest.pid()),
    ];
    let read = || -> Result<Vec<(f64, Option<f64>)>, String> {
        pids.iter()
            .map(|(_, pid)| Ok((cpu_seconds(*pid)?, run_seconds(*pid))))
            .collect()
    };
    let before = read()?;
    std::thread::sleep(idle);
    let after = read()?;
    let notes = stack.relay.exit_note() + &stack.guest.exit_note();
    if !notes.is_empty() {
        return Err(format!("idle {} mode:{notes}", mode.name));
    }
    // The client is still connected: the relay and the device VM idle with a client,
    // as they would between a guest's accesses.
    drop(c);
    let label = if poll_window.is_zero() {
        mode.name.to_string()
    } else {
        format!("{} (adaptive, {} us)", mode.name, poll_window.as_micros())
    };
    Ok(pids
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), (b, a))| Row {
            mode: label.clone(),
            adaptive: !poll_window.is_zero(),
            process: name.to_string(),
            cpu_s: a.0 - b.0,
            run_s: a.1.zip(b.1).map(|(a, b)| a - b),
            window_s: idle.as_secs_f64(),
        })
        .collect())
}

/// The table of `rows`.
pub fn table(rows: &[Row], idle: Duration) -> Table {
    let mut t = Table::new(
        "Idle CPU",
        &format!(
            "Relay and loopback device VM serving one gpio device with a client connected: \
             2 000 round trips and 20 000 posted writes, then nothing. Measured over {:.1} s \
             starting 0.5 s after the poll window ran out, for all the process's threads: \
             user + system time (/proc/PID/stat, in clock ticks of {:.0} ms, which miss wake-ups \
             shorter than a tick) and time on a CPU (/proc/PID/task/*/schedstat, in ns). The \
             share of one core is the larger of the two.",
            idle.as_secs_f64(),
            1000.0 / clock_ticks().unwrap_or(100.0)
        ),
        &[
            "mode",
            "process",
            ">utime+stime ms",
            ">on-CPU ms (schedstat)",
            ">% of a core",
        ],
    );
    for r in rows {
        t.row(vec![
            r.mode.clone(),
            r.process.clone(),
            num(r.cpu_s * 1000.0, 0),
            r.run_s.map_or("-".into(), |s| num(s * 1000.0, 2)),
            num(r.percent(), 2),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time() {
        let pid = std::process::id();
        let t = cpu_seconds(pid).unwrap();
        assert!(t >= 0.0);
        if let Some(r) = run_seconds(pid) {
            assert!(r > 0.0, "this test ran");
        }
    }
}
