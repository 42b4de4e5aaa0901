//! Driver-side virtqueues: the driver's half of the VIRTIO split ring, over memory that
//! the device (vfu-relay, through the VMM) reads and writes.

mod memory;
mod split;

pub use memory::{Allocation, SharedMemory};
pub use split::{
    Descriptor, DriverQueue, QueueError, Segment, UsedElem, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
