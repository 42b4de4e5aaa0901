//! How the driver reaches the tunnel device. A transport gives the driver memory it
//! shares with the device, feature negotiation, queue setup, notifications toward the
//! device and interrupts from it. The tunnel engine ([`crate::tunnel`]) runs the same
//! way over every transport.

pub mod loopback;
pub mod pci;
pub mod shm;

use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;

use thiserror::Error;

use crate::virtqueue::SharedMemory;

/// A transport failure.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The device (or the VMM playing it) could not be reached.
    #[error("connecting to {what}: {source}")]
    Connect {
        /// What was being connected to.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The device refused a setup step.
    #[error("device setup ({step}): {reason}")]
    Setup {
        /// The step.
        step: &'static str,
        /// The device's answer.
        reason: String,
    },
    /// Memory for the driver could not be created.
    #[error("shared memory: {0}")]
    Memory(std::io::Error),
}

/// The driver's view of the tunnel device.
pub trait Transport: Send {
    /// Memory shared with the device: rings and buffers go here.
    fn memory(&self) -> &SharedMemory;
    /// Number of queues the device offers.
    fn max_queues(&self) -> u16;
    /// Largest queue size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// Offers `wanted` feature bits; returns those in force.
    fn negotiate(&mut self, wanted: u64) -> Result<u64, TransportError>;
    /// Sets up queue `index` with `size` entries at the given guest-physical ring
    /// addresses (descriptor table, available ring, used ring).
    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        rings: (u64, u64, u64),
    ) -> Result<(), TransportError>;
    /// Starts the device once every queue is set up.
    fn start(&mut self) -> Result<(), TransportError>;
    /// Tells the device that queue `index` has new buffers.
    fn notify(&self, index: u16);
    /// A file descriptor that becomes readable when the device interrupts for queue
    /// `index`. Queues that share an interrupt return the same fd; the engine then
    /// watches it once and acknowledges it with the first of those queues' index.
    fn interrupt_fd(&self, index: u16) -> RawFd;
    /// Acknowledges an interrupt of queue `index` (clears its fd).
    fn ack_interrupt(&self, index: u16);
    /// Where shared memory region 0 (DMA windows) is mapped in this process, if the
    /// device has one.
    fn shared_memory(&self) -> Option<(*mut u8, usize)> {
        None
    }
    /// A file descriptor that reports hang-up when the device is gone for good (the
    /// loopback VMM's vhost-user connection to the relay), if the transport has one.
    fn hangup_fd(&self) -> Option<RawFd> {
        None
    }
    /// File descriptors onto DMA windows, for servers in the device VM that map client
    /// memory themselves (bridged vfio-user servers), if the transport can give them.
    fn window_fds(&self) -> Option<Arc<dyn WindowFds>> {
        None
    }
}

/// Hands out the memory of DMA windows (shared memory region 0) as file descriptors.
///
/// The loopback VMM keeps a duplicate of the fd of each window the relay maps. A
/// transport for a real device VM could give the BAR's resource file
/// (`/sys/bus/pci/devices/.../resourceN`) at the window's offset.
pub trait WindowFds: Send + Sync {
    /// An fd, and the offset in it, where `len` bytes at `offset` of shared memory
    /// region 0 can be mapped; `None` unless one window mapped now covers them all.
    fn window_fd(&self, offset: u64, len: u64) -> Option<(OwnedFd, u64)>;
}
