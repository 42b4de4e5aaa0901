//! `vfu-guest`: the driver of the vfu-relay tunnel device, or a plain vfio-user server.
//!
//! ```text
//! vfu-guest --loopback /run/vfu-relay/frontend.sock --serve gpio0=gpio
//! vfu-guest --loopback /run/vfu-relay/frontend.sock --bridge nvme0=/run/nvme0.sock
//! vfu-guest --pci auto --serve gpio0=gpio                  # inside a device VM
//! vfu-guest --listen /tmp/gpio.sock --model gpio
//! vfu-guest --list-models
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use log::{error, info};

use vfu_guest::hostile::{Case, Misbehave};
use vfu_guest::transport::loopback::Loopback;
use vfu_guest::transport::pci::{find_tunnel, DriverChoice, PciOptions, PciTransport};
use vfu_guest::transport::Transport;
use vfu_guest::tunnel::{DriverConfig, ServeSpec, TunnelDriver};
use vfu_guest::{direct, models};

/// Serves vfio-user device models and bridges unmodified vfio-user servers: inside a
/// device VM behind vfu-relay (here with the loopback VMM, which plays the device VM's
/// VMM in this process), or serves a model directly on a host socket.
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(group(ArgGroup::new("mode").required(true).args(["loopback", "pci", "listen", "list_models"])))]
#[command(group(ArgGroup::new("served").multiple(true)))]
struct Args {
    /// Loopback VMM: connect to the relay's frontend socket as the vhost-user frontend.
    #[arg(long, value_name = "PATH", requires = "served")]
    loopback: Option<PathBuf>,
    /// Inside a device VM: drive the tunnel device at this PCI address (e.g.
    /// 0000:00:04.0), or `auto` (the one function with the tunnel's PCI ID 1af4:1078, or
    /// a virtio-fs 1af4:105a whose tag starts with "vfu": compatibility mode), through
    /// the kernel driver --pci-driver names, binding it if needed; DMA memory comes from
    /// hugepages (--memory-mib of them must be free).
    #[arg(long, value_name = "BDF", requires = "served")]
    pci: Option<String>,
    /// With --pci: the kernel driver that gives vfu-guest the function: `uio`
    /// (uio_pci_generic, INTx), `vfio` (vfio-pci in no-IOMMU mode, an MSI-X vector per
    /// queue on eventfds) or `auto` (the one it is bound to, else vfio when vfio-pci is
    /// loaded with no-IOMMU mode on, else uio) [default: auto].
    #[arg(long, value_name = "uio|vfio|auto", requires = "pci")]
    pci_driver: Option<DriverChoice>,
    /// With --loopback or --pci: serve device NAME (as exported by the relay) with model MODEL.
    #[arg(long = "serve", value_name = "NAME=MODEL", value_parser = ServeSpec::parse, group = "served")]
    serve: Vec<ServeSpec>,
    /// With --loopback or --pci: serve device NAME with the vfio-user server listening on
    /// SOCKET in this (device) VM, through the bridge. May repeat, and mix with
    /// --serve; a name is served once.
    #[arg(long = "bridge", value_name = "NAME=SOCKET", value_parser = ServeSpec::parse_bridge, group = "served")]
    bridge: Vec<ServeSpec>,
    /// Direct mode: serve --model as a plain vfio-user server on this socket (no relay).
    #[arg(long, value_name = "SOCKET", requires = "model")]
    listen: Option<PathBuf>,
    /// With --listen: the model to serve.
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// List the device models and exit.
    #[arg(long)]
    list_models: bool,
    /// With --loopback: MiB of guest memory; with --pci: MiB of hugepages for rings and
    /// buffers.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    memory_mib: usize,
    /// With --loopback: seconds to wait for the relay to appear.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    connect_timeout: u64,
    /// Queue pairs to set up.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queue_pairs: u16,
    /// With --loopback: do not offer shared memory for DMA windows (every DMA then
    /// goes through the relay's copy path), as with a VMM without vhost-user SHMEM.
    #[arg(long)]
    no_shmem: bool,
    /// Do not ask the relay to place copy-path DMA data in the driver's buffers
    /// (tunnel feature DIRECT_DATA): the data then travels inside tunnel messages.
    #[arg(long)]
    no_direct_data: bool,
    /// With --loopback or --pci: poll mode. The engine thread keeps polling the
    /// tunnel's queues, with the relay's interrupts off, for this many microseconds
    /// after the last message before it sleeps (0: event mode).
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    poll_us: u64,
    /// With --loopback or --pci: run the engine thread (the tunnel's queues and the
    /// devices served on it) on this CPU.
    #[arg(long, value_name = "CPU")]
    engine_cpu: Option<usize>,
    /// TESTING THE RELAY ONLY: misbehave toward the relay on purpose on device DEVICE's
    /// channel, in the ways CASE names (one per trigger, in order), serving everything
    /// else as usual; `--misbehave list` lists the cases. The hostile device VM suite
    /// of vfu-relay runs this (docs/security.md, "Hostile device VM").
    #[arg(long, value_name = "DEVICE:CASE[,CASE]", value_parser = MisbehaveArg::parse)]
    misbehave: Option<MisbehaveArg>,
    /// TESTING THE RELAY ONLY: with --loopback, give the relay guest memory that is not
    /// sealed against shrinking (as a VMM with memory-backend-file would), which it
    /// refuses unless started with --unsealed-vmm-memory.
    #[arg(long, hide = true, requires = "loopback")]
    unsealed_memory: bool,
}

