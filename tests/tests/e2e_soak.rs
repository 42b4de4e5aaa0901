//! A bounded soak (issue 8, "Hostile peers"): many devices, random disconnects of
//! clients and of the device VM, all data checked, no panic, no leak.
//!
//! A real vfu-relay exports `VFU_SOAK_DEVICES` devices (default 24, half `gpio`, half
//! `dma-engine`) to a loopback vfu-guest. One client thread per device does checked
//! work for `VFU_SOAK_SECONDS` (default 60):
//!
//! - gpio: reads the config-space IDs, writes the 16 outputs (one byte posted, one
//!   acknowledged), reads them back;
//! - dma-engine: reads the ID register, copies 4 to 64 KiB of fresh data from its
//!   source to its destination region, checks STATUS, the destination bytes, the
//!   CRC32C register, the completion record and the MSI-X interrupt; its memory is a
//!   sealed memfd (windows), an unsealed one (the relay's pread/pwrite), or no fd at
//!   all (the relay asks the client), chosen per connection;
//!
//! and, every 10 to 100 operations, disconnects (cleanly, or abruptly with a request
//! still in flight) and connects again. Meanwhile a schedule drawn from the seed kills
//! the device VM (SIGKILL or SIGTERM), leaves it down for a while or not, and starts a
//! new one in a random mode (windows, copy path, copy path without DIRECT_DATA; one or
//! two queue pairs).
//!
//! What must hold:
//! - no client ever reads wrong data. A request may fail (an outage, a timeout): that
//!   is counted by errno, never a failure. A value read is checked exactly when nothing
//!   failed and no device VM died during the operation; across a restart it may also be
//!   the value of a device after reset (outputs 0, STATUS IDLE), never anything else; a
//!   copy the device reports DONE always has the right bytes and CRC;
//! - the relay never exits, and the device VM only when it is killed; neither logs a
//!   panic (their standard error goes to log files in the scratch directory, unless
//!   `VFU_TEST_LOG` shows it);
//! - afterwards every device serves a fresh client (IDs, a register round trip, a
//!   checked copy);
//! - the relay's fds are what they were after a warm-up of the same work (without
//!   disruptions), and its resident memory is within a small bound of it.
//!
//! The seed is printed; `VFU_SOAK_SEED=N` replays the same schedule and the same
//! client choices (the interleaving of threads is the machine's). A summary follows:
//! operations, checks, errors by kind, restarts, reconnects.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{pci_region, Capabilities};
use vfu_tests::dma_engine::{
    completion, crc32c, eventfd, fired, memfd, try_enable_client, try_map, try_set_irq,
    try_start_copy, unsealed_memfd, Memory, COMPLETION, DST, DST_SIZE, MEMORY_SIZE, MIB, SRC,
};
use vfu_tests::logs::{self, Log};
use vfu_tests::procfs::{rss_kib, status_kib, steady_fd_count};
use vfu_tests::{binary, wait_for_socket, Proc, Scratch};

const SETUP: Duration = Duration::from_secs(30);
/// How long a client waits for a reply (QEMU's 5 s; the relay answers ETIMEDOUT at 3).
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// gpio: the register BAR and the two output registers.
const GPIO_BAR: u32 = 2;
const GPIO_IDS: [u8; 4] = [0x4f, 0x49, 0xc8, 0x0d];
/// dma-engine: the register BAR, its ID register and config-space IDs.
const DMA_BAR: u32 = 0;
const DMA_ID: [u8; 4] = *b"DMAE";
const DMA_IDS: [u8; 4] = [0x34, 0x12, 0xf0, 0x11];
// The dma-engine client's memory is the `vfu_tests::dma_engine` layout: source at SRC
// (1 MiB, read-only to the device), destination at DST (1 MiB and a page, the
// completion record at its end).

/// splitmix64: a small, seedable generator (the schedule and the clients' choices).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0 .. n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True `per_mille` times in a thousand.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Model {
    Gpio,
    DmaEngine,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Gpio => "gpio",
            Model::DmaEngine => "dma-engine",
        }
    }

    fn ids(self) -> [u8; 4] {
        match self {
            Model::Gpio => GPIO_IDS,
            Model::DmaEngine => DMA_IDS,
        }
    }
}

