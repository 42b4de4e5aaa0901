//! REGION_READ round trips and posted REGION_WRITE throughput, relayed (per mode)
//! against the same `gpio` model served directly, per CPU placement.

use vfu_tests::pin_to;

use crate::common::{
    online_cpus, posted_multi, posted_single, round_trips, Direct, Mode, Relayed, Samples,
};
use crate::null_server::NullServer;
use crate::table::{num, rate, ratio, Table};

/// Where the client and the servers run.
#[derive(Debug, Clone)]
pub struct Placement {
    /// "same core" or "across cores".
    pub name: &'static str,
    /// CPU of the client.
    pub client: usize,
    /// CPU of the relay, the device VM and the direct server.
    pub servers: usize,
}

impl Placement {
    /// Same core, and across cores when there are two CPUs.
    pub fn all() -> Vec<Placement> {
        let mut v = vec![Placement {
            name: "same core",
            client: 0,
            servers: 0,
        }];
        if online_cpus() > 1 {
            v.push(Placement {
                name: "across cores",
                client: 0,
                servers: 1,
            });
        }
        v
    }

    /// "same core (client CPU 0, servers CPU 0)".
    pub fn label(&self) -> String {
        format!(
            "{} (client CPU {}, servers CPU {})",
            self.name, self.client, self.servers
        )
    }
}

/// How much to measure per path.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Timed round trips (a tenth more untimed before them).
    pub rounds: usize,
    /// Posted writes, one REGION_WRITE each.
    pub writes: usize,
    /// Posted writes coalesced into REGION_WRITE_MULTI (0: not measured).
    pub multi_writes: usize,
}

/// A path from the client to a `gpio`-like server.
#[derive(Debug, Clone)]
pub enum Kind {
    /// vfu-guest serving `gpio` itself (`--listen`): the baseline.
    Direct,
    /// Through vfu-relay to a loopback device VM serving `gpio`, in this mode.
    Relayed(Mode),
    /// The null server, a thread of the benchmark with no model: a reference for what
    /// the client and the socket allow.
    Null,
}

/// What one path measured at one placement.
pub struct Figures {
    /// Index into the placements measured.
    pub placement: usize,
    /// The path.
    pub kind: Kind,
    /// Round trips.
    pub rt: Samples,
    /// Posted REGION_WRITEs per second, one message each.
    pub single: f64,
    /// Posted writes per second coalesced into REGION_WRITE_MULTI; `None`: not offered
    /// or not measured.
    pub multi: Option<f64>,
}

impl Figures {
    /// "direct", "relayed, event mode", ...
    pub fn path(&self) -> String {
        match &self.kind {
            Kind::Direct => "direct".into(),
            Kind::Relayed(m) => format!("relayed, {} mode", m.name),
            Kind::Null => "null server (reference)".into(),
        }
    }

    /// The relay's mode, on a relayed path.
    pub fn relayed(&self) -> Option<&Mode> {
        match &self.kind {
            Kind::Relayed(m) => Some(m),
            _ => None,
        }
    }
}

fn measure_one(c: &mut vfu_proto::client::Client, counts: Counts) -> Result<Figures, String> {
    let rt = round_trips(c, counts.rounds)?;
    let single = posted_single(c, counts.writes)?;
    let multi = if counts.multi_writes > 0 {
        posted_multi(c, counts.multi_writes)?
    } else {
        None
    };
    Ok(Figures {
        placement: 0,
        kind: Kind::Direct,
        rt,
        single,
        multi,
    })
}

/// Measures, for each placement, the direct server, the relayed path in each mode of
/// `modes` and, with `null`, the null server, one after the other, each path's
/// processes running only while it is measured (a polling relay would otherwise take
/// CPU from the others). Returns what was measured and what failed (a failed path does
/// not stop the others).
pub fn measure(
    placements: &[Placement],
    modes: &[Mode],
    null: bool,
    counts: Counts,
) -> (Vec<Figures>, Vec<String>) {
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for (pi, p) in placements.iter().enumerate() {
        if let Err(e) = pin_to(p.client) {
            failed.push(format!("pinning the client to CPU {}: {e}", p.client));
            continue;
        }
        let mut paths = vec![Kind::Direct];
        paths.extend(modes.iter().cloned().map(Kind::Relayed));
        if null {
            paths.push(Kind::Null);
        }
        for kind in paths {
            let mut f = Figures {
                placement: pi,
                kind,
                rt: Samples::default(),
                single: 0.0,
                multi: None,
            };
            let what = format!("{}, {}", p.name, f.path());
            eprintln!("vfu-bench: round trips and posted writes: {what}");
            let r = match &f.kind {
                Kind::Direct => Direct::start("bench-direct", Some(p.servers)).and_then(|mut d| {
                    let mut c = d.connect()?;
                    measure_one(&mut c, counts).map_err(|e| e + &d.server.exit_note())
                }),
                Kind::Relayed(m) => Relayed::start("bench-relayed", Some(p.servers), 1, m)
                    .and_then(|mut s| {
                        let mut c = s.connect(0)?;
                        measure_one(&mut c, counts)
                            .map_err(|e| e + &s.relay.exit_note() + &s.guest.exit_note())
                    }),
                Kind::Null => NullServer::start(p.servers).and_then(|mut n| {
                    let mut c = n.connect()?;
                    let r = measure_one(&mut c, counts);
                    drop(c);
                    let end = n.finish();
                    let r = r?;
                    end.map(|()| r)
                }),
            };
            match r {
                Ok(m) => {
                    f.rt = m.rt;
                    f.single = m.single;
                    f.multi = m.multi;
                    out.push(f);
                }
                Err(e) => failed.push(format!("{what}: {e}")),
            }
        }
    }
    (out, failed)
}