/// What `--misbehave` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MisbehaveArg {
    /// `list`: print the cases.
    List,
    /// Misbehave so.
    Spec(Misbehave),
}

impl MisbehaveArg {
    fn parse(arg: &str) -> Result<Self, String> {
        if arg == "list" {
            return Ok(Self::List);
        }
        Misbehave::parse(arg).map(Self::Spec)
    }
}

fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // A second signal kills the process the default way.
        let _ = register_stop(sig, stop.clone());
    }
    stop
}

/// Sets `flag` on `sig` (async-signal-safe: an atomic store).
fn register_stop(sig: i32, flag: Arc<AtomicBool>) -> std::io::Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Release);
        }
    }
    // SAFETY: installs a handler that only performs an atomic store.
    let r = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    if r == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    let misbehave = match args.misbehave {
        Some(MisbehaveArg::List) => {
            for case in Case::ALL {
                println!("{:<36} {}", case.name(), case.about());
            }
            return Ok(());
        }
        Some(MisbehaveArg::Spec(m)) => Some(m),
        None => None,
    };
    if args.list_models {
        for name in models::NAMES {
            println!("{name}");
        }
        return Ok(());
    }
    let stop = stop_on_signals();
    if let Some(path) = args.listen {
        let name = args.model.unwrap_or_default();
        let model = models::build(&name).map_err(|e| e.to_string())?;
        info!("serving model {name} on {}", path.display());
        return direct::serve(&path, model, stop).map_err(|e| e.to_string());
    }
    let mut serve = args.serve;
    serve.extend(args.bridge);
    ServeSpec::check_all(&serve)?;
    if let Some(m) = &misbehave {
        if !serve.iter().any(|s| s.name == m.device) {
            return Err(format!(
                "--misbehave: device {:?} is not served here",
                m.device
            ));
        }
    }
    let config = DriverConfig {
        serve,
        queue_pairs: args.queue_pairs,
        queue_size: 256,
        direct_data: !args.no_direct_data,
        poll: Duration::from_micros(args.poll_us),
        engine_cpu: args.engine_cpu,
        misbehave,
    };
    if let Some(bdf) = args.pci {
        let options = PciOptions {
            memory: args.memory_mib << 20,
            driver: args.pci_driver.unwrap_or_default(),
            ..PciOptions::default()
        };
        let bdf = if bdf == "auto" {
            let found = find_tunnel(&options.sysfs).map_err(|e| e.to_string())?;
            info!("tunnel device found at {found}");
            found
        } else {
            bdf
        };
        let transport = PciTransport::open(&bdf, &options).map_err(|e| e.to_string())?;
        // A console marker for scripts and tests: which driver, which interrupts.
        println!(
            "VFU-GUEST TRANSPORT pci={} {}",
            transport.bdf(),
            transport.summary()
        );
        return drive(transport, config, stop);
    }
    let path = args.loopback.unwrap_or_default();
    let transport = Loopback::connect(
        &path,
        args.memory_mib << 20,
        Duration::from_secs(args.connect_timeout),
        !args.no_shmem,
        args.unsealed_memory,
    )
    .map_err(|e| e.to_string())?;
    drive(transport, config, stop)
}

