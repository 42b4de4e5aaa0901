//! SIGHUP: the configuration file is read again and the difference in devices is
//! applied as `remove` and `add` requests on the control socket, like `vfu-relay ctl`
//! would. Devices that did not change are not touched; other settings need a restart.

use std::path::{Path, PathBuf};

use log::{info, warn};

use super::client;
use super::protocol::{DeviceInfo, Reply, Request};
use crate::config::{Config, DeviceConfig};

/// The requests that turn the exported devices `current` into those of `wanted`:
/// removals first (a device whose socket changed is removed and added again), then
/// additions in the order of the file. Relative socket paths are taken relative to
/// `cwd` on both sides.
pub fn plan(current: &[DeviceInfo], wanted: &[DeviceConfig], cwd: &Path) -> Vec<Request> {
    let abs = |p: &Path| -> PathBuf { cwd.join(p) };
    let wanted: Vec<(&str, PathBuf)> = wanted
        .iter()
        .map(|d| (d.name.as_str(), abs(&d.socket)))
        .collect();
    let kept = |d: &DeviceInfo| {
        wanted
            .iter()
            .any(|(n, s)| *n == d.name && *s == abs(Path::new(&d.socket)))
    };
    let mut requests: Vec<Request> = current
        .iter()
        .filter(|d| !kept(d))
        .map(|d| Request::Remove {
            name: d.name.clone(),
        })
        .collect();
    for (name, socket) in &wanted {
        let exists = current
            .iter()
            .any(|d| d.name == *name && abs(Path::new(&d.socket)) == *socket);
        if !exists {
            requests.push(Request::Add {
                name: name.to_string(),
                socket: socket.display().to_string(),
            });
        }
    }
    requests
}

/// Reads `file` again and applies its devices through the control socket of the
/// running relay, whose configuration is `running`. Everything is logged; nothing
/// stops the relay.
pub fn reload(running: &Config, file: &Path) {
    info!("SIGHUP: reading {} again", file.display());
    let new = match Config::from_file(file) {
        Ok(c) => c,
        Err(e) => {
            warn!("SIGHUP: {e}; nothing changed");
            return;
        }
    };
    let unchanged_devices = Config {
        devices: running.devices.clone(),
        ..new.clone()
    };
    if unchanged_devices != *running {
        warn!("SIGHUP: settings other than devices changed; they take effect at the next start");
    }
    let control = running.control_socket();
    let current = match client::request(&control, &Request::List) {
        Ok(Reply::Devices { devices, .. }) => devices,
        Ok(other) => {
            warn!("SIGHUP: unexpected answer to list: {other:?}");
            return;
        }
        Err(e) => {
            warn!("SIGHUP: {e}");
            return;
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let requests = plan(&current, &new.devices, &cwd);
    if requests.is_empty() {
        info!("SIGHUP: devices unchanged");
    }
    for r in requests {
        match client::request(&control, &r) {
            Ok(Reply::Error { message, .. }) => warn!("SIGHUP: {r:?}: {message}"),
            Ok(_) => {}
            Err(e) => warn!("SIGHUP: {r:?}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Served;

    fn info(name: &str, socket: &str) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            socket: socket.into(),
            channel: 1,
            client: false,
            device_vm: Served::Unknown,
            in_flight: 0,
            requests: 0,
            connections: 0,
        }
    }

    fn dev(name: &str, socket: &str) -> DeviceConfig {
        DeviceConfig {
            name: name.into(),
            socket: socket.into(),
        }
    }

    /// Unchanged devices are left alone, gone ones removed, new ones added, one whose
    /// socket moved is removed and added again; relative paths compare as absolute.
    #[test]
    fn plan_applies_the_difference_only() {
        let current = [
            info("a", "/r/a.sock"),
            info("b", "/r/b.sock"),
            info("c", "c.sock"),
        ];
        let wanted = [
            dev("a", "/r/a.sock"),
            dev("c", "/r/c.sock"),
            dev("b", "/r/b2.sock"),
            dev("d", "d.sock"),
        ];
        let cwd = Path::new("/r");
        assert_eq!(
            plan(&current, &wanted, cwd),
            vec![
                Request::Remove { name: "b".into() },
                Request::Add {
                    name: "b".into(),
                    socket: "/r/b2.sock".into()
                },
                Request::Add {
                    name: "d".into(),
                    socket: "/r/d.sock".into()
                },
            ]
        );
        assert!(plan(&current, &[], cwd).len() == 3);
        assert!(plan(&[], &[], cwd).is_empty());
    }
}
