//! Every command as a typed request and a typed reply, with the fds each may carry.

use super::{
    expect_end, Command, DecodeError, DeviceFeature, DeviceInfo, DmaAccess, DmaMap, DmaReadReply,
    DmaUnmap, DmaWrite, DmaWriteReply, GetInfoRequest, Header, IrqInfo, MigDataRead,
    MigDataReadReply, MigDataWrite, MultiWrite, RegionAccess, RegionInfo, RegionIoFds,
    RegionReadReply, RegionWrite, SetIrqs, Version, HEADER_SIZE,
};
use crate::wire::{Reader, Writer};

/// A command as the client (or, for DMA_READ / DMA_WRITE, the server) sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// VERSION: proposed version and capabilities.
    Version(Version),
    /// DMA_MAP; an fd may come with it.
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo(GetInfoRequest),
    /// DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo(GetInfoRequest),
    /// DEVICE_GET_REGION_IO_FDS.
    DeviceGetRegionIoFds(GetInfoRequest),
    /// DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo(GetInfoRequest),
    /// DEVICE_SET_IRQS; eventfds may come with it.
    DeviceSetIrqs(SetIrqs),
    /// REGION_READ.
    RegionRead(RegionAccess),
    /// REGION_WRITE.
    RegionWrite(RegionWrite),
    /// DMA_READ (server to client).
    DmaRead(DmaAccess),
    /// DMA_WRITE (server to client).
    DmaWrite(DmaWrite),
    /// DEVICE_RESET.
    DeviceReset,
    /// REGION_WRITE_MULTI (1 or more writes).
    RegionWriteMulti(Vec<MultiWrite>),
    /// DEVICE_FEATURE.
    DeviceFeature(DeviceFeature),
    /// MIG_DATA_READ.
    MigDataRead(MigDataRead),
    /// MIG_DATA_WRITE.
    MigDataWrite(MigDataWrite),
}

/// A successful reply. Failures are error replies: a header with the ERROR flag and an
/// errno, see [`encode_error_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// VERSION: accepted version and capabilities.
    Version(Version),
    /// DMA_MAP: no payload.
    DmaMap,
    /// DMA_UNMAP: the request echoed.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfo),
    /// DEVICE_GET_REGION_INFO; an fd comes with it for an MMAP region.
    DeviceGetRegionInfo(RegionInfo),
    /// DEVICE_GET_REGION_IO_FDS; fds come with it.
    DeviceGetRegionIoFds(RegionIoFds),
    /// DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo(IrqInfo),
    /// DEVICE_SET_IRQS: no payload.
    DeviceSetIrqs,
    /// REGION_READ: the data.
    RegionRead(RegionReadReply),
    /// REGION_WRITE: the access echoed.
    RegionWrite(RegionAccess),
    /// DMA_READ: the data.
    DmaRead(DmaReadReply),
    /// DMA_WRITE.
    DmaWrite(DmaWriteReply),
    /// DEVICE_RESET: no payload.
    DeviceReset,
    /// REGION_WRITE_MULTI: writes completed.
    RegionWriteMulti {
        /// Number of writes completed.
        wr_cnt: u64,
    },
    /// DEVICE_FEATURE.
    DeviceFeature(DeviceFeature),
    /// MIG_DATA_READ.
    MigDataRead(MigDataReadReply),
    /// MIG_DATA_WRITE: no payload.
    MigDataWrite,
}

fn fd_count_error(command: Command, got: usize, expected: usize) -> DecodeError {
    DecodeError::FdCount {
        command: command.name(),
        got,
        expected,
    }
}

/// Checks that a message carries between `min` and `max` fds.
fn check_fds(command: Command, nfds: usize, min: usize, max: usize) -> Result<(), DecodeError> {
    if nfds < min || nfds > max {
        let expected = if nfds < min { min } else { max };
        return Err(fd_count_error(command, nfds, expected));
    }
    Ok(())
}

impl Request {
    /// The command number.
    pub fn command(&self) -> Command {
        match self {
            Request::Version(_) => Command::Version,
            Request::DmaMap(_) => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Request::DeviceGetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Request::DeviceGetRegionIoFds(_) => Command::DeviceGetRegionIoFds,
            Request::DeviceGetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Request::DeviceSetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead(_) => Command::RegionRead,
            Request::RegionWrite(_) => Command::RegionWrite,
            Request::DmaRead(_) => Command::DmaRead,
            Request::DmaWrite(_) => Command::DmaWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::RegionWriteMulti(_) => Command::RegionWriteMulti,
            Request::DeviceFeature(_) => Command::DeviceFeature,
            Request::MigDataRead(_) => Command::MigDataRead,
            Request::MigDataWrite(_) => Command::MigDataWrite,
        }
    }