/// What the client threads and the schedule share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Bumped before the device VM is killed: an operation that sees it change may
    /// have met a device after reset.
    epoch: AtomicU64,
    /// Wrong data and other broken promises, with what was expected and seen.
    failures: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("SOAK FAILURE: {what}");
        self.failures.lock().unwrap().push(what);
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}

/// What one client thread did.
#[derive(Default)]
struct Stats {
    ops: u64,
    /// Values and copies checked exactly.
    exact: u64,
    /// Checked as "right, or a device after reset" (a restart during the operation).
    lenient: u64,
    /// Copies whose data, CRC and completion record were checked.
    copies: u64,
    interrupts: u64,
    errors: BTreeMap<String, u64>,
    connects: u64,
    connect_failures: u64,
    disconnects: u64,
    abrupt: u64,
}

impl Stats {
    fn error(&mut self, e: &ClientError) {
        let kind = match e {
            ClientError::Errno(n) => errno_name(*n),
            ClientError::Timeout => "client timeout".into(),
            ClientError::BadReply(_) => "bad reply".into(),
            ClientError::Transport(_) => "connection closed".into(),
            ClientError::Io(_) => "socket error".into(),
            ClientError::NotNegotiated(_) => "not negotiated".into(),
        };
        *self.errors.entry(kind).or_default() += 1;
    }

    fn add(&mut self, o: Stats) {
        self.ops += o.ops;
        self.exact += o.exact;
        self.lenient += o.lenient;
        self.copies += o.copies;
        self.interrupts += o.interrupts;
        self.connects += o.connects;
        self.connect_failures += o.connect_failures;
        self.disconnects += o.disconnects;
        self.abrupt += o.abrupt;
        for (k, n) in o.errors {
            *self.errors.entry(k).or_default() += n;
        }
    }
}

fn errno_name(n: u32) -> String {
    let name = match n as i32 {
        libc::ENODEV => "ENODEV",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::EFAULT => "EFAULT",
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        _ => return format!("errno {n}"),
    };
    name.into()
}

/// A bad reply is a broken promise (the relay checks replies as the client would);
/// everything else may happen while device VMs come and go.
fn note_error(stats: &mut Stats, shared: &Shared, what: &str, e: &ClientError) {
    if let ClientError::BadReply(r) = e {
        shared.fail(format!("{what}: bad reply: {r}"));
    }
    stats.error(e);
}

/// Whether the connection is unusable after `e` (the relay closed it).
fn fatal(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport(_) | ClientError::Io(_))
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The device's client memory of a dma-engine connection, and how the relay reaches it.
struct DmaMemory {
    memory: Memory,
    kind: &'static str,
}

/// One client thread's connection.
struct Conn {
    client: Client,
    /// dma-engine: memory and interrupt eventfd.
    dma: Option<(DmaMemory, OwnedFd)>,
    /// The epoch at which the device was last enabled (bus master, MSI-X): a new device
    /// VM starts with them off.
    enabled_at: Option<u64>,
}

/// Connects and sets the connection up (dma-engine: memory maps and the interrupt
/// eventfd).
fn connect(socket: &Path, model: Model, rng: &mut Rng) -> Result<Conn, ClientError> {
    let mut client = Client::connect(socket, REPLY_WAIT)?;
    client.negotiate(Capabilities {
        max_msg_fds: Some(16),
        ..Capabilities::default()
    })?;
    let dma = match model {
        Model::Gpio => None,
        Model::DmaEngine => {
            let (memory, kind, fd) = match rng.below(3) {
                0 => {
                    let f = memfd(MEMORY_SIZE);
                    let fd = f.try_clone()?;
                    (Memory::File(f), "sealed memfd", Some(fd))
                }
                1 => {
                    let f = unsealed_memfd(MEMORY_SIZE);
                    let fd = f.try_clone()?;
                    (Memory::File(f), "unsealed memfd", Some(fd))
                }
                _ => {
                    let buf = Arc::new(Mutex::new(vec![0u8; MEMORY_SIZE as usize]));
                    client.serve_dma(SRC, buf.clone());
                    (Memory::Buffer(buf), "no fd", None)
                }
            };
            try_map(&mut client, SRC, MIB, 0, false, fd.as_ref())?;
            try_map(&mut client, DST, DST_SIZE, DST - SRC, true, fd.as_ref())?;
            let irq = eventfd();
            try_set_irq(&mut client, Some(irq.try_clone()?))?;
            Some((DmaMemory { memory, kind }, irq))
        }
    };
    Ok(Conn {
        client,
        dma,
        enabled_at: None,
    })
}

