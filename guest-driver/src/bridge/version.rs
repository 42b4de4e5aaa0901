//! VERSION on both sides of the bridge: what the bridge proposes to the server as its
//! client, and what it answers the tunnel's client from the server's answer.

use vfu_proto::vfio_user::{Capabilities, Version};

/// Largest data transfer the bridge proposes to the server (its DMA_READ / DMA_WRITE
/// come in pieces of at most this size) and offers the client at most.
pub const MAX_DATA_XFER: u32 = 1 << 20;

/// File descriptors the bridge accepts from the server in one message (REGION_INFO,
/// REGION_IO_FDS replies; they are closed, see [`super::replies`]).
pub const RECEIVE_MAX_FDS: u32 = 16;

/// Eventfd slots the bridge takes in one SET_IRQS from the client (the relay keeps the
/// client's fds and decides for itself; this is what the bridge states). The bridge
/// splits such a request to the server's own `max_msg_fds`.
pub const CLIENT_MAX_FDS: u32 = 16;

/// Room for headers in a message that carries `max_data_xfer_size` bytes of data.
pub const HEADROOM: usize = 4096;

/// The VERSION the bridge sends the server: version 0.0, as QEMU; no migration, no
/// twin socket (the bridge relays neither).
pub fn proposal() -> Version {
    Version {
        major: 0,
        minor: 0,
        capabilities: Some(Capabilities {
            max_msg_fds: Some(RECEIVE_MAX_FDS),
            max_data_xfer_size: Some(MAX_DATA_XFER),
            ..Default::default()
        }),
    }
}

/// The VERSION reply for the client, from its proposal, the server's answer, and the
/// largest data transfer the tunnel carries (`tunnel_xfer`).
///
/// - `max_data_xfer_size`: the least of the server's, the bridge's and the tunnel's;
/// - `max_msg_fds`: [`CLIENT_MAX_FDS`] (the bridge splits SET_IRQS for the server);
/// - `pgsizes`, `max_dma_maps`: the server's;
/// - `write_multiple`: the server's, if the client asked;
/// - no `migration` (not relayed: the bridge does not track dirty pages of windows)
///   and no `twin_socket`.
pub fn answer(client: &Version, server: &Version, tunnel_xfer: u32) -> Version {
    let offered = client.capabilities.unwrap_or_default();
    let dev = server.capabilities.unwrap_or_default();
    Version {
        major: 0,
        minor: server.minor.min(client.minor),
        capabilities: Some(Capabilities {
            max_msg_fds: Some(CLIENT_MAX_FDS),
            max_data_xfer_size: Some(
                dev.max_data_xfer_size()
                    .min(MAX_DATA_XFER)
                    .min(tunnel_xfer)
                    .max(1),
            ),
            pgsizes: Some(dev.pgsizes()),
            max_dma_maps: Some(dev.max_dma_maps()),
            twin_socket: None,
            write_multiple: offered.write_multiple.map(|w| w && dev.write_multiple()),
            migration: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_proto::vfio_user::Migration;

    /// Limits are the least of the three parties; migration and twin sockets are never
    /// offered, whatever the server says; the server's page sizes and map count pass.
    #[test]
    fn answer_intersects_and_drops_what_is_not_relayed() {
        let client = Version {
            major: 0,
            minor: 0,
            capabilities: Some(Capabilities {
                write_multiple: Some(true),
                migration: Some(Migration {
                    pgsize: Some(4096),
                    max_bitmap_size: None,
                }),
                ..Default::default()
            }),
        };
        let server = Version {
            major: 0,
            minor: 2,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(1),
                max_data_xfer_size: Some(4 << 20),
                pgsizes: Some(4096 | 1 << 21),
                max_dma_maps: Some(7),
                write_multiple: Some(true),
                migration: Some(Migration {
                    pgsize: Some(4096),
                    max_bitmap_size: None,
                }),
                ..Default::default()
            }),
        };
        let v = answer(&client, &server, 512 << 10);
        assert_eq!((v.major, v.minor), (0, 0));
        let c = v.capabilities.unwrap();
        assert_eq!(c.max_data_xfer_size, Some(512 << 10));
        assert_eq!(c.max_msg_fds, Some(CLIENT_MAX_FDS));
        assert_eq!(c.pgsizes, Some(4096 | 1 << 21));
        assert_eq!(c.max_dma_maps, Some(7));
        assert_eq!(c.write_multiple, Some(true));
        assert_eq!(c.migration, None);
        assert_eq!(c.twin_socket, None);

        // A server that states nothing: the spec's defaults.
        let bare = Version {
            major: 0,
            minor: 0,
            capabilities: None,
        };
        let c = answer(&bare, &bare, u32::MAX).capabilities.unwrap();
        assert_eq!(c.max_data_xfer_size, Some(MAX_DATA_XFER));
        assert_eq!(c.write_multiple, None);
    }
}
