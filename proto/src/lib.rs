//! vfu-proto: the vfio-user wire protocol and the vfu-relay tunnel protocol.
//!
//! - [`vfio_user`]: every message of the vfio-user specification (QEMU
//!   `docs/interop/vfio-user.rst`), as request and reply, decoded into typed values
//!   and encoded back.
//! - [`transport`]: framing of vfio-user messages on a UNIX stream socket, with file
//!   descriptors passed as SCM_RIGHTS.
//! - [`client`]: a blocking vfio-user client for tests, tools and benchmarks.
//! - [`tunnel`]: the messages of the tunnel virtio device (`docs/tunnel.md`).
//! - [`poll`]: the clock of adaptive polling, and thread placement, for vfu-relay and
//!   vfu-guest alike.
//!
//! Decoders never panic, never read out of bounds, and never allocate more than the
//! bounded message they are given; every rejection is a typed error that knows the errno
//! to answer with. There is no I/O policy here: what to do with a message is the
//! caller's business.

#![deny(missing_docs)]

pub mod client;
pub mod mem;
pub mod poll;
pub mod transport;
pub mod tunnel;
pub mod vfio_user;
pub mod wire;
