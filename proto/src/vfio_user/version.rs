//! VERSION (1): protocol version and the capabilities JSON.
//!
//! ```text
//! payload: le16 major, le16 minor, then optional version data: UTF-8 JSON and a NUL
//! {"capabilities": {"max_msg_fds": N, "max_data_xfer_size": N, "pgsizes": N,
//!                   "max_dma_maps": N, "twin_socket": {"supported": B, "fd_index": N},
//!                   "write_multiple": B, "migration": {"pgsize": N, "max_bitmap_size": N}}}
//! ```
//! Every key is optional; unknown keys are ignored. `migration` is no longer in the
//! spec but QEMU still sends it and libvfio-user still parses it, so it is kept.

use serde::{Deserialize, Serialize};

use super::{
    DecodeError, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
};
use crate::wire::{Reader, Writer};

/// Twin-socket parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinSocket {
    /// Whether the sender supports twin-socket mode.
    #[serde(default)]
    pub supported: bool,
    /// Index of the socket fd in the reply's fd array (reply only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// The legacy migration capability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Page size of the dirty bitmap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsize: Option<u64>,
    /// Largest dirty bitmap (QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The capabilities object. `None` means "not stated": use the accessor for the
/// spec's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Largest `count` of a data transfer the sender can receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u32>,
    /// Page sizes supported for DMA maps, or'ed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Most DMA maps valid at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// Twin-socket mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocket>,
    /// REGION_WRITE_MULTI support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
    /// Legacy migration parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

impl Capabilities {
    /// `max_msg_fds`, default 1.
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }
    /// `max_data_xfer_size`, default 1 MiB.
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }
    /// `pgsizes`, default 4 KiB.
    pub fn pgsizes(&self) -> u64 {
        self.pgsizes.unwrap_or(DEFAULT_PGSIZES)
    }
    /// `max_dma_maps`, default 65535.
    pub fn max_dma_maps(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }
    /// `write_multiple`, default false.
    pub fn write_multiple(&self) -> bool {
        self.write_multiple.unwrap_or(false)
    }
}

#[derive(Serialize, Deserialize)]
struct VersionData {
    #[serde(default)]
    capabilities: Capabilities,
}

/// VERSION request and reply (same format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major version (QEMU and libvfio-user speak 0).
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The capabilities; `None` when the message has no version data.
    pub capabilities: Option<Capabilities>,
}

impl Version {
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let major = r.u16()?;
        let minor = r.u16()?;
        let data = r.rest();
        let capabilities = if data.is_empty() {
            None
        } else {
            Some(parse_json(data)?)
        };
        Ok(Self {
            major,
            minor,
            capabilities,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.put_u16(self.major);
        out.put_u16(self.minor);
        if let Some(caps) = &self.capabilities {
            let json = serde_json::to_vec(&VersionData {
                capabilities: *caps,
            })
            .unwrap_or_else(|_| b"{}".to_vec());
            out.put_bytes(&json);
            out.put_u8(0);
        }
    }
}

fn parse_json(data: &[u8]) -> Result<Capabilities, DecodeError> {
    // The spec says the data includes its terminating NUL; accept it missing too.
    let text = data.strip_suffix(&[0]).unwrap_or(data);
    if text.contains(&0) {
        return Err(DecodeError::BadCapabilities {
            reason: "NUL inside the JSON text".into(),
        });
    }
    let parsed: VersionData =
        serde_json::from_slice(text).map_err(|e| DecodeError::BadCapabilities {
            reason: e.to_string(),
        })?;
    Ok(parsed.capabilities)
}