/// One checked gpio operation. Returns Err when the connection is gone.
fn gpio_op(
    conn: &mut Conn,
    rng: &mut Rng,
    shared: &Shared,
    stats: &mut Stats,
    dev: &str,
) -> Result<(), ()> {
    let c = &mut conn.client;
    let (a, b) = (rng.next() as u8, rng.next() as u8);
    let e0 = shared.epoch();
    let run = |c: &mut Client| -> Result<([u8; 4], u8, u8), ClientError> {
        // An acknowledged request first: the device is served now, so the posted write
        // that follows is not dropped for want of a device VM.
        let ids = c.region_read(pci_region::CONFIG, 0, 4)?;
        c.region_write_posted(GPIO_BAR, 0, &[a])?;
        c.region_write(GPIO_BAR, 4, &[b])?;
        let r = c.region_read(GPIO_BAR, 0, 1)?[0];
        let s = c.region_read(GPIO_BAR, 4, 1)?[0];
        Ok(([ids[0], ids[1], ids[2], ids[3]], r, s))
    };
    let result = run(c);
    let e1 = shared.epoch();
    stats.ops += 1;
    match result {
        Err(e) => {
            note_error(stats, shared, &format!("{dev}: gpio operation"), &e);
            if fatal(&e) {
                return Err(());
            }
        }
        Ok((ids, r, s)) => {
            if ids != GPIO_IDS {
                shared.fail(format!("{dev}: config-space IDs {ids:02x?}"));
            }
            if e0 == e1 {
                stats.exact += 1;
                if (r, s) != (a, b) {
                    shared.fail(format!(
                        "{dev}: wrote outputs {a:#04x} {b:#04x}, read back {r:#04x} {s:#04x} (no restart meanwhile)"
                    ));
                }
            } else {
                stats.lenient += 1;
                if !(r == a || r == 0) || !(s == b || s == 0) {
                    shared.fail(format!(
                        "{dev}: wrote outputs {a:#04x} {b:#04x}, read back {r:#04x} {s:#04x} (across a restart: each may be 0)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// One checked dma-engine copy. Returns Err when the connection is gone.
fn dma_op(
    conn: &mut Conn,
    rng: &mut Rng,
    shared: &Shared,
    stats: &mut Stats,
    dev: &str,
) -> Result<(), ()> {
    let e0 = shared.epoch();
    if conn.enabled_at != Some(e0) {
        // A dma-engine after reset has memory space, bus master and MSI-X off.
        match try_enable_client(&mut conn.client) {
            Ok(()) => conn.enabled_at = Some(e0),
            Err(e) => {
                stats.ops += 1;
                note_error(stats, shared, &format!("{dev}: enable"), &e);
                return if fatal(&e) { Err(()) } else { Ok(()) };
            }
        }
    }
    let Conn { client, dma, .. } = conn;
    let (mem, irq) = dma.as_ref().expect("a dma-engine connection has memory");
    let len = 4096 * (1 + rng.below(16) as usize);
    let salt = rng.next();
    let data: Vec<u8> = (0..len)
        .map(|k| ((k as u64).wrapping_mul(0x9e37_79b9) ^ salt) as u8)
        .collect();
    mem.memory.write(SRC, &data);
    mem.memory.write(DST, &vec![0u8; len]);
    mem.memory.write(COMPLETION, &[0u8; 16]);
    let _ = fired(irq, Duration::ZERO);
    let run = |c: &mut Client| -> Result<([u8; 4], u32, u32), ClientError> {
        let id = c.region_read(DMA_BAR, 0, 4)?;
        try_start_copy(c, SRC, DST, COMPLETION, len as u64)?;
        let st = c.region_read(DMA_BAR, 0x28, 8)?;
        Ok(([id[0], id[1], id[2], id[3]], u32_le(&st), u32_le(&st[4..])))
    };
    let result = run(client);
    let e1 = shared.epoch();
    stats.ops += 1;
    let (id, status, crc) = match result {
        Err(e) => {
            note_error(stats, shared, &format!("{dev}: copy"), &e);
            return if fatal(&e) { Err(()) } else { Ok(()) };
        }
        Ok(r) => r,
    };
    if id != DMA_ID {
        shared.fail(format!("{dev}: ID register {id:02x?}"));
    }
    let quiet = e0 == e1;
    let what = format!("{dev} ({}): copy of {len} bytes", mem.kind);
    match status & 0xff {
        1 => {
            stats.copies += 1;
            if quiet {
                stats.exact += 1;
            } else {
                stats.lenient += 1;
            }
            let got = mem.memory.read(DST, len);
            if got != data {
                let at = got.iter().zip(&data).position(|(g, d)| g != d);
                shared.fail(format!(
                    "{what}: DONE but the destination differs (first at byte {at:?})"
                ));
            }
            let want = crc32c(&data);
            let [rstatus, rcrc, rlen, _] = completion(&mem.memory);
            if crc != want || (rstatus, rcrc, rlen) != (0, want, len as u32) {
                shared.fail(format!(
                    "{what}: DONE with CRC register {crc:#x}, completion record status {rstatus} CRC {rcrc:#x} length {rlen} (expected CRC {want:#x})"
                ));
            }
            if quiet {
                if fired(irq, REPLY_WAIT) {
                    stats.interrupts += 1;
                } else {
                    shared.fail(format!("{what}: DONE without its MSI-X interrupt"));
                }
            }
        }
        0 if !quiet => stats.lenient += 1,
        2 if !quiet => stats.lenient += 1,
        _ => shared.fail(format!(
            "{what}: STATUS {status:#x}{}",
            if quiet { " (no restart meanwhile)" } else { "" }
        )),
    }
    // Acknowledge DONE (INTR_STATUS is write-1-to-clear).
    if let Err(e) = client.region_write(DMA_BAR, 0x34, &1u32.to_le_bytes()) {
        note_error(stats, shared, &format!("{dev}: acknowledge"), &e);
        if fatal(&e) {
            return Err(());
        }
    }
    Ok(())
}

/// A client thread: connects, works, disconnects, until told to stop.
fn client_thread(
    index: usize,
    model: Model,
    socket: PathBuf,
    seed: u64,
    shared: Arc<Shared>,
) -> Stats {
    let dev = format!("dev{index} ({})", model.name());
    let mut rng = Rng(seed ^ (index as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let mut stats = Stats::default();
    while !shared.stop.load(Ordering::Relaxed) {
        let mut conn = match connect(&socket, model, &mut rng) {
            Ok(c) => c,
            Err(e) => {
                stats.connect_failures += 1;
                note_error(&mut stats, &shared, &format!("{dev}: connect"), &e);
                std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
                continue;
            }
        };
        stats.connects += 1;
        let ops = 10 + rng.below(90);
        let mut alive = true;
        for _ in 0..ops {
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let r = match model {
                Model::Gpio => gpio_op(&mut conn, &mut rng, &shared, &mut stats, &dev),
                Model::DmaEngine => dma_op(&mut conn, &mut rng, &shared, &mut stats, &dev),
            };
            if r.is_err() {
                alive = false;
                break;
            }
        }
        stats.disconnects += 1;
        if alive && rng.chance(300) {
            // Gone with a request in flight: the relay and the device VM clean up.
            stats.abrupt += 1;
            let _ = match model {
                Model::Gpio => conn.client.region_write_posted(GPIO_BAR, 0, &[0x5a]),
                Model::DmaEngine => {
                    conn.client
                        .region_write_posted(DMA_BAR, 0x24, &1u32.to_le_bytes())
                }
            };
        }
        drop(conn);
    }
    stats
}

/// The device VM's modes: how the device VM reaches client memory.
const MODES: [(&str, &[&str]); 3] = [
    ("windows", &[]),
    ("copy path", &["--no-shmem"]),
    (
        "copy path, no DIRECT_DATA",
        &["--no-shmem", "--no-direct-data"],
    ),
];

/// The loopback device VM.
struct DeviceVm {
    proc: Proc,
    mode: usize,
    pairs: u16,
}

/// Starts `bin` with its standard error appended to `log` (warnings and errors, and
/// any panic message), or shown when `VFU_TEST_LOG` is set.
fn spawn_logged(name: &str, bin: &str, args: &[String], log: &Log) -> Proc {
    if std::env::var_os("VFU_TEST_LOG").is_some() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        return Proc::spawn(name, &binary(bin), &args);
    }
    logs::spawn_logged(name, bin, args, "warn", &log.path)
}

fn start_guest(env: &Logs, frontend: &Path, serve: &[String], mode: usize, pairs: u16) -> DeviceVm {
    let mut args = vec!["--loopback".to_string(), frontend.display().to_string()];
    for s in serve {
        args.push("--serve".into());
        args.push(s.clone());
    }
    args.extend(MODES[mode].1.iter().map(|s| s.to_string()));
    args.extend(["--queue-pairs".to_string(), pairs.to_string()]);
    DeviceVm {
        proc: spawn_logged("vfu-guest", "vfu-guest", &args, &env.guest),
        mode,
        pairs,
    }
}

/// Where the processes' standard error goes.
struct Logs {
    relay: Log,
    guest: Log,
}

/// The relay's fds once they stopped changing, its VmRSS and RssAnon (KiB).
fn measure(pid: u32) -> (usize, u64, u64) {
    let fds = steady_fd_count(pid, Duration::from_millis(200), Duration::from_secs(10));
    (fds, rss_kib(pid), status_kib(pid, "RssAnon:"))
}

/// A fresh, well-behaved client of every device: IDs, a register round trip, and (for
/// dma-engine) a checked copy with its interrupt.
fn fresh_clients(devices: &[(String, Model, PathBuf)]) -> Result<(), String> {
    for (i, (name, model, socket)) in devices.iter().enumerate() {
        let deadline = Instant::now() + SETUP;
        let mut rng = Rng(i as u64);
        let shared = Shared::default();
        let mut stats = Stats::default();
        loop {
            let attempt = (|| -> Result<(), String> {
                let mut conn = connect(socket, *model, &mut rng).map_err(|e| e.to_string())?;
                let ids = conn
                    .client
                    .region_read(pci_region::CONFIG, 0, 4)
                    .map_err(|e| e.to_string())?;
                if ids != model.ids() {
                    return Err(format!("IDs {ids:02x?}"));
                }
                let before = shared.failures.lock().unwrap().len();
                let r = match model {
                    Model::Gpio => gpio_op(&mut conn, &mut rng, &shared, &mut stats, name),
                    Model::DmaEngine => dma_op(&mut conn, &mut rng, &shared, &mut stats, name),
                };
                let failures = shared.failures.lock().unwrap();
                if r.is_err() || !stats.errors.is_empty() || failures.len() > before {
                    return Err(format!("errors {:?}, {:?}", stats.errors, *failures));
                }
                if stats.exact == 0 {
                    return Err("nothing checked".into());
                }
                Ok(())
            })();
            match attempt {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("{name}: no fresh client served: {e}"))
                }
                Err(_) => {
                    stats = Stats::default();
                    shared.failures.lock().unwrap().clear();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    Ok(())
}

/// Runs the clients until `until`, the schedule disrupting them if `schedule` holds a
/// generator. Returns the clients' statistics and the restarts done.
fn run_phase(
    devices: &[(String, Model, PathBuf)],
    seed: u64,
    until: Instant,
    mut schedule: Option<&mut Rng>,
    env: &mut Env,
    shared: &Arc<Shared>,
) -> (Stats, Vec<String>) {
    shared.stop.store(false, Ordering::SeqCst);
    let threads: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, (_, model, socket))| {
            let (model, socket, shared) = (*model, socket.clone(), shared.clone());
            std::thread::spawn(move || client_thread(i, model, socket, seed, shared))
        })
        .collect();
    let mut events = Vec::new();
    while Instant::now() < until {
        let wait = match schedule.as_deref_mut() {
            Some(rng) => Duration::from_millis(300 + rng.below(2200)),
            None => Duration::from_millis(200),
        };
        std::thread::sleep(wait.min(until.saturating_duration_since(Instant::now())));
        env.check_alive(shared);
        if Instant::now() >= until {
            break;
        }
        if let Some(rng) = schedule.as_deref_mut() {
            if let Some(e) = env.disrupt(rng, shared) {
                events.push(e);
            }
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    let mut stats = Stats::default();
    for t in threads {
        stats.add(t.join().expect("client threads do not panic"));
    }
    (stats, events)
}

struct Env {
    relay: Proc,
    guest: DeviceVm,
    logs: Logs,
    frontend: PathBuf,
    serve: Vec<String>,
    restarts: u64,
}

impl Env {
    /// The relay must not exit, and the device VM only when killed.
    fn check_alive(&mut self, shared: &Shared) {
        if let Some(code) = self.relay.exited() {
            shared.fail(format!("the relay exited ({code:?})"));
            panic!("the relay exited ({code:?})");
        }
        if let Some(code) = self.guest.proc.exited() {
            shared.fail(format!(
                "the device VM exited on its own ({code:?}), mode {}",
                MODES[self.guest.mode].0
            ));
            self.restart(0, 1, shared);
        }
    }

    /// Kills the device VM (the epoch moves first) and starts a new one.
    fn restart(&mut self, mode: usize, pairs: u16, shared: &Shared) {
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.guest.proc.kill();
        self.guest = start_guest(&self.logs, &self.frontend, &self.serve, mode, pairs);
        self.restarts += 1;
    }

    /// One event of the schedule.
    fn disrupt(&mut self, rng: &mut Rng, shared: &Shared) -> Option<String> {
        match rng.below(10) {
            0..=6 => {
                let mode = rng.below(MODES.len() as u64) as usize;
                let pairs = 1 + rng.below(2) as u16;
                shared.epoch.fetch_add(1, Ordering::SeqCst);
                let how = if rng.chance(300) {
                    self.guest.proc.stop();
                    "SIGTERM"
                } else {
                    self.guest.proc.kill();
                    "SIGKILL"
                };
                let down = Duration::from_millis(rng.below(4) * 500);
                std::thread::sleep(down);
                self.guest = start_guest(&self.logs, &self.frontend, &self.serve, mode, pairs);
                self.restarts += 1;
                Some(format!(
                    "device VM {how}, down {down:?}, back in mode {} with {pairs} pair(s)",
                    MODES[mode].0
                ))
            }
            _ => None,
        }
    }
}

#[test]
fn soak_many_devices_with_disconnects_and_restarts() {
    let seconds: u64 = std::env::var("VFU_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let count: usize = std::env::var("VFU_SOAK_DEVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
        .max(2);
    let seed: u64 = std::env::var("VFU_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("soak: seed {seed} (replay: VFU_SOAK_SEED={seed}), {count} devices, {seconds} s");

    let scratch = Scratch::new("soak");
    let frontend = scratch.join("frontend.sock");
    let devices: Vec<(String, Model, PathBuf)> = (0..count)
        .map(|i| {
            let model = if i % 2 == 0 {
                Model::Gpio
            } else {
                Model::DmaEngine
            };
            let name = format!("dev{i}");
            let socket = scratch.join(&format!("{name}.sock"));
            (name, model, socket)
        })
        .collect();
    let exported: Vec<(&str, &Path)> = devices
        .iter()
        .map(|(n, _, s)| (n.as_str(), s.as_path()))
        .collect();
    let logs = Logs {
        relay: Log::new(scratch.join("relay.log")),
        guest: Log::new(scratch.join("guest.log")),
    };
    let mut args = vec![
        "--frontend-socket".to_string(),
        frontend.display().to_string(),
        "--queue-pairs".into(),
        "2".into(),
    ];
    for (name, sock) in &exported {
        args.push("--device".into());
        args.push(format!("{name}={}", sock.display()));
    }
    let relay = spawn_logged("vfu-relay", "vfu-relay", &args, &logs.relay);
    for (_, _, s) in &devices {
        assert!(wait_for_socket(s, SETUP), "relay socket {}", s.display());
    }
    let serve: Vec<String> = devices
        .iter()
        .map(|(n, m, _)| format!("{n}={}", m.name()))
        .collect();
    let guest = start_guest(&logs, &frontend, &serve, 0, 1);
    let mut env = Env {
        relay,
        guest,
        logs,
        frontend,
        serve,
        restarts: 0,
    };
    let shared = Arc::new(Shared::default());
    fresh_clients(&devices).expect("every device served at the start");

    // Warm-up: the same work without disruptions, then the baseline.
    let warmup = Duration::from_secs((seconds / 5).clamp(3, 10));
    let (warm, _) = run_phase(
        &devices,
        seed,
        Instant::now() + warmup,
        None,
        &mut env,
        &shared,
    );
    fresh_clients(&devices).expect("every device serves a fresh client after the warm-up");
    let pid = env.relay.pid();
    let (fds0, rss0, anon0) = measure(pid);

    // The soak.
    let mut schedule = Rng(seed);
    let started = Instant::now();
    let (stats, events) = run_phase(
        &devices,
        seed.wrapping_add(1),
        started + Duration::from_secs(seconds),
        Some(&mut schedule),
        &mut env,
        &shared,
    );
    let elapsed = started.elapsed();

    // Afterwards: the baseline's device VM mode, every device serves a fresh client,
    // the relay holds what it held after the warm-up.
    env.check_alive(&shared);
    if (env.guest.mode, env.guest.pairs) != (0, 1) {
        env.restart(0, 1, &shared);
    }
    let fresh = fresh_clients(&devices);
    let (mut fds1, mut rss1, mut anon1) = measure(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds1 != fds0 && Instant::now() < deadline {
        (fds1, rss1, anon1) = measure(pid);
    }

    eprintln!("soak summary (seed {seed}):");
    eprintln!(
        "  warm-up {warmup:?}: {} operations, {} checked exactly",
        warm.ops, warm.exact
    );
    eprintln!(
        "  soak {elapsed:.1?}: {} operations by {count} clients, {} checked exactly, {} across a restart, {} copies checked (data, CRC, record), {} interrupts",
        stats.ops, stats.exact, stats.lenient, stats.copies, stats.interrupts
    );
    eprintln!(
        "  clients: {} connections ({} failed to connect), {} disconnects, {} of them with a request in flight",
        stats.connects, stats.connect_failures, stats.disconnects, stats.abrupt
    );
    eprintln!(
        "  device VM restarts: {} ({} scheduled events)",
        env.restarts,
        events.len()
    );
    for e in &events {
        eprintln!("    {e}");
    }
    eprintln!("  errors by kind (each an error reply or a closed connection, never data):");
    for (k, n) in &stats.errors {
        eprintln!("    {k:<20} {n}");
    }
    eprintln!(
        "  relay: fds {fds0} -> {fds1}, VmRSS {rss0} -> {rss1} KiB, RssAnon {anon0} -> {anon1} KiB"
    );

    let mut failures = shared.failures.lock().unwrap().clone();
    for (who, log) in [
        ("vfu-relay", &env.logs.relay),
        ("vfu-guest", &env.logs.guest),
    ] {
        let p = log.panics();
        eprintln!("  {who}: {} panic(s) in its log", p.len());
        failures.extend(p.into_iter().map(|l| format!("{who}: {l}")));
    }
    assert!(
        failures.is_empty(),
        "{} broken promise(s) (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(env.relay.exited().is_none(), "the relay is alive");
    fresh.unwrap_or_else(|e| panic!("after the soak (seed {seed}): {e}"));
    assert!(
        stats.ops > 0 && stats.exact > 0,
        "the clients did checked work"
    );
    assert_eq!(
        fds1, fds0,
        "the relay's fds after the soak (seed {seed}) are those after the warm-up"
    );
    assert!(
        anon1 <= anon0 + RSS_TOLERANCE_KIB && rss1 <= rss0 + RSS_TOLERANCE_KIB,
        "the relay's memory grew (seed {seed}): VmRSS {rss0} -> {rss1} KiB, RssAnon {anon0} -> {anon1} KiB"
    );
}

/// How much the relay's resident memory (all of it, and the anonymous part) may grow
/// over the soak, beyond the warm-up's: allocator caches and the device VM's buffers
/// the relay touched, not a leak proportional to the work.
const RSS_TOLERANCE_KIB: u64 = 8192;
