//! Relay configuration: from the command line or a TOML file, validated once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::warn;
use serde::Deserialize;

use crate::access::{Access, AccessSpec, Gid, SocketMode, Uid, User};
use crate::sockets::Perms;
use crate::Error;

/// Longest device name (the tunnel's channel name limit).
pub const MAX_NAME: usize = vfu_proto::tunnel::MAX_CHANNEL_NAME;

/// Most devices one relay exports at a time, from the configuration and added at run
/// time together. Each costs a listening socket, a client connection with its DMA and
/// interrupt fds, and up to 8 MiB of messages queued toward the device VM plus 16 MiB
/// of replies queued toward its client under load.
pub const MAX_DEVICES: usize = 256;

/// One exported device: the name the device VM serves it under, the socket where
/// vfio-user clients connect, and who may connect to it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "RawDevice")]
pub struct DeviceConfig {
    /// Device name, matched against what vfu-guest serves (`--serve NAME=MODEL`).
    pub name: String,
    /// Path of the vfio-user socket the relay listens on.
    pub socket: PathBuf,
    /// This device's overrides of the relay's socket defaults (`socket_mode`,
    /// `socket_group`, `allow_uids`, `allow_gids`).
    pub access: AccessSpec,
}

/// A `[[device]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: String,
    socket: PathBuf,
    #[serde(default)]
    socket_mode: Option<SocketMode>,
    #[serde(default)]
    socket_group: Option<Gid>,
    #[serde(default)]
    allow_uids: Option<Vec<Uid>>,
    #[serde(default)]
    allow_gids: Option<Vec<Gid>>,
}

impl From<RawDevice> for DeviceConfig {
    fn from(d: RawDevice) -> Self {
        Self {
            name: d.name,
            socket: d.socket,
            access: AccessSpec {
                socket_mode: d.socket_mode,
                socket_group: d.socket_group,
                allow_uids: d.allow_uids,
                allow_gids: d.allow_gids,
            },
        }
    }
}

impl DeviceConfig {
    /// Parses `NAME=SOCKET`.
    pub fn parse(arg: &str) -> Result<Self, Error> {
        let (name, socket) = arg
            .split_once('=')
            .ok_or_else(|| Error::Config(format!("--device {arg:?}: expected NAME=SOCKET")))?;
        Ok(Self {
            name: name.to_string(),
            socket: PathBuf::from(socket),
            access: AccessSpec::default(),
        })
    }

    /// Checks the device on its own: a name of 1 to [`MAX_NAME`] bytes without NUL or
    /// '=', a socket path that is not empty. Says what is wrong otherwise.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > MAX_NAME || self.name.contains(['\0', '=']) {
            return Err(format!(
                "device name {:?}: must be 1 to {MAX_NAME} bytes without NUL or '='",
                self.name
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(format!("device {:?}: empty socket path", self.name));
        }
        Ok(())
    }
}

