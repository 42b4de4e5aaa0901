//! Hostile device VM (issue 8): for each case, a real vfu-relay and a loopback device
//! VM (`vfu-guest --loopback`) serving `dma0` and `dma1` with the dma-engine model, the
//! driver misbehaving on purpose on `dma0`'s channel (`--misbehave dma0:CASE`, see
//! `guest-driver/src/hostile/mod.rs`) and behaving on `dma1`'s.
//!
//! One table of cases ([`cases`]) is driven by one runner ([`hostile_device_vms`]).
//! Each case names the misbehaviour, the relay's log lines that must show it, and a
//! function that drives the affected client (of `dma0`: a `vfu_proto::client`, with
//! client memory in memfds) to the moment the device VM misbehaves and checks what
//! that client sees: an error reply (ETIMEDOUT where the device VM's answer was lost,
//! EIO where it was unusable, EFAULT in the device's status where its DMA was refused,
//! ENODEV where the device VM was dropped), a correct answer where nothing was lost,
//! and its memory untouched where the device VM reached for memory it was not given.
//! Every wait is bounded. Around each case the runner checks that
//!
//! - the relay process is alive,
//! - it logged the case (its standard error holds each of the case's lines),
//! - the neighbour ([`vfu_tests::neighbour::Neighbour`]), a client of `dma1` that
//!   runs checked DMA copies (data, CRC in the completion record and MSI-X interrupt
//!   verified) on a thread for the whole case, made progress during the case and
//!   still does,
//! - the relay holds the descriptors it held before the affected client came, once
//!   that client is gone.
//!
//! A device VM that breaks a ring itself (its available index out of range) is
//! dropped by the relay: for those cases the neighbour may see errors while no device
//! VM serves it, and the case checks instead that a new, well-behaved device VM serves
//! both devices again, the neighbour on its old connection.
//!
//! `VFU_HOSTILE_CASE=name` runs one case; `VFU_TEST_LOG=debug` raises both processes'
//! log level (the logs are kept in files either way, and printed for a case that fails).

use std::fs::File;
use std::ops::ControlFlow;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{pci_region, DmaUnmap, Request};
use vfu_tests::case_table::{self, run_cases};
use vfu_tests::dma_engine::{
    crc32c, eventfd, fired, memfd, try_copy, try_enable, try_map, try_set_irq, unsealed_memfd,
};
use vfu_tests::logs::{self, test_log_level, Log};
use vfu_tests::neighbour::Neighbour;
use vfu_tests::procfs::{self, fd_count, rss_kib};
use vfu_tests::{try_connect_served, wait_for_socket, Proc, Scratch};

/// The relay's request timeout in the suite: what a client whose request the device VM
/// lost waits before its ETIMEDOUT.
const REQUEST_TIMEOUT_MS: u64 = 1000;
/// Bound on every wait for an answer.
const WAIT: Duration = Duration::from_secs(5);
/// Bound on setting up a relay and a device VM.
const SETUP: Duration = Duration::from_secs(20);

const EIO: u32 = libc::EIO as u32;
const EFAULT: u32 = libc::EFAULT as u32;
const ENODEV: u32 = libc::ENODEV as u32;
const ETIMEDOUT: u32 = libc::ETIMEDOUT as u32;

/// The dma-engine's PCI IDs: what a read of 4 bytes at offset 0 of config space gives.
const IDS: [u8; 4] = [0x34, 0x12, 0xf0, 0x11];
const PAGE: u64 = 4096;
const KIB64: u64 = 64 << 10;

// ---------------------------------------------------------------------------------
// Processes and the relay's resources.

/// Starts `bin` with `args`, its standard error in `log` (`RUST_LOG` from
/// `VFU_TEST_LOG`, else info).
fn spawn_logged(name: &str, bin: &str, args: &[String], log: &Log) -> Proc {
    logs::spawn_logged(name, bin, args, &test_log_level("info"), &log.path)
}

/// Waits until the relay holds `want` fds.
fn settle_fds(pid: u32, want: usize, wait: Duration) -> Result<(), String> {
    procfs::settle_fds(pid, want, wait).map_err(|n| {
        format!("the relay holds {n} fds, {want} before the affected client came (after {wait:?})")
    })
}

// ---------------------------------------------------------------------------------
// Clients.

/// A client of `socket` that negotiated VERSION, retrying until the device is served.
fn served(socket: &Path, wait: Duration) -> Result<Client, String> {
    try_connect_served(socket, WAIT, wait)
}

/// The trigger of most cases: a read of the device IDs.
fn id_read(c: &mut Client) -> Result<Vec<u8>, ClientError> {
    c.region_read(pci_region::CONFIG, 0, 4)
}

/// The ID read is answered with the IDs.
fn ids_answered(c: &mut Client, what: &str) -> Result<(), String> {
    match id_read(c) {
        Ok(ids) if ids == IDS => Ok(()),
        Ok(ids) => Err(format!("{what}: the ID read gave {ids:02x?}")),
        Err(e) => Err(format!("{what}: the ID read failed: {e}")),
    }
}

/// The ID read fails with `errno` within the bound.
fn ids_fail_with(c: &mut Client, errno: u32, what: &str) -> Result<(), String> {
    let t = Instant::now();
    match id_read(c) {
        Err(ClientError::Errno(e)) if e == errno => Ok(()),
        other => Err(format!(
            "{what}: the ID read gave {other:?} after {:?}, expected errno {errno}",
            t.elapsed()
        )),
    }
}

fn map(
    c: &mut Client,
    iova: u64,
    size: u64,
    offset: u64,
    write: bool,
    fd: Option<&File>,
) -> Result<(), String> {
    try_map(c, iova, size, offset, write, fd).map_err(|e| format!("DMA_MAP {iova:#x}: {e}"))
}

