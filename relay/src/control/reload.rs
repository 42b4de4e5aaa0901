//! SIGHUP: the configuration file is read again and the difference in devices is
//! applied as `remove` and `add` requests on the control socket, like `vfu-relay ctl`
//! would. Devices that did not change are not touched; other settings need a restart.

use std::path::{Path, PathBuf};

use log::{info, warn};

use super::client;
use super::protocol::{DeviceInfo, Reply, Request};
use crate::access::Access;
use crate::config::{Config, DeviceConfig};

/// The requests that turn the exported devices `current` into those of `wanted`:
/// removals first (a device whose socket or access changed is removed and added
/// again), then additions in the order of the file. A wanted device's access is its
/// own keys over `defaults` (the running relay's). Relative socket paths are taken
/// relative to `cwd` on both sides.
pub fn plan(
    current: &[DeviceInfo],
    wanted: &[DeviceConfig],
    defaults: &Access,
    cwd: &Path,
) -> Vec<Request> {
    let abs = |p: &Path| -> PathBuf { cwd.join(p) };
    let wanted: Vec<(&DeviceConfig, PathBuf, Access)> = wanted
        .iter()
        .map(|d| (d, abs(&d.socket), d.access.over(defaults)))
        .collect();
    let same = |d: &DeviceInfo, (w, socket, access): &(&DeviceConfig, PathBuf, Access)| {
        w.name == d.name
            && *socket == abs(Path::new(&d.socket))
            && d.access.as_ref().is_none_or(|a| a == access)
    };
    let mut requests: Vec<Request> = current
        .iter()
        .filter(|d| !wanted.iter().any(|w| same(d, w)))
        .map(|d| Request::Remove {
            name: d.name.clone(),
        })
        .collect();
    for w in &wanted {
        if !current.iter().any(|d| same(d, w)) {
            requests.push(Request::Add {
                name: w.0.name.clone(),
                socket: w.1.display().to_string(),
                access: w.0.access.clone(),
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
    let requests = plan(&current, &new.devices, &running.device_defaults(), &cwd);
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
    use crate::access::{AccessSpec, SocketMode, Uid};
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
            access: Some(Access::default()),
        }
    }

    fn dev(name: &str, socket: &str) -> DeviceConfig {
        DeviceConfig {
            name: name.into(),
            socket: socket.into(),
            ..DeviceConfig::default()
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
            plan(&current, &wanted, &Access::default(), cwd),
            vec![
                Request::Remove { name: "b".into() },
                Request::Add {
                    name: "b".into(),
                    socket: "/r/b2.sock".into(),
                    access: AccessSpec::default(),
                },
                Request::Add {
                    name: "d".into(),
                    socket: "/r/d.sock".into(),
                    access: AccessSpec::default(),
                },
            ]
        );
        assert!(plan(&current, &[], &Access::default(), cwd).len() == 3);
        assert!(plan(&[], &[], &Access::default(), cwd).is_empty());
    }

    /// A device whose access changed (its own keys, or what the defaults give it) is
    /// removed and added again with its keys; one whose access is what it was is left
    /// alone, and so is a device of a relay that does not report access.
    #[test]
    fn plan_compares_access() {
        let cwd = Path::new("/r");
        let mut wanted = dev("a", "/r/a.sock");
        wanted.access.allow_uids = Some(vec![Uid(107)]);
        let current = [info("a", "/r/a.sock")];
        let p = plan(
            &current,
            std::slice::from_ref(&wanted),
            &Access::default(),
            cwd,
        );
        assert_eq!(
            p,
            vec![
                Request::Remove { name: "a".into() },
                Request::Add {
                    name: "a".into(),
                    socket: "/r/a.sock".into(),
                    access: wanted.access.clone(),
                },
            ]
        );
        let mut now = info("a", "/r/a.sock");
        now.access = Some(wanted.access.over(&Access::default()));
        assert!(plan(
            &[now],
            std::slice::from_ref(&wanted),
            &Access::default(),
            cwd
        )
        .is_empty());
        let defaults = Access {
            mode: SocketMode::new(0o660).unwrap(),
            ..Access::default()
        };
        let plain = dev("a", "/r/a.sock");
        assert_eq!(
            plan(&current, std::slice::from_ref(&plain), &defaults, cwd).len(),
            2
        );
        let mut old = info("a", "/r/a.sock");
        old.access = None;
        assert!(plan(&[old], &[plain], &defaults, cwd).is_empty());
    }
}
