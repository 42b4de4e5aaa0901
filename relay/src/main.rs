//! `vfu-relay`: the host daemon. See `vfu-relay --help` and `docs/operating.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::error;

use vfu_relay::access::{AccessSpec, Gid, SocketMode, Uid, User};
use vfu_relay::control::{client, Reply, Request};
use vfu_relay::{Config, DeviceConfig, Error};

/// Exports vfio-user devices served inside a device VM: each --device gets a vfio-user
/// socket on the host; the device VM's VMM connects to --frontend-socket as the
/// vhost-user frontend of the tunnel device.
///
/// Devices can be added and removed while the relay runs, through its control socket
/// (`vfu-relay ctl add|remove|list`), or by editing the --config file and sending the
/// relay SIGHUP. The others are not disturbed. See docs/operating.md.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// vhost-user socket the device VM's VMM connects to.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    frontend_socket: Option<PathBuf>,
    /// Export a device: NAME as vfu-guest serves it, SOCKET where vfio-user clients
    /// connect. Repeat for more devices (at most 256, added ones included); none is
    /// fine: add them later with `vfu-relay ctl add`.
    #[arg(long = "device", value_name = "NAME=SOCKET")]
    devices: Vec<String>,
    /// Control socket for `vfu-relay ctl` (created with mode 0600) [default: the
    /// frontend socket's path with .ctl appended].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Read the configuration from a TOML file instead (see docs/operating.md); SIGHUP
    /// reads it again and applies its devices.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "frontend_socket", "devices", "control_socket", "user", "socket_mode", "socket_group",
        "allow_uids", "allow_gids", "frontend_allow_uids", "frontend_allow_gids",
        "poll_us", "switch_cpu", "tunnel_cpu", "request_timeout_ms", "queue_pairs",
        "shm_size_mib", "unsealed_windows", "any_memory_file", "unsealed_vmm_memory", "group",
    ])]
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
    /// Accept client memory files of any file system, not only tmpfs and hugetlbfs
    /// (trusted clients only: a file on FUSE or a network mount can stall every device).
    #[arg(long)]
    any_memory_file: bool,
    /// Map the device VM's guest memory even if it is not a memfd sealed against
    /// shrinking (e.g. QEMU's memory-backend-file on hugetlbfs or /dev/shm; trusts
    /// the device VM's VMM: it could make the relay die of SIGBUS).
    #[arg(long)]
    unsealed_vmm_memory: bool,
    /// Once the sockets exist, drop privileges to this user (name or uid); see
    /// docs/security.md for what it then needs.
    #[arg(long, value_name = "USER")]
    user: Option<User>,
    /// With --user: the group to drop to [default: the user's primary group].
    #[arg(long, value_name = "GROUP", requires = "user")]
    group: Option<Gid>,
    /// Mode of the device sockets and the frontend socket, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600")]
    socket_mode: SocketMode,
    /// Group of the device sockets and the frontend socket [default: the relay's].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<Gid>,
    /// A user (name or uid) who may connect to device sockets, besides root and the
    /// relay's own user. Repeat for more.
    #[arg(long = "allow-uid", value_name = "USER")]
    allow_uids: Vec<Uid>,
    /// A group (name or gid) whose members (by primary group) may connect to device
    /// sockets. Repeat for more.
    #[arg(long = "allow-gid", value_name = "GROUP")]
    allow_gids: Vec<Gid>,
    /// A user who may connect to the frontend socket, besides root and the relay's own
    /// user. Repeat for more.
    #[arg(long = "frontend-allow-uid", value_name = "USER")]
    frontend_allow_uids: Vec<Uid>,
    /// A group whose members may connect to the frontend socket. Repeat for more.
    #[arg(long = "frontend-allow-gid", value_name = "GROUP")]
    frontend_allow_gids: Vec<Gid>,
    /// Poll mode: keep polling client sockets and the tunnel's queues for this many
    /// microseconds after the last message before sleeping (0: event mode). See
    /// docs/operating.md, "Poll mode".
    #[arg(long, value_name = "US", default_value_t = 0)]
    poll_us: u64,
    /// Run the switch threads (client sockets; in poll mode the tunnel's queues) on
    /// these CPUs (one switch thread per queue pair; thread K on the (K mod n)-th CPU
    /// listed), e.g. `1` or `2,3`.
    #[arg(long, value_name = "CPU[,CPU...]", value_delimiter = ',')]
    switch_cpu: Vec<usize>,
    /// Run the tunnel's queue worker threads on these CPUs (one worker per queue pair;
    /// pair P on the (P mod n)-th CPU listed), e.g. `1` or `2,3`.
    #[arg(long, value_name = "CPU[,CPU...]", value_delimiter = ',')]
    tunnel_cpu: Vec<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add, remove or list the devices of a running relay, through its control socket.
    Ctl(CtlArgs),
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// The relay's control socket [default: $VFU_RELAY_CONTROL_SOCKET].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Take the control socket from the relay's configuration file.
    #[arg(long, value_name = "FILE", conflicts_with = "control_socket")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Debug, Subcommand)]