fn unmap(c: &mut Client, iova: u64, size: u64) -> Result<(), String> {
    c.request(&Request::DmaUnmap(DmaUnmap::region(iova, size)), vec![])
        .map(|_| ())
        .map_err(|e| format!("DMA_UNMAP {iova:#x}: {e}"))
}

/// STATUS of a copy that failed with `errno`.
fn status_error(errno: u32) -> u32 {
    2 | errno << 16
}

// ---------------------------------------------------------------------------------
// The affected client's memory for the DMA cases.

/// A memfd that is not sealed: the relay serves it on the copy path (pread/pwrite), so
/// every DMA of the device VM to it passes the relay's checks.
fn unsealed(len: u64) -> File {
    unsealed_memfd(len)
}

/// The affected client's memory for DMA: one memfd of four 64 KiB parts, two mapped
/// and two never mapped (guards), each filled with its own pattern.
///
/// | file offset | IOVA | |
/// |---|---|---|
/// | 0 | [`A_SRC`] | source, mapped read-only |
/// | 64 KiB | - | guard |
/// | 128 KiB | [`A_DST`] | destination, mapped read-write; the completion record in its last page |
/// | 192 KiB | - | guard |
struct DmaMemory {
    file: File,
}

const A_SRC: u64 = 0x10_0000;
const A_DST: u64 = 0x20_0000;
const A_COMPLETION: u64 = A_DST + KIB64 - PAGE;

impl DmaMemory {
    fn new() -> Self {
        let file = unsealed(4 * KIB64);
        let m = Self { file };
        m.fill();
        m
    }

    /// The pattern of the whole file.
    fn pattern() -> Vec<u8> {
        let mut v = Vec::with_capacity(4 * KIB64 as usize);
        for part in 0..4u64 {
            v.extend((0..KIB64).map(|i| match part {
                0 => (i * 7 + 3) as u8,
                1 => 0xa5,
                2 => 0,
                _ => 0x5a,
            }));
        }
        v
    }

    fn fill(&self) {
        self.file.write_all_at(&Self::pattern(), 0).unwrap();
    }

    fn read(&self) -> Vec<u8> {
        let mut v = vec![0u8; 4 * KIB64 as usize];
        self.file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    /// Maps the source and destination.
    fn map(&self, c: &mut Client) -> Result<(), String> {
        map(c, A_SRC, KIB64, 0, false, Some(&self.file))?;
        map(c, A_DST, KIB64, 2 * KIB64, true, Some(&self.file))
    }

    /// Nothing changed since [`DmaMemory::fill`].
    fn untouched(&self) -> Result<(), String> {
        let got = self.read();
        let want = Self::pattern();
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err(format!(
                "the client's memory changed at file offset {at:#x}: {:#04x}, was {:#04x}",
                got[at], want[at]
            )),
        }
    }

    /// After a successful copy of `len` bytes from the source to the destination:
    /// the destination holds them, the record says so, nothing else changed.
    fn copied(&self, len: usize) -> Result<(), String> {
        let got = self.read();
        let mut want = Self::pattern();
        let (src, dst) = (0, 2 * KIB64 as usize);
        want.copy_within(src..src + len, dst);
        let rec = (A_COMPLETION - A_DST) as usize + dst;
        // The completion record: status, CRC, length, sequence number (not checked).
        want[rec..rec + 4].copy_from_slice(&0u32.to_le_bytes());
        let crc = crc32c(&want[dst..dst + len]);
        want[rec + 4..rec + 8].copy_from_slice(&crc.to_le_bytes());
        want[rec + 8..rec + 12].copy_from_slice(&(len as u32).to_le_bytes());
        want[rec + 12..rec + 16].copy_from_slice(&got[rec + 12..rec + 16]);
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err(format!(
                "after the copy, file offset {at:#x} holds {:#04x}, expected {:#04x}",
                got[at], want[at]
            )),
        }
    }
}

/// A dma-engine client of `dma0` with [`DmaMemory`] mapped and MSI-X vector 0 on `irq`.
struct DmaClient {
    c: Client,
    mem: DmaMemory,
    irq: OwnedFd,
}

impl DmaClient {
    fn new(env: &Env) -> Result<Self, String> {
        let mut c = env.affected()?;
        let mem = DmaMemory::new();
        mem.map(&mut c)?;
        try_enable(&mut c)?;
        let irq = eventfd();
        try_set_irq(&mut c, Some(irq.try_clone().unwrap()))
            .map_err(|e| format!("SET_IRQS: {e}"))?;
        Ok(Self { c, mem, irq })
    }

    /// Copies `len` bytes from the source to the destination; returns STATUS.
    fn copy(&mut self, len: u64) -> Result<u32, String> {
        try_copy(&mut self.c, A_SRC, A_DST, A_COMPLETION, len).map_err(|e| format!("copy: {e}"))
    }

    /// A copy of 4 KiB fails with EFAULT in STATUS and writes nothing but its
    /// completion record; then one that the device VM does not touch succeeds, data
    /// checked.
    fn refused_then_served(&mut self) -> Result<(), String> {
        let st = self.copy(PAGE)?;
        if st != status_error(EFAULT) {
            return Err(format!(
                "STATUS {st:#x} after the redirected DMA, expected ERROR with EFAULT"
            ));
        }
        let rec = (2 * KIB64 + A_COMPLETION - A_DST) as usize;
        let mut status = [0u8; 4];
        self.mem
            .file
            .read_exact_at(&mut status, rec as u64)
            .unwrap();
        if u32::from_le_bytes(status) != EFAULT {
            return Err(format!(
                "completion record status {status:02x?}, expected EFAULT"
            ));
        }
        // Apart from the record, nothing changed.
        let pattern = DmaMemory::pattern();
        self.mem
            .file
            .write_all_at(&pattern[rec..rec + 16], rec as u64)
            .unwrap();
        self.mem.untouched()?;
        self.served()
    }