fn drive<T: Transport + 'static>(
    transport: T,
    config: DriverConfig,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut driver = TunnelDriver::new(transport, config).map_err(|e| e.to_string())?;
    driver.run(stop).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    vfu_proto::mem::keep_large_buffers_on_heap();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_guest::tunnel::Served;

    /// --pci-driver takes uio, vfio, auto (and the kernel drivers' names), defaults to
    /// auto, and only goes with --pci.
    #[test]
    fn pci_driver_argument() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["vfu-guest", "--pci", "auto", "--serve", "gpio0=gpio"];
            argv.extend(extra);
            Args::try_parse_from(argv)
        };
        assert_eq!(parse(&[]).unwrap().pci_driver, None, "auto");
        for (arg, want) in [
            ("uio", DriverChoice::Uio),
            ("uio_pci_generic", DriverChoice::Uio),
            ("vfio", DriverChoice::Vfio),
            ("vfio-pci", DriverChoice::Vfio),
            ("auto", DriverChoice::Auto),
        ] {
            assert_eq!(
                parse(&["--pci-driver", arg]).unwrap().pci_driver,
                Some(want)
            );
        }
        assert!(parse(&["--pci-driver", "igb_uio"]).is_err());
        assert!(
            Args::try_parse_from(["vfu-guest", "--list-models", "--pci-driver", "vfio"]).is_err()
        );
    }

    /// --serve and --bridge mix and repeat; a name given twice is refused before
    /// anything starts; --loopback needs one of them.
    #[test]
    fn serve_and_bridge_arguments() {
        let args = Args::try_parse_from([
            "vfu-guest",
            "--loopback",
            "/tmp/f.sock",
            "--bridge",
            "dev0=/tmp/inner.sock",
            "--serve",
            "gpio0=gpio",
            "--bridge",
            "dev1=/tmp/other.sock",
        ])
        .unwrap();
        assert_eq!(args.serve.len(), 1);
        assert_eq!(args.bridge.len(), 2);
        assert_eq!(
            args.bridge[0].server,
            Served::Bridge(PathBuf::from("/tmp/inner.sock"))
        );
        let mut all = args.serve.clone();
        all.extend(args.bridge.clone());
        assert!(ServeSpec::check_all(&all).is_ok());

        let twice = Args::try_parse_from([
            "vfu-guest",
            "--loopback",
            "/tmp/f.sock",
            "--bridge",
            "gpio0=/tmp/inner.sock",
            "--serve",
            "gpio0=gpio",
        ])
        .unwrap();
        let mut all = twice.serve;
        all.extend(twice.bridge);
        assert!(ServeSpec::check_all(&all).is_err());

        assert!(Args::try_parse_from(["vfu-guest", "--loopback", "/tmp/f.sock"]).is_err());
        assert!(
            Args::try_parse_from(["vfu-guest", "--loopback", "/tmp/f", "--bridge", "x"]).is_err()
        );
        assert!(
            Args::try_parse_from(["vfu-guest", "--loopback", "/tmp/f", "--bridge", "dev0=/s"])
                .is_ok()
        );
    }
}