    /// Decodes the payload of command `command` that came with `nfds` fds.
    ///
    /// Checks sizes, counts, flags and the number of fds; a failure carries the errno
    /// to answer with. Values that depend on the device (region and IRQ indexes, ranges
    /// within a region) are the server's to check.
    pub fn decode(command: u16, payload: &[u8], nfds: usize) -> Result<Self, DecodeError> {
        let command = Command::try_from(command)?;
        let mut r = Reader::new(payload);
        let req = match command {
            Command::Version => Request::Version(Version::decode(&mut r)?),
            Command::DmaMap => Request::DmaMap(DmaMap::decode(&mut r)?),
            Command::DmaUnmap => Request::DmaUnmap(DmaUnmap::decode(&mut r)?),
            Command::DeviceGetInfo => Request::DeviceGetInfo(DeviceInfo::decode_request(&mut r)?),
            Command::DeviceGetRegionInfo => {
                Request::DeviceGetRegionInfo(RegionInfo::decode_request(&mut r)?)
            }
            Command::DeviceGetRegionIoFds => {
                Request::DeviceGetRegionIoFds(RegionIoFds::decode_request(&mut r)?)
            }
            Command::DeviceGetIrqInfo => {
                Request::DeviceGetIrqInfo(IrqInfo::decode_request(&mut r)?)
            }
            Command::DeviceSetIrqs => Request::DeviceSetIrqs(SetIrqs::decode(&mut r, nfds)?),
            Command::RegionRead => Request::RegionRead(RegionAccess::decode(&mut r)?),
            Command::RegionWrite => Request::RegionWrite(RegionWrite::decode(&mut r)?),
            Command::DmaRead => Request::DmaRead(DmaAccess::decode(r.rest())?),
            Command::DmaWrite => Request::DmaWrite(DmaWrite::decode(r.rest())?),
            Command::DeviceReset => Request::DeviceReset,
            Command::RegionWriteMulti => Request::RegionWriteMulti(MultiWrite::decode_all(&mut r)?),
            Command::DeviceFeature => Request::DeviceFeature(DeviceFeature::decode(&mut r, false)?),
            Command::MigDataRead => Request::MigDataRead(MigDataRead::decode(&mut r)?),
            Command::MigDataWrite => Request::MigDataWrite(MigDataWrite::decode(&mut r)?),
        };
        expect_end(&r)?;
        let (min, max) = req.fd_range();
        check_fds(command, nfds, min, max)?;
        Ok(req)
    }

    /// How many fds this request may carry (inclusive range).
    pub fn fd_range(&self) -> (usize, usize) {
        match self {
            Request::DmaMap(_) => (0, 1),
            Request::DeviceSetIrqs(s) => (s.fd_count(), s.fd_count()),
            _ => (0, 0),
        }
    }

    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Version(v) => v.encode(out),
            Request::DmaMap(m) => m.encode(out),
            Request::DmaUnmap(u) => u.encode(out),
            Request::DeviceGetInfo(g) => DeviceInfo::encode_request(g, out),
            Request::DeviceGetRegionInfo(g) => RegionInfo::encode_request(g, out),
            Request::DeviceGetRegionIoFds(g) => RegionIoFds::encode_request(g, out),
            Request::DeviceGetIrqInfo(g) => IrqInfo::encode_request(g, out),
            Request::DeviceSetIrqs(s) => s.encode(out),
            Request::RegionRead(a) => a.encode(out),
            Request::RegionWrite(w) => w.encode(out),
            Request::DmaRead(a) => a.encode(out),
            Request::DmaWrite(w) => w.encode(out),
            Request::DeviceReset => {}
            Request::RegionWriteMulti(w) => MultiWrite::encode_all(w, out),
            Request::DeviceFeature(f) => f.encode(out),
            Request::MigDataRead(m) => m.encode(out),
            Request::MigDataWrite(m) => m.encode(out),
        }
    }
}

impl Reply {
    /// The command number.
    pub fn command(&self) -> Command {
        match self {
            Reply::Version(_) => Command::Version,
            Reply::DmaMap => Command::DmaMap,
            Reply::DmaUnmap(_) => Command::DmaUnmap,
            Reply::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Reply::DeviceGetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Reply::DeviceGetRegionIoFds(_) => Command::DeviceGetRegionIoFds,
            Reply::DeviceGetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Reply::DeviceSetIrqs => Command::DeviceSetIrqs,
            Reply::RegionRead(_) => Command::RegionRead,
            Reply::RegionWrite(_) => Command::RegionWrite,
            Reply::DmaRead(_) => Command::DmaRead,
            Reply::DmaWrite(_) => Command::DmaWrite,
            Reply::DeviceReset => Command::DeviceReset,
            Reply::RegionWriteMulti { .. } => Command::RegionWriteMulti,
            Reply::DeviceFeature(_) => Command::DeviceFeature,
            Reply::MigDataRead(_) => Command::MigDataRead,
            Reply::MigDataWrite => Command::MigDataWrite,
        }
    }

