//! Telling a service manager how the relay is doing (systemd's `Type=notify`): ready
//! once every socket listens, a status line as the device VM comes and goes, stopping
//! on a termination signal. Without `NOTIFY_SOCKET` in the environment nothing is sent.

use log::debug;
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("service manager notification failed: {e}");
    }
}

/// Every listening socket is bound: clients and the device VM's VMM can connect.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line (`systemctl status` shows it).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The relay is about to exit.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
