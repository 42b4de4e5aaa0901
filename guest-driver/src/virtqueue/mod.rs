//! Driver-side virtqueues: the driver's half of the VIRTIO split ring, over memory that
//! the device (vfu-relay, through the VMM) reads and writes.

mod memory;
mod split;

pub use memory::{Allocation, SharedMemory};
pub use split::{DriverQueue, QueueError, Segment, UsedElem};
