//! The embedded demo: relay, a loopback device VM serving `gpio`, a vfio-user client
//! through the relay, and the same model served directly for comparison.
//!
//! Run it with `scripts/demo.sh` (which builds everything first). Ctrl-C at any point
//! stops it and cleans up every process and socket.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vfu_guest::device::lspci;
use vfu_proto::client::Client;
use vfu_proto::vfio_user::{pci_irq, pci_region, Capabilities};
use vfu_tests::{
    start_direct, start_loopback_guest, start_relay, wait_for_socket, Latency, Scratch,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Release);
}

const BAR2: u32 = 2;
const ROUNDS: usize = 2000;

fn check_interrupt() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::Acquire) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn connect(path: &std::path::Path) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        check_interrupt()?;
        if let Ok(mut c) = Client::connect(path, Duration::from_secs(5)) {
            if c.negotiate(Capabilities::default()).is_ok() {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no device answering on {}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// REGION_READ round trips of BAR2 offset 1 (the input register).
fn measure(c: &mut Client) -> Result<(Latency, f64), String> {
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS / 10 {
        c.region_read(BAR2, 1, 1).map_err(|e| e.to_string())?;
    }
    for _ in 0..ROUNDS {
        let t = Instant::now();
        c.region_read(BAR2, 1, 1).map_err(|e| e.to_string())?;
        samples.push(t.elapsed());
    }
    check_interrupt()?;
    // Posted writes: send a burst without waiting, then one read to know they are done.
    let n = 20_000;
    let t = Instant::now();
    for i in 0..n {
        c.region_write_posted(BAR2, 0, &[i as u8])
            .map_err(|e| e.to_string())?;
    }
    c.region_read(BAR2, 0, 1).map_err(|e| e.to_string())?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    Ok((Latency::from_samples(&mut samples), rate))
}

fn run() -> Result<(), String> {
    let scratch = Scratch::new("demo");
    let frontend = scratch.join("frontend.sock");
    let relayed = scratch.join("gpio0.sock");
    let direct = scratch.join("gpio-direct.sock");

    println!("== vfu-relay demo ==");
    println!(
        "starting vfu-relay         --frontend-socket {} --device gpio0={}",
        frontend.display(),
        relayed.display()
    );
    let _relay = start_relay(&frontend, &[("gpio0", &relayed)]);
    if !wait_for_socket(&relayed, Duration::from_secs(10)) {
        return Err("vfu-relay did not start".into());
    }
    println!(
        "starting the device VM     vfu-guest --loopback {} --serve gpio0=gpio",
        frontend.display()
    );
    let _guest = start_loopback_guest(&frontend, &[("gpio0", "gpio")]);
    println!(
        "starting the direct server vfu-guest --listen {} --model gpio",
        direct.display()
    );
    let _direct = start_direct(&direct, "gpio");

    let mut c = connect(&relayed)?;
    println!(
        "\nconnected through the relay; VERSION negotiated: {:?}\n",
        c.server_caps
    );

    let info = c.device_info().map_err(|e| e.to_string())?;
    let mut regions = Vec::new();
    for i in 0..info.num_regions {
        regions.push(c.region_info(i).map_err(|e| e.to_string())?.0);
    }
    let mut irqs = Vec::new();
    for i in 0..info.num_irqs.min(pci_irq::COUNT) {
        irqs.push(c.irq_info(i).map_err(|e| e.to_string())?);
    }
    let config = c
        .region_read(
            pci_region::CONFIG,
            0,
            regions[pci_region::CONFIG as usize].size.min(256) as u32,
        )
        .map_err(|e| e.to_string())?;
    println!("{}", lspci::render(&config, &regions, &irqs));

    println!("registers (BAR2, ACCES PCI-IDIO-16 layout):");
    c.region_write(BAR2, 0, &[0x5a])
        .map_err(|e| e.to_string())?;
    c.region_write(BAR2, 4, &[0xc3])
        .map_err(|e| e.to_string())?;
    let out0 = c.region_read(BAR2, 0, 1).map_err(|e| e.to_string())?[0];
    let out1 = c.region_read(BAR2, 4, 1).map_err(|e| e.to_string())?[0];
    let in0 = c.region_read(BAR2, 1, 1).map_err(|e| e.to_string())?[0];
    println!("  wrote FET outputs 0-7 = 0x5a, 8-15 = 0xc3; read back 0x{out0:02x}, 0x{out1:02x}");
    println!("  isolated inputs 0-7 read 0x{in0:02x}");
    if (out0, out1) != (0x5a, 0xc3) {
        return Err("outputs did not read back".into());
    }

    println!("\nround-trip latency, REGION_READ of 1 byte, {ROUNDS} samples (placement: as the scheduler puts the processes; see docs/benchmarks.md for pinned runs):");
    let (relay_lat, relay_rate) = measure(&mut c)?;
    let mut d = connect(&direct)?;
    let (direct_lat, direct_rate) = measure(&mut d)?;
    println!(
        "  {:<10} {:>10} {:>10} {:>16}",
        "path", "p50 us", "p99 us", "posted writes/s"
    );
    println!(
        "  {:<10} {:>10.1} {:>10.1} {:>16.0}",
        "direct", direct_lat.p50, direct_lat.p99, direct_rate
    );
    println!(
        "  {:<10} {:>10.1} {:>10.1} {:>16.0}",
        "relayed", relay_lat.p50, relay_lat.p99, relay_rate
    );
    println!(
        "  relayed/direct p50: {:.2}x",
        relay_lat.p50 / direct_lat.p50
    );

    c.reset().map_err(|e| e.to_string())?;
    println!("\ndevice reset; cleaning up");
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let result = run();
    // Processes and the scratch directory were dropped (stopped, removed) by now.
    match result {
        Ok(()) => {
            println!("done: every process stopped, every socket removed");
            ExitCode::SUCCESS
        }
        Err(_) if INTERRUPTED.load(Ordering::Acquire) => {
            eprintln!("interrupted: every process stopped, every socket removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
