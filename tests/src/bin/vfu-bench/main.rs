//! The benchmark of `docs/benchmarks.md`.
//!
//! `report` runs every part in one run and writes `report.md` and `latency.svg`:
//! REGION_READ round trips (p50, p99) and posted REGION_WRITE throughput (one message
//! per write, and coalesced into REGION_WRITE_MULTI), relayed in event and poll mode
//! against the same `gpio` model served directly, on one core and across cores; DMA
//! bandwidth per path against memcpy and interrupt latency; aggregate ops/s with 1, 8
//! and 64 devices; the idle CPU of the relay and the device VM; the targets of issue 7
//! checked against all that. Figures are ratios against a baseline measured in the same
//! run.
//!
//! The other subcommands are the parts the report grew from, printed as they always
//! were: `latency` (round trips and posted writes, event mode), `dma` (DMA and
//! interrupts, event mode), `all` (both; the default), `memfd-io` (what the relay's copy
//! path chooses between) and `device-vm` (round trips through a real device VM under
//! QEMU TCG, unpinned). `aggregate` runs the report's aggregate part alone (both
//! modes, `--queue-pairs`), to look at one figure without the rest.
//!
//! ```text
//! target/release/vfu-bench report [--out DIR] [--quick] [--poll-us N] [--queue-pairs N]
//!                                 [--rounds N] [--writes N] [--multi-writes N]
//! target/release/vfu-bench aggregate [--poll-us N] [--queue-pairs N]
//! target/release/vfu-bench [latency|dma|memfd-io|device-vm|all] [--rounds N] [--writes N]
//! ```

mod aggregate;
mod common;
mod dma;
mod idle;
mod latency;
mod memfd_io;
mod null_server;
mod report;
mod svg;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use vfu_proto::client::Client;
use vfu_tests::{wait_for_socket, Scratch};

use common::{connect_within, posted_single, round_trips, Direct, Mode, Relayed, Samples};

/// Round trips and posted writes (one message each) through `c`.
fn measure(c: &mut Client, rounds: usize, writes: usize) -> Result<(Samples, f64), String> {
    Ok((round_trips(c, rounds)?, posted_single(c, writes)?))
}

/// Round trips through a real device VM with the tunnel on each PCI driver (one VM after
/// the other), the loopback device VM and the direct server, in one run, unpinned.
fn device_vm(rounds: usize, writes: usize) -> Result<(), String> {
    use vfu_tests::device_vm::image;
    let image = image().ok_or(
        "no device-VM image: run scripts/device-vm/build-image.sh and set \
         VFU_DEVICE_VM_IMAGE=target/device-vm/current",
    )?;
    let scratch = Scratch::try_new("bench-vm").map_err(|e| format!("scratch directory: {e}"))?;
    let mut loopback = Relayed::start("bench-vm-loopback", None, 1, &Mode::event())?;
    let mut direct = Direct::start("bench-vm-direct", None)?;
    println!("vfu-bench device-vm: {rounds} REGION_READ round trips (1 byte, gpio BAR2) and {writes} posted 1-byte REGION_WRITEs per path, unpinned");
    println!();
    println!("| path | p50 us | p99 us | posted writes/s | p50 vs direct |");
    println!("|---|---:|---:|---:|---:|");
    let d = measure(&mut direct.connect()?, rounds, writes)?;
    let l = measure(&mut loopback.connect(0)?, rounds, writes)?;
    let mut rows = vec![
        ("direct".to_string(), d),
        ("relayed, loopback device VM".to_string(), l),
    ];
    for (driver, what) in [
        ("uio_pci_generic", "uio_pci_generic, INTx"),
        ("vfio-pci", "vfio-pci no-IOMMU, MSI-X"),
    ] {
        let f = in_device_vm(&image, &scratch, driver, rounds, writes)?;
        rows.push((
            format!("relayed, QEMU TCG device VM (vhost-user-fs-pci, {what})"),
            f,
        ));
    }
    let base = rows[0].1 .0.p50();
    for (path, (lat, writes_per_s)) in &rows {
        println!(
            "| {path} | {:.1} | {:.1} | {:.0} | {:.2}x |",
            lat.p50(),
            lat.p99(),
            writes_per_s,
            lat.p50() / base
        );
    }
    Ok(())
}