/// The relay's configuration, valid by construction (see [`Config::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the device VM's VMM (the vhost-user frontend) connects.
    pub frontend_socket: PathBuf,
    /// The control socket (`vfu-relay ctl`); by default the frontend socket's path
    /// with `.ctl` appended (see [`Config::control_socket`]).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Exported devices.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// How long a client request may wait for the device VM before the relay answers
    /// ETIMEDOUT (QEMU's own timeout is 5 s).
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Queue pairs offered to the device VM.
    #[serde(default = "default_queue_pairs")]
    pub queue_pairs: u16,
    /// Size of the tunnel device's shared memory region for DMA windows, in MiB; 0
    /// turns windows off (every DMA goes through the copy path).
    #[serde(default = "default_shm_size_mib")]
    pub shm_size_mib: u64,
    /// Give windows onto client memory that can shrink too (anything but a memfd
    /// sealed with `F_SEAL_SHRINK`). Such a client can make the device VM fault on its
    /// window by truncating the file, so this is for trusted clients only; by default
    /// that memory goes through the copy path.
    #[serde(default)]
    pub unsealed_windows: bool,
    /// Accept DMA_MAP memory files of any file system, not only tmpfs and hugetlbfs
    /// (memfds, `/dev/shm`, `/dev/hugepages`). A file on FUSE or a network mount can
    /// make the copy path's pread/pwrite, which runs on the thread every device shares,
    /// wait as long as its client likes, so this is for trusted clients only.
    #[serde(default)]
    pub any_memory_file: bool,
    /// Map the device VM's guest memory even when a region's file can shrink (anything
    /// but a memfd sealed with `F_SEAL_SHRINK`, e.g. QEMU's `memory-backend-file` on
    /// hugetlbfs or `/dev/shm`, Cloud Hypervisor's `shared=on` memory). Its VMM could
    /// then make the relay die of SIGBUS by truncating the file, so this trusts the
    /// device VM's VMM; by default such a VMM is refused.
    #[serde(default)]
    pub unsealed_vmm_memory: bool,
    /// Drop to this user once the sockets exist (`docs/security.md`).
    #[serde(default)]
    pub user: Option<User>,
    /// And to this group (default: the user's primary group). Only with `user`.
    #[serde(default)]
    pub group: Option<Gid>,
    /// Mode of the device sockets and the frontend socket (default 0600).
    #[serde(default)]
    pub socket_mode: SocketMode,
    /// Group of the device sockets and the frontend socket (default: the relay's).
    #[serde(default)]
    pub socket_group: Option<Gid>,
    /// Users who may connect to device sockets besides root and the relay's own user
    /// (a device's own `allow_uids` replaces this list).
    #[serde(default)]
    pub allow_uids: Vec<Uid>,
    /// Primary groups whose members may connect to device sockets.
    #[serde(default)]
    pub allow_gids: Vec<Gid>,
    /// Mode of the frontend socket (default: `socket_mode`).
    #[serde(default)]
    pub frontend_socket_mode: Option<SocketMode>,
    /// Group of the frontend socket (default: `socket_group`).
    #[serde(default)]
    pub frontend_socket_group: Option<Gid>,
    /// Users who may connect to the frontend socket besides root and the relay's own.
    #[serde(default)]
    pub frontend_allow_uids: Vec<Uid>,
    /// Primary groups whose members may connect to the frontend socket.
    #[serde(default)]
    pub frontend_allow_gids: Vec<Gid>,
    /// Poll mode: microseconds the switch thread keeps polling client sockets and the
    /// tunnel's queues (with the device VM's notifications off) after the last message,
    /// before it turns notifications back on and sleeps. 0, the default, is event mode:
    /// it sleeps whenever there is nothing to do.
    #[serde(default)]
    pub poll_us: u64,
    /// CPUs of the switch threads (client sockets; in poll mode the tunnel's queues
    /// too), one per queue pair: switch thread K runs on the (K mod n)-th CPU listed.
    /// One CPU or a list in the file; empty: anywhere.
    #[serde(default, deserialize_with = "one_or_many")]
    pub switch_cpu: Vec<usize>,
    /// CPUs of the tunnel's queue worker threads (device-VM notifications), one per
    /// queue pair: pair P's worker runs on the (P mod n)-th CPU listed. One CPU or a
    /// list in the file; empty: anywhere.
    #[serde(default, deserialize_with = "one_or_many")]
    pub tunnel_cpu: Vec<usize>,
    /// The file this configuration was read from, if any: SIGHUP reads it again.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Default for Config {
    /// No frontend socket (not valid as it is), no devices, every other setting at its
    /// default.
    fn default() -> Self {
        Self {
            frontend_socket: PathBuf::new(),
            control_socket: None,
            devices: Vec::new(),
            request_timeout_ms: default_timeout_ms(),
            queue_pairs: default_queue_pairs(),
            shm_size_mib: default_shm_size_mib(),
            unsealed_windows: false,
            any_memory_file: false,
            unsealed_vmm_memory: false,
            user: None,
            group: None,
            socket_mode: SocketMode::default(),
            socket_group: None,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            frontend_socket_mode: None,
            frontend_socket_group: None,
            frontend_allow_uids: Vec::new(),
            frontend_allow_gids: Vec::new(),
            poll_us: 0,
            switch_cpu: Vec::new(),
            tunnel_cpu: Vec::new(),
            file: None,
        }
    }
}

