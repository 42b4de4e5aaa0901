//! Relay configuration: from the command line or a TOML file, validated once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// Longest device name (the tunnel's channel name limit).
pub const MAX_NAME: usize = vfu_proto::tunnel::MAX_CHANNEL_NAME;

/// One exported device: the name the device VM serves it under, and the socket where
/// vfio-user clients connect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Device name, matched against what vfu-guest serves (`--serve NAME=MODEL`).
    pub name: String,
    /// Path of the vfio-user socket the relay listens on.
    pub socket: PathBuf,
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
        })
    }
}

/// The relay's configuration, valid by construction (see [`Config::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the device VM's VMM (the vhost-user frontend) connects.
    pub frontend_socket: PathBuf,
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
}

fn default_timeout_ms() -> u64 {
    3000
}

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
    /// request_timeout_ms = 3000   # optional
    /// [[device]]
    /// name = "gpio0"
    /// socket = "/run/vfu-relay/gpio0.sock"
    /// ```
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.validate()
    }

    /// Checks names (non-empty, at most 64 bytes, no NUL, no '=' , unique), sockets
    /// (non-empty, distinct, not the frontend socket) and the numbers.
    pub fn validate(self) -> Result<Self, Error> {
        if self.frontend_socket.as_os_str().is_empty() {
            return Err(Error::Config("frontend socket path is empty".into()));
        }
        if self.devices.is_empty() {
            return Err(Error::Config(
                "no device configured: give at least one --device NAME=SOCKET".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        sockets.insert(self.frontend_socket.clone());
        for d in &self.devices {
            if d.name.is_empty() || d.name.len() > MAX_NAME || d.name.contains(['\0', '=']) {
                return Err(Error::Config(format!(
                    "device name {:?}: must be 1 to {MAX_NAME} bytes without NUL or '='",
                    d.name
                )));
            }
            if !names.insert(d.name.clone()) {
                return Err(Error::Config(format!(
                    "device name {:?} used twice",
                    d.name
                )));
            }
            if d.socket.as_os_str().is_empty() {
                return Err(Error::Config(format!(
                    "device {:?}: empty socket path",
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
        if self.queue_pairs == 0 || self.queue_pairs > 64 {
            return Err(Error::Config(format!(
                "queue pairs {}: must be 1 to 64",
                self.queue_pairs
            )));
        }
        Ok(self)
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            frontend_socket: "/tmp/f.sock".into(),
            devices: vec![DeviceConfig::parse("gpio0=/tmp/g.sock").unwrap()],
            request_timeout_ms: 3000,
            queue_pairs: 1,
            shm_size_mib: default_shm_size_mib(),
            unsealed_windows: false,
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

    /// Duplicate names or sockets, empty names, the frontend socket reused, no devices
    /// and out-of-range numbers are rejected.
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
        c.devices.clear();
        assert!(c.validate().is_err());
        let mut c = base();
        c.request_timeout_ms = 0;
        assert!(c.validate().is_err());
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
        assert_eq!(Config::from_file(&p).unwrap(), base());
        std::fs::write(
            &p,
            "frontend_socket = \"/tmp/f.sock\"\nunsealed_windows = true\n[[device]]\nname = \"gpio0\"\nsocket = \"/tmp/g.sock\"\n",
        )
        .unwrap();
        assert!(Config::from_file(&p).unwrap().unsealed_windows);
        std::fs::write(&p, "frontend_socket = \"/tmp/f.sock\"\nbogus = 1\n").unwrap();
        assert!(Config::from_file(&p).is_err());
        assert!(Config::from_file(&dir.join("missing.toml")).is_err());
    }
}
