//! What every part of the benchmark shares: starting the relayed and the direct paths,
//! connecting, the `gpio` round trips and posted writes, latency samples.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfu_proto::client::{Client, ClientError};
use vfu_proto::vfio_user::{Capabilities, MultiWrite};
use vfu_tests::{
    try_start_direct_on, try_start_loopback_guest_with, try_start_relay_with, wait_for_socket,
    Proc, Scratch,
};

/// The `gpio` register BAR.
pub const BAR2: u32 = 2;
/// FET outputs 0-7: read back what was written.
pub const OUT0_7: u64 = 0;
/// Isolated inputs 0-7: what the round trips read.
pub const IN0_7: u64 = 1;
/// FET outputs 8-15: read back what was written.
pub const OUT8_15: u64 = 4;

/// How long the relay, the device VM or a direct server may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How the relay and the loopback device VM run: event mode, or poll mode with the
/// options that turn it on.
#[derive(Debug, Clone)]
pub struct Mode {
    /// "event" or "poll".
    pub name: &'static str,
    /// Extra vfu-relay options.
    pub relay: Vec<String>,
    /// Extra vfu-guest options.
    pub guest: Vec<String>,
}

impl Mode {
    /// Event mode: the daemons' defaults.
    pub fn event() -> Self {
        Self {
            name: "event",
            relay: Vec::new(),
            guest: Vec::new(),
        }
    }

    /// This mode with `pairs` queue pairs offered by the relay and used by the device
    /// VM (`--queue-pairs`; 1 is both daemons' default and adds nothing).
    pub fn with_queue_pairs(&self, pairs: u16) -> Self {
        let mut m = Self {
            name: self.name,
            relay: self.relay.clone(),
            guest: self.guest.clone(),
        };
        if pairs != 1 {
            for args in [&mut m.relay, &mut m.guest] {
                args.extend(["--queue-pairs".to_string(), pairs.to_string()]);
            }
        }
        m
    }

    /// Poll mode: relay and device VM keep polling for `us` microseconds after the last
    /// message (`--poll-us`).
    pub fn poll(us: u64) -> Self {
        let o = vec!["--poll-us".to_string(), us.to_string()];
        Self {
            name: "poll",
            relay: o.clone(),
            guest: o,
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A relay and a loopback device VM serving devices `gpio0..gpioN` (`gpio` model),
/// stopped on drop.
pub struct Relayed {
    /// The relay.
    pub relay: Proc,
    /// The loopback device VM.
    pub guest: Proc,
    /// The device sockets, in device order.
    pub sockets: Vec<PathBuf>,
    _scratch: Scratch,
}

impl Relayed {
    /// Starts the relay and the device VM for `devices` gpio devices on `cpu` (both
    /// processes) in `mode`, and waits for the relay's device sockets.
    pub fn start(
        tag: &str,
        cpu: Option<usize>,
        devices: usize,
        mode: &Mode,
    ) -> Result<Self, String> {
        let scratch = Scratch::try_new(tag).map_err(|e| format!("scratch directory: {e}"))?;
        let frontend = scratch.join("frontend.sock");
        let names: Vec<String> = (0..devices).map(|i| format!("gpio{i}")).collect();
        let sockets: Vec<PathBuf> = names
            .iter()
            .map(|n| scratch.join(&format!("{n}.sock")))
            .collect();
        let exported: Vec<(&str, &Path)> = names
            .iter()
            .zip(&sockets)
            .map(|(n, s)| (n.as_str(), s.as_path()))
            .collect();
        let mut relay = try_start_relay_with(cpu, &frontend, &exported, &strs(&mode.relay))?;
        for s in &sockets {
            if !wait_for_socket(s, START_TIMEOUT) {
                return Err(format!(
                    "vfu-relay did not create {}{}",
                    s.display(),
                    relay.exit_note()
                ));
            }
        }
        let served: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "gpio")).collect();
        let guest = try_start_loopback_guest_with(cpu, &frontend, &served, &strs(&mode.guest))?;
        Ok(Self {
            relay,
            guest,
            sockets,
            _scratch: scratch,
        })
    }

    /// A client of device `i`, once the device VM serves it.
    pub fn connect(&mut self, i: usize) -> Result<Client, String> {
        let socket = self.sockets.get(i).ok_or("no such device")?.clone();
        connect_while(&socket, &mut [&mut self.relay, &mut self.guest])
    }
}

/// The `gpio` model served directly by vfu-guest (`--listen`), stopped on drop.
pub struct Direct {
    /// The server.
    pub server: Proc,
    /// Its socket.
    pub socket: PathBuf,
    _scratch: Scratch,
}

impl Direct {
    /// Starts it on `cpu`.
    pub fn start(tag: &str, cpu: Option<usize>) -> Result<Self, String> {
        let scratch = Scratch::try_new(tag).map_err(|e| format!("scratch directory: {e}"))?;
        let socket = scratch.join("direct.sock");
        let server = try_start_direct_on(cpu, &socket, "gpio")?;
        Ok(Self {
            server,
            socket,
            _scratch: scratch,
        })
    }