enum CtlAction {
    /// Export a device: NAME as vfu-guest serves it, SOCKET where vfio-user clients
    /// connect (created by the relay). If a device VM is connected, it is asked to
    /// serve the device at once.
    Add {
        /// The device.
        #[arg(value_name = "NAME=SOCKET")]
        device: String,
        /// Mode of its socket, in octal [default: the relay's socket_mode].
        #[arg(long, value_name = "MODE")]
        socket_mode: Option<SocketMode>,
        /// Group of its socket [default: the relay's socket_group].
        #[arg(long, value_name = "GROUP")]
        socket_group: Option<Gid>,
        /// A user who may connect (repeat for more) [default: the relay's allow_uids].
        #[arg(long = "allow-uid", value_name = "USER")]
        allow_uids: Vec<Uid>,
        /// A group who may connect (repeat for more) [default: the relay's allow_gids].
        #[arg(long = "allow-gid", value_name = "GROUP")]
        allow_gids: Vec<Gid>,
    },
    /// Withdraw a device: its socket is removed, its client disconnected (requests in
    /// flight fail with ENODEV), the device VM told.
    Remove {
        /// The device's name.
        name: String,
    },
    /// List the devices: name, channel, client, whether the device VM serves it,
    /// requests, socket.
    List {
        /// Print the relay's reply as one line of JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Why `vfu-relay ctl` failed, as it prints it.
type CtlError = String;

impl CtlArgs {
    /// The control socket to use.
    fn socket(&self) -> Result<PathBuf, CtlError> {
        if let Some(p) = &self.control_socket {
            return Ok(p.clone());
        }
        if let Some(file) = &self.config {
            return Config::from_file(file)
                .map(|c| c.control_socket())
                .map_err(|e| e.to_string());
        }
        match std::env::var_os("VFU_RELAY_CONTROL_SOCKET") {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err("which relay? give --control-socket PATH (the relay's is its frontend socket path with .ctl appended unless configured), --config FILE, or set VFU_RELAY_CONTROL_SOCKET".into()),
        }
    }

    /// The request, with a relative socket path made absolute here: the relay's
    /// working directory is not ours.
    fn request(&self) -> Result<Request, CtlError> {
        Ok(match &self.action {
            CtlAction::Add {
                device,
                socket_mode,
                socket_group,
                allow_uids,
                allow_gids,
            } => {
                let (name, socket) = device
                    .split_once('=')
                    .ok_or_else(|| format!("add {device:?}: expected NAME=SOCKET"))?;
                let mut path = PathBuf::from(socket);
                if path.as_os_str().is_empty() {
                    return Err(format!("add {device:?}: empty socket path"));
                }
                if path.is_relative() {
                    let cwd =
                        std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
                    path = cwd.join(path);
                }
                let socket = path
                    .to_str()
                    .ok_or_else(|| format!("socket path {}: not UTF-8", path.display()))?
                    .to_string();
                Request::Add {
                    name: name.to_string(),
                    socket,
                    access: AccessSpec {
                        socket_mode: *socket_mode,
                        socket_group: *socket_group,
                        allow_uids: (!allow_uids.is_empty()).then(|| allow_uids.clone()),
                        allow_gids: (!allow_gids.is_empty()).then(|| allow_gids.clone()),
                    },
                }
            }
            CtlAction::Remove { name } => Request::Remove { name: name.clone() },
            CtlAction::List { .. } => Request::List,
        })
    }
}

/// Runs `vfu-relay ctl`: what it prints on success, or why it failed.
fn ctl(args: &CtlArgs) -> Result<String, CtlError> {
    let socket = args.socket()?;
    let request = args.request()?;
    let reply = client::request(&socket, &request).map_err(|e| e.to_string())?;
    let json = matches!(args.action, CtlAction::List { json: true });
    render(reply, json)
}

/// The reply as `vfu-relay ctl` prints it.
fn render(reply: Reply, json: bool) -> Result<String, CtlError> {
    match reply {
        Reply::Error { message, .. } => Err(message),
        r if json => Ok(String::from_utf8_lossy(r.encode().trim_ascii_end()).into_owned()),
        Reply::Added {
            name,
            socket,
            channel,
        } => Ok(format!(
            "added {name} (channel {channel}): clients connect to {socket}"
        )),
        Reply::Removed { name } => Ok(format!("removed {name}")),
        Reply::Devices { device_vm, devices } => {
            let mut rows = vec![[
                "NAME".to_string(),
                "CHANNEL".into(),
                "CLIENT".into(),
                "DEVICE VM".into(),
                "IN FLIGHT".into(),
                "REQUESTS".into(),
                "SOCKET".into(),
            ]];
            for d in &devices {
                rows.push([
                    d.name.clone(),
                    d.channel.to_string(),
                    if d.client { "yes" } else { "no" }.into(),
                    d.device_vm.as_str().into(),
                    d.in_flight.to_string(),
                    d.requests.to_string(),
                    d.socket.clone(),
                ]);
            }
            let mut widths = [0usize; 7];
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let mut out = format!(
                "device VM: {}\n",
                if device_vm {
                    "connected"
                } else {
                    "not connected"
                }
            );
            if devices.is_empty() {
                out.push_str("no devices");
                return Ok(out);
            }
            for row in &rows {
                let line: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .map(|(cell, w)| format!("{cell:w$}"))
                    .collect();
                out.push_str(line.join("  ").trim_end());
                out.push('\n');
            }
            out.pop();
            Ok(out)
        }
    }
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
            control_socket: args.control_socket,
            devices,
            request_timeout_ms: args.request_timeout_ms,
            queue_pairs: args.queue_pairs,
            shm_size_mib: args.shm_size_mib,
            unsealed_windows: args.unsealed_windows,
            any_memory_file: args.any_memory_file,
            unsealed_vmm_memory: args.unsealed_vmm_memory,
            user: args.user,
            group: args.group,
            socket_mode: args.socket_mode,
            socket_group: args.socket_group,
            allow_uids: args.allow_uids,
            allow_gids: args.allow_gids,
            frontend_socket_mode: None,
            frontend_socket_group: None,
            frontend_allow_uids: args.frontend_allow_uids,
            frontend_allow_gids: args.frontend_allow_gids,
            poll_us: args.poll_us,
            switch_cpu: args.switch_cpu,
            tunnel_cpu: args.tunnel_cpu,
            file: None,
        }
        .validate()
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Command::Ctl(ctl_args)) = args.command.take() {
        return match ctl(&ctl_args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vfu-relay ctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    vfu_proto::mem::keep_large_buffers_on_heap();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
        let c = parse(&["vfu-relay", "--frontend-socket", "/tmp/f"]).unwrap();
        assert!(c.devices.is_empty(), "devices can all come later");
        assert_eq!(c.control_socket(), PathBuf::from("/tmp/f.ctl"));
        assert!(
            !c.unsealed_vmm_memory,
            "the VMM's memory is checked by default"
        );
        let c = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/tmp/f",
            "--unsealed-vmm-memory",
        ])
        .unwrap();
        assert!(c.unsealed_vmm_memory);
        let c = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/tmp/f",
            "--control-socket",
            "/tmp/c",
        ])
        .unwrap();
        assert_eq!(c.control_socket(), PathBuf::from("/tmp/c"));
        assert!(parse(&["vfu-relay", "--config", "/x", "--control-socket", "/c"]).is_err());
        assert!(parse(&["vfu-relay", "--config", "/x", "--user", "root"]).is_err());
        assert!(parse(&["vfu-relay", "--config", "/x", "--device", "a=/tmp/a"]).is_err());
        // Every relay option belongs in the file with --config: given on the command
        // line as well, it is an error, not silently ignored.
        for option in [
            ["--request-timeout-ms", "5"],
            ["--queue-pairs", "2"],
            ["--shm-size-mib", "0"],
            ["--group", "0"],
            ["--tunnel-cpu", "0"],
        ] {
            let e = parse(&["vfu-relay", "--config", "/x", option[0], option[1]]).unwrap_err();
            assert!(e.contains("cannot be used with"), "{option:?}: {e}");
        }
        for flag in [
            "--unsealed-windows",
            "--any-memory-file",
            "--unsealed-vmm-memory",
        ] {
            let e = parse(&["vfu-relay", "--config", "/x", flag]).unwrap_err();
            assert!(e.contains("cannot be used with"), "{flag}: {e}");
        }
    }

    fn ctl_args(args: &[&str]) -> Result<CtlArgs, String> {
        let mut all = vec!["vfu-relay", "ctl"];
        all.extend_from_slice(args);
        match Args::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .command
        {
            Some(Command::Ctl(c)) => Ok(c),
            None => Err("no subcommand".into()),
        }
    }

    /// `vfu-relay ctl` parses into the request it sends, without a relay: a relative
    /// socket becomes absolute, a device without '=' or an action without its argument
    /// is an error, relay options do not mix with the subcommand.
    #[test]
    fn ctl_command_line() {
        let c = ctl_args(&["--control-socket", "/c", "add", "b=/tmp/b.sock"]).unwrap();
        assert_eq!(c.socket().unwrap(), PathBuf::from("/c"));
        assert_eq!(
            c.request().unwrap(),
            Request::Add {
                name: "b".into(),
                socket: "/tmp/b.sock".into(),
                access: AccessSpec::default(),
            }
        );
        let c = ctl_args(&[
            "--control-socket",
            "/c",
            "add",
            "b=/b",
            "--socket-mode",
            "0660",
            "--allow-uid",
            "root",
            "--allow-uid",
            "107",
        ])
        .unwrap();
        let Request::Add { access, .. } = c.request().unwrap() else {
            panic!("not an add");
        };
        assert_eq!(access.socket_mode.map(|m| m.bits()), Some(0o660));
        assert_eq!(access.allow_uids, Some(vec![Uid(0), Uid(107)]));
        assert_eq!(access.allow_gids, None, "left out: the relay's default");
        assert!(ctl_args(&[
            "--control-socket",
            "/c",
            "add",
            "b=/b",
            "--socket-mode",
            "999"
        ])
        .is_err());
        let c = ctl_args(&["--control-socket", "/c", "add", "b=rel.sock"]).unwrap();
        let Request::Add { socket, .. } = c.request().unwrap() else {
            panic!("not an add");
        };
        assert!(socket.starts_with('/') && socket.ends_with("/rel.sock"));
        let c = ctl_args(&["--control-socket", "/c", "add", "b"]).unwrap();
        assert!(c.request().unwrap_err().contains("NAME=SOCKET"));
        let c = ctl_args(&["--control-socket", "/c", "remove", "b"]).unwrap();
        assert_eq!(c.request().unwrap(), Request::Remove { name: "b".into() });
        let c = ctl_args(&["--control-socket", "/c", "list", "--json"]).unwrap();
        assert!(matches!(c.action, CtlAction::List { json: true }));
        assert!(ctl_args(&["--control-socket", "/c"]).is_err());
        assert!(ctl_args(&["--control-socket", "/c", "remove"]).is_err());
        assert!(ctl_args(&["--control-socket", "/c", "--config", "/f", "list"]).is_err());
        assert!(
            Args::try_parse_from(["vfu-relay", "--frontend-socket", "/f", "ctl", "list"]).is_err()
        );
    }

    /// Replies print as one line per fact, a table for list, the relay's JSON line
    /// with --json, and an error reply becomes the failure message.
    #[test]
    fn ctl_output() {
        use vfu_relay::control::{CommandError, DeviceInfo, Served};
        let list = Reply::Devices {
            device_vm: true,
            devices: vec![DeviceInfo {
                name: "gpio0".into(),
                socket: "/run/g.sock".into(),
                channel: 1,
                client: true,
                device_vm: Served::Served,
                in_flight: 0,
                requests: 42,
                connections: 1,
                access: None,
            }],
        };
        let text = render(list.clone(), false).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "device VM: connected");
        assert!(lines[1].starts_with("NAME ") && lines[1].ends_with("SOCKET"));
        assert!(
            lines[2].starts_with("gpio0 ")
                && lines[2].contains(" served ")
                && lines[2].contains(" 42 ")
        );
        let json = render(list.clone(), true).unwrap();
        assert_eq!(Reply::decode(json.as_bytes()).unwrap(), list);
        let empty = Reply::Devices {
            device_vm: false,
            devices: vec![],
        };
        assert_eq!(
            render(empty, false).unwrap(),
            "device VM: not connected\nno devices"
        );
        let err = Reply::from(CommandError::UnknownDevice { name: "x".into() });
        assert_eq!(render(err, false).unwrap_err(), "no device named \"x\"");
    }

    /// Who may connect and whom to drop to, from the command line: defaults, names and
    /// numbers, and clear errors for an unknown user or group, a bad mode, or --group
    /// without --user.
    #[test]
    fn access_options() {
        let c = parse(&["vfu-relay", "--frontend-socket", "/tmp/f"]).unwrap();
        assert_eq!(c.socket_mode.bits(), 0o600);
        assert!(c.user.is_none() && c.allow_uids.is_empty());
        let c = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/tmp/f",
            "--user",
            "root",
            "--group",
            "0",
            "--socket-mode",
            "0660",
            "--socket-group",
            "root",
            "--allow-uid",
            "107",
            "--allow-gid",
            "root",
            "--frontend-allow-uid",
            "64055",
        ])
        .unwrap();
        assert_eq!(c.privileges(), Some((0, 0)));
        assert_eq!(c.socket_mode.bits(), 0o660);
        assert_eq!(c.socket_group, Some(Gid(0)));
        assert_eq!(c.allow_uids, vec![Uid(107)]);
        assert_eq!(c.allow_gids, vec![Gid(0)]);
        assert_eq!(c.frontend_access().allow_uids, vec![Uid(64055)]);
        assert_eq!(c.frontend_access().mode.bits(), 0o660);
        let e = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/f",
            "--user",
            "no-such-user-vfu",
        ])
        .unwrap_err();
        assert!(e.contains("unknown user"), "{e}");
        let e = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/f",
            "--allow-gid",
            "no-such-group-vfu",
        ])
        .unwrap_err();
        assert!(e.contains("unknown group"), "{e}");
        let e = parse(&[
            "vfu-relay",
            "--frontend-socket",
            "/f",
            "--socket-mode",
            "0778",
        ])
        .unwrap_err();
        assert!(e.contains("socket mode"), "{e}");
        assert!(parse(&["vfu-relay", "--frontend-socket", "/f", "--group", "root"]).is_err());
    }
}
