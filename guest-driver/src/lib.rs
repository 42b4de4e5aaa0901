//! vfu-guest: the driver of the vfu-relay tunnel device, and the device API that device
//! models are written against.
//!
//! - [`device`]: the device API (like libvfio-user, in Rust): a model implements
//!   [`device::DeviceModel`]; [`device::DeviceServer`] answers every vfio-user request
//!   for it (PCI config space, region dispatch, IRQs, reset).
//! - [`models`]: sample device models, by name.
//! - [`direct`]: serve a model as a plain vfio-user server on a UNIX socket (no relay).
//! - [`virtqueue`]: driver-side split virtqueues.
//! - [`transport`]: how the driver reaches the tunnel device (the loopback VMM first).
//! - [`tunnel`]: the tunnel protocol engine: HELLO, channels, dispatch to device servers.
//! - [`crc32c`]: the CRC32C the models and the migration stream use.
//! - [`bridge`]: a channel served by an unmodified vfio-user server in the device VM.
//! - [`hostile`]: a test mode in which the driver misbehaves toward the relay on purpose.

pub mod bridge;
pub mod crc32c;
pub mod device;
pub mod direct;
pub mod hostile;
pub mod models;
pub mod transport;
pub mod tunnel;
pub mod virtqueue;
