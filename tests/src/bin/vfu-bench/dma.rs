//! DMA bandwidth per path, and interrupt latency.
//!
//! The `dma-engine` model copies LEN bytes (CONTROL = START | NOCRC) on each DMA path;
//! the figure is the median of what the device reports in DMA_NS (time in its DMA
//! calls), against the same two copies done with memcpy on the device's CPU. Interrupt
//! latency: from the device raising MSI-X vector 0 (IRQ_NS) to a client thread blocked
//! on the vector's eventfd waking up.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vfu_guest::models::dma_engine::monotonic_ns;
use vfu_proto::client::Client;
use vfu_tests::dma_engine::{try_setup, Path, Setup, BAR0, COMPLETION, DST, SRC};
use vfu_tests::pin_to;

use crate::common::{online_cpus, Mode, Samples};
use crate::table::{num, ratio, Table};

/// Copy sizes.
pub const SIZES: [u32; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
const CONTROL_START_NOCRC: u64 = 0b11;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Copies per size at least and at most (64 MiB worth in between).
    pub ops: (usize, usize),
    /// Interrupt latency samples.
    pub irqs: usize,
}

impl Effort {
    /// What `vfu-bench dma` has always done.
    pub const FULL: Effort = Effort {
        ops: (20, 300),
        irqs: 500,
    };
    /// `--quick`.
    pub const QUICK: Effort = Effort {
        ops: (8, 40),
        irqs: 100,
    };
}

/// Everything one run measured.
pub struct Results {
    /// CPU of the relay, the device VM and the memcpy baseline.
    pub servers: usize,
    /// memcpy nanoseconds per size, hot caches.
    pub hot: Vec<f64>,
    /// The same after a 64 MiB sweep.
    pub cold: Vec<f64>,
    /// Per path and mode: label, device nanoseconds per size.
    pub paths: Vec<(String, Vec<f64>)>,
    /// Interrupt latency per mode (window setup).
    pub irq: Vec<(String, Samples)>,
}

fn reg_write(c: &mut Client, off: u64, v: u64, width: usize) -> Result<(), String> {
    c.region_write(BAR0, off, &v.to_le_bytes()[..width])
        .map_err(|e| format!("dma-engine register {off:#x}: REGION_WRITE: {e}"))
}

fn reg(c: &mut Client, off: u64, width: u32) -> Result<u64, String> {
    let b = c
        .region_read(BAR0, off, width)
        .map_err(|e| format!("dma-engine register {off:#x}: REGION_READ: {e}"))?;
    let mut v = [0u8; 8];
    let n = b.len().min(8);
    v[..n].copy_from_slice(&b[..n]);
    Ok(u64::from_le_bytes(v))
}

/// Median nanoseconds the device spends in DMA for `len` bytes.
fn device_ns(s: &mut Setup, len: u32, ops: usize) -> Result<f64, String> {
    let c = &mut s.client;
    reg_write(c, 0x08, SRC, 8)?;
    reg_write(c, 0x10, DST, 8)?;
    reg_write(c, 0x18, COMPLETION, 8)?;
    reg_write(c, 0x20, u64::from(len), 4)?;
    let mut ns = Vec::with_capacity(ops);
    for i in 0..ops + 3 {
        reg_write(c, 0x24, CONTROL_START_NOCRC, 4)?;
        let status = reg(c, 0x28, 4)?;
        if status & 0xff != 1 {
            return Err(format!(
                "dma-engine copy of {len} bytes failed: status {status:#x}"
            ));
        }
        if i >= 3 {
            ns.push(reg(c, 0x38, 8)? as f64);
        }
    }
    ns.sort_by(f64::total_cmp);
    Ok(ns[ns.len() / 2])
}

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

fn read_eventfd(fd: &OwnedFd) -> isize {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local from an fd we own.
    unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) }
}

/// Interrupt latency: device raise (IRQ_NS) to a thread blocked on the eventfd.
fn irq_latency(s: &mut Setup, samples: usize) -> Result<Samples, String> {
    let fd: OwnedFd = s.irq.try_clone().map_err(|e| e.to_string())?;
    // Take the signals of the operations before (the fd is still non-blocking), then
    // block in the waiter thread.
    read_eventfd(&fd);
    // SAFETY: F_SETFL on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
        return Err(format!(
            "eventfd: F_SETFL: {}",
            std::io::Error::last_os_error()
        ));
    }
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        for _ in 0..samples {
            let n = read_eventfd(&fd);
            let t = monotonic_ns();
            if n != 8 || tx.send(t).is_err() {
                return;
            }
        }
    });
    let c = &mut s.client;
    reg_write(c, 0x20, 64, 4)?;
    let mut us = Vec::new();
    for _ in 0..samples {
        reg_write(c, 0x24, CONTROL_START_NOCRC, 4)?;
        let woke = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "no interrupt within 5 s".to_string())?;
        let raised = reg(c, 0x40, 8)?;
        us.push(woke.saturating_sub(raised) as f64 / 1000.0);
        reg_write(c, 0x34, 1, 4)?;
    }
    let _ = waiter.join();
    Ok(Samples::from_us(us))
}

/// memcpy baseline on `cpu`, where the device VM runs: hot caches, then cold.
fn baseline_on(cpu: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
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
    .map_err(|_| "the memcpy baseline thread failed".to_string())
}

