//! VERSION negotiation through the relay.
//!
//! The client's VERSION goes to the device model, which answers with what it supports.
//! The relay then answers the client with the intersection of three parties: what the
//! client proposed, what the device model accepted, and what the relay itself can
//! carry. File descriptors end at the relay, so `max_msg_fds` is the relay's own; data
//! transfers cross the tunnel, so `max_data_xfer_size` is bounded by the tunnel's message
//! size as well as by the device's.
//!
//! Migration is not negotiated here: a client learns whether the device migrates from
//! DEVICE_FEATURE MIGRATION, which the relay forwards to the device model untouched,
//! like MIG_DEVICE_STATE, MIG_DATA_READ/WRITE and the DMA logging features. The legacy
//! `migration` object (no longer in the spec) is passed on as the device stated it,
//! when the client proposed it: `pgsize` is the granularity at which the device logs
//! its DMA (the relay logs nothing of its own; the device saw the client's proposal,
//! which the relay forwards as sent), and `max_bitmap_size` is bounded by what one
//! tunnel message carries, as a DMA_LOGGING_REPORT bitmap travels in one.

use vfu_proto::vfio_user::{Capabilities, Version};

/// What the relay itself can take from a client, and carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// fds the relay accepts in one client message (SET_IRQS eventfd arrays).
    pub max_msg_fds: u32,
    /// Largest data transfer the tunnel carries in one message.
    pub max_data_xfer_size: u32,
    /// DMA mappings the relay tracks per client.
    pub max_dma_maps: u32,
}

impl RelayLimits {
    /// The relay's defaults: 16 fds (QEMU's ceiling), 1 MiB transfers, 65535 maps.
    pub const DEFAULT: RelayLimits = RelayLimits {
        max_msg_fds: 16,
        max_data_xfer_size: 1 << 20,
        max_dma_maps: 65535,
    };
}

/// The smallest `max_data_xfer_size` a client may state: the relay cuts the device's
/// DMA toward a client mapped without fds into messages of that size, and a client
/// that takes a byte at a time would turn one 1 MiB read into a million messages
/// (and the relay's memory with them). A VERSION below it is refused (EINVAL).
pub const MIN_CLIENT_DATA_XFER_SIZE: u32 = 4096;

/// The VERSION reply the client gets, from its proposal, the device's answer and the
/// relay's limits. Keys the client did not propose are not offered back, except the two
/// every endpoint states about itself (`max_msg_fds`, `max_data_xfer_size`).
pub fn negotiate(proposal: &Version, device: &Version, relay: RelayLimits) -> Version {
    let client = proposal.capabilities.unwrap_or_default();
    let dev = device.capabilities.unwrap_or_default();
    let caps = Capabilities {
        max_msg_fds: Some(relay.max_msg_fds),
        max_data_xfer_size: Some(dev.max_data_xfer_size().min(relay.max_data_xfer_size)),
        pgsizes: Some(dev.pgsizes()),
        max_dma_maps: Some(dev.max_dma_maps().min(relay.max_dma_maps)),
        // The relay does not set up a second socket for server-to-client commands.
        twin_socket: None,
        write_multiple: client
            .write_multiple
            .map(|offered| offered && dev.write_multiple()),
        migration: match (client.migration, dev.migration) {
            (Some(_), Some(d)) => {
                let carried = u64::from(relay.max_data_xfer_size);
                Some(vfu_proto::vfio_user::Migration {
                    pgsize: d.pgsize,
                    max_bitmap_size: Some(d.max_bitmap_size.map_or(carried, |m| m.min(carried))),
                })
            }
            _ => None,
        },
    };
    Version {
        major: device.major,
        minor: device.minor.min(proposal.minor),
        capabilities: Some(caps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_proto::vfio_user::Migration;

    fn v(caps: Capabilities) -> Version {
        Version {
            major: 0,
            minor: 0,
            capabilities: Some(caps),
        }
    }

    /// Limits are the minimum of device and relay; fds are the relay's; options the
    /// client did not propose are not offered; twin sockets are never offered; the
    /// legacy migration object is the device's, its bitmap bounded by the relay.
    #[test]
    fn intersection() {
        let client = v(Capabilities {
            max_msg_fds: Some(16),
            max_data_xfer_size: Some(1 << 20),
            write_multiple: Some(true),
            twin_socket: Some(vfu_proto::vfio_user::TwinSocket {
                supported: true,
                fd_index: None,
            }),
            migration: Some(Migration {
                pgsize: Some(4096),
                max_bitmap_size: Some(1 << 28),
            }),
            ..Default::default()
        });
        let device = v(Capabilities {
            max_msg_fds: Some(1),
            max_data_xfer_size: Some(4 << 20),
            max_dma_maps: Some(100),
            write_multiple: Some(false),
            migration: Some(Migration {
                pgsize: Some(8192),
                max_bitmap_size: None,
            }),
            ..Default::default()
        });
        let r = negotiate(&client, &device, RelayLimits::DEFAULT);
        let c = r.capabilities.unwrap();
        assert_eq!(c.max_msg_fds, Some(16));
        assert_eq!(c.max_data_xfer_size, Some(1 << 20));
        assert_eq!(c.max_dma_maps, Some(100));
        assert_eq!(c.write_multiple, Some(false));
        assert_eq!(c.twin_socket, None);
        assert_eq!(
            c.migration,
            Some(Migration {
                pgsize: Some(8192),
                max_bitmap_size: Some(1 << 20),
            }),
            "the device's page size; bitmaps no larger than a tunnel message carries"
        );

        // A client that proposed nothing optional gets nothing optional back.
        let r = negotiate(&v(Capabilities::default()), &device, RelayLimits::DEFAULT);
        let c = r.capabilities.unwrap();
        assert_eq!(c.write_multiple, None);
        assert_eq!(c.migration, None);

        // A device that does not state it: nothing, whatever the client proposed.
        let r = negotiate(&client, &v(Capabilities::default()), RelayLimits::DEFAULT);
        assert_eq!(r.capabilities.unwrap().migration, None);
        // A device's smaller bitmap limit is kept.
        let small = v(Capabilities {
            migration: Some(Migration {
                pgsize: Some(4096),
                max_bitmap_size: Some(4096),
            }),
            ..Default::default()
        });
        let r = negotiate(&client, &small, RelayLimits::DEFAULT);
        assert_eq!(
            r.capabilities.unwrap().migration.unwrap().max_bitmap_size,
            Some(4096)
        );
    }

    /// The minor version is the lower of the two.
    #[test]
    fn minor_version() {
        let mut p = v(Capabilities::default());
        p.minor = 3;
        let mut d = v(Capabilities::default());
        d.minor = 1;
        assert_eq!(negotiate(&p, &d, RelayLimits::DEFAULT).minor, 1);
    }
}
