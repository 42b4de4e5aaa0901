//! `vfu-bench report`: every part in one run, a markdown table per part, the targets of
//! issue 7 checked against them, `report.md` and `latency.svg` written to one folder.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{online_cpus, supports, Mode};
use crate::latency::{Counts, Figures, Kind, Placement};
use crate::svg::{cdf_chart, Panel, Series};
use crate::table::{num, rate, ratio, Table};
use crate::{aggregate, dma, idle, latency};

/// What `report` runs and where it writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Folder of report.md and latency.svg.
    pub out: PathBuf,
    /// Shorter runs of every part.
    pub quick: bool,
    /// Poll window of the poll rows (0: no poll rows).
    pub poll_us: u64,
    /// Timed round trips per path (default 20 000, quick 2 000).
    pub rounds: Option<usize>,
    /// Posted writes, one message each, per path (default 100 000, quick 20 000).
    pub writes: Option<usize>,
    /// Posted writes in REGION_WRITE_MULTI per path (default 1 000 000, quick 200 000).
    pub multi_writes: Option<usize>,
    /// Queue pairs of the aggregate part's relay and device VM (each pair has its own
    /// relay switch thread and tunnel worker, and its own vfu-guest engine thread).
    pub queue_pairs: u16,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            out: PathBuf::from("target/bench"),
            quick: false,
            poll_us: 200_000,
            rounds: None,
            writes: None,
            multi_writes: None,
            queue_pairs: 1,
        }
    }
}

/// The targets of issue 7.
const RT_POLL_ACROSS: f64 = 0.6;
const RT_EVENT_SAME: f64 = 1.3;
const POSTED: f64 = 1_000_000.0;
const SCALE: f64 = 0.9;
const IDLE_PERCENT: f64 = 1.0;
/// In-flight requests of the aggregate part.
pub const DEPTH: usize = 64;
pub const DEVICE_COUNTS: [usize; 3] = [1, 8, 64];

/// "2026-11-21 14:03 UTC" from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, mo, d) = civil((secs / 86_400) as i64);
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), counting in
/// eras of 400 years that start on March 1st.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(mo <= 2), mo, d)
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    first_line("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The commit of the source tree the benchmark runs from, when it is a git checkout.
fn source_commit() -> String {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("."));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c} with uncommitted changes")
            } else {
                c
            }
        }
        None => "unknown (not run from a git checkout)".into(),
    }
}

/// One line of the targets table.
struct Target {
    what: String,
    measured: String,
    /// `None`: not measured.
    met: Option<bool>,
}

impl Target {
    fn new(what: &str, measured: String, met: Option<bool>) -> Self {
        Self {
            what: what.into(),
            measured,
            met,
        }
    }
    fn missing(what: &str, why: &str) -> Self {
        Self::new(what, format!("not measured: {why}"), None)
    }
}

fn rt_target(
    what: &str,
    placements: &[Placement],
    figures: &[Figures],
    placement: &str,
    mode: &str,
    bound: f64,
) -> Target {
    let Some(pi) = placements.iter().position(|p| p.name == placement) else {
        return Target::missing(what, &format!("no {placement} placement on this machine"));
    };
    let relayed = figures
        .iter()
        .find(|f| f.placement == pi && f.relayed().is_some_and(|m| m.name == mode));
    match (latency::direct_of(figures, pi), relayed) {
        (Some(d), Some(r)) => {
            let x = r.rt.p50() / d.rt.p50();
            Target::new(
                what,
                format!(
                    "{} ({} us relayed, {} us direct)",
                    ratio(x),
                    num(r.rt.p50(), 1),
                    num(d.rt.p50(), 1)
                ),
                Some(x <= bound),
            )
        }
        (None, _) => Target::missing(what, "the direct row failed"),
        (_, None) => Target::missing(what, &format!("no {mode}-mode row")),
    }
}

