//! `vfu-relay`: the host daemon. See `vfu-relay --help` and `docs/operating.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::error;

use vfu_relay::{Config, DeviceConfig, Error};

/// Exports vfio-user devices served inside a device VM: each --device gets a vfio-user
/// socket on the host; the device VM's VMM connects to --frontend-socket as the
/// vhost-user frontend of the tunnel device.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// vhost-user socket the device VM's VMM connects to.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    frontend_socket: Option<PathBuf>,
    /// Export a device: NAME as vfu-guest serves it, SOCKET where vfio-user clients
    /// connect. Repeat for more devices.
    #[arg(long = "device", value_name = "NAME=SOCKET")]
    devices: Vec<String>,
    /// Read the configuration from a TOML file instead (see docs/operating.md).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["frontend_socket", "devices"])]
    config: Option<PathBuf>,
    /// Milliseconds a client request may wait for the device VM before ETIMEDOUT.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    request_timeout_ms: u64,
    /// Queue pairs offered to the device VM.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queue_pairs: u16,
    /// MiB of shared memory for zero-copy DMA windows (needs a frontend with vhost-user
    /// SHMEM support); 0 sends every DMA through the copy path.
    #[arg(long, value_name = "MIB", default_value_t = 16384)]
    shm_size_mib: u64,
    /// Also give windows onto client memory that is not a memfd sealed against
    /// shrinking (trusted clients only: such a client can make the device VM fault).
    #[arg(long)]
    unsealed_windows: bool,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if let Some(path) = args.config {
            return Config::from_file(&path);
        }
        let devices = args
            .devices
            .iter()
            .map(|d| DeviceConfig::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        Config {
            frontend_socket: args.frontend_socket.unwrap_or_default(),
            devices,
            request_timeout_ms: args.request_timeout_ms,
            queue_pairs: args.queue_pairs,
            shm_size_mib: args.shm_size_mib,
            unsealed_windows: args.unsealed_windows,
        }
        .validate()
    }
}

fn main() -> ExitCode {
    vfu_proto::mem::keep_large_buffers_on_heap();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let result = Config::try_from(args).and_then(vfu_relay::run);
    match result {
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

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(args).map_err(|e| e.to_string())?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    /// The command line becomes a validated configuration without running anything.
    #[test]
    fn command_line() {
        let c = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/tmp/f",
            "--device",
            "a=/tmp/a",
            "--device",
            "b=/tmp/b",
        ])
        .unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.request_timeout_ms, 3000);
        assert!(parse(&["vfu-relay", "--device", "a=/tmp/a"]).is_err());
        assert!(parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/tmp/f",
            "--device",
            "nope"
        ])
        .is_err());
        assert!(parse(&["vfu-relay", "--frontend-socket", "/tmp/f"]).is_err());
        assert!(parse(&["vfu-relay", "--config", "/x", "--device", "a=/tmp/a"]).is_err());
    }
}
