//! vfu-relay: terminates vfio-user sockets on the host and tunnels their messages into a
//! device VM over a virtio device whose vhost-user backend it is.
//!
//! - [`config`]: what to export, from the command line or a TOML file.
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

pub mod channel;
pub mod client_memory;
pub mod config;
pub mod control;
pub mod dma;
pub mod frontend_requests;
pub mod remote_dma;
pub mod service;
pub mod sockets;
pub mod switch;
pub mod table;
pub mod tunnel;
pub mod version;

use std::sync::Arc;

use log::{error, info};
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
pub fn run(config: Config) -> Result<()> {
    let relay = Arc::new(switch::Relay::new(config)?);
    handle_signals(relay.clone())?;
    let switch = switch::Switch::start(relay.clone())?;
    info!(
        "vfu-relay: {} device(s) (add more with `vfu-relay ctl --control-socket {} add NAME=SOCKET`); waiting for the device VM on {}",
        relay.channels().len(),
        relay.config.control_socket().display(),
        relay.config.frontend_socket.display()
    );
    let result = tunnel::serve_frontends(relay.clone());
    if let Err(e) = &result {
        error!("tunnel: {e}");
    }
    switch.stop();
    result
}

/// SIGINT and SIGTERM remove the relay's sockets and end the process; SIGHUP reads the
/// configuration file again and applies its devices (when the relay was started with
/// `--config`). The signals are blocked in every thread (they inherit the mask) and
/// taken by one thread with sigwait.
fn handle_signals(relay: Arc<switch::Relay>) -> Result<()> {
    // SAFETY: plain libc signal-set manipulation on a local sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
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
            for ch in relay.channels() {
                let _ = std::fs::remove_file(&ch.socket);
            }
            let _ = std::fs::remove_file(&relay.config.frontend_socket);
            let _ = std::fs::remove_file(relay.config.control_socket());
            std::process::exit(0);
        })?;
    Ok(())
}