    /// A client.
    pub fn connect(&mut self) -> Result<Client, String> {
        let socket = self.socket.clone();
        connect_while(&socket, &mut [&mut self.server])
    }
}

/// What every client of the benchmark proposes in VERSION: REGION_WRITE_MULTI, as
/// QEMU's client does.
pub fn proposal() -> Capabilities {
    Capabilities {
        write_multiple: Some(true),
        ..Default::default()
    }
}

/// Connects to `socket` and negotiates VERSION, retrying until it is served; fails at
/// once when one of `procs` exits, or after [`START_TIMEOUT`].
pub fn connect_while(socket: &Path, procs: &mut [&mut Proc]) -> Result<Client, String> {
    connect_within(socket, START_TIMEOUT, procs)
}

/// [`connect_while`] with a `timeout` of its own.
pub fn connect_within(
    socket: &Path,
    timeout: Duration,
    procs: &mut [&mut Proc],
) -> Result<Client, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match Client::connect(socket, REPLY_TIMEOUT) {
            Ok(mut c) => match c.negotiate(proposal()) {
                Ok(_) => return Ok(c),
                Err(e) => format!("VERSION: {e}"),
            },
            Err(e) => e.to_string(),
        };
        for p in procs.iter_mut() {
            let note = p.exit_note();
            if !note.is_empty() {
                return Err(format!("{} not served{note}", socket.display()));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{} not served: {last}", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Latency samples in microseconds, sorted.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<f64>);

impl Samples {
    /// From samples in microseconds.
    pub fn from_us(mut us: Vec<f64>) -> Self {
        us.sort_by(f64::total_cmp);
        Self(us)
    }

    /// The `q` quantile (0 to 1), nearest rank; 0 without samples.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        self.0[i]
    }

    /// Median.
    pub fn p50(&self) -> f64 {
        self.quantile(0.5)
    }

    /// 99th percentile.
    pub fn p99(&self) -> f64 {
        self.quantile(0.99)
    }

    /// The samples, sorted.
    pub fn sorted(&self) -> &[f64] {
        &self.0
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

fn client_err(what: &'static str) -> impl Fn(ClientError) -> String {
    move |e| format!("{what}: {e}")
}

/// One byte read from the `gpio` BAR.
pub fn read_byte(c: &mut Client, offset: u64) -> Result<u8, String> {
    let b = c
        .region_read(BAR2, offset, 1)
        .map_err(client_err("REGION_READ"))?;
    b.first()
        .copied()
        .ok_or_else(|| "empty REGION_READ reply".into())
}

/// `rounds` one-byte REGION_READ round trips (after `rounds / 10` not timed).
pub fn round_trips(c: &mut Client, rounds: usize) -> Result<Samples, String> {
    for _ in 0..rounds / 10 {
        read_byte(c, IN0_7)?;
    }
    let mut us = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        read_byte(c, IN0_7)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Samples::from_us(us))
}

/// `writes` posted one-byte REGION_WRITEs, one message each, to FET outputs 0-7, then a
/// REGION_READ of it: the server applies requests in order, so its answer comes after
/// every write, and it must read the last value written. Writes per second, from the
/// first write to that answer.
pub fn posted_single(c: &mut Client, writes: usize) -> Result<f64, String> {
    if writes == 0 {
        return Err("no writes to time".into());
    }
    let t = Instant::now();
    for i in 0..writes {
        c.region_write_posted(BAR2, OUT0_7, &[i as u8])
            .map_err(client_err("posted REGION_WRITE"))?;
    }
    let got = read_byte(c, OUT0_7)?;
    let secs = t.elapsed().as_secs_f64();
    let want = (writes - 1) as u8;
    if got != want {
        return Err(format!(
            "after {writes} posted REGION_WRITEs the outputs read {got:#04x}, not the last value written ({want:#04x})"
        ));
    }
    Ok(writes as f64 / secs)
}

/// `writes` one-byte writes alternating between FET outputs 0-7 and 8-15, posted as
/// REGION_WRITE_MULTI messages (at most 200 writes each, as QEMU coalesces them), then
/// REGION_READs of both registers, which must hold the last values written. Writes per
/// second (each write counts, not each message), from the first message to the last
/// answer; `None` when the server did not offer `write_multiple`.
pub fn posted_multi(c: &mut Client, writes: usize) -> Result<Option<f64>, String> {
    if writes < 2 {
        return Err("fewer than 2 writes to time".into());
    }
    if !c.server_caps.write_multiple() {
        return Ok(None);
    }
    let value = |i: usize| (i / 2) as u8 ^ 0x5a;
    let batch: Vec<MultiWrite> = (0..writes)
        .map(|i| {
            let offset = if i % 2 == 0 { OUT0_7 } else { OUT8_15 };
            MultiWrite::new(BAR2, offset, &[value(i)]).ok_or("a one-byte write")
        })
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    c.region_write_multi_posted(&batch)
        .map_err(client_err("posted REGION_WRITE_MULTI"))?;
    let low = read_byte(c, OUT0_7)?;
    let high = read_byte(c, OUT8_15)?;
    let secs = t.elapsed().as_secs_f64();
    let last_even = (writes - 1) & !1;
    let last_odd = if writes.is_multiple_of(2) {
        writes - 1
    } else {
        writes - 2
    };
    let want = (value(last_even), value(last_odd));
    if (low, high) != want {
        return Err(format!(
            "after {writes} writes in REGION_WRITE_MULTI the outputs read {low:#04x} {high:#04x}, not the last values written ({:#04x} {:#04x})",
            want.0, want.1
        ));
    }
    Ok(Some(writes as f64 / secs))
}

/// Online CPUs, whatever this thread's affinity is.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Whether `binary --help` lists `option` (so a benchmark row that needs it can say
/// why it was left out instead of failing).
pub fn supports(binary: &str, option: &str) -> Result<bool, String> {
    let bin = vfu_tests::try_binary(binary)?;
    let out = std::process::Command::new(&bin)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} --help: {e}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(option))
}
