//! The control socket: devices added, removed and listed while the relay runs
//! (`vfu-relay ctl`, `docs/operating.md`).
//!
//! - [`protocol`]: the requests and replies, one JSON object per line.
//! - [`server`]: the relay's end, served by the switch thread.
//! - [`client`]: the other end, for `vfu-relay ctl` and the SIGHUP reload.
//! - [`reload`]: what a changed configuration file means as requests.

pub mod client;
pub mod protocol;
pub mod reload;
pub mod server;

pub use protocol::{CommandError, DeviceInfo, Reply, Request, Served};
