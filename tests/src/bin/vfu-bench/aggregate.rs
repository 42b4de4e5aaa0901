//! Aggregate REGION_READ operations per second with many devices on one relay.
//!
//! One relay exports N `gpio` devices, one loopback device VM serves them all, and the
//! benchmark keeps the same number of requests in flight whatever N is (`depth`, 64 by
//! default): all of them pipelined on the one device's connection, `depth / N` on each
//! of N. The connections are spread over at most two client threads (the machine has
//! two cores). So the rows differ only in how many devices the same load is spread
//! over, and the ratio to the 1-device row says what serving many devices costs the
//! relay and the device VM.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::{Command, RegionAccess, Reply, Request};
use vfu_tests::pin_to;

use crate::common::{online_cpus, Mode, Relayed, BAR2, IN0_7};
use crate::table::{rate, ratio, Table};

/// Client threads at most.
const THREADS: usize = 2;

/// What one run measured.
pub struct Row {
    /// Mode.
    pub mode: String,
    /// Devices.
    pub devices: usize,
    /// Client threads.
    pub threads: usize,
    /// Requests in flight per device.
    pub depth: usize,
    /// REGION_READs completed per second, all devices together.
    pub ops: f64,
    /// The slowest device's and the fastest device's share of it, per second.
    pub per_device: (f64, f64),
}

fn read_request() -> Request {
    Request::RegionRead(RegionAccess {
        offset: IN0_7,
        region: BAR2,
        count: 1,
    })
}

/// One client thread: keeps `per_device` reads in flight on each of `clients`, taking
/// replies in order, until `stop`; returns the replies each device gave while
/// `counting`.
fn drive(
    mut clients: Vec<(usize, Client)>,
    per_device: usize,
    counting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    cpu: usize,
) -> Result<Vec<u64>, String> {
    let _ = pin_to(cpu);
    let mut queues: Vec<VecDeque<u16>> = Vec::with_capacity(clients.len());
    for (d, c) in clients.iter_mut() {
        let mut q = VecDeque::with_capacity(per_device);
        for _ in 0..per_device {
            q.push_back(
                c.send_request(&read_request())
                    .map_err(|e| format!("gpio{d}: REGION_READ: {e}"))?,
            );
        }
        queues.push(q);
    }
    let mut counts = vec![0u64; clients.len()];
    let take = |d: usize, c: &mut Client, id: u16| -> Result<(), String> {
        match c.wait_reply(id, Command::RegionRead) {
            Ok(Reply::RegionRead(r)) if r.data.len() == 1 => Ok(()),
            Ok(other) => Err(format!("gpio{d}: unexpected reply {other:?}")),
            Err(e) => Err(format!("gpio{d}: REGION_READ: {e}")),
        }
    };
    while !stop.load(Ordering::Relaxed) {
        for (((d, c), q), n) in clients.iter_mut().zip(queues.iter_mut()).zip(&mut counts) {
            let Some(id) = q.pop_front() else { continue };
            take(*d, c, id)?;
            if counting.load(Ordering::Relaxed) {
                *n += 1;
            }
            q.push_back(
                c.send_request(&read_request())
                    .map_err(|e| format!("gpio{d}: REGION_READ: {e}"))?,
            );
        }
    }
    // Take what is still in flight, so that the devices are idle when the relay stops.
    for ((d, c), q) in clients.iter_mut().zip(queues.iter_mut()) {
        while let Some(id) = q.pop_front() {
            take(*d, c, id)?;
        }
    }
    Ok(counts)
}