/// The direct figures of placement `pi`.
pub fn direct_of(figures: &[Figures], pi: usize) -> Option<&Figures> {
    figures
        .iter()
        .find(|f| f.placement == pi && matches!(f.kind, Kind::Direct))
}

/// Round trips: p50 and p99 per path, and their ratios to the direct server at the same
/// placement.
pub fn round_trip_table(placements: &[Placement], figures: &[Figures], rounds: usize) -> Table {
    let mut t = Table::new(
        "REGION_READ round trip",
        &format!(
            "{rounds} one-byte REGION_READs of the gpio model's BAR2 per path, one at a time \
             (after {} untimed), with vfu-proto's blocking client pinned to the client CPU; the \
             relay, the loopback device VM and the direct server (vfu-guest --listen) pinned to \
             the servers CPU. Baseline: the direct server at the same placement, in this run. \
             The null server is a reference, not a baseline: a thread of vfu-bench on the \
             servers CPU that answers with no device model, no relay and no other process, \
             what the client and the socket allow.",
            rounds / 10
        ),
        &[
            "placement",
            "path",
            ">p50 us",
            ">p99 us",
            ">p50 vs direct",
            ">p99 vs direct",
        ],
    );
    for f in figures {
        let d = direct_of(figures, f.placement);
        t.row(vec![
            placements[f.placement].label(),
            f.path(),
            num(f.rt.p50(), 1),
            num(f.rt.p99(), 1),
            ratio(f.rt.p50() / d.map_or(f64::NAN, |d| d.rt.p50())),
            ratio(f.rt.p99() / d.map_or(f64::NAN, |d| d.rt.p99())),
        ]);
    }
    t
}

/// Posted writes per second per path, one message per write and coalesced, against the
/// direct server at the same placement.
pub fn posted_table(placements: &[Placement], figures: &[Figures], counts: Counts) -> Table {
    let mut t = Table::new(
        "Posted writes",
        &format!(
            "Throughput of posted (NO_REPLY) one-byte writes to the gpio outputs, counted per \
             write, from the first write to the answer of a REGION_READ sent after the last \
             one, which must read the last value written (the server applies requests in \
             order). One REGION_WRITE message per write: {} writes. Coalesced: {} writes in \
             REGION_WRITE_MULTI messages of 200 (as QEMU 10.1's client sends them when the \
             server offers write_multiple). Same placement and processes as the round trips; \
             baseline: the direct server. The null server row is the ceiling this client \
             and socket put on every path.",
            counts.writes, counts.multi_writes
        ),
        &[
            "placement",
            "path",
            ">REGION_WRITE writes/s",
            ">vs direct",
            ">REGION_WRITE_MULTI writes/s",
            ">vs direct",
        ],
    );
    for f in figures {
        let d = direct_of(figures, f.placement);
        let multi = |x: Option<f64>| x.unwrap_or(f64::NAN);
        t.row(vec![
            placements[f.placement].label(),
            f.path(),
            rate(f.single),
            ratio(f.single / d.map_or(f64::NAN, |d| d.single)),
            f.multi.map_or("not offered".into(), rate),
            ratio(multi(f.multi) / d.map_or(f64::NAN, |d| multi(d.multi))),
        ]);
    }
    t
}

/// `vfu-bench latency`: event mode, one REGION_WRITE per write, printed as it always
/// was.
pub fn run(rounds: usize, writes: usize) -> Result<(), String> {
    let placements = Placement::all();
    let counts = Counts {
        rounds,
        writes,
        multi_writes: 0,
    };
    let (figures, failed) = measure(&placements, &[Mode::event()], false, counts);
    println!("vfu-bench: {rounds} REGION_READ round trips (1 byte, gpio BAR2) and {writes} posted 1-byte REGION_WRITEs per path");
    println!();
    println!("| placement | path | p50 us | p99 us | posted writes/s | p50 vs direct |");
    println!("|---|---|---:|---:|---:|---:|");
    for f in &figures {
        let d = direct_of(&figures, f.placement).map_or(f64::NAN, |d| d.rt.p50());
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {:.2}x |",
            placements[f.placement].label(),
            if f.relayed().is_some() {
                "relayed"
            } else {
                "direct"
            },
            f.rt.p50(),
            f.rt.p99(),
            f.single,
            f.rt.p50() / d
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}
