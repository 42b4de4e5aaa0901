//! Helpers for the cross-process tests, the demo and the benchmark: start vfu-relay and
//! vfu-guest as real processes, wait for their sockets, and clean up after them.

pub mod case_table;
pub mod device_vm;
pub mod dma_engine;
pub mod logs;
pub mod neighbour;
pub mod procfs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory for sockets, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    /// Its path.
    pub path: PathBuf,
}

impl Scratch {
    /// A new directory under the system temp dir, unique to this process and `tag`.
    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).expect("create scratch directory")
    }

    /// [`Scratch::new`], failing with the error instead of panicking.
    pub fn try_new(tag: &str) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("vfu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process that is terminated (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `bin` with `args`; its output goes to this process's stderr only when
    /// `VFU_TEST_LOG` is set, so test output stays readable.
    pub fn spawn(name: &str, bin: &Path, args: &[&str]) -> Self {
        Self::spawn_on(None, name, bin, args)
    }

    /// Like [`Proc::spawn`], pinned to CPU `cpu` when given.
    pub fn spawn_on(cpu: Option<usize>, name: &str, bin: &Path, args: &[&str]) -> Self {
        Self::try_spawn_on(cpu, name, bin, args)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
    }

    /// [`Proc::spawn_on`], failing with the error instead of panicking.
    pub fn try_spawn_on(
        cpu: Option<usize>,
        name: &str,
        bin: &Path,
        args: &[&str],
    ) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null());
        if let Some(cpu) = cpu {
            let batch = std::env::var_os("VFU_SCHED_BATCH").is_some();
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // sched_setaffinity and sched_setscheduler, which are async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    pin_to(cpu)?;
                    if batch {
                        let param = libc::sched_param { sched_priority: 0 };
                        if libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        match std::env::var("VFU_TEST_LOG") {
            Ok(level) => {
                cmd.env("RUST_LOG", level);
            }
            Err(_) => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd.spawn()?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    /// Starts `cmd` as it is configured (standard input from /dev/null).
    pub fn spawn_command(name: &str, mut cmd: Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_string(),
            child,
        }
    }

    /// Takes over `child`, started by the caller (e.g. with its output piped).
    pub fn spawn_command_child(name: &str, child: Child) -> Self {
        Self {
            name: name.to_string(),
            child,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// If it has exited: `Some` of its exit code (`None` inside for a signal).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Sends SIGTERM and waits up to 5 s, then SIGKILL. Returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// For error messages: " (NAME exited with status N)" or " (NAME was killed by a
    /// signal)" when it has exited, else nothing.
    pub fn exit_note(&mut self) -> String {
        match self.exited() {
            Some(Some(code)) => format!(" ({} exited with status {code})", self.name),
            Some(None) => format!(" ({} was killed by a signal)", self.name),
            None => String::new(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
    }
}

/// Pins the calling thread (or, before exec, process) to CPU `cpu`.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Finds a workspace binary next to the running executable (`target/<profile>/`, or
/// its parent when running from `deps/`).
pub fn binary(name: &str) -> PathBuf {
    try_binary(name).unwrap_or_else(|e| panic!("{e}"))
}

/// [`binary`], failing with a message instead of panicking.
pub fn try_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let mut dir = exe
        .parent()
        .ok_or("the executable has no directory")?
        .to_path_buf();
    for _ in 0..2 {
        let candidate = dir.join(name);
        if candidate.exists() {
            return Ok(candidate);
        }
        if !dir.pop() {
            break;
        }
    }
    Err(format!(
        "{name} not found next to {}: build the workspace first (cargo build --workspace)",
        exe.display()
    ))
}

/// Waits until a UNIX socket at `path` accepts connections.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Connects a vfu-proto client to `socket` and negotiates VERSION (16 fds), retrying
/// until the device is served (the device VM is up) or `timeout` passes.
pub fn connect_served(socket: &Path, timeout: Duration) -> vfu_proto::client::Client {
    try_connect_served(socket, timeout, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`connect_served`], failing with a message (the last attempt's error) instead of
/// panicking: retries for `wait`; the client waits `reply_wait` for each reply.
pub fn try_connect_served(
    socket: &Path,
    reply_wait: Duration,
    wait: Duration,
) -> Result<vfu_proto::client::Client, String> {
    try_connect_ready(socket, reply_wait, wait, |_| Ok(()))
}

/// [`try_connect_served`], taking a client only once `ready` succeeds on it as well (a
/// register read, say: the device VM serves the device), else connecting again.
pub fn try_connect_ready(
    socket: &Path,
    reply_wait: Duration,
    wait: Duration,
    mut ready: impl FnMut(&mut vfu_proto::client::Client) -> Result<(), vfu_proto::client::ClientError>,
) -> Result<vfu_proto::client::Client, String> {
    let deadline = Instant::now() + wait;
    loop {
        let attempt = vfu_proto::client::Client::connect(socket, reply_wait).and_then(|mut c| {
            c.negotiate(vfu_proto::vfio_user::Capabilities {
                max_msg_fds: Some(16),
                ..Default::default()
            })?;
            ready(&mut c)?;
            Ok(c)
        });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{} not served: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Starts vfu-relay with a frontend socket and devices `(name, socket)`.
pub fn start_relay(frontend: &Path, devices: &[(&str, &Path)]) -> Proc {
    start_relay_on(None, frontend, devices)
}

/// [`start_relay`] pinned to `cpu`.
pub fn start_relay_on(cpu: Option<usize>, frontend: &Path, devices: &[(&str, &Path)]) -> Proc {
    start_relay_with(cpu, frontend, devices, &[])
}

/// [`start_relay_on`] with `extra` command-line options.
pub fn start_relay_with(
    cpu: Option<usize>,
    frontend: &Path,
    devices: &[(&str, &Path)],
    extra: &[&str],
) -> Proc {
    try_start_relay_with(cpu, frontend, devices, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// [`start_relay_with`], failing with a message instead of panicking.
pub fn try_start_relay_with(
    cpu: Option<usize>,
    frontend: &Path,
    devices: &[(&str, &Path)],
    extra: &[&str],
) -> Result<Proc, String> {
    let mut args = vec![
        "--frontend-socket".to_string(),
        frontend.display().to_string(),
    ];
    for (name, sock) in devices {
        args.push("--device".into());
        args.push(format!("{name}={}", sock.display()));
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = try_binary("vfu-relay")?;
    Proc::try_spawn_on(cpu, "vfu-relay", &bin, &args)
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// The control socket of a relay started with `frontend` and no `--control-socket`.
pub fn control_socket(frontend: &Path) -> PathBuf {
    let mut p = frontend.as_os_str().to_os_string();
    p.push(".ctl");
    PathBuf::from(p)
}

/// What `vfu-relay ctl` did.
#[derive(Debug)]
pub struct CtlOutput {
    /// It exited with status 0.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `vfu-relay ctl --control-socket CONTROL ARGS...` to its end.
pub fn relay_ctl(control: &Path, args: &[&str]) -> CtlOutput {
    let out = Command::new(binary("vfu-relay"))
        .arg("ctl")
        .arg("--control-socket")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vfu-relay ctl");
    CtlOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Starts vfu-guest as the loopback device VM serving `(name, model)` pairs.
pub fn start_loopback_guest(frontend: &Path, serve: &[(&str, &str)]) -> Proc {
    start_loopback_guest_on(None, frontend, serve)
}

/// [`start_loopback_guest`] pinned to `cpu`.
pub fn start_loopback_guest_on(
    cpu: Option<usize>,
    frontend: &Path,
    serve: &[(&str, &str)],
) -> Proc {
    try_start_loopback_guest_with(cpu, frontend, serve, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// [`start_loopback_guest_on`] with `extra` vfu-guest options, failing with a message
/// instead of panicking.
pub fn try_start_loopback_guest_with(
    cpu: Option<usize>,
    frontend: &Path,
    serve: &[(&str, &str)],
    extra: &[&str],
) -> Result<Proc, String> {
    let mut args = vec!["--loopback".to_string(), frontend.display().to_string()];
    for (name, model) in serve {
        args.push("--serve".into());
        args.push(format!("{name}={model}"));
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = try_binary("vfu-guest")?;
    Proc::try_spawn_on(cpu, "vfu-guest (loopback)", &bin, &args)
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// Starts vfu-guest in direct mode: `model` on `socket`, no relay.
pub fn start_direct(socket: &Path, model: &str) -> Proc {
    start_direct_on(None, socket, model)
}

/// [`start_direct`] pinned to `cpu`.
pub fn start_direct_on(cpu: Option<usize>, socket: &Path, model: &str) -> Proc {
    try_start_direct_on(cpu, socket, model).unwrap_or_else(|e| panic!("{e}"))
}

/// [`start_direct_on`], failing with a message instead of panicking.
pub fn try_start_direct_on(cpu: Option<usize>, socket: &Path, model: &str) -> Result<Proc, String> {
    let s = socket.display().to_string();
    let bin = try_binary("vfu-guest")?;
    Proc::try_spawn_on(
        cpu,
        "vfu-guest (direct)",
        &bin,
        &["--listen", &s, "--model", model],
    )
    .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// Latency statistics of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Samples.
    pub count: usize,
}

impl Latency {
    /// From durations (sorted here).
    pub fn from_samples(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let pick = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            p50: pick(0.5),
            p99: pick(0.99),
            count: samples.len(),
        }
    }
}
