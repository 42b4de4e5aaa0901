//! The benchmark of `docs/benchmarks.md`: REGION_READ round trips (p50, p99) and posted
//! REGION_WRITE throughput, relayed (vfu-relay + loopback device VM) against the same
//! `gpio` model served directly by vfu-guest, with the same client, in one run, for each
//! CPU placement. Figures are ratios against the direct baseline of the same placement.
//!
//! Then DMA: the `dma-engine` model copies 4 KiB to 1 MiB on each DMA path, and the time
//! it spends in its DMA calls is compared with the same two copies done with memcpy in
//! this process; and interrupt latency, from the device raising MSI-X vector 0 to the
//! client's eventfd waking a thread blocked on it.
//!
//! `memfd-io` measures what the relay's copy path chooses between: pread/pwrite of a
//! memfd against memcpy from a mapping of it.
//!
//! `device-vm` measures the same round trips through a real device VM (QEMU under TCG,
//! the image of `scripts/device-vm/build-image.sh`) against the loopback device VM and
//! the direct server, unpinned (QEMU's vCPU thread goes where the scheduler puts it).
//!
//! ```text
//! target/release/vfu-bench [latency|dma|memfd-io|device-vm|all] [--rounds N] [--writes N]
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

/// Round trips through a real device VM with the tunnel on each PCI driver (one VM after
/// the other), the loopback device VM and the direct server, in one run, unpinned.
fn device_vm(rounds: usize, writes: usize) -> Result<(), String> {
    use vfu_tests::device_vm::image;
    let image = image().ok_or(
        "no device-VM image: run scripts/device-vm/build-image.sh and set \
         VFU_DEVICE_VM_IMAGE=target/device-vm/current",
    )?;
    let scratch = Scratch::new("bench-vm");
    let frontend = scratch.join("frontend.sock");
    let relayed = scratch.join("gpio0.sock");
    let direct = scratch.join("direct.sock");
    let _relay = start_relay_on(None, &frontend, &[("gpio0", &relayed)]);
    let _guest = start_loopback_guest_on(None, &frontend, &[("gpio0", "gpio")]);
    let _direct = start_direct_on(None, &direct, "gpio");
    if !wait_for_socket(&relayed, Duration::from_secs(10)) {
        return Err("relay did not start".into());
    }
    println!("vfu-bench device-vm: {rounds} REGION_READ round trips (1 byte, gpio BAR2) and {writes} posted 1-byte REGION_WRITEs per path, unpinned");
    println!();
    println!("| path | p50 us | p99 us | posted writes/s | p50 vs direct |");
    println!("|---|---:|---:|---:|---:|");
    let d = measure(&direct, rounds, writes)?;
    let l = measure(&relayed, rounds, writes)?;
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
    let base = rows[0].1.lat.p50;
    for (path, f) in &rows {
        println!(
            "| {path} | {:.1} | {:.1} | {:.0} | {:.2}x |",
            f.lat.p50,
            f.lat.p99,
            f.writes_per_s,
            f.lat.p50 / base
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
) -> Result<Figures, String> {
    use vfu_tests::device_vm::{DeviceVm, BOOT};
    let frontend = scratch.join(&format!("vm-{driver}.sock"));
    let in_vm = scratch.join(&format!("vm-{driver}-gpio0.sock"));
    let _relay = vfu_tests::start_relay_with(
        None,
        &frontend,
        &[("gpio0", &in_vm)],
        &["--shm-size-mib", "0"],
    );
    if !wait_for_socket(&frontend, Duration::from_secs(10)) {
        return Err("relay did not start".into());
    }
    let vm = DeviceVm::boot_with_driver(
        image,
        &frontend,
        &scratch.join(&format!("console-{driver}.log")),
        "gpio0=gpio",
        Some(driver),
    );
    let _ = vfu_tests::connect_served(&in_vm, BOOT);
    let transport = vm
        .wait_for_marker("VFU-GUEST TRANSPORT", 1, BOOT)
        .unwrap_or_default();
    if !transport.contains(&format!("driver={driver}")) {
        return Err(format!(
            "the device VM did not drive the tunnel through {driver}; console:\n{}",
            vm.console()
        ));
    }
    measure(&in_vm, rounds, writes).map_err(|e| format!("{e}; console:\n{}", vm.console()))
}

fn main() -> ExitCode {
    // The client side of the benchmark serves DMA_READ/DMA_WRITE with buffers of up to
    // 1 MiB, like the daemons: keep them on the heap the same way.
    vfu_proto::mem::keep_large_buffers_on_heap();
    let mut rounds = 20_000;
    let mut writes = 100_000;
    let mut what = "all".to_string();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if matches!(
            a.as_str(),
            "latency" | "dma" | "memfd-io" | "device-vm" | "all"
        ) {
            what = a.clone();
            continue;
        }
        let v = it.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--rounds", Some(n)) => rounds = n,
            ("--writes", Some(n)) => writes = n,
            _ => {
                eprintln!("usage: vfu-bench [latency|dma|memfd-io|device-vm|all] [--rounds N] [--writes N]");
                return ExitCode::from(2);
            }
        }
    }
    let result = match what.as_str() {
        "latency" => run(rounds, writes),
        "dma" => dma::run(),
        "memfd-io" => memfd_io::run(),
        "device-vm" => device_vm(rounds, writes),
        _ => run(rounds, writes).and_then(|()| dma::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

mod dma {
    //! DMA bandwidth per path, and interrupt latency.

    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use vfu_guest::models::dma_engine::monotonic_ns;
    use vfu_tests::dma_engine::{
        reg_read, reg_write, setup_on, Path, Setup, BAR0, COMPLETION, DST, SRC,
    };
    use vfu_tests::pin_to;

    const SIZES: [u32; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
    const CONTROL_START_NOCRC: u64 = 0b11;

    fn reg64(s: &mut Setup, off: u64) -> u64 {
        let b = s.client.region_read(BAR0, off, 8).unwrap_or_default();
        b.get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// Median nanoseconds the device spends in DMA for `len` bytes.
    fn device_ns(s: &mut Setup, len: u32, ops: usize) -> Result<f64, String> {
        reg_write(&mut s.client, 0x08, SRC, 8);
        reg_write(&mut s.client, 0x10, DST, 8);
        reg_write(&mut s.client, 0x18, COMPLETION, 8);
        reg_write(&mut s.client, 0x20, u64::from(len), 4);
        let mut ns = Vec::with_capacity(ops);
        for i in 0..ops + 3 {
            reg_write(&mut s.client, 0x24, CONTROL_START_NOCRC, 4);
            if reg_read(&mut s.client, 0x28) & 0xff != 1 {
                return Err(format!(
                    "operation failed: status {:#x}",
                    reg_read(&mut s.client, 0x28)
                ));
            }
            if i >= 3 {
                ns.push(reg64(s, 0x38) as f64);
            }
        }
        ns.sort_by(f64::total_cmp);
        Ok(ns[ns.len() / 2])
    }

    /// Median nanoseconds of the same work with memcpy: `len` bytes from a source buffer
    /// into a local one, then from it into a destination buffer.
    /// Median nanoseconds of the two copies the device does (source into a local
    /// buffer, local buffer into the destination) with memcpy. With `cold`, a 64 MiB
    /// sweep (twice this machine's L3) runs before each one: the device's copies run
    /// between round trips through the relay, so their cache state lies between the two.
    fn memcpy_ns(len: usize, cold: bool) -> f64 {
        let src = vec![0x5au8; len];
        let mut tmp = vec![0u8; len];
        let mut dst = vec![0u8; len];
        let (rounds, mut sweep) = if cold {
            (60, vec![0u8; 64 << 20])
        } else {
            (2000, Vec::new())
        };
        let mut ns = Vec::new();
        for i in 0..rounds {
            sweep.fill(i as u8);
            std::hint::black_box(&sweep);
            let t = Instant::now();
            tmp.copy_from_slice(std::hint::black_box(&src));
            dst.copy_from_slice(std::hint::black_box(&tmp));
            ns.push(t.elapsed().as_nanos() as f64);
            std::hint::black_box(&dst);
        }
        ns.sort_by(f64::total_cmp);
        ns[ns.len() / 2]
    }

    fn gbps(len: u32, ns: f64) -> f64 {
        f64::from(len) / ns
    }

    /// Interrupt latency: device raise (IRQ_NS) to a thread blocked on the eventfd.
    fn irq_latency(s: &mut Setup, samples: usize) -> Result<(f64, f64), String> {
        let fd: OwnedFd = s.irq.try_clone().map_err(|e| e.to_string())?;
        // Take the signals of the operations before (the fd is still non-blocking), then
        // block in the waiter thread.
        let mut stale = 0u64;
        // SAFETY: reads 8 bytes into a local from an fd we own; F_SETFL on it.
        unsafe {
            libc::read(
                fd.as_raw_fd(),
                &mut stale as *mut u64 as *mut libc::c_void,
                8,
            );
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0);
        }
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            for _ in 0..samples {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into a local from an fd we own.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8)
                };
                let t = monotonic_ns();
                if n != 8 || tx.send(t).is_err() {
                    return;
                }
            }
        });
        reg_write(&mut s.client, 0x20, 64, 4);
        let mut lat = Vec::new();
        for _ in 0..samples {
            reg_write(&mut s.client, 0x24, CONTROL_START_NOCRC, 4);
            let woke = rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| "no interrupt".to_string())?;
            let raised = reg64(s, 0x40);
            lat.push(woke.saturating_sub(raised) as f64 / 1000.0);
            reg_write(&mut s.client, 0x34, 1, 4);
        }
        let _ = waiter.join();
        lat.sort_by(f64::total_cmp);
        Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
    }

    /// memcpy baseline on `cpu`, where the device VM runs: hot caches, then cold.
    fn baseline_on(cpu: usize) -> (Vec<f64>, Vec<f64>) {
        std::thread::spawn(move || {
            let _ = pin_to(cpu);
            let hot = SIZES
                .iter()
                .map(|&l| memcpy_ns(l as usize, false))
                .collect();
            let cold = SIZES.iter().map(|&l| memcpy_ns(l as usize, true)).collect();
            (hot, cold)
        })
        .join()
        .unwrap_or_default()
    }

    pub fn run() -> Result<(), String> {
        // Online CPUs, whatever this thread's affinity is.
        // SAFETY: sysconf has no memory effects.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let servers = if cpus > 1 { 1 } else { 0 };
        println!();
        println!("DMA by the dma-engine model (NOCRC), device time in its DMA calls (median), vs the same two copies with memcpy here; client CPU 0, relay and device VM CPU {servers}");
        println!();
        print!("| path |");
        for len in SIZES {
            print!(" {} KiB GB/s |", len >> 10);
        }
        println!();
        print!("|---|");
        for _ in SIZES {
            print!("---:|");
        }
        println!();
        let (base, cold) = baseline_on(servers);
        if base.len() != SIZES.len() || cold.len() != SIZES.len() {
            return Err("the memcpy baseline thread failed".into());
        }
        print!("| memcpy (baseline) |");
        for (i, &len) in SIZES.iter().enumerate() {
            print!(" {:.2} |", gbps(len, base[i]));
        }
        println!();
        print!("| memcpy, cold caches (reference) |");
        for (i, &len) in SIZES.iter().enumerate() {
            print!(" {:.2} ({:.2}x) |", gbps(len, cold[i]), base[i] / cold[i]);
        }
        println!();
        let mut irq = None;
        for path in Path::ALL {
            let mut s = setup_on(Some(servers), "bench-dma", path);
            pin_to(0).map_err(|e| e.to_string())?;
            print!("| {} |", path.name());
            for (i, &len) in SIZES.iter().enumerate() {
                let ops = (64 << 20) / len as usize;
                let ns = device_ns(&mut s, len, ops.clamp(20, 300))?;
                print!(" {:.2} ({:.2}x) |", gbps(len, ns), base[i] / ns);
            }
            println!();
            if path == Path::Window {
                irq = Some(irq_latency(&mut s, 500)?);
            }
        }
        if let Some((p50, p99)) = irq {
            println!();
            println!("interrupt latency (device raises MSI-X vector 0 -> client thread wakes on its eventfd), window setup, 500 samples: p50 {p50:.1} us, p99 {p99:.1} us");
        }
        Ok(())
    }
}

