//! The neighbour: a client of a second `dma-engine` device that keeps running checked
//! DMA copies on a thread of its own while a test attacks something else (another
//! device, the relay, the device VM), and a way to check that it kept making progress
//! and never saw wrong data.
//!
//! Each copy ([`Neighbour::start`] says how the client is set up) moves 4 to 64 KiB of
//! fresh data from the source to the destination region of a sealed memfd (the
//! [`crate::dma_engine`] layout) and checks STATUS (DONE), the destination bytes, the
//! CRC in the completion record and the MSI-X interrupt of vector 0.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfu_proto::client::Client;

use crate::dma_engine::{
    completion, crc32c, eventfd, fired, memfd, try_copy, try_enable, try_map, try_set_irq, Memory,
    COMPLETION, DST, DST_SIZE, MEMORY_SIZE, MIB, SRC,
};
use crate::try_connect_served;

/// How long the neighbour waits for each reply and for each copy's interrupt.
pub const REPLY_WAIT: Duration = Duration::from_secs(5);
/// How long [`Neighbour::start`] waits for its device to be served.
pub const SETUP: Duration = Duration::from_secs(20);

/// A client of a `dma-engine` device copying without a pause on its own thread until
/// dropped.
///
/// A copy whose data is wrong (destination or CRC) is always a failure, and the thread
/// stops. A request that fails (an error reply, a timeout, STATUS not DONE, no
/// interrupt) is a failure too, unless errors are tolerated
/// ([`Neighbour::tolerate_errors`], while no device VM may serve the device): then it
/// is counted ([`Neighbour::errors`]), and the device enabled again before the next
/// copy (a new device VM's device is as after a reset).
pub struct Neighbour {
    ops: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    tolerant: Arc<AtomicBool>,
    phase: Arc<Mutex<Option<&'static str>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Neighbour {
    /// Connects to `socket` (retrying for [`SETUP`] until the device is served), maps a
    /// sealed memfd as the source (read-only) and destination (read-write) regions,
    /// enables the device with MSI-X vector 0 on an eventfd, and starts copying.
    pub fn start(socket: &Path) -> Result<Self, String> {
        let mut c = try_connect_served(socket, REPLY_WAIT, SETUP)?;
        let file = memfd(MEMORY_SIZE);
        let e = |what: &'static str| move |e| format!("neighbour, {what}: {e}");
        try_map(&mut c, SRC, MIB, 0, false, Some(&file)).map_err(e("DMA_MAP"))?;
        try_map(&mut c, DST, DST_SIZE, DST - SRC, true, Some(&file)).map_err(e("DMA_MAP"))?;
        try_enable(&mut c).map_err(|e| format!("neighbour: {e}"))?;
        let irq = eventfd();
        let irq2 = irq
            .try_clone()
            .map_err(|e| format!("neighbour, eventfd: {e}"))?;
        try_set_irq(&mut c, Some(irq2)).map_err(e("SET_IRQS"))?;
        let mem = Memory::File(file);
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let tolerant = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (ops, errors, failure, tolerant, phase, stop) = (
                ops.clone(),
                errors.clone(),
                failure.clone(),
                tolerant.clone(),
                phase.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let e = match one_copy(&mut c, &mem, &irq, i) {
                        Ok(()) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                            i += 1;
                            continue;
                        }
                        Err(Wrong::Error(_)) if tolerant.load(Ordering::Relaxed) => {
                            // No device VM serves it now: once one does, the device is as
                            // after a reset (its config space was the old device VM's).
                            errors.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(20));
                            let _ = try_enable(&mut c);
                            i += 1;
                            continue;
                        }
                        Err(Wrong::Error(e) | Wrong::Data(e)) => e,
                    };
                    *failure.lock().unwrap() = Some(match *phase.lock().unwrap() {
                        Some(p) => format!("op {i}, during {p}: {e}"),
                        None => format!("op {i}: {e}"),
                    });
                    return;
                }
            })
        };
        Ok(Self {
            ops,
            errors,
            failure,
            tolerant,
            phase,
            stop,
            thread: Some(thread),
        })
    }

    /// The copies completed and checked so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// The requests that failed while errors were tolerated.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The failure that stopped the thread, if one did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// With `on`, a failed request is counted instead of failing (wrong data never is
    /// tolerated); without, it fails again.
    pub fn tolerate_errors(&self, on: bool) {
        self.tolerant.store(on, Ordering::Relaxed);
    }

    /// Names what the test is doing now (a case), for the failure message.
    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = Some(phase);
    }

    /// Waits up to `wait` until `n` more copies completed; fails at once with the
    /// neighbour's failure, if it has one.
    pub fn progress(&self, n: u64, wait: Duration) -> Result<(), String> {
        let start = self.ops();
        let deadline = Instant::now() + wait;
        loop {
            if let Some(f) = self.failure() {
                return Err(format!("neighbour: {f}"));
            }
            if self.ops() >= start + n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "neighbour: {} of {n} copies in {wait:?}",
                    self.ops() - start
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a neighbour's copy went wrong.
enum Wrong {
    /// A request failed (an error reply, a timeout, STATUS not DONE, no interrupt).
    Error(String),
    /// The device answered, and the data is wrong: never acceptable.
    Data(String),
}

/// Copy `i`: fresh data at SRC, copied to DST; STATUS DONE, the destination bytes and
/// the completion record's CRC right, the interrupt fired.
fn one_copy(c: &mut Client, mem: &Memory, irq: &OwnedFd, i: u64) -> Result<(), Wrong> {
    let len = 4096 * (1 + (i % 16) as usize);
    let data: Vec<u8> = (0..len)
        .map(|k| (k as u64 ^ i.wrapping_mul(0x9e37_79b9)) as u8)
        .collect();
    mem.write(SRC, &data);
    mem.write(DST, &vec![0u8; len]);
    // A stale interrupt of an earlier, failed attempt does not count.
    let _ = fired(irq, Duration::ZERO);
    let st = try_copy(c, SRC, DST, COMPLETION, len as u64)
        .map_err(|e| Wrong::Error(format!("copy of {len} bytes: {e}")))?;
    if st != 1 {
        return Err(Wrong::Error(format!(
            "STATUS {st:#x} after a copy of {len} bytes"
        )));
    }
    if mem.read(DST, len) != data {
        return Err(Wrong::Data(format!("the copy of {len} bytes differs")));
    }
    let [_, crc, _, _] = completion(mem);
    if crc != crc32c(&data) {
        return Err(Wrong::Data(format!(
            "CRC {crc:#x}, expected {:#x}",
            crc32c(&data)
        )));
    }
    if !fired(irq, REPLY_WAIT) {
        return Err(Wrong::Error("no MSI-X interrupt".into()));
    }
    Ok(())
}