fn posted_target(
    what: &str,
    placements: &[Placement],
    figures: &[Figures],
    pick: impl Fn(&Figures) -> Option<f64>,
) -> Target {
    let best = figures
        .iter()
        .filter(|f| f.relayed().is_some())
        .filter_map(|f| pick(f).map(|x| (x, f)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((x, f)) => {
            let ceiling = figures
                .iter()
                .find(|n| n.placement == f.placement && matches!(n.kind, Kind::Null))
                .and_then(&pick)
                .map_or(String::new(), |n| {
                    format!("; the null server reached {} there", rate(n))
                });
            Target::new(
                what,
                format!(
                    "{} writes/s (best relayed row: {} mode, {}{ceiling})",
                    rate(x),
                    f.relayed().map_or("?", |m| m.name),
                    placements[f.placement].name
                ),
                Some(x >= POSTED),
            )
        }
        None => Target::missing(what, "no relayed row"),
    }
}

fn targets_table(targets: &[Target]) -> Table {
    let mut t = Table::new(
        "Targets (issue 7)",
        "Each target checked against the rows above, from this run.",
        &["target", "measured", "met"],
    );
    for x in targets {
        t.row(vec![
            x.what.clone(),
            x.measured.clone(),
            match x.met {
                Some(true) => "yes".into(),
                Some(false) => "**no**".into(),
                None => "-".into(),
            },
        ]);
    }
    t
}

/// Prints `t` and keeps it for the report file.
fn emit(doc: &mut String, t: &Table) {
    let md = t.markdown();
    println!("{md}");
    doc.push_str(&md);
    doc.push('\n');
}

/// Runs the report; fails (after writing what it has) when a part failed.
pub fn run(o: &Options) -> Result<(), String> {
    let quick = o.quick;
    let counts = Counts {
        rounds: o.rounds.unwrap_or(if quick { 2_000 } else { 20_000 }),
        writes: o.writes.unwrap_or(if quick { 20_000 } else { 100_000 }),
        multi_writes: o
            .multi_writes
            .unwrap_or(if quick { 200_000 } else { 1_000_000 }),
    };
    let (agg_warmup, agg_time) = if quick {
        (Duration::from_millis(200), Duration::from_millis(500))
    } else {
        (Duration::from_millis(500), Duration::from_secs(2))
    };
    let idle_time = Duration::from_secs(if quick { 2 } else { 5 });
    let dma_effort = if quick {
        dma::Effort::QUICK
    } else {
        dma::Effort::FULL
    };
    std::fs::create_dir_all(&o.out)
        .map_err(|e| format!("cannot create {}: {e}", o.out.display()))?;

    let mut failed: Vec<String> = Vec::new();
    let mut modes = vec![Mode::event()];
    let poll_note = if o.poll_us == 0 {
        "Poll rows left out (--poll-us 0).".to_string()
    } else {
        match (
            supports("vfu-relay", "--poll-us"),
            supports("vfu-guest", "--poll-us"),
        ) {
            (Ok(true), Ok(true)) => {
                modes.push(Mode::poll(o.poll_us));
                format!(
                    "Poll mode: vfu-relay and vfu-guest with `--poll-us {}` (they keep polling \
                     for that long after the last message, then sleep).",
                    o.poll_us
                )
            }
            (Ok(_), Ok(_)) => "Poll rows left out: this vfu-relay or vfu-guest has no \
                 --poll-us option."
                .to_string(),
            (Err(e), _) | (_, Err(e)) => {
                failed.push(e.clone());
                format!("Poll rows left out: {e}")
            }
        }
    };
    let loadavg_before = load_average();
    let mut doc = format!(
        "# vfu-bench report\n\n\
         Run of {} on {} CPUs, Linux {}; source {}; load average before the run: {}.\n\
         `vfu-bench report{}`: {} round trips, {} posted writes (one message each) and {} \
         coalesced writes per path. {}\n\n\
         Every ratio is against a baseline measured in this run: the direct server at the \
         same placement, memcpy on the device's CPU for DMA, one device for the aggregate.\n\n",
        utc_now(),
        online_cpus(),
        first_line("/proc/sys/kernel/osrelease"),
        source_commit(),
        loadavg_before,
        if quick { " --quick" } else { "" },
        counts.rounds,
        counts.writes,
        counts.multi_writes,
        poll_note
    );
    println!("{doc}");

    // 1. Round trips and posted writes.
    let placements = Placement::all();
    let (figures, mut f) = latency::measure(&placements, &modes, true, counts);
    failed.append(&mut f);
    emit(
        &mut doc,
        &latency::round_trip_table(&placements, &figures, counts.rounds),
    );
    let chart = "![REGION_READ round-trip distribution](latency.svg)\n\n";
    doc.push_str(chart);
    emit(
        &mut doc,
        &latency::posted_table(&placements, &figures, counts),
    );

    // 2. DMA and interrupts.
    match dma::measure(&modes, dma_effort) {
        Ok(r) => {
            emit(&mut doc, &r.bandwidth_table());
            emit(&mut doc, &r.irq_table());
        }
        Err(e) => failed.push(format!("DMA: {e}")),
    }

    // 3. Many devices.
    let mut agg = Vec::new();
    for mode in &modes {
        let mode = mode.with_queue_pairs(o.queue_pairs);
        for n in DEVICE_COUNTS {
            eprintln!("vfu-bench: aggregate: {n} devices, {} mode", mode.name);
            match aggregate::measure(&mode, n, DEPTH, agg_warmup, agg_time) {
                Ok(r) => agg.push(r),
                Err(e) => failed.push(format!("aggregate: {e}")),
            }
        }
    }
    emit(
        &mut doc,
        &aggregate::table(&agg, DEPTH, agg_time, o.queue_pairs),
    );

    // 4. Idle CPU.
    let mut idle_rows = Vec::new();
    for mode in &modes {
        let window = if mode.name == "poll" {
            Duration::from_micros(o.poll_us)
        } else {
            Duration::ZERO
        };
        eprintln!("vfu-bench: idle CPU, {} mode", mode.name);
        match idle::measure(mode, window, idle_time) {
            Ok(mut r) => idle_rows.append(&mut r),
            Err(e) => failed.push(format!("idle: {e}")),
        }
    }
    emit(&mut doc, &idle::table(&idle_rows, idle_time));

    // Targets.
    let mut targets = vec![
        rt_target(
            "REGION_READ p50, relayed in poll mode vs direct, across cores: at most 0.6x",
            &placements,
            &figures,
            "across cores",
            "poll",
            RT_POLL_ACROSS,
        ),
        rt_target(
            "REGION_READ p50, relayed vs direct, same core, event mode: at most 1.3x",
            &placements,
            &figures,
            "same core",
            "event",
            RT_EVENT_SAME,
        ),
        posted_target(
            "Posted REGION_WRITE relayed: at least 1M ops/s (one message per write)",
            &placements,
            &figures,
            |f| Some(f.single),
        ),
        posted_target(
            "Posted REGION_WRITE relayed: at least 1M ops/s (coalesced in REGION_WRITE_MULTI)",
            &placements,
            &figures,
            |f| f.multi,
        ),
    ];
    for mode in &modes {
        let what = format!(
            "64 devices on one relay: aggregate ops/s at least 0.9x of one device's ({} mode)",
            mode.name
        );
        let one = agg.iter().find(|r| r.mode == mode.name && r.devices == 1);
        let many = agg.iter().find(|r| r.mode == mode.name && r.devices == 64);
        targets.push(match (one, many) {
            (Some(a), Some(b)) => Target::new(
                &what,
                format!(
                    "{} ({} vs {} ops/s)",
                    ratio(b.ops / a.ops),
                    rate(b.ops),
                    rate(a.ops)
                ),
                Some(b.ops / a.ops >= SCALE),
            ),
            _ => Target::missing(&what, "a device count failed"),
        });
    }
    for process in ["vfu-relay", "vfu-guest (loopback)"] {
        let what = format!("Idle {process} in adaptive mode: under 1% of a core");
        targets.push(
            match idle_rows
                .iter()
                .find(|r| r.adaptive && r.process == process)
            {
                Some(r) => Target::new(
                    &what,
                    format!("{} % ({})", num(r.percent(), 2), r.mode),
                    Some(r.percent() < IDLE_PERCENT),
                ),
                None => Target::missing(&what, "no adaptive (poll-mode) idle row"),
            },
        );
    }
    emit(&mut doc, &targets_table(&targets));

    // The chart.
    let panels: Vec<Panel<'_>> = placements
        .iter()
        .enumerate()
        .map(|(pi, p)| Panel {
            title: p.label(),
            series: figures
                .iter()
                .filter(|f| f.placement == pi)
                .map(|f| Series {
                    label: f.path(),
                    samples: &f.rt,
                })
                .collect(),
        })
        .collect();
    let svg = cdf_chart(
        "REGION_READ round trip: cumulative distribution",
        &format!(
            "{} round trips per path, {}; gpio BAR2, 1 byte",
            counts.rounds,
            utc_now()
        ),
        &panels,
    );
    let svg_path = o.out.join("latency.svg");
    if let Err(e) = std::fs::write(&svg_path, svg) {
        failed.push(format!("cannot write {}: {e}", svg_path.display()));
    }
    doc.push_str(&format!(
        "Load average after the run: {}.\n",
        load_average()
    ));
    if !failed.is_empty() {
        doc.push_str("\n## Failed\n\n");
        for f in &failed {
            doc.push_str(&format!("- {f}\n"));
        }
    }
    let md_path = o.out.join("report.md");
    if let Err(e) = std::fs::write(&md_path, &doc) {
        failed.push(format!("cannot write {}: {e}", md_path.display()));
    }
    println!(
        "vfu-bench: wrote {} and {}",
        md_path.display(),
        svg_path.display()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} part(s) failed (VFU_TEST_LOG=info shows vfu-relay's and vfu-guest's logs):\n  {}",
            failed.len(),
            failed.join("\n  ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_723 + 31 + 28), (2024, 2, 29));
        assert_eq!(civil(19_723 + 366), (2025, 1, 1));
        assert_eq!(civil(-1), (1969, 12, 31));
    }

    #[test]
    fn date_is_iso_like() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-11-21 14:03 UTC".len(), "{d}");
        assert!(d.ends_with(" UTC"));
    }
}