mod memfd_io {
    //! pread/pwrite of a memfd against memcpy from a mapping of it: why the relay maps
    //! client memfds that are sealed against shrinking.

    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    use vfu_proto::mem::map_fd;
    use vfu_tests::dma_engine::memfd;

    const MIB: usize = 1 << 20;

    pub fn run() -> Result<(), String> {
        let f = memfd(MIB as u64);
        let fd = std::os::fd::AsFd::as_fd(&f);
        let map = map_fd(fd, 0, MIB as u64, true, true).map_err(|e| e.to_string())?;
        // SAFETY: a fresh 1 MiB read-write mapping of a memfd sealed against shrinking;
        // nothing else uses it while this slice lives.
        let mapped = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), MIB) };
        mapped.fill(1);
        let mut buf = vec![0u8; MIB];
        println!("\nmemfd access, 64 MiB per size, one thread (GB/s)\n");
        println!("| size | pread | pwrite | memcpy from a mapping | memcpy to a mapping |");
        println!("|---|---:|---:|---:|---:|");
        for size in [4096usize, 16384, 65536, 262144, MIB] {
            let n = (64 * MIB) / size;
            let rate = |f: &mut dyn FnMut()| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                (n * size) as f64 / t.elapsed().as_secs_f64() / 1e9
            };
            let pread = rate(&mut || {
                f.read_exact_at(&mut buf[..size], 0).expect("pread");
            });
            let pwrite = rate(&mut || {
                f.write_all_at(&buf[..size], 0).expect("pwrite");
            });
            let from = rate(&mut || {
                buf[..size].copy_from_slice(&mapped[..size]);
                std::hint::black_box(&buf);
            });
            let to = rate(&mut || {
                mapped[..size].copy_from_slice(&buf[..size]);
                std::hint::black_box(&*mapped);
            });
            println!(
                "| {} KiB | {pread:.2} | {pwrite:.2} | {from:.2} | {to:.2} |",
                size >> 10
            );
        }
        // SAFETY: the mapping made above, unmapped once; `mapped` is not used again.
        unsafe { libc::munmap(map.as_ptr().cast(), MIB) };
        Ok(())
    }
}
