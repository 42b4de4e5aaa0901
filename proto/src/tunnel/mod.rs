//! The tunnel protocol between vfu-relay (the device) and vfu-guest (the driver),
//! specified in `docs/tunnel.md`.
//!
//! A [`TunnelMessage`] is a 16-byte [`TunnelHeader`] and a body. [`TunnelMessage::decode`]
//! checks everything the spec requires of a message on its own (lengths, reserved bits,
//! slot counts, segment counts, name lengths); what depends on state (is the channel
//! up, is the IOVA mapped) is the receiver's business.

mod error;
mod header;
mod message;

pub use error::TunnelError;
pub use header::{Kind, TunnelHeader, FLAG_REPLY, TUNNEL_HEADER_SIZE};
pub use message::{
    decode_dma_request_head, encode_dma_write_head, encode_reply_head, Body, DmaSegment, Hello,
    HelloReply, IrqTrigger, Slot, SlotType, TunnelMessage, VfioUserFrame, MAX_CHANNEL_NAME,
    MAX_DMA_SEGMENTS, MAX_ERROR_TEXT, REPLY_HEAD_SIZE,
};

/// Protocol version spoken by this crate.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version spoken by this crate.
pub const VERSION_MINOR: u16 = 0;
/// Default virtio device ID of the tunnel device.
pub const VIRTIO_ID: u32 = 56;
/// Shared memory region id that holds the DMA windows.
pub const SHM_ID_WINDOWS: u8 = 0;
/// Smallest `max_msg_size` a side may announce.
pub const MIN_MSG_SIZE: u32 = 4096;
/// Smallest `h2g` buffer a driver posts.
pub const MIN_H2G_BUFFER: u32 = 256;

/// Tunnel feature bits, exchanged in HELLO.
pub mod features {
    /// DMA_MAP may carry a DMA_WINDOW slot.
    pub const WINDOWS: u64 = 1 << 0;
    /// Region IO fds replies may carry IOEVENTFD slots; DOORBELL is used.
    pub const DOORBELLS: u64 = 1 << 1;
    /// Replies may carry GUEST_MEMORY slots.
    pub const GUEST_MEMORY: u64 = 1 << 2;
    /// A DMA_READ or DMA_WRITE request may end its chain with device-writable
    /// descriptors; the device then writes the reply there instead of sending it on
    /// `h2g`, so a DMA_READ's data lands where the driver wants it.
    pub const DIRECT_DATA: u64 = 1 << 3;
    /// Every feature this crate knows.
    /// Posted (NO_REPLY) vfio-user requests reach the driver as posted, and it says
    /// which it carried out with POSTED_DONE, one per channel and batch, instead of a
    /// reply each.
    pub const POSTED_DONE: u64 = 1 << 4;
    /// Every feature this crate knows.
    pub const ALL: u64 = WINDOWS | DOORBELLS | GUEST_MEMORY | DIRECT_DATA | POSTED_DONE;
}

/// Queue index of the host-to-guest queue of pair `pair`.
pub fn h2g_queue(pair: u16) -> u16 {
    pair * 2
}

/// Queue index of the guest-to-host queue of pair `pair`.
pub fn g2h_queue(pair: u16) -> u16 {
    pair * 2 + 1
}

/// The queue pair that carries channel `channel` when `pairs` pairs are in use.
pub fn pair_of_channel(channel: u32, pairs: u16) -> u16 {
    (channel % u32::from(pairs.max(1))) as u16
}