/// Longest poll period: 10 s (polling longer than that is polling for ever, which a
/// CPU-bound deployment should say with a large value, not rely on).
pub const MAX_POLL_US: u64 = 10_000_000;

fn default_timeout_ms() -> u64 {
    3000
}

/// A number or a list of numbers (`tunnel_cpu = 1` or `tunnel_cpu = [0, 1]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(n) => vec![n],
        OneOrMany::Many(v) => v,
    })
}

/// Most queue pairs the relay offers: vhost-user-backend gives each worker thread its
/// queues as a 64-bit mask, and each pair has its own thread.
pub const MAX_QUEUE_PAIRS: u16 = 32;

fn default_queue_pairs() -> u16 {
    1
}

fn default_shm_size_mib() -> u64 {
    16 << 10
}

impl Config {
    /// Reads a TOML file:
    ///
    /// ```toml
    /// frontend_socket = "/run/vfu-relay/frontend.sock"
    /// control_socket = "/run/vfu-relay/control.sock"  # optional
    /// request_timeout_ms = 3000   # optional
    /// [[device]]
    /// name = "gpio0"
    /// socket = "/run/vfu-relay/gpio0.sock"
    /// ```
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.file = Some(path.to_path_buf());
        config.validate()
    }

    /// Checks names (non-empty, at most 64 bytes, no NUL, no '=' , unique), sockets
    /// (non-empty, distinct, not the frontend or control socket), the number of devices
    /// (none is fine: they can be added at run time) and the numbers.
    pub fn validate(self) -> Result<Self, Error> {
        if self.frontend_socket.as_os_str().is_empty() {
            return Err(Error::Config("frontend socket path is empty".into()));
        }
        let control = self.control_socket();
        if control.as_os_str().is_empty() || control == self.frontend_socket {
            return Err(Error::Config(format!(
                "control socket {:?}: must be a path of its own",
                control.display()
            )));
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(Error::Config(format!(
                "{} devices configured: at most {MAX_DEVICES}",
                self.devices.len()
            )));
        }
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        sockets.insert(self.frontend_socket.clone());
        sockets.insert(control);
        for d in &self.devices {
            d.check().map_err(Error::Config)?;
            if !names.insert(d.name.clone()) {
                return Err(Error::Config(format!(
                    "device name {:?} used twice",
                    d.name
                )));
            }
            if !sockets.insert(d.socket.clone()) {
                return Err(Error::Config(format!(
                    "socket {} used twice",
                    d.socket.display()
                )));
            }
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > 60_000 {
            return Err(Error::Config(format!(
                "request timeout {} ms: must be 1 to 60000",
                self.request_timeout_ms
            )));
        }
        if self.shm_size_mib > 1 << 30 {
            return Err(Error::Config(format!(
                "shared memory of {} MiB is beyond 1 PiB",
                self.shm_size_mib
            )));
        }
        if self.poll_us > MAX_POLL_US {
            return Err(Error::Config(format!(
                "poll_us {}: must be 0 (event mode) to {MAX_POLL_US}",
                self.poll_us
            )));
        }
        let cpus = vfu_proto::poll::configured_cpus();
        let named = self
            .switch_cpu
            .iter()
            .map(|&c| ("switch_cpu", c))
            .chain(self.tunnel_cpu.iter().map(|&c| ("tunnel_cpu", c)));
        for (what, cpu) in named {
            if cpu >= cpus {
                return Err(Error::Config(format!(
                    "{what} {cpu}: this machine has CPUs 0 to {}",
                    cpus - 1
                )));
            }
        }
        // One queue worker thread per pair, named by a 64-bit mask of its two queues.
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(Error::Config(format!(
                "queue pairs {}: must be 1 to {MAX_QUEUE_PAIRS}",
                self.queue_pairs
            )));
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(Error::Config(
                "group is set without user: give the user to drop privileges to".into(),
            ));
        }
        if let Some(user) = &self.user {
            if self.group.is_none() && user.primary_gid.is_none() {
                return Err(Error::Config(format!(
                    "user {:?} has no entry in the user database, so no primary group: give group too",
                    user.name
                )));
            }
        }
        let frontend = self.frontend_access();
        if frontend.mode.bits() & 0o002 != 0 {
            warn!(
                "the frontend socket has mode {}: any local user may connect; only the allow-list refuses them",
                frontend.mode
            );
        }
        for d in &self.devices {
            let mode = self.device_access(d).mode;
            if mode.bits() & 0o002 != 0 {
                warn!(
                    "{}: socket mode {mode}: any local user may connect; only the allow-list refuses them",
                    d.name
                );
            }
        }
        Ok(self)
    }

    /// The uid and gid the relay drops to after creating its sockets, if any.
    pub fn privileges(&self) -> Option<(u32, u32)> {
        let user = self.user.as_ref()?;
        let gid = self.group.or(user.primary_gid)?;
        Some((user.uid.0, gid.0))
    }

    /// Access of a device that overrides nothing: the top-level keys.
    pub fn device_defaults(&self) -> Access {
        Access {
            mode: self.socket_mode,
            group: self.socket_group,
            allow_uids: self.allow_uids.clone(),
            allow_gids: self.allow_gids.clone(),
        }
    }

    /// Access of device `d`: its own keys over the top-level ones.
    pub fn device_access(&self, d: &DeviceConfig) -> Access {
        d.access.over(&self.device_defaults())
    }

    /// Access of the frontend socket.
    pub fn frontend_access(&self) -> Access {
        Access {
            mode: self.frontend_socket_mode.unwrap_or(self.socket_mode),
            group: self.frontend_socket_group.or(self.socket_group),
            allow_uids: self.frontend_allow_uids.clone(),
            allow_gids: self.frontend_allow_gids.clone(),
        }
    }

    /// How a socket of `access` is made: its mode; owned by the user and group the
    /// relay drops to, if it does (as the sockets it makes afterwards are), and of the
    /// access's group if it has one.
    pub fn perms(&self, access: &Access) -> Perms {
        let drop = self.privileges();
        Perms {
            mode: access.mode.bits(),
            owner: drop.map(|(uid, _)| uid),
            group: access.group.map(|g| g.0).or(drop.map(|(_, gid)| gid)),
        }
    }

    /// How the control socket is made: mode 0600, owned by the relay's user and group
    /// (after dropping privileges, too). Only root and that user may connect.
    pub fn control_perms(&self) -> Perms {
        self.perms(&Access::default())
    }

    /// How long the switch polls after the last message (zero: event mode).
    pub fn poll(&self) -> Duration {
        Duration::from_micros(self.poll_us)
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Where the control socket is: as configured, else next to the frontend socket
    /// (its path with `.ctl` appended).
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| default_control_socket(&self.frontend_socket))
    }
}

