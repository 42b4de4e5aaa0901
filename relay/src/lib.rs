//! vfu-relay: terminates vfio-user sockets on the host and tunnels their messages into a
//! device VM over a virtio device whose vhost-user backend it is.
//!
//! - [`config`]: what to export, from the command line or a TOML file.
//! - [`access`]: who may connect to the sockets (modes, groups, SO_PEERCRED
//!   allow-lists) and dropping privileges.
//! - [`channel`]: one exported device: its client connection, requests in flight,
//!   interrupt eventfds.
//! - [`table`]: the exported devices by channel id, added and removed at run time.
//! - [`switch`]: the thread that owns the device sockets, client connections and the
//!   control socket, and forwards client requests into the tunnel.
//! - [`control`]: the control socket's protocol (`vfu-relay ctl add|remove|list`) and
//!   the SIGHUP reload.
//! - [`sockets`]: listening sockets that replace stale ones, never live ones.
//! - [`tunnel`]: the vhost-user backend of the tunnel device, the queue-level link and
//!   the tunnel protocol (HELLO, channels, sessions, replies, interrupts).
//! - [`version`]: the honest VERSION negotiation between client and device model.
//! - [`ratelimit`]: warnings about what an untrusted peer sends, rate-limited.
//! - `fuzzing` (hidden): what the fuzz targets in `relay/fuzz` call, and counts of what
//!   the relay holds.

pub mod access;
pub mod channel;
pub mod client_memory;
pub mod config;
pub mod control;
pub mod dma;
pub mod frontend_requests;
#[doc(hidden)]
pub mod fuzzing;
pub mod ratelimit;
pub mod remote_dma;
pub mod service;
pub mod sockets;
pub mod switch;
pub mod table;
pub mod tunnel;
pub mod version;

use std::sync::Arc;

use log::{error, info, warn};
use thiserror::Error;

pub use config::{Config, DeviceConfig};

/// Everything that stops the relay.
#[derive(Debug, Error)]
pub enum Error {
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A socket could not be created.
    #[error("socket {path}: {source}")]
    Socket {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Dropping privileges failed.
    #[error("dropping privileges: {0}")]
    Privileges(#[from] access::DropError),
    /// The vhost-user backend failed to start.
    #[error("vhost-user backend: {0}")]
    Backend(String),
    /// Any other system error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Result of relay operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Runs the relay until it fails or a termination signal arrives.
///
/// Order: the termination signals are blocked; every socket is created (frontend,
/// control, devices) with its mode, owner and group; privileges are dropped if
/// configured (before any thread exists); then the signal thread, the switch and the
/// frontend loop start.
pub fn run(config: Config) -> Result<()> {
    let signals = block_signals();
    raise_fd_limit(config.devices.len());
    let relay = Arc::new(switch::Relay::new(config)?);
    let frontend_path = relay.config.frontend_socket.clone();
    let frontend = sockets::bind_with(
        &frontend_path,
        relay.config.perms(&relay.config.frontend_access()),
    )
    .map_err(|source| Error::Socket {
        path: frontend_path.display().to_string(),
        source,
    })?;
    let bound = match switch::Switch::bind(relay.clone()) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&frontend_path);
            return Err(e);
        }
    };
    if let Some((uid, gid)) = relay.config.privileges() {
        if let Err(e) = access::drop_privileges(uid, gid) {
            bound.abandon();
            let _ = std::fs::remove_file(&frontend_path);
            return Err(e.into());
        }
        info!(
            "dropped privileges: running as uid {uid}{} gid {gid}, no supplementary groups",
            access::user_name(uid).map_or(String::new(), |n| format!(" ({n})"))
        );
    }
    handle_signals(relay.clone(), signals)?;
    let switch = bound.start()?;
    info!(
        "vfu-relay: {} device(s) (add more with `vfu-relay ctl --control-socket {} add NAME=SOCKET`); waiting for the device VM on {}",
        relay.channels().len(),
        relay.config.control_socket().display(),
        relay.config.frontend_socket.display()
    );
    let result = tunnel::serve_frontends(relay.clone(), frontend);
    if let Err(e) = &result {
        error!("tunnel: {e}");
    }
    let _ = std::fs::remove_file(&frontend_path);
    switch.stop();
    result
}

/// Raises the soft limit on open files to the hard one (the relay polls with epoll,
/// so high descriptor numbers are fine), and says so when the hard limit is below what
/// the clients of `devices` devices may make the relay hold ([`dma::MAX_CLIENT_FDS`]
/// each): one client could then take descriptors the others need.
fn raise_fd_limit(devices: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let needed = (devices.max(1) as u64 + 1) * dma::MAX_CLIENT_FDS as u64;
    if lim.rlim_cur < needed {
        warn!(
            "open files limit {} is below what the clients of {} device(s) may hold ({} each, {needed} with headroom): raise it (LimitNOFILE=) or a client that maps many files can starve the others",
            lim.rlim_cur,
            devices.max(1),
            dma::MAX_CLIENT_FDS
        );
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and the threads it starts from
/// now on; [`handle_signals`] takes them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// SIGINT and SIGTERM remove the relay's sockets and end the process; SIGHUP reads the
/// configuration file again and applies its devices (when the relay was started with
/// `--config`). The signals are blocked in every thread ([`block_signals`]: they
/// inherit the mask) and taken by one thread with sigwait.
fn handle_signals(relay: Arc<switch::Relay>, set: libc::sigset_t) -> Result<()> {
    std::thread::Builder::new()
        .name("vfu-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: sigwait on a valid set, writing into a local.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if sig == libc::SIGHUP {
                match &relay.config.file {
                    Some(file) => control::reload::reload(&relay.config, file),
                    None => {
                        info!("SIGHUP: the relay was not started with --config; nothing to read")
                    }
                }
                continue;
            }
            info!("signal {sig}: removing sockets and exiting");
            service::stopping();
            let sockets = relay
                .channels()
                .iter()
                .map(|ch| ch.socket.clone())
                .chain([
                    relay.config.frontend_socket.clone(),
                    relay.config.control_socket(),
                ])
                .collect::<Vec<_>>();
            for path in sockets {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => warn!(
                        "cannot remove {}: {e} (the next start replaces it as stale)",
                        path.display()
                    ),
                    _ => {}
                }
            }
            std::process::exit(0);
        })?;
    Ok(())
}
