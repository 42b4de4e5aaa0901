//! Entry points for the fuzz targets in `relay/fuzz` (not an API): the parts of the
//! relay that the switch thread and the frontend loop call, which a fuzz target drives
//! in-process without sockets, and a count of what the relay holds, so that a target
//! can check that nothing grows without bound and that everything goes once the
//! clients and the device VM are gone.

use std::time::Instant;

use vfu_proto::tunnel::TunnelMessage;

use crate::channel::ChannelCounts;
use crate::switch::Relay;
use crate::tunnel::{BadMessage, LinkCounts};

/// What the relay holds, summed over its channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// The link's queues toward the device VM.
    pub link: LinkCounts,
    /// Exported channels.
    pub active: usize,
    /// Removed channels waiting for the device VM's CHANNEL_DOWN reply.
    pub retiring: usize,
    /// The channels' state, summed.
    pub channels: ChannelCounts,
}

impl Counts {
    /// Whether the relay holds nothing but its exported channels: no client, no
    /// request, no queued message, no retired session.
    pub fn is_idle(&self) -> bool {
        self.link == LinkCounts::default()
            && self.retiring == 0
            && self.channels == ChannelCounts::default()
    }
}

/// What `relay` holds now.
pub fn counts(relay: &Relay) -> Counts {
    let table = relay.table();
    let active = table.active().count();
    let all: Vec<_> = table.all().cloned().collect();
    drop(table);
    let mut channels = ChannelCounts::default();
    for ch in &all {
        let c = ch.counts();
        channels.clients += c.clients;
        channels.pending += c.pending;
        channels.pending_bytes += c.pending_bytes;
        channels.remote_ops += c.remote_ops;
        channels.remote_chunks += c.remote_chunks;
        channels.dma_regions += c.dma_regions;
        channels.dma_files += c.dma_files;
        channels.irq_fds += c.irq_fds;
        channels.retired_sessions += c.retired_sessions;
        channels.retired_regions += c.retired_regions;
        channels.abandoned += c.abandoned;
    }
    Counts {
        link: relay.link.counts(),
        active,
        retiring: all.len() - active,
        channels,
    }
}

/// Decodes the bytes of one message from the device VM as the link does after it put
/// the message together from the `g2h` buffers.
pub fn decode_g2h(bytes: Vec<u8>) -> Result<TunnelMessage, BadMessage> {
    crate::tunnel::decode(Ok(bytes))
}

/// The tag of the CHANNEL_UP of channel `id` the relay waits to be answered, if any.
pub fn channel_up_tag(relay: &Relay, id: u32) -> Option<u32> {
    relay.channel(id)?.channel_up_tag()
}

/// The device VM's VMM disconnected (what the frontend loop does then).
pub fn device_vm_gone(relay: &Relay) {
    crate::tunnel::device_vm_gone(relay);
}

/// The switch's periodic work for removed channels: those whose CHANNEL_DOWN the
/// device VM has not answered by `now` are forgotten.
pub fn expire_retiring(relay: &Relay, now: Instant) {
    relay.expire_retiring(now);
}