/// The control socket of a relay whose frontend socket is `frontend`: `frontend.ctl`.
pub fn default_control_socket(frontend: &Path) -> PathBuf {
    let mut path = frontend.as_os_str().to_os_string();
    path.push(".ctl");
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            frontend_socket: "/tmp/f.sock".into(),
            control_socket: None,
            devices: vec![DeviceConfig::parse("gpio0=/tmp/g.sock").unwrap()],
            request_timeout_ms: 3000,
            queue_pairs: 1,
            ..Config::default()
        }
    }

    /// NAME=SOCKET parses; a missing '=' is a clear error.
    #[test]
    fn parses_device_arguments() {
        let d = DeviceConfig::parse("gpio0=/run/x.sock").unwrap();
        assert_eq!(d.name, "gpio0");
        assert_eq!(d.socket, PathBuf::from("/run/x.sock"));
        let e = DeviceConfig::parse("gpio0").unwrap_err();
        assert!(e.to_string().contains("NAME=SOCKET"));
    }

    /// Duplicate names or sockets, empty names, the frontend or control socket reused,
    /// more than MAX_DEVICES devices and out-of-range numbers are rejected; no device
    /// at all is fine (devices can be added at run time).
    #[test]
    fn validation() {
        assert!(base().validate().is_ok());
        let mut c = base();
        c.devices
            .push(DeviceConfig::parse("gpio0=/tmp/h.sock").unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("used twice"));
        let mut c = base();
        c.devices
            .push(DeviceConfig::parse("other=/tmp/g.sock").unwrap());
        assert!(c.validate().is_err());
        let mut c = base();
        c.devices[0].socket = "/tmp/f.sock".into();
        assert!(c.validate().is_err());
        let mut c = base();
        c.devices[0].name = String::new();
        assert!(c.validate().is_err());
        let mut c = base();
        c.devices[0].name = "x".repeat(65);
        assert!(c.validate().is_err());
        let mut c = base();
        c.devices[0].name = "a=b".into();
        assert!(c.validate().is_err());
        let mut c = base();
        c.devices.clear();
        assert!(c.validate().is_ok());
        let mut c = base();
        c.devices = (0..=MAX_DEVICES)
            .map(|i| DeviceConfig::parse(&format!("d{i}=/tmp/d{i}.sock")).unwrap())
            .collect();
        assert!(c.validate().unwrap_err().to_string().contains("at most"));
        let mut c = base();
        c.devices[0].socket = "/tmp/f.sock.ctl".into();
        assert!(c.validate().is_err(), "the default control socket is taken");
        let mut c = base();
        c.control_socket = Some("/tmp/f.sock".into());
        assert!(c.validate().is_err());
        let mut c = base();
        c.request_timeout_ms = 0;
        assert!(c.validate().is_err());
        let mut c = base();
        c.queue_pairs = MAX_QUEUE_PAIRS;
        assert!(c.validate().is_ok());
        let mut c = base();
        c.queue_pairs = MAX_QUEUE_PAIRS + 1;
        assert!(c.validate().unwrap_err().to_string().contains("1 to 32"));
        let mut c = base();
        c.tunnel_cpu = vec![0, 9999];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tunnel_cpu 9999"));
    }

    /// `tunnel_cpu` is one CPU or a list, in the file as on the command line.
    #[test]
    fn tunnel_cpu_one_or_a_list() {
        let head = "frontend_socket = \"/tmp/f.sock\"\n";
        let one: Config = toml::from_str(&format!("{head}tunnel_cpu = 1\n")).unwrap();
        assert_eq!(one.tunnel_cpu, vec![1]);
        let list: Config = toml::from_str(&format!("{head}tunnel_cpu = [0, 1]\n")).unwrap();
        assert_eq!(list.tunnel_cpu, vec![0, 1]);
        let none: Config = toml::from_str(head).unwrap();
        assert!(none.tunnel_cpu.is_empty());
        assert!(toml::from_str::<Config>(&format!("{head}tunnel_cpu = \"x\"\n")).is_err());
    }

    /// The control socket defaults to the frontend socket's path plus `.ctl`.
    #[test]
    fn control_socket_default() {
        assert_eq!(base().control_socket(), PathBuf::from("/tmp/f.sock.ctl"));
        let mut c = base();
        c.control_socket = Some("/run/x".into());
        assert_eq!(c.control_socket(), PathBuf::from("/run/x"));
    }

    /// The TOML form gives the same configuration; unknown keys are errors.
    #[test]
    fn toml_file() {
        let dir = std::env::temp_dir().join(format!("vfu-relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("relay.toml");
        std::fs::write(
            &p,
            "frontend_socket = \"/tmp/f.sock\"\n[[device]]\nname = \"gpio0\"\nsocket = \"/tmp/g.sock\"\n",
        )
        .unwrap();
        let expected = Config {
            file: Some(p.clone()),
            ..base()
        };
        assert_eq!(Config::from_file(&p).unwrap(), expected);
        std::fs::write(
            &p,
            "frontend_socket = \"/tmp/f.sock\"\ncontrol_socket = \"/tmp/c\"\nunsealed_windows = true\nunsealed_vmm_memory = true\n[[device]]\nname = \"gpio0\"\nsocket = \"/tmp/g.sock\"\n",
        )
        .unwrap();
        let c = Config::from_file(&p).unwrap();
        assert!(c.unsealed_windows);
        assert!(c.unsealed_vmm_memory);
        assert!(!base().unsealed_vmm_memory, "off by default");
        assert_eq!(c.control_socket(), PathBuf::from("/tmp/c"));
        std::fs::write(&p, "frontend_socket = \"/tmp/f.sock\"\nbogus = 1\n").unwrap();
        assert!(Config::from_file(&p).is_err());
        assert!(Config::from_file(&dir.join("missing.toml")).is_err());
    }

    /// Who may connect: the defaults are mode 0600, no group, nobody but root and the
    /// relay's user; top-level keys set the device defaults, a device's own keys
    /// replace them for that device, the frontend has keys of its own and takes the
    /// mode and group of the devices unless set.
    #[test]
    fn access_keys() {
        let c = base().validate().unwrap();
        let d = c.device_access(&c.devices[0]);
        assert_eq!(d, Access::default());
        assert_eq!(d.mode.bits(), 0o600);
        assert_eq!(c.frontend_access(), Access::default());
        assert_eq!(c.privileges(), None);
        assert_eq!(c.control_perms(), Perms::PRIVATE);

        let p = toml_config(
            "access",
            r#"
frontend_socket = "/tmp/f.sock"
socket_mode = "0660"
socket_group = "root"
allow_uids = [107, "root"]
allow_gids = [36]
frontend_allow_uids = [64055]
[[device]]
name = "a"
socket = "/tmp/a.sock"
[[device]]
name = "b"
socket = "/tmp/b.sock"
socket_mode = 0o600
allow_uids = [1001]
allow_gids = []
"#,
        );
        let c = Config::from_file(&p).unwrap();
        let a = c.device_access(&c.devices[0]);
        assert_eq!(a.mode.bits(), 0o660);
        assert_eq!(a.group, Some(Gid(0)));
        assert_eq!(a.allow_uids, vec![Uid(107), Uid(0)]);
        assert_eq!(a.allow_gids, vec![Gid(36)]);
        let b = c.device_access(&c.devices[1]);
        assert_eq!(b.mode.bits(), 0o600);
        assert_eq!(b.group, Some(Gid(0)), "the group is not overridden");
        assert_eq!(b.allow_uids, vec![Uid(1001)]);
        assert!(b.allow_gids.is_empty());
        let f = c.frontend_access();
        assert_eq!(f.mode.bits(), 0o660);
        assert_eq!(f.allow_uids, vec![Uid(64055)]);
        assert!(f.allow_gids.is_empty());
    }

    /// `user` and `group` resolve names; a group alone, an unknown user or group, a
    /// bad mode or an unknown device key are errors that say which.
    #[test]
    fn privilege_and_access_errors() {
        let err = |tag: &str, body: &str| {
            let p = toml_config(tag, &format!("frontend_socket = \"/tmp/f.sock\"\n{body}"));
            Config::from_file(&p).unwrap_err().to_string()
        };
        let p = toml_config(
            "user",
            "frontend_socket = \"/tmp/f.sock\"\nuser = \"root\"\n",
        );
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.privileges(), Some((0, 0)));
        assert_eq!(
            c.control_perms(),
            Perms {
                mode: 0o600,
                owner: Some(0),
                group: Some(0)
            }
        );
        let p = toml_config(
            "user-group",
            "frontend_socket = \"/tmp/f.sock\"\nuser = 4000000000\ngroup = 4000000001\n",
        );
        assert_eq!(
            Config::from_file(&p).unwrap().privileges(),
            Some((4_000_000_000, 4_000_000_001))
        );
        assert!(err("nogroup", "user = 4000000000\n").contains("give group too"));
        assert!(err("grouponly", "group = \"root\"\n").contains("without user"));
        assert!(err("baduser", "user = \"no-such-user-vfu\"\n")
            .contains("unknown user \"no-such-user-vfu\""));
        assert!(err("badgroup", "socket_group = \"no-such-group-vfu\"\n").contains("unknown group"));
        assert!(err("badmode", "socket_mode = \"0999\"\n").contains("socket mode"));
        assert!(err("bigmode", "socket_mode = 0o4777\n").contains("socket mode"));
        assert!(err("decimal", "socket_mode = 660\n").contains("socket mode"));
        assert!(err("baduid", "allow_uids = [-1]\n").contains("-1"));
        assert!(err(
            "devkey",
            "[[device]]\nname = \"a\"\nsocket = \"/tmp/a\"\nallow_users = [1]\n"
        )
        .contains("allow_users"));
    }

    fn toml_config(tag: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfu-relay-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("relay.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
}