/// Measures every path in every mode of `modes`, with the client on CPU 0 and the
/// relay and device VM on CPU 1 (0 on a single CPU).
pub fn measure(modes: &[Mode], effort: Effort) -> Result<Results, String> {
    let servers = if online_cpus() > 1 { 1 } else { 0 };
    eprintln!("vfu-bench: DMA: memcpy baseline on CPU {servers}");
    let (hot, cold) = baseline_on(servers)?;
    let mut paths = Vec::new();
    let mut irq = Vec::new();
    for mode in modes {
        for path in Path::ALL {
            eprintln!("vfu-bench: DMA: {} path, {} mode", path.name(), mode.name);
            let relay: Vec<&str> = mode.relay.iter().map(String::as_str).collect();
            let guest: Vec<&str> = mode.guest.iter().map(String::as_str).collect();
            let mut s = try_setup(Some(servers), "bench-dma", path, &relay, &guest)
                .map_err(|e| format!("{} path, {} mode: {e}", path.name(), mode.name))?;
            pin_to(0).map_err(|e| format!("pinning the client to CPU 0: {e}"))?;
            let mut ns = Vec::new();
            for len in SIZES {
                let ops = ((64 << 20) / len as usize).clamp(effort.ops.0, effort.ops.1);
                ns.push(
                    device_ns(&mut s, len, ops)
                        .map_err(|e| format!("{} path, {} mode: {e}", path.name(), mode.name))?,
                );
            }
            let label = if modes.len() > 1 {
                format!("{} ({} mode)", path.name(), mode.name)
            } else {
                path.name().to_string()
            };
            paths.push((label, ns));
            if path == Path::Window {
                eprintln!("vfu-bench: interrupt latency, {} mode", mode.name);
                let samples = irq_latency(&mut s, effort.irqs)
                    .map_err(|e| format!("interrupt latency, {} mode: {e}", mode.name))?;
                irq.push((mode.name.to_string(), samples));
            }
        }
    }
    Ok(Results {
        servers,
        hot,
        cold,
        paths,
        irq,
    })
}

impl Results {
    /// Bandwidth per path and size, as a ratio to the hot memcpy baseline.
    pub fn bandwidth_table(&self) -> Table {
        let mut columns = vec!["path".to_string()];
        columns.extend(SIZES.iter().map(|l| format!(">{} KiB GB/s", l >> 10)));
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let mut t = Table::new(
            "DMA bandwidth per path",
            &format!(
                "The dma-engine model copies LEN bytes of client memory to client memory \
                 (CONTROL = START | NOCRC); bandwidth is LEN over the median time the device \
                 reports in DMA_NS (its DMA read and write calls). Baseline: the same two \
                 copies with memcpy in a thread on the device's CPU. Client on CPU 0, relay and \
                 device VM on CPU {}. In brackets: the ratio to the baseline.",
                self.servers
            ),
            &cols,
        );
        let mut base = vec!["memcpy (baseline)".to_string()];
        base.extend(
            SIZES
                .iter()
                .zip(&self.hot)
                .map(|(&l, &ns)| num(gbps(l, ns), 2)),
        );
        t.row(base);
        let mut row = |label: &str, ns: &[f64]| {
            let mut r = vec![label.to_string()];
            for ((&l, &ns), &hot) in SIZES.iter().zip(ns).zip(&self.hot) {
                r.push(format!("{} ({})", num(gbps(l, ns), 2), ratio(hot / ns)));
            }
            t.row(r);
        };
        row("memcpy, cold caches (reference)", &self.cold);
        for (label, ns) in &self.paths {
            row(label, ns);
        }
        t
    }

    /// Interrupt latency per mode.
    pub fn irq_table(&self) -> Table {
        let mut t = Table::new(
            "Interrupt latency",
            &format!(
                "From the device raising MSI-X vector 0 (IRQ_NS, CLOCK_MONOTONIC) to a client \
                 thread blocked on the vector's eventfd waking up: device VM -> relay -> \
                 eventfd -> client. Window setup; relay and device VM on CPU {}, client on \
                 CPU 0. No baseline exists in this run (no direct path raises interrupts \
                 here): the figures stand alone.",
                self.servers
            ),
            &["mode", ">samples", ">p50 us", ">p99 us"],
        );
        for (mode, s) in &self.irq {
            t.row(vec![
                mode.clone(),
                s.len().to_string(),
                num(s.p50(), 1),
                num(s.p99(), 1),
            ]);
        }
        t
    }
}

/// `vfu-bench dma`: event mode, printed as it always was.
pub fn run() -> Result<(), String> {
    let r = measure(&[Mode::event()], Effort::FULL)?;
    println!();
    println!("DMA by the dma-engine model (NOCRC), device time in its DMA calls (median), vs the same two copies with memcpy here; client CPU 0, relay and device VM CPU {}", r.servers);
    println!();
    print!("{}", r.bandwidth_table().grid());
    if let Some((_, s)) = r.irq.first() {
        println!();
        println!("interrupt latency (device raises MSI-X vector 0 -> client thread wakes on its eventfd), window setup, {} samples: p50 {:.1} us, p99 {:.1} us", s.len(), s.p50(), s.p99());
    }
    Ok(())
}
