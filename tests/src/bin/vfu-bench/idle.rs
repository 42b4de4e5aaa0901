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
    /// CPU seconds (user + system, all threads) over the idle window.
    pub cpu_s: f64,
    /// The idle window, seconds.
    pub window_s: f64,
}

impl Row {
    /// Percent of one core.
    pub fn percent(&self) -> f64 {
        100.0 * self.cpu_s / self.window_s
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
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".into());
    }
    Ok(ticks as f64 / hz as f64)
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
    let before: Vec<f64> = pids
        .iter()
        .map(|(_, pid)| cpu_seconds(*pid))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(idle);
    let after: Vec<f64> = pids
        .iter()
        .map(|(_, pid)| cpu_seconds(*pid))
        .collect::<Result<_, _>>()?;
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
            cpu_s: a - b,
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
             starting 0.5 s after the poll window ran out: user + system time of all the \
             process's threads (/proc/PID/stat), as a share of one core.",
            idle.as_secs_f64()
        ),
        &["mode", "process", ">CPU ms", ">% of a core"],
    );
    for r in rows {
        t.row(vec![
            r.mode.clone(),
            r.process.clone(),
            num(r.cpu_s * 1000.0, 0),
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
        let t = cpu_seconds(std::process::id()).unwrap();
        assert!(t >= 0.0);
    }
}