    /// A copy of 4 KiB succeeds: data, record and interrupt.
    fn served(&mut self) -> Result<(), String> {
        self.mem.fill();
        let st = self.copy(PAGE)?;
        if st != 1 {
            return Err(format!("STATUS {st:#x} after a copy, expected DONE"));
        }
        self.mem.copied(PAGE as usize)?;
        if !fired(&self.irq, WAIT) {
            return Err("no MSI-X interrupt after a copy".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// A relay and a hostile device VM.

/// How a case sets up the relay and the device VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// One queue pair, windows on.
    Plain,
    /// Two queue pairs: `dma0` (channel 1) on pair 1, `dma1` (channel 2) on pair 0.
    TwoPairs,
}

struct Env {
    relay: Proc,
    guest: Proc,
    relay_log: Log,
    guest_log: Log,
    frontend: PathBuf,
    dma0: PathBuf,
    setup: Setup,
    neighbour: Neighbour,
    /// The relay's fds with only the neighbour connected.
    baseline: usize,
    scratch: Scratch,
}

impl Env {
    fn start(case: &Case) -> Result<Self, String> {
        let scratch = Scratch::new(&format!("hdvm-{}", case.name));
        let frontend = scratch.join("frontend.sock");
        let dma0 = scratch.join("dma0.sock");
        let dma1 = scratch.join("dma1.sock");
        let mut args: Vec<String> = vec![
            "--frontend-socket".into(),
            frontend.display().to_string(),
            "--device".into(),
            format!("dma0={}", dma0.display()),
            "--device".into(),
            format!("dma1={}", dma1.display()),
            "--request-timeout-ms".into(),
            REQUEST_TIMEOUT_MS.to_string(),
        ];
        if case.setup == Setup::TwoPairs {
            args.extend(["--queue-pairs".into(), "2".into()]);
        }
        let relay_log = Log::new(scratch.join("relay.log"));
        let relay = spawn_logged("vfu-relay", "vfu-relay", &args, &relay_log);
        if !wait_for_socket(&dma1, SETUP) {
            return Err("the relay's sockets never appeared".into());
        }
        let guest_log = Log::new(scratch.join("guest.log"));
        let guest = start_guest(&frontend, case.setup, Some(case.name), &guest_log);
        // No client of dma0 before the case: its first session is the case's.
        let neighbour = Neighbour::start(&dma1)?;
        neighbour.progress(3, SETUP)?;
        // Settled: the relay's fds with only the neighbour connected.
        std::thread::sleep(Duration::from_millis(100));
        let baseline = fd_count(relay.pid());
        Ok(Self {
            relay,
            guest,
            relay_log,
            guest_log,
            frontend,
            dma0,
            setup: case.setup,
            neighbour,
            baseline,
            scratch,
        })
    }

    /// A client of the device the device VM misbehaves on.
    fn affected(&self) -> Result<Client, String> {
        served(&self.dma0, WAIT)
    }

    /// The hostile device VM has gone (the relay dropped it): a well-behaved one takes
    /// its place, and serves the affected client `c` again on its old connection.
    fn replace_device_vm(&mut self, c: &mut Client) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        while self.guest.is_running() {
            if Instant::now() > deadline {
                return Err("the hostile device VM is still connected".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = Log::new(self.scratch.join("guest2.log"));
        self.guest = start_guest(&self.frontend, self.setup, None, &log);
        let deadline = Instant::now() + SETUP;
        while id_read(c).map_or(true, |ids| ids != IDS) {
            if Instant::now() > deadline {
                return Err("the new device VM never served the affected client".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn start_guest(frontend: &Path, setup: Setup, misbehave: Option<&str>, log: &Log) -> Proc {
    let mut args: Vec<String> = vec![
        "--loopback".into(),
        frontend.display().to_string(),
        "--serve".into(),
        "dma0=dma-engine".into(),
        "--serve".into(),
        "dma1=dma-engine".into(),
    ];
    if setup == Setup::TwoPairs {
        args.extend(["--queue-pairs".into(), "2".into()]);
    }
    if let Some(case) = misbehave {
        args.extend(["--misbehave".into(), format!("dma0:{case}")]);
    }
    spawn_logged("vfu-guest (loopback)", "vfu-guest", &args, log)
}

// ---------------------------------------------------------------------------------
// The cases.

/// One hostile device VM.
struct Case {
    /// The misbehaviour (`vfu-guest --misbehave dma0:NAME`).
    name: &'static str,
    setup: Setup,
    /// Each of these is in a line of the relay's log after the case.
    logs: &'static [&'static str],
    /// The affected client's part, and what it must see.
    run: fn(&mut Env) -> Result<(), String>,
    /// The relay drops the device VM: the neighbour may fail meanwhile.
    drops_device_vm: bool,
}

const fn case(
    name: &'static str,
    logs: &'static [&'static str],
    run: fn(&mut Env) -> Result<(), String>,
) -> Case {
    Case {
        name,
        setup: Setup::Plain,
        logs,
        run,
        drops_device_vm: false,
    }
}

/// The device VM's answer to the ID read is lost: the client gets ETIMEDOUT from the
/// relay at the request timeout; the channel is in sync again for the next read.
fn lost(env: &mut Env) -> Result<(), String> {
    let mut c = env.affected()?;
    ids_fail_with(
        &mut c,
        ETIMEDOUT,
        "the read whose reply the device VM spoiled",
    )?;
    ids_answered(&mut c, "the next read")
}

/// The device VM's answer to the ID read is unusable: the client gets EIO at once;
/// the next read is answered.
fn unusable(env: &mut Env) -> Result<(), String> {
    let mut c = env.affected()?;
    ids_fail_with(&mut c, EIO, "the read whose reply the device VM spoiled")?;
    ids_answered(&mut c, "the next read")
}

/// Nothing reaches the client but the right answer: the ID read is answered, and so
/// are the next ones.
fn answered(env: &mut Env) -> Result<(), String> {
    let mut c = env.affected()?;
    ids_answered(&mut c, "the read")?;
    ids_answered(&mut c, "the next read")
}

/// A bad `h2g` buffer is posted after the ID read: the relay must pass it by and lose
/// nothing, so 300 more reads (enough to go round the 256 buffers of the queue) are all
/// answered.
fn h2g_buffer(env: &mut Env) -> Result<(), String> {
    let mut c = env.affected()?;
    ids_answered(&mut c, "the read")?;
    for i in 0..300 {
        ids_answered(&mut c, &format!("read {i} after the bad buffer"))?;
    }
    Ok(())
}

/// The device VM breaks a ring: the relay drops it, the affected client's request
/// fails at once (ENODEV), and a new device VM serves both devices again (the
/// neighbour on its old connection).
fn dropped(env: &mut Env) -> Result<(), String> {
    env.neighbour.tolerate_errors(true);
    let mut c = env.affected()?;
    ids_fail_with(
        &mut c,
        ENODEV,
        "the read when the device VM broke its g2h ring",
    )?;
    env.replace_device_vm(&mut c)?;
    ids_answered(&mut c, "the affected client, on its old connection")?;
    env.neighbour.tolerate_errors(false);
    env.neighbour.progress(3, SETUP)
}

/// As [`dropped`], for a broken `h2g` ring: the relay finds it broken when it next
/// writes to it, which may be for the neighbour's request before it has read the ID
/// read's reply (then the read fails with ENODEV) or for the affected client's next
/// request (then that one does).
fn dropped_h2g(env: &mut Env) -> Result<(), String> {
    env.neighbour.tolerate_errors(true);
    let mut c = env.affected()?;
    match id_read(&mut c) {
        Ok(ids) if ids == IDS => ids_fail_with(
            &mut c,
            ENODEV,
            "the read after the device VM broke its h2g ring",
        )?,
        Err(ClientError::Errno(ENODEV)) => {}
        other => return Err(format!("the ID read gave {other:?}")),
    }
    env.replace_device_vm(&mut c)?;
    ids_answered(&mut c, "the affected client, on its old connection")?;
    env.neighbour.tolerate_errors(false);
    env.neighbour.progress(3, SETUP)
}

/// A probe of the device VM's own (after the ID read, answered) reaches for the
/// client's memory: the relay answers it with `answer` (in the device VM's log) and the
/// client's memory is untouched.
fn probe(env: &mut Env, answer: &str) -> Result<(), String> {
    let mut c = env.affected()?;
    let mem = DmaMemory::new();
    mem.map(&mut c)?;
    ids_answered(&mut c, "the read")?;
    env.guest_log.wait_for(answer, WAIT)?;
    mem.untouched()?;
    ids_answered(&mut c, "the next read")
}

/// The client maps a sealed memfd (a window); after the ID read the device VM says 50
/// times that it serves the channel, unasked. The device VM's VMM (the loopback VMM,
/// which keeps a descriptor per window) holds no more descriptors afterwards: no window
/// was mapped again; the client's map and unmap work as before.
fn unsolicited_channel_up(env: &mut Env) -> Result<(), String> {
    let mut c = env.affected()?;
    let mem = memfd(KIB64);
    map(&mut c, 0x40_0000, KIB64, 0, true, Some(&mem))?;
    ids_answered(&mut c, "a read before")?;
    let vmm_fds = fd_count(env.guest.pid());
    let relay_fds = fd_count(env.relay.pid());
    // The trigger, and 50 unsolicited statuses after its reply.
    ids_answered(&mut c, "the read")?;
    ids_answered(&mut c, "the next read")?;
    std::thread::sleep(Duration::from_millis(300));
    let (v, r) = (fd_count(env.guest.pid()), fd_count(env.relay.pid()));
    if v > vmm_fds || r > relay_fds {
        return Err(format!(
            "the device VM's VMM holds {v} fds ({vmm_fds} before), the relay {r} ({relay_fds} before)"
        ));
    }
    unmap(&mut c, 0x40_0000, KIB64)?;
    ids_answered(&mut c, "a read after the unmap")
}

/// The model's DMA is redirected where the client gave it nothing: the copy fails with
/// EFAULT, the client's memory is untouched, the next copy works.
fn dma_refused(env: &mut Env) -> Result<(), String> {
    DmaClient::new(env)?.refused_then_served()
}

/// The model's interrupt is raised where nobody assigned one: the copy works, the
/// client's MSI-X eventfd stays silent; the next copy's interrupt arrives.
fn irq_misdirected(env: &mut Env) -> Result<(), String> {
    let mut d = DmaClient::new(env)?;
    d.mem.fill();
    let st = d.copy(PAGE)?;
    if st != 1 {
        return Err(format!("STATUS {st:#x}, expected DONE"));
    }
    d.mem.copied(PAGE as usize)?;
    if fired(&d.irq, Duration::from_millis(300)) {
        return Err("the client's vector 0 fired for an interrupt raised elsewhere".into());
    }
    d.served()
}

/// The client maps a sealed memfd (a window, and the relay's own mapping and fd) and an
/// unsealed one, and leaves: the device VM does not acknowledge the end of the session
/// properly, and the relay lets go of the memory at the request timeout.
fn session_end(env: &mut Env) -> Result<(), String> {
    let mut c = env.affected()?;
    let sealed = memfd(KIB64);
    let plain = unsealed(KIB64);
    map(&mut c, 0x10_0000, KIB64, 0, true, Some(&sealed))?;
    map(&mut c, 0x20_0000, KIB64, 0, true, Some(&plain))?;
    let held = fd_count(env.relay.pid());
    if held < env.baseline + 3 {
        return Err(format!(
            "the relay holds {held} fds with the client's two files and its socket, {} without",
            env.baseline
        ));
    }
    drop(c);
    // The session's end is not acknowledged: the memory goes at the request timeout.
    settle_fds(
        env.relay.pid(),
        env.baseline,
        Duration::from_millis(REQUEST_TIMEOUT_MS) + WAIT,
    )?;
    let mut c = env.affected()?;
    ids_answered(&mut c, "a new client")
}

/// After the client's DMA_UNMAP is acknowledged, the device VM writes to the range: the
/// relay refuses (EFAULT, in the device VM's log) and the memory, which the client
/// rewrote after its unmap, is untouched.
fn dma_after_unmap(env: &mut Env) -> Result<(), String> {
    written_after_unmap(
        env,
        unsealed(KIB64),
        "HOSTILE dma_write_after_unmap: the relay answered #1: status 14",
    )
}

/// As [`dma_after_unmap`], through the window: the device VM writes into the window
/// for 600 ms after acknowledging the unmap; from the client's unmap reply on, not one
/// write reaches its memory (the relay withdrew the window first).
fn window_after_unmap(env: &mut Env) -> Result<(), String> {
    written_after_unmap(env, memfd(KIB64), "writes into the window landed")
}

/// The client maps `mem` (64 KiB of 0x11) and unmaps it, then fills it with 0x22; once
/// the device VM's log has `line` (its writes after the unmap are done), the memory
/// still holds 0x22 only, and the device answers the client.
fn written_after_unmap(env: &mut Env, mem: File, line: &str) -> Result<(), String> {
    let mut c = env.affected()?;
    mem.write_all_at(&[0x11; KIB64 as usize], 0).unwrap();
    map(&mut c, 0x40_0000, KIB64, 0, true, Some(&mem))?;
    unmap(&mut c, 0x40_0000, KIB64)?;
    mem.write_all_at(&[0x22; KIB64 as usize], 0).unwrap();
    env.guest_log.wait_for(line, WAIT)?;
    all_bytes(&mem, KIB64, 0x22)?;
    ids_answered(&mut c, "the read after")
}

fn all_bytes(f: &File, len: u64, want: u8) -> Result<(), String> {
    let mut got = vec![0u8; len as usize];
    f.read_exact_at(&mut got, 0).unwrap();
    match got.iter().position(|&b| b != want) {
        None => Ok(()),
        Some(at) => Err(format!(
            "the client's memory at {at:#x} holds {:#04x} after its unmap, {want:#04x} expected",
            got[at]
        )),
    }
}

/// The relay (`pid`) holds at most 64 MiB of resident memory more than `before` KiB
/// (the flood cases' bound); the error says how much it grew, and `when`.
fn rss_bounded(pid: u32, before: u64, when: &str) -> Result<(), String> {
    let grown = rss_kib(pid).saturating_sub(before);
    if grown > 64 << 10 {
        return Err(format!(
            "the relay's resident memory grew by {grown} KiB{when}"
        ));
    }
    Ok(())
}

/// A flood after the ID read's reply: the read is answered, the neighbour keeps
/// working while the relay takes the flood, the relay logs between 1 and `max_lines`
/// lines containing `line` (one per message would be 20000), its resident memory stays
/// within 64 MiB of what it was, and the affected device answers again afterwards.
fn flood(env: &mut Env, line: &str, max_lines: usize) -> Result<(), String> {
    let pid = env.relay.pid();
    let rss = rss_kib(pid);
    let mut c = env.affected()?;
    ids_answered(&mut c, "the read")?;
    env.neighbour.progress(5, Duration::from_secs(30))?;
    // The relay has taken the flood when the device answers the affected client again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while id_read(&mut c).map_or(true, |ids| ids != IDS) {
        if Instant::now() > deadline {
            return Err("the affected device never answered again after the flood".into());
        }
    }
    rss_bounded(pid, rss, "")?;
    let n = env.relay_log.count(line);
    if n == 0 || n > max_lines {
        return Err(format!(
            "the relay logged {n} lines with {line:?} (1 to {max_lines} expected)"
        ));
    }
    Ok(())
}

/// The device VM floods the relay with 1 MiB DMA_READs on `dma0`'s queue pair while it
/// reads none of the replies: the relay's memory stays bounded, the neighbour on the
/// other pair keeps working, and the affected client's later requests time out (the
/// device VM reads nothing of that pair any more).
fn flood_unread(env: &mut Env) -> Result<(), String> {
    let pid = env.relay.pid();
    let rss = rss_kib(pid);
    let mut c = env.affected()?;
    let mem = unsealed(1 << 20);
    map(&mut c, 0x10_0000, 1 << 20, 0, false, Some(&mem))?;
    ids_answered(&mut c, "the read")?;
    env.guest_log
        .wait_for("HOSTILE dma_read_flood_unread: stops reading", WAIT)?;
    env.neighbour.progress(10, Duration::from_secs(30))?;
    rss_bounded(pid, rss, " while the device VM read none of its replies")?;
    ids_fail_with(
        &mut c,
        ETIMEDOUT,
        "a read on the pair whose replies go unread",
    )
}

/// 100000 interrupts on the client's MSI-X vector 0 after the ID read: each one
/// signals its eventfd once (the counter reads exactly 100000 once the device answers
/// again, since the interrupts came before that answer on the same ring), the relay's
/// memory stays bounded, the neighbour on the other pair keeps working.
fn irq_flood(env: &mut Env) -> Result<(), String> {
    let pid = env.relay.pid();
    let rss = rss_kib(pid);
    let mut d = DmaClient::new(env)?;
    ids_answered(&mut d.c, "the read")?;
    env.neighbour.progress(5, Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while id_read(&mut d.c).map_or(true, |ids| ids != IDS) {
        if Instant::now() > deadline {
            return Err("the affected device never answered again after the flood".into());
        }
    }
    let mut count = [0u8; 8];
    // SAFETY: reads 8 bytes into a local from the non-blocking eventfd the client owns.
    let n = unsafe {
        libc::read(
            std::os::fd::AsRawFd::as_raw_fd(&d.irq),
            count.as_mut_ptr().cast(),
            8,
        )
    };
    let count = if n == 8 { u64::from_ne_bytes(count) } else { 0 };
    if count != 100_000 {
        return Err(format!(
            "vector 0 was signalled {count} times, 100000 expected"
        ));
    }
    rss_bounded(pid, rss, "")?;
    Ok(())
}

/// The device VM floods 1 MiB DMA_READs of memory the client mapped without an fd
/// (the relay asks the client for each); the client answers all it is asked: the
/// relay lets at most 16 such operations (16 MiB) wait for the client and answers the
/// others EAGAIN, so its memory stays bounded and the neighbour keeps working. The
/// client's own reads meanwhile may time out (its device is busy with the flood it
/// makes); once the flood is over they are answered.
fn remote_flood(env: &mut Env) -> Result<(), String> {
    let pid = env.relay.pid();
    let rss = rss_kib(pid);
    let mut c = env.affected()?;
    c.serve_dma(0x10_0000, Arc::new(Mutex::new(vec![0x33; 1 << 20])));
    map(&mut c, 0x10_0000, 1 << 20, 0, false, None)?;
    ids_answered(&mut c, "the read")?;
    // A client answers the relay's DMA commands while it waits for its own replies.
    let deadline = Instant::now() + Duration::from_secs(60);
    while env
        .guest_log
        .count("HOSTILE remote_dma_flood: the relay answered #300")
        == 0
    {
        if Instant::now() > deadline {
            return Err("the device VM's 300 DMA reads were never all answered".into());
        }
        match id_read(&mut c) {
            Ok(ids) if ids == IDS => {}
            Err(ClientError::Errno(ETIMEDOUT)) => {}
            other => return Err(format!("a read during the flood gave {other:?}")),
        }
    }
    env.neighbour.progress(5, Duration::from_secs(30))?;
    rss_bounded(pid, rss, "")?;
    ids_answered(&mut c, "a read after the flood")
}

/// Every case. Each one's comment says what it proves.
fn cases() -> Vec<Case> {
    let mut all = vec![
        // ---- Descriptor chains: the g2h chain carrying the reply is refused, the
        // message lost, the client answered ETIMEDOUT; the relay reads nothing outside
        // guest memory, follows no loop, and the queue goes on with the next chain.
        // A chain whose last descriptor links to itself is refused as a loop, not
        // walked queue-size times and read as a message.
        case(
            "chain_loops_to_itself",
            &["descriptor chain refused", "loops"],
            lost,
        ),
        // Likewise a loop through two descriptors.
        case(
            "chain_loops_through_two",
            &["descriptor chain refused", "loops"],
            lost,
        ),
        // A link to a descriptor beyond the table is refused, not cut short and the
        // rest taken as the whole chain.
        case(
            "chain_next_out_of_range",
            &["descriptor chain refused", "beyond the queue"],
            lost,
        ),
        // An indirect table, which the relay does not offer, is refused, not followed.
        case(
            "chain_indirect",
            &["descriptor chain refused", "indirect"],
            lost,
        ),
        // A buffer 1 TiB into guest-physical space: nothing read, chain refused.
        case(
            "chain_outside_guest_memory",
            &["descriptor chain refused", "outside guest memory"],
            lost,
        ),
        // A buffer that wraps around 2^64: refused.
        case(
            "chain_address_wraps",
            &["descriptor chain refused", "outside guest memory"],
            lost,
        ),
        // A buffer holding 100 bytes past its message: the message is dropped as the
        // framing rules say, and the next message starts a new frame.
        case(
            "chain_longer_than_message",
            &["malformed message from the device VM", "trailing bytes"],
            lost,
        ),
        // A buffer of 10 bytes, not even a header: dropped.
        case(
            "chain_shorter_than_header",
            &["malformed message from the device VM", "truncated"],
            lost,
        ),
        // A buffer of 0 bytes: dropped.
        case(
            "chain_empty_buffer",
            &["malformed message from the device VM", "truncated"],
            lost,
        ),
        // A buffer claiming 4 GiB: refused before anything is read or allocated.
        case(
            "chain_4gib_buffer",
            &["descriptor chain refused", "4294967295 bytes"],
            lost,
        ),
        // The reply in a device-writable buffer (wrong direction): nothing read as a
        // message, nothing written.
        case("chain_device_writable", &["device-writable"], lost),
        // A writable buffer before a readable one: refused.
        case(
            "chain_writable_before_readable",
            &["descriptor chain refused", "after a device-writable"],
            lost,
        ),
        // A message followed by writable buffers that is not a DMA request: refused,
        // nothing written into them.
        case(
            "chain_writable_after_message",
            &["device-writable buffers"],
            lost,
        ),
        // An available-ring entry naming a descriptor beyond the table: skipped.
        case(
            "avail_head_out_of_range",
            &["descriptor chain refused", "beyond the queue"],
            lost,
        ),
        // ---- Ring indexes: a ring the device VM broke cannot be used again; the relay
        // drops that device VM (its clients get ENODEV at once, not at their timeouts)
        // and a new one serves every device again.
        Case {
            drops_device_vm: true,
            ..case(
                "avail_index_jumps",
                &["g2h queue 0 unusable", "dropping the device VM"],
                dropped,
            )
        },
        Case {
            drops_device_vm: true,
            ..case(
                "h2g_avail_index_jumps",
                &["h2g queue 0 unusable", "dropping the device VM"],
                dropped_h2g,
            )
        },
        // ---- h2g buffers: a buffer the relay cannot write a message into is passed
        // by (used, 0 bytes) and logged; no message is lost or cut.
        case(
            "h2g_buffer_read_only",
            &["h2g queue 0: buffer refused", "not device-writable"],
            h2g_buffer,
        ),
        case(
            "h2g_buffer_outside_guest_memory",
            &["h2g queue 0: buffer refused", "outside guest memory"],
            h2g_buffer,
        ),
        case(
            "h2g_buffer_loops",
            &["h2g queue 0: buffer refused", "loops"],
            h2g_buffer,
        ),
        case(
            "h2g_buffer_tiny",
            &["h2g queue 0: buffer refused", "256"],
            h2g_buffer,
        ),
        // ---- Replies: matched by the relay's own message ID and the command; one
        // that matches nothing is dropped and logged, and the client's request times out.
        case(
            "reply_unknown_message_id",
            &["reply to no request in flight"],
            lost,
        ),
        case(
            "reply_wrong_command",
            &["reply to no request in flight"],
            lost,
        ),
        // A reply for a channel that does not exist: ERROR (ENOENT) to the device VM.
        case(
            "reply_unknown_channel",
            &["channel 2147418112, which does not exist"],
            lost,
        ),
        case(
            "reply_on_channel_zero",
            &["channel 0, which does not exist"],
            lost,
        ),
        // A reply sent twice: the client gets the first, the second matches nothing.
        case("reply_twice", &["reply to no request in flight"], answered),
        // A reply whose payload does not decode: the client gets EIO, not the bytes.
        case(
            "reply_malformed_payload",
            &["invalid reply from the device VM"],
            unusable,
        ),
        // A reply with an fd slot: EIO, no fd invented.
        case(
            "reply_with_fd_slot",
            &[
                "invalid reply from the device VM",
                "carries 1 file descriptors",
            ],
            unusable,
        ),
        // Framing of the message itself: each dropped with an ERROR to the device VM.
        case(
            "reply_vfio_header_size_mismatch",
            &["malformed message from the device VM"],
            lost,
        ),
        case(
            "reply_reserved_flags",
            &[
                "malformed message from the device VM",
                "reserved header flags",
            ],
            lost,
        ),
        case(
            "reply_length_over_limit",
            &["malformed message from the device VM", "exceeds the limit"],
            lost,
        ),
        case("reply_unknown_kind", &["unknown kind 0x77"], lost),
        // A vfio-user command from the device toward the client: not forwarded.
        case("reply_as_command", &["device sent command"], lost),
        // Kinds only the relay sends, and a status for a channel that does not exist:
        // refused and logged; the client is served.
        case("device_only_kinds", &["which it must not"], answered),
        // CHANNEL_UP statuses the relay did not ask for: ignored and logged; they do not
        // start the client's session again (which would map its DMA regions into new
        // windows, again and again, and send their maps anew).
        case(
            "channel_up_status_repeated",
            &["did not ask for"],
            unsolicited_channel_up,
        ),
        case(
            "status_for_unknown_channel",
            &["status for unknown channel"],
            answered,
        ),
        // ---- DMA: the relay's own checks, whatever the device VM's library would
        // have refused. The model's DMA, redirected: EFAULT in the device's STATUS,
        // the client's memory untouched (guards included), the next copy fine.
        case(
            "dma_read_outside_maps",
            &["outside the client's maps or against"],
            dma_refused,
        ),
        case(
            "dma_read_across_map_end",
            &["outside the client's maps or against"],
            dma_refused,
        ),
        case(
            "dma_write_to_read_only_map",
            &["outside the client's maps or against"],
            dma_refused,
        ),
        case(
            "dma_write_outside_maps",
            &["outside the client's maps or against"],
            dma_refused,
        ),
        // Requests of the device VM's own: 64 segments, the last outside every map:
        // EFAULT and not one byte written.
        case(
            "dma_segments_one_bad",
            &["outside the client's maps or against"],
            |env| {
                probe(
                    env,
                    "HOSTILE dma_segments_one_bad: the relay answered #1: status 14",
                )
            },
        ),
        // A segment that wraps around 2^64: malformed, refused.
        case(
            "dma_segment_wraps",
            &["malformed message from the device VM", "segment length"],
            |env| {
                probe(
                    env,
                    "HOSTILE dma_segment_wraps: the relay answered #1: ERROR 22",
                )
            },
        ),
        // A read whose reply would not fit a message: E2BIG, nothing allocated.
        case("dma_read_larger_than_message", &["cannot fit"], |env| {
            probe(env, "HOSTILE dma_read_larger_than_message: the relay answered #1: DMA_READ reply, status 7")
        }),
        // A read for a channel that does not exist: ENOENT.
        case("dma_unknown_channel", &["which does not exist"], |env| {
            probe(
                env,
                "HOSTILE dma_unknown_channel: the relay answered #1: DMA_READ reply, status 2",
            )
        }),
        // Use after the unmap, on the copy path: EFAULT, memory untouched.
        case(
            "dma_write_after_unmap",
            &["outside the client's maps or against"],
            dma_after_unmap,
        ),
        // Use after the unmap, through the window: the window is gone before the client
        // hears its unmap succeeded (the relay cannot see these writes: nothing logged).
        case("window_write_after_unmap", &[], window_after_unmap),
        // ---- Interrupts: only the client's assigned eventfds of the channel, index
        // and vector are signalled; the others are logged and ignored.
        case(
            "irq_unassigned_vector",
            &["where the client has no eventfd assigned"],
            irq_misdirected,
        ),
        case(
            "irq_index_out_of_range",
            &["where the client has no eventfd assigned"],
            irq_misdirected,
        ),
        case(
            "irq_vector_range_overflows",
            &["where the client has no eventfd assigned"],
            irq_misdirected,
        ),
        case(
            "irq_unknown_channel",
            &["channel 2147418112, which does not exist"],
            irq_misdirected,
        ),
        // ---- Sessions: a SESSION_END never acknowledged, or acknowledged under a tag
        // the relay never used, does not keep the client's memory (fds, mappings,
        // windows) past the request timeout.
        case(
            "session_end_never_acknowledged",
            &["did not acknowledge the end of the session"],
            session_end,
        ),
        case(
            "session_end_wrong_tag",
            &["did not acknowledge the end of the session"],
            session_end,
        ),
    ];
    // ---- Floods, on dma0's queue pair (1 of 2; the neighbour is on pair 0): the relay
    // serves the other pair all the while, and keeps nothing of them.
    let floods = [
        // 100000 interrupts on an assigned vector: signalled (a device may interrupt at
        // any rate), nothing kept.
        case("irq_flood", &[], irq_flood),
        // 20000 replies to nothing, malformed messages, ERROR reports: each handled,
        // the log rate-limited.
        case(
            "unsolicited_reply_flood",
            &["reply to no request in flight"],
            |env| flood(env, "reply to no request in flight", 200),
        ),
        case(
            "malformed_message_flood",
            &["malformed message from the device VM"],
            |env| flood(env, "malformed message from the device VM", 200),
        ),
        case("error_report_flood", &["device VM reports error"], |env| {
            flood(env, "device VM reports error", 200)
        }),
        // 300 DMA reads of 1 MiB of memory the client serves itself: the relay's memory
        // stays bounded.
        case(
            "remote_dma_flood",
            &["waiting for the client"],
            remote_flood,
        ),
        // 400 DMA reads of 1 MiB whose answers the device VM never takes: the relay
        // keeps a bounded backlog of them and leaves the rest of the requests in the
        // ring.
        case("dma_read_flood_unread", &["does not take"], flood_unread),
    ];
    all.extend(floods.into_iter().map(|c| Case {
        setup: Setup::TwoPairs,
        ..c
    }));
    all
}

/// Runs one case against its own relay and device VM; the shared checks come after
/// the case's own.
fn run(case: &Case) -> Result<(), String> {
    let mut env = Env::start(case)?;
    let result = run_in(&mut env, case);
    if result.is_err() {
        eprintln!(
            "---- {}: relay log (last lines)\n{}\n---- device VM log (last lines)\n{}",
            case.name,
            env.relay_log.tail(30),
            env.guest_log.tail(30)
        );
    }
    result
}

fn run_in(env: &mut Env, case: &Case) -> Result<(), String> {
    let before = env.neighbour.ops();
    (case.run)(env)?;
    if let Some(status) = env.relay.exited() {
        return Err(format!("the relay exited ({status:?})"));
    }
    for line in case.logs {
        env.relay_log
            .wait_for(line, Duration::from_secs(2))
            .map_err(|e| format!("the relay did not log the case: {e}"))?;
    }
    env.neighbour.progress(2, WAIT)?;
    if !case.drops_device_vm && env.neighbour.errors() > 0 {
        return Err("the neighbour saw errors".into());
    }
    if env.neighbour.ops() <= before {
        return Err("the neighbour made no progress during the case".into());
    }
    settle_fds(env.relay.pid(), env.baseline, WAIT)?;
    if let Some(status) = env.relay.exited() {
        return Err(format!("the relay exited ({status:?})"));
    }
    Ok(())
}

impl case_table::Case for Case {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// Every case of [`cases`], each against a relay and device VM of its own. Set
/// `VFU_HOSTILE_CASE=name` to run one case.
#[test]
fn hostile_device_vms() {
    run_cases(
        "hostile device VM",
        &cases(),
        30,
        &mut (),
        |(), case| run(case),
        |()| ControlFlow::Continue(()),
    );
}

/// The misbehaviours the suite names are those vfu-guest knows, and the suite covers
/// every one of them.
#[test]
fn every_misbehaviour_has_a_case() {
    let names: std::collections::HashSet<&str> = cases().iter().map(|c| c.name).collect();
    for m in vfu_guest::hostile::Case::ALL {
        assert!(names.contains(m.name()), "no case for {}", m.name());
    }
    for n in &names {
        assert!(
            n.parse::<vfu_guest::hostile::Case>().is_ok(),
            "{n} is not a misbehaviour"
        );
    }
}