/// Boots a device VM (and a relay for it) with the tunnel bound to `driver`, measures
/// through it, and stops both.
fn in_device_vm(
    image: &Path,
    scratch: &Scratch,
    driver: &str,
    rounds: usize,
    writes: usize,
) -> Result<(Samples, f64), String> {
    use vfu_tests::device_vm::{DeviceVm, BOOT};
    let frontend = scratch.join(&format!("vm-{driver}.sock"));
    let in_vm = scratch.join(&format!("vm-{driver}-gpio0.sock"));
    let mut relay = vfu_tests::try_start_relay_with(
        None,
        &frontend,
        &[("gpio0", &in_vm)],
        &["--shm-size-mib", "0"],
    )?;
    if !wait_for_socket(&frontend, Duration::from_secs(10)) {
        return Err(format!("vfu-relay did not start{}", relay.exit_note()));
    }
    let vm = DeviceVm::boot_with_driver(
        image,
        &frontend,
        &scratch.join(&format!("console-{driver}.log")),
        "gpio0=gpio",
        Some(driver),
    );
    let mut c = connect_within(&in_vm, BOOT, &mut [&mut relay])
        .map_err(|e| format!("{e}; console:\n{}", vm.console()))?;
    let transport = vm
        .wait_for_marker("VFU-GUEST TRANSPORT", 1, BOOT)
        .unwrap_or_default();
    if !transport.contains(&format!("driver={driver}")) {
        return Err(format!(
            "the device VM did not drive the tunnel through {driver}; console:\n{}",
            vm.console()
        ));
    }
    measure(&mut c, rounds, writes).map_err(|e| format!("{e}; console:\n{}", vm.console()))
}

const USAGE: &str = "usage: vfu-bench report [--out DIR] [--quick] [--poll-us N] [--rounds N] [--writes N] [--multi-writes N] [--queue-pairs N]
       vfu-bench aggregate [--poll-us N] [--queue-pairs N]
       vfu-bench [latency|dma|memfd-io|device-vm|all] [--rounds N] [--writes N]";

fn main() -> ExitCode {
    // The client side of the benchmark serves DMA_READ/DMA_WRITE with buffers of up to
    // 1 MiB, like the daemons: keep them on the heap the same way.
    vfu_proto::mem::keep_large_buffers_on_heap();
    let mut what = "all".to_string();
    let mut report = report::Options::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "latency" | "dma" | "memfd-io" | "device-vm" | "all" | "report" | "aggregate" => {
                what = a.clone();
                continue;
            }
            "--quick" => {
                report.quick = true;
                continue;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
        let value = it.next();
        let n = value.and_then(|v| v.parse::<usize>().ok());
        match (a.as_str(), n) {
            ("--rounds", Some(n)) if n > 0 => report.rounds = Some(n),
            ("--writes", Some(n)) if n > 1 => report.writes = Some(n),
            ("--multi-writes", Some(n)) if n > 1 => report.multi_writes = Some(n),
            ("--poll-us", Some(n)) => report.poll_us = n as u64,
            ("--queue-pairs", Some(n)) if (1..=32).contains(&n) => report.queue_pairs = n as u16,
            ("--out", _) if value.is_some() => {
                report.out = PathBuf::from(value.map_or("", String::as_str));
            }
            _ => {
                eprintln!(
                    "vfu-bench: bad argument {a}{}\n{USAGE}",
                    value.map_or(String::new(), |v| format!(" {v}"))
                );
                return ExitCode::from(2);
            }
        }
    }
    let rounds = report.rounds.unwrap_or(20_000);
    let writes = report.writes.unwrap_or(100_000);
    let result = match what.as_str() {
        "report" => report::run(&report),
        "latency" => latency::run(rounds, writes),
        "dma" => dma::run(),
        "aggregate" => aggregate::run(report.poll_us, report.queue_pairs),
        "memfd-io" => memfd_io::run(),
        "device-vm" => device_vm(rounds, writes),
        _ => latency::run(rounds, writes).and_then(|()| dma::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
