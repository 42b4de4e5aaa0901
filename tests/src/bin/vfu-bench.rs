//! The benchmark of `docs/benchmarks.md`: REGION_READ round trips (p50, p99) and posted
//! REGION_WRITE throughput, relayed (vfu-relay + loopback device VM) against the same
//! `gpio` model served directly by vfu-guest, with the same client, in one run, for each
//! CPU placement. Figures are ratios against the direct baseline of the same placement.
//!
//! ```text
//! target/release/vfu-bench [--rounds N] [--writes N]
//! ```

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::Capabilities;
use vfu_tests::{
    pin_to, start_direct_on, start_loopback_guest_on, start_relay_on, wait_for_socket, Latency,
    Scratch,
};

const BAR2: u32 = 2;

struct Placement {
    name: &'static str,
    /// CPU of the client.
    client: usize,
    /// CPU of the relay, the device VM and the direct server.
    servers: usize,
}

struct Figures {
    lat: Latency,
    writes_per_s: f64,
}

fn connect(path: &Path) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(mut c) = Client::connect(path, Duration::from_secs(5)) {
            if c.negotiate(Capabilities::default()).is_ok() {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no device on {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn measure(path: &Path, rounds: usize, writes: usize) -> Result<Figures, String> {
    let mut c = connect(path)?;
    let e = |e: vfu_proto::client::ClientError| e.to_string();
    for _ in 0..rounds / 10 {
        c.region_read(BAR2, 1, 1).map_err(e)?;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        c.region_read(BAR2, 1, 1).map_err(e)?;
        samples.push(t.elapsed());
    }
    let t = Instant::now();
    for i in 0..writes {
        c.region_write_posted(BAR2, 0, &[i as u8]).map_err(e)?;
    }
    // One read after the burst: every posted write before it has been applied.
    c.region_read(BAR2, 0, 1).map_err(e)?;
    let writes_per_s = writes as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        lat: Latency::from_samples(&mut samples),
        writes_per_s,
    })
}

fn run(rounds: usize, writes: usize) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut placements = vec![Placement {
        name: "same core",
        client: 0,
        servers: 0,
    }];
    if cpus > 1 {
        placements.push(Placement {
            name: "across cores",
            client: 0,
            servers: 1,
        });
    }
    println!("vfu-bench: {rounds} REGION_READ round trips (1 byte, gpio BAR2) and {writes} posted 1-byte REGION_WRITEs per path");
    println!();
    println!("| placement | path | p50 us | p99 us | posted writes/s | p50 vs direct |");
    println!("|---|---|---:|---:|---:|---:|");
    for p in &placements {
        let scratch = Scratch::new("bench");
        let frontend = scratch.join("frontend.sock");
        let relayed = scratch.join("gpio0.sock");
        let direct = scratch.join("direct.sock");
        let _relay = start_relay_on(Some(p.servers), &frontend, &[("gpio0", &relayed)]);
        let _guest = start_loopback_guest_on(Some(p.servers), &frontend, &[("gpio0", "gpio")]);
        let _direct = start_direct_on(Some(p.servers), &direct, "gpio");
        if !wait_for_socket(&relayed, Duration::from_secs(10)) {
            return Err("relay did not start".into());
        }
        pin_to(p.client).map_err(|e| e.to_string())?;
        let d = measure(&direct, rounds, writes)?;
        let r = measure(&relayed, rounds, writes)?;
        for (path, f) in [("direct", &d), ("relayed", &r)] {
            println!(
                "| {} (client CPU {}, servers CPU {}) | {path} | {:.1} | {:.1} | {:.0} | {:.2}x |",
                p.name,
                p.client,
                p.servers,
                f.lat.p50,
                f.lat.p99,
                f.writes_per_s,
                f.lat.p50 / d.lat.p50
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut rounds = 20_000;
    let mut writes = 100_000;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--rounds", Some(n)) => rounds = n,
            ("--writes", Some(n)) => writes = n,
            _ => {
                eprintln!("usage: vfu-bench [--rounds N] [--writes N]");
                return ExitCode::from(2);
            }
        }
    }
    match run(rounds, writes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
