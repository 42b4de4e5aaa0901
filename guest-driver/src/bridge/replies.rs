//! Replies of the server that carry file descriptors, which cannot cross the tunnel.
//!
//! - DEVICE_GET_REGION_INFO with an fd (a region the client could mmap): the fd is
//!   closed; the MMAP flag, the sparse-mmap areas and the MSI-X-mappable capability
//!   go, since they describe what the client could map; other capabilities stay. The
//!   client then reaches the region with REGION_READ / REGION_WRITE, which the server
//!   answers as for any region. The bridge asks the server with a large `argsz`, so
//!   that it sees every capability, and cuts the reply to the client's own `argsz`
//!   (the spec's retry rule) after removing them.
//! - DEVICE_GET_REGION_IO_FDS: the bridge answers it itself, "no ioeventfds" (count
//!   0), without asking the server; the client's writes arrive as REGION_WRITE.
//! - Any other reply with fds (none in the spec): the fds are closed, the reply passes.

use vfu_proto::vfio_user::{
    encode_reply, RegionCap, RegionInfo, Reply, REGION_INFO_FLAG_CAPS, REGION_INFO_FLAG_MMAP,
};

use super::pending::Fix;
use crate::device::errno::EIO;
use crate::device::Errno;

/// The `argsz` the bridge asks REGION_INFO with: room for any capability chain that a
/// reply of the bridge's message size limit can hold.
pub const REGION_INFO_ARGSZ: u32 = 64 << 10;

/// The reply payload for the client from the server's successful reply payload to a
/// request of `command`, after `fix`; `EIO` for a reply that does not decode where it
/// must be rewritten.
pub fn fix_reply(command: u16, payload: &[u8], fix: Fix, msg_id: u16) -> Result<Vec<u8>, Errno> {
    match fix {
        Fix::None => Ok(payload.to_vec()),
        Fix::RegionInfo { argsz } => {
            let Ok(Reply::DeviceGetRegionInfo(info)) = Reply::decode(command, payload, 0) else {
                return Err(EIO);
            };
            let (cut, _) = without_mmap(info).reply_for(argsz);
            Ok(payload_of(encode_reply(
                msg_id,
                &Reply::DeviceGetRegionInfo(cut),
            )))
        }
    }
}

/// The region as the client may use it: nothing to mmap.
pub fn without_mmap(mut info: RegionInfo) -> RegionInfo {
    info.flags &= !REGION_INFO_FLAG_MMAP;
    info.caps
        .retain(|c| !matches!(c, RegionCap::SparseMmap(_) | RegionCap::MsixMappable));
    if info.caps.is_empty() {
        info.flags &= !REGION_INFO_FLAG_CAPS;
    } else {
        info.flags |= REGION_INFO_FLAG_CAPS;
    }
    info
}

fn payload_of(mut message: Vec<u8>) -> Vec<u8> {
    message.drain(..vfu_proto::vfio_user::HEADER_SIZE);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_proto::vfio_user::{
        Command, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE, REGION_INFO_SIZE,
    };

    fn info_payload(info: &RegionInfo) -> Vec<u8> {
        payload_of(encode_reply(1, &Reply::DeviceGetRegionInfo(info.clone())))
    }

    /// An mmap-able region loses MMAP, its sparse areas and MSI-X-mappable, keeps its
    /// other capabilities, and is cut to the client's argsz with the right size to
    /// ask again.
    #[test]
    fn region_info_loses_what_needs_an_fd() {
        let mut info = RegionInfo::new(
            2,
            REGION_INFO_FLAG_READ
                | REGION_INFO_FLAG_WRITE
                | REGION_INFO_FLAG_MMAP
                | REGION_INFO_FLAG_CAPS,
            0x4000,
        );
        info.caps = vec![
            RegionCap::SparseMmap(vec![(0, 0x1000)]),
            RegionCap::Type {
                region_type: 1,
                subtype: 2,
            },
            RegionCap::MsixMappable,
        ];
        let cmd = Command::DeviceGetRegionInfo as u16;
        let full = fix_reply(
            cmd,
            &info_payload(&info),
            Fix::RegionInfo { argsz: 4096 },
            7,
        )
        .unwrap();
        let Ok(Reply::DeviceGetRegionInfo(got)) = Reply::decode(cmd, &full, 0) else {
            panic!("decodes");
        };
        assert_eq!(got.flags & REGION_INFO_FLAG_MMAP, 0);
        // (The CAPS flag and chain are the encoder's to write; the decoder hands caps.)
        assert_ne!(full[4] as u32 & REGION_INFO_FLAG_CAPS, 0);
        assert_eq!(
            got.caps,
            vec![RegionCap::Type {
                region_type: 1,
                subtype: 2
            }]
        );
        assert_eq!(got.argsz, REGION_INFO_SIZE + 16);

        let cut = fix_reply(
            cmd,
            &info_payload(&info),
            Fix::RegionInfo {
                argsz: REGION_INFO_SIZE,
            },
            7,
        )
        .unwrap();
        let Ok(Reply::DeviceGetRegionInfo(got)) = Reply::decode(cmd, &cut, 0) else {
            panic!("decodes");
        };
        assert_eq!((got.argsz, got.caps.len()), (REGION_INFO_SIZE + 16, 0));

        // Only sparse areas: no capability left, no CAPS flag.
        info.caps.truncate(1);
        let bare = fix_reply(
            cmd,
            &info_payload(&info),
            Fix::RegionInfo { argsz: 4096 },
            7,
        )
        .unwrap();
        let Ok(Reply::DeviceGetRegionInfo(got)) = Reply::decode(cmd, &bare, 0) else {
            panic!("decodes");
        };
        assert_eq!(got.flags, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE);
        assert_eq!(got.argsz, REGION_INFO_SIZE);
        assert_eq!(
            fix_reply(cmd, &[1, 2, 3], Fix::RegionInfo { argsz: 64 }, 7),
            Err(EIO)
        );
    }
}