    /// Decodes the payload of a successful reply to `command` that came with `nfds`
    /// fds. (An error reply has no payload to decode: see [`Header::error`].)
    pub fn decode(command: u16, payload: &[u8], nfds: usize) -> Result<Self, DecodeError> {
        let command = Command::try_from(command)?;
        let mut r = Reader::new(payload);
        let reply = match command {
            Command::Version => Reply::Version(Version::decode(&mut r)?),
            Command::DmaMap => Reply::DmaMap,
            Command::DmaUnmap => Reply::DmaUnmap(DmaUnmap::decode(&mut r)?),
            Command::DeviceGetInfo => Reply::DeviceGetInfo(DeviceInfo::decode(&mut r)?),
            Command::DeviceGetRegionInfo => {
                Reply::DeviceGetRegionInfo(RegionInfo::decode(r.rest())?)
            }
            Command::DeviceGetRegionIoFds => {
                Reply::DeviceGetRegionIoFds(RegionIoFds::decode(&mut r, nfds)?)
            }
            Command::DeviceGetIrqInfo => Reply::DeviceGetIrqInfo(IrqInfo::decode(&mut r)?),
            Command::DeviceSetIrqs => Reply::DeviceSetIrqs,
            Command::RegionRead => Reply::RegionRead(RegionReadReply::decode(&mut r)?),
            Command::RegionWrite => Reply::RegionWrite(RegionAccess::decode(&mut r)?),
            Command::DmaRead => Reply::DmaRead(DmaReadReply::decode(r.rest())?),
            Command::DmaWrite => Reply::DmaWrite(DmaWriteReply::decode(r.rest())?),
            Command::DeviceReset => Reply::DeviceReset,
            Command::RegionWriteMulti => Reply::RegionWriteMulti { wr_cnt: r.u64()? },
            Command::DeviceFeature => Reply::DeviceFeature(DeviceFeature::decode(&mut r, true)?),
            Command::MigDataRead => Reply::MigDataRead(MigDataReadReply::decode(&mut r)?),
            Command::MigDataWrite => Reply::MigDataWrite,
        };
        expect_end(&r)?;
        let (min, max) = reply.fd_range();
        check_fds(command, nfds, min, max)?;
        Ok(reply)
    }

    /// How many fds this reply may carry (inclusive range).
    pub fn fd_range(&self) -> (usize, usize) {
        match self {
            // The client end of the twin socket.
            Reply::Version(_) => (0, 1),
            Reply::DeviceGetRegionInfo(_) => (0, 1),
            Reply::DeviceGetRegionIoFds(f) => {
                let n = f.fd_count();
                // Entries may share fds, so more fds than entries is an error but fewer
                // is not possible: every index must resolve.
                (n, n.max(f.sub_regions.len()))
            }
            _ => (0, 0),
        }
    }

    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Version(v) => v.encode(out),
            Reply::DmaMap | Reply::DeviceSetIrqs | Reply::DeviceReset | Reply::MigDataWrite => {}
            Reply::DmaUnmap(u) => u.encode(out),
            Reply::DeviceGetInfo(i) => i.encode(out),
            Reply::DeviceGetRegionInfo(i) => i.encode(out),
            Reply::DeviceGetRegionIoFds(f) => f.encode(out),
            Reply::DeviceGetIrqInfo(i) => i.encode(out),
            Reply::RegionRead(d) => d.encode(out),
            Reply::RegionWrite(a) => a.encode(out),
            Reply::DmaRead(d) => d.encode(out),
            Reply::DmaWrite(d) => d.encode(out),
            Reply::RegionWriteMulti { wr_cnt } => out.put_u64(*wr_cnt),
            Reply::DeviceFeature(f) => f.encode(out),
            Reply::MigDataRead(m) => m.encode(out),
        }
    }
}

/// A whole command message: header and payload. `no_reply` asks the server not to
/// answer.
pub fn encode_request(msg_id: u16, request: &Request, no_reply: bool) -> Vec<u8> {
    let mut payload = Vec::new();
    request.encode(&mut payload);
    let mut header = Header::command(msg_id, request.command() as u16, payload.len());
    header.no_reply = no_reply;
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    header.encode(&mut out);
    out.extend_from_slice(&payload);
    out
}

/// A whole successful reply message to the command with `msg_id`.
pub fn encode_reply(msg_id: u16, reply: &Reply) -> Vec<u8> {
    let mut payload = Vec::new();
    reply.encode(&mut payload);
    let request = Header::command(msg_id, reply.command() as u16, 0);
    let header = Header::reply_to(&request, payload.len());
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    header.encode(&mut out);
    out.extend_from_slice(&payload);
    out
}

/// An error reply (header only) to `request`, carrying `errno`.
pub fn encode_error_reply(request: &Header, errno: u32) -> Vec<u8> {
    Header::error_reply_to(request, errno).to_bytes().to_vec()
}