/// Measures `devices` devices in `mode` for `duration` after `warmup`, with `depth`
/// requests in flight in all.
pub fn measure(
    mode: &Mode,
    devices: usize,
    depth: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Row, String> {
    let (client_cpu, servers) = if online_cpus() > 1 { (0, 1) } else { (0, 0) };
    let mut stack = Relayed::start("bench-agg", Some(servers), devices, mode)?;
    let mut clients = Vec::with_capacity(devices);
    for d in 0..devices {
        clients.push((d, stack.connect(d)?));
    }
    let threads = devices.clamp(1, THREADS);
    let per_device = (depth / devices).max(1);
    let mut groups: Vec<Vec<(usize, Client)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in clients.into_iter().enumerate() {
        groups[i % threads].push(c);
    }
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let (counting, stop) = (counting.clone(), stop.clone());
            std::thread::spawn(move || drive(g, per_device, counting, stop, client_cpu))
        })
        .collect();
    std::thread::sleep(warmup);
    counting.store(true, Ordering::Relaxed);
    let t = Instant::now();
    std::thread::sleep(duration);
    counting.store(false, Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut failure = None;
    let mut counts = Vec::with_capacity(devices);
    for w in workers {
        match w.join() {
            Ok(Ok(mut c)) => counts.append(&mut c),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a client thread panicked".to_string())),
        }
    }
    if let Some(e) = failure {
        return Err(format!(
            "{devices} devices, {} mode: {e}{}{}",
            mode.name,
            stack.relay.exit_note(),
            stack.guest.exit_note()
        ));
    }
    let total: u64 = counts.iter().sum();
    let slowest = counts.iter().min().copied().unwrap_or(0);
    let fastest = counts.iter().max().copied().unwrap_or(0);
    Ok(Row {
        mode: mode.name.to_string(),
        devices,
        threads,
        depth: per_device,
        ops: total as f64 / secs,
        per_device: (slowest as f64 / secs, fastest as f64 / secs),
    })
}

/// `vfu-bench aggregate`: the report's aggregate part alone, event mode and (unless
/// `poll_us` is 0) poll mode, with `pairs` queue pairs; prints its table.
pub fn run(poll_us: u64, pairs: u16) -> Result<(), String> {
    use crate::report::{DEPTH, DEVICE_COUNTS};
    let (warmup, duration) = (Duration::from_millis(500), Duration::from_secs(2));
    let mut modes = vec![Mode::event()];
    if poll_us > 0 {
        modes.push(Mode::poll(poll_us));
    }
    let mut rows = Vec::new();
    for mode in &modes {
        let mode = mode.with_queue_pairs(pairs);
        for n in DEVICE_COUNTS {
            eprintln!("vfu-bench: aggregate: {n} devices, {} mode", mode.name);
            rows.push(measure(&mode, n, DEPTH, warmup, duration)?);
        }
    }
    println!("{}", table(&rows, DEPTH, duration, pairs).markdown());
    Ok(())
}

/// The table of `rows`, each against the 1-device row of its mode.
pub fn table(rows: &[Row], depth: usize, duration: Duration, pairs: u16) -> Table {
    let (c, s) = if online_cpus() > 1 { (0, 1) } else { (0, 0) };
    let pairs = if pairs == 1 {
        "one queue pair (one relay switch thread, one tunnel worker, one vfu-guest engine \
         thread)"
            .to_string()
    } else {
        format!(
            "{pairs} queue pairs (`--queue-pairs {pairs}`: per pair a relay switch thread, a \
             tunnel worker and a vfu-guest engine thread; device N on pair N mod {pairs})"
        )
    };
    let mut t = Table::new(
        "Aggregate REGION_READ ops/s with 1, 8 and 64 devices",
        &format!(
            "One relay exporting N gpio devices, one loopback device VM serving them all \
             (both on CPU {s}), over {pairs}, one client connection per device, driven by at most {THREADS} \
             client threads on CPU {c}. The load is the same in every row: {depth} one-byte \
             REGION_READs in flight in all (pipelined: {depth} on the one device, {depth}/N on \
             each of N), replies taken in order, for {:.1} s after a warm-up. Baseline: the \
             1-device row of the same mode.",
            duration.as_secs_f64()
        ),
        &[
            "mode",
            ">devices",
            ">client threads",
            ">in flight per device",
            ">ops/s",
            ">vs 1 device",
            ">per device ops/s, slowest - fastest",
        ],
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.mode == r.mode && b.devices == 1)
            .map_or(f64::NAN, |b| b.ops);
        t.row(vec![
            r.mode.clone(),
            r.devices.to_string(),
            r.threads.to_string(),
            r.depth.to_string(),
            rate(r.ops),
            ratio(r.ops / base),
            format!("{} - {}", rate(r.per_device.0), rate(r.per_device.1)),
        ]);
    }
    t
}
