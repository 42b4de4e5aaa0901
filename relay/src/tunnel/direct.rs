//! Direct data placement (tunnel feature `DIRECT_DATA`, `docs/tunnel.md` section 6.6):
//! a DMA_READ or DMA_WRITE request whose descriptor chain ends in device-writable
//! buffers is answered in those buffers. A DMA_READ's data is copied once, from the
//! client's memory straight into the device VM's buffer; a DMA_WRITE's data is copied
//! once, from the request's own buffers into the client's memory.
//!
//! Everything the driver wrote is read once into local values (header, segments) and
//! checked there; the data itself is never interpreted, only copied, through volatile
//! slices of guest memory bounded by the chain's descriptors.

use log::debug;
use vfu_proto::tunnel::{
    decode_dma_request_head, encode_reply_head, Body, Kind, TunnelError, TunnelHeader,
    MAX_DMA_SEGMENTS, REPLY_HEAD_SIZE, TUNNEL_HEADER_SIZE,
};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, VolatileSlice,
};

use super::link::overlaps_any;
use super::Link;
use crate::client_memory::Direction;
use crate::switch::Relay;

/// Guest-physical stretches of a descriptor chain, in chain order.
#[derive(Debug, Clone, Default)]
pub struct GuestRanges(Vec<(GuestAddress, usize)>);

impl GuestRanges {
    /// Adds a descriptor's buffer.
    pub fn push(&mut self, addr: GuestAddress, len: usize) {
        self.0.push((addr, len));
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.0.iter().map(|r| r.1).sum()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of buffers (of any length, 0 included).
    pub fn buffers(&self) -> usize {
        self.0.len()
    }

    /// Whether a buffer meets one of `areas` (guest-physical address, bytes).
    pub fn meets(&self, areas: &[(u64, u64)]) -> bool {
        self.0
            .iter()
            .any(|&(a, n)| overlaps_any(areas, a.raw_value(), n as u64))
    }

    /// Copies as much of `bytes` as the ranges hold, from their start; returns how
    /// much (0 if a range is outside guest memory).
    pub fn write_prefix(&self, mem: &GuestMemoryMmap, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.len());
        if self.write(mem, 0, &bytes[..n]) {
            n
        } else {
            0
        }
    }

    /// Slices of guest memory covering `[offset, offset + len)` of the ranges, or `None`
    /// when that lies outside them or outside guest memory.
    pub fn slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        offset: usize,
        len: usize,
    ) -> Option<Vec<VolatileSlice<'m>>> {
        let mut out = Vec::new();
        let (mut skip, mut left) = (offset, len);
        for &(addr, n) in &self.0 {
            if left == 0 {
                break;
            }
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(left);
            let start = addr.checked_add(skip as u64)?;
            out.push(mem.get_slice(start, take).ok()?);
            skip = 0;
            left -= take;
        }
        (left == 0).then_some(out)
    }

    /// Copies `bytes` to `offset`.
    fn write(&self, mem: &GuestMemoryMmap, offset: usize, bytes: &[u8]) -> bool {
        let Some(slices) = self.slices(mem, offset, bytes.len()) else {
            return false;
        };
        let mut at = 0;
        for s in slices {
            s.copy_from(&bytes[at..at + s.len()]);
            at += s.len();
        }
        true
    }

    /// Reads up to `max` bytes from the start.
    pub fn read_prefix(&self, mem: &GuestMemoryMmap, max: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(max.min(self.len()));
        for &(addr, n) in &self.0 {
            let take = n.min(max - out.len());
            if take == 0 {
                break;
            }
            let at = out.len();
            out.resize(at + take, 0);
            mem.read_slice(&mut out[at..], addr).ok()?;
        }
        Some(out)
    }
}

/// What a direct request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectOp {
    /// DMA_READ: the data goes into the writable buffers after the reply head.
    Read,
    /// DMA_WRITE: the data lies in the readable buffers from this offset on.
    Write {
        /// Offset of the data in the readable buffers.
        data_at: usize,
    },
}

/// A DMA request to be answered in its own chain.
#[derive(Debug)]
pub struct DirectRequest {
    /// The request's header.
    pub header: TunnelHeader,
    /// Read or write.
    pub op: DirectOp,
    /// The segments, checked for count and overflow.
    pub segments: Vec<(u64, u64)>,
    readable: GuestRanges,
    writable: GuestRanges,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Where the chain came from, for [`crate::tunnel::Link::complete_direct`].
    pub pair: usize,
    /// Head descriptor of the chain.
    pub head: u16,
    /// Link generation the chain belongs to.
    pub generation: u64,
}

/// Largest readable prefix a direct request needs to be decoded (header and segments).
pub const HEAD_MAX: usize = TUNNEL_HEADER_SIZE + 8 + 16 * MAX_DMA_SEGMENTS;

/// A chain the relay cannot take as a direct request.
#[derive(Debug)]
pub struct BadDirect {
    /// The header, if it decoded.
    pub header: Option<TunnelHeader>,
    /// Why.
    pub error: TunnelError,
}

impl DirectRequest {
    /// Decodes a chain with writable buffers. `prefix` holds the first bytes of the
    /// readable buffers (up to [`HEAD_MAX`]).
    #[allow(clippy::too_many_arguments)]
    pub fn parse(
        prefix: &[u8],
        readable: GuestRanges,
        writable: GuestRanges,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        pair: usize,
        head: u16,
        generation: u64,
    ) -> Result<Self, BadDirect> {
        let header = TunnelHeader::decode(prefix).map_err(|error| BadDirect {
            header: None,
            error,
        })?;
        let bad = |error| BadDirect {
            header: Some(header),
            error,
        };
        if header.message_size() != readable.len() {
            return Err(bad(TunnelError::LengthMismatch {
                len: header.len,
                actual: readable.len().saturating_sub(TUNNEL_HEADER_SIZE),
            }));
        }
        if writable.len() < REPLY_HEAD_SIZE {
            return Err(bad(TunnelError::InvalidField {
                field: "device-writable bytes (the reply head needs 24)",
                value: writable.len() as u64,
            }));
        }
        let body = &prefix[TUNNEL_HEADER_SIZE..];
        let (segments, op) = match (Kind::from_u16(header.kind), header.reply) {
            (Some(Kind::DmaRead), false) => {
                let (segments, end) = decode_dma_request_head(body).map_err(bad)?;
                if end != header.len as usize {
                    return Err(bad(TunnelError::TrailingBytes {
                        extra: header.len as usize - end.min(header.len as usize),
                    }));
                }
                (segments, DirectOp::Read)
            }
            (Some(Kind::DmaWrite), false) => {
                let (segments, data_at) = decode_dma_request_head(body).map_err(bad)?;
                let total: u64 = segments.iter().map(|s| s.len).sum();
                if (header.len as u64).checked_sub(data_at as u64) != Some(total) {
                    return Err(bad(TunnelError::InvalidField {
                        field: "dma write data length",
                        value: header.len as u64,
                    }));
                }
                (
                    segments,
                    DirectOp::Write {
                        data_at: TUNNEL_HEADER_SIZE + data_at,
                    },
                )
            }
            _ => {
                return Err(bad(TunnelError::InvalidField {
                    field: "kind of a chain with device-writable buffers",
                    value: u64::from(header.kind),
                }))
            }
        };
        Ok(Self {
            header,
            op,
            segments: segments.iter().map(|s| (s.iova, s.len)).collect(),
            readable,
            writable,
            mem,
            pair,
            head,
            generation,
        })
    }

    /// Bytes the request moves.
    pub fn total(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Runs `f` on the guest buffers that hold the data (DMA_WRITE) or receive it
    /// (DMA_READ), and the direction of the copy to or from the client; `None` when the
    /// chain cannot hold the data.
    pub fn with_data<R>(&self, f: impl FnOnce(&[VolatileSlice<'_>], Direction) -> R) -> Option<R> {
        let mem = self.mem.memory();
        let len = usize::try_from(self.total()).ok()?;
        let (slices, direction) = match self.op {
            DirectOp::Read => (
                self.writable.slices(&mem, REPLY_HEAD_SIZE, len)?,
                Direction::FromClient,
            ),
            DirectOp::Write { data_at } => (
                self.readable.slices(&mem, data_at, len)?,
                Direction::ToClient,
            ),
        };
        Some(f(&slices, direction))
    }

    /// A DMA_WRITE's data, copied out (for the path through the client's messages).
    pub fn data(&self) -> Option<Vec<u8>> {
        self.with_data(|slices, _| {
            let mut out = Vec::with_capacity(slices.iter().map(|s| s.len()).sum());
            for s in slices {
                let at = out.len();
                out.resize(at + s.len(), 0);
                s.copy_to(&mut out[at..]);
            }
            out
        })
    }

    fn kind(&self) -> Kind {
        match self.op {
            DirectOp::Read => Kind::DmaRead,
            DirectOp::Write { .. } => Kind::DmaWrite,
        }
    }

    /// Writes the reply head (the data, if any, is already in place) and returns the
    /// chain to the driver.
    pub fn finish(self, link: &Link, status: u32, data_len: usize) {
        let head = encode_reply_head(
            self.header.channel,
            self.header.tag,
            self.kind(),
            status,
            data_len,
        );
        let written = if self.writable.write(&self.mem.memory(), 0, &head) {
            REPLY_HEAD_SIZE + data_len
        } else {
            0
        };
        link.complete_direct(&self, written as u32);
    }

    /// Answers with `body` (a reply that came the message way: from the client, or an
    /// error). A DMA_READ reply whose data does not fit the chain becomes `E2BIG`.
    pub fn answer(self, link: &Link, body: Body) {
        debug!(
            "direct request {} on channel {} answered with {:?}",
            self.header.tag,
            self.header.channel,
            body.kind()
        );
        match body {
            Body::DmaReadReply { status: 0, data } if self.op == DirectOp::Read => {
                let mem = self.mem.memory();
                if self.writable.len() - REPLY_HEAD_SIZE < data.len()
                    || !self.writable.write(&mem, REPLY_HEAD_SIZE, &data)
                {
                    drop(mem);
                    return self.finish(link, libc::E2BIG as u32, 0);
                }
                drop(mem);
                self.finish(link, 0, data.len());
            }
            Body::Status { status: 0, kind } if self.op != DirectOp::Read => {
                let status = if kind == Kind::DmaWrite as u16 {
                    0
                } else {
                    libc::EIO as u32
                };
                self.finish(link, status, 0)
            }
            Body::DmaReadReply { status, .. } | Body::Status { status, .. } => self.finish(
                link,
                if status == 0 {
                    libc::EIO as u32
                } else {
                    status
                },
                0,
            ),
            other => {
                debug!("direct request answered with {:?}; EIO", other.kind());
                self.finish(link, libc::EIO as u32, 0)
            }
        }
    }
}

/// Serves a direct request: straight between the client's memory and the chain where
/// the client's fds reach every segment, else the message way (client DMA commands,
/// errors), whose reply then lands in the chain.
pub fn serve(relay: &Relay, req: DirectRequest) {
    let (channel, tag) = (req.header.channel, req.header.tag);
    let Some(ch) = relay.channel(channel) else {
        return req.finish(&relay.link, libc::ENOENT as u32, 0);
    };
    let local = req.with_data(|slices, direction| ch.copy_local(&req.segments, slices, direction));
    let local = match local {
        // The chain cannot hold the data.
        None => return req.finish(&relay.link, libc::E2BIG as u32, 0),
        Some(l) => l,
    };
    match (local, &req.op) {
        (Some(Ok(())), DirectOp::Read) => {
            let n = req.total() as usize;
            req.finish(&relay.link, 0, n)
        }
        (Some(Ok(())), DirectOp::Write { .. }) => req.finish(&relay.link, 0, 0),
        (Some(Err(e)), _) => {
            // Logged by copy_local (a range the client's maps do not allow), or an I/O
            // error of the copy.
            debug!("{}: direct DMA request refused: {e:?}", ch.name);
            req.finish(&relay.link, e.errno(), 0)
        }
        (None, DirectOp::Read) => {
            let segments = req.segments.clone();
            if let Some(req) = relay.link.park_direct(req) {
                return req.finish(&relay.link, libc::EBUSY as u32, 0);
            }
            if let Some(reply) = ch.on_dma_read(relay, tag, &segments) {
                relay.link.reply(channel, tag, reply);
            }
        }
        (None, DirectOp::Write { .. }) => {
            let segments = req.segments.clone();
            let Some(mut data) = req.data() else {
                return req.finish(&relay.link, libc::EFAULT as u32, 0);
            };
            if let Some(req) = relay.link.park_direct(req) {
                return req.finish(&relay.link, libc::EBUSY as u32, 0);
            }
            if let Some(status) = ch.on_dma_write(relay, tag, &segments, &mut data) {
                relay.link.reply(
                    channel,
                    tag,
                    Body::Status {
                        kind: Kind::DmaWrite as u16,
                        status,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::RelayLimits;
    use vfu_proto::tunnel::{encode_dma_write_head, DmaSegment, TunnelMessage};

    fn memory() -> GuestMemoryAtomic<GuestMemoryMmap> {
        GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("guest memory"),
        )
    }

    fn ranges(list: &[(u64, usize)]) -> GuestRanges {
        let mut r = GuestRanges::default();
        for &(a, n) in list {
            r.push(GuestAddress(a), n);
        }
        r
    }

    /// Places `bytes` across `readable` and parses the chain.
    fn chain(
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        bytes: &[u8],
        readable: GuestRanges,
        writable: GuestRanges,
    ) -> Result<DirectRequest, BadDirect> {
        assert!(readable.write(&mem.memory(), 0, bytes));
        let prefix = readable.read_prefix(&mem.memory(), HEAD_MAX).unwrap();
        DirectRequest::parse(&prefix, readable, writable, mem.clone(), 0, 3, 1)
    }

    fn read_request(len: u64) -> Vec<u8> {
        TunnelMessage {
            channel: 2,
            tag: 5,
            body: Body::DmaRead {
                segments: vec![DmaSegment { iova: 0x1000, len }],
            },
        }
        .encode()
    }

    /// Proves that a chain is taken as a direct request only when its readable part is
    /// exactly one DMA_READ or DMA_WRITE request and its writable part can hold a reply
    /// head; and that the data buffers are the right bytes of the chain, across
    /// descriptor boundaries.
    #[test]
    fn chains_are_parsed_strictly() {
        let mem = memory();
        let req = read_request(100);
        // Readable split over two descriptors; writable over two.
        let ok = chain(
            &mem,
            &req,
            ranges(&[(0x100, 10), (0x200, req.len() - 10)]),
            ranges(&[(0x1000, 30), (0x2000, 94)]),
        )
        .unwrap();
        assert_eq!(ok.op, DirectOp::Read);
        assert_eq!(ok.segments, vec![(0x1000, 100)]);
        let lens = ok
            .with_data(|s, d| {
                assert_eq!(d, Direction::FromClient);
                s.iter().map(|s| s.len()).collect::<Vec<_>>()
            })
            .unwrap();
        assert_eq!(lens, vec![6, 94], "data after the 24-byte reply head");
        // The writable part cannot hold the data: no buffers (E2BIG for the caller).
        let short = chain(
            &mem,
            &req,
            ranges(&[(0x100, req.len())]),
            ranges(&[(0x1000, 60)]),
        );
        assert!(short.unwrap().with_data(|_, _| ()).is_none());
        // Too small for a reply head.
        assert!(chain(
            &mem,
            &req,
            ranges(&[(0x100, req.len())]),
            ranges(&[(0x1000, 8)])
        )
        .is_err());
        // Readable part longer than the message.
        assert!(chain(
            &mem,
            &req,
            ranges(&[(0x100, req.len() + 1)]),
            ranges(&[(0x1000, 200)])
        )
        .is_err());
        // Not a DMA request.
        let hello = TunnelMessage {
            channel: 0,
            tag: 1,
            body: Body::ChannelDown,
        }
        .encode();
        assert!(chain(
            &mem,
            &hello,
            ranges(&[(0x100, hello.len())]),
            ranges(&[(0x1000, 64)])
        )
        .is_err());
        // A DMA_WRITE whose data length disagrees with its segments.
        let seg = [DmaSegment {
            iova: 0x1000,
            len: 16,
        }];
        let mut w = encode_dma_write_head(2, 6, &seg, 8);
        w.extend_from_slice(&[1; 8]);
        assert!(chain(
            &mem,
            &w,
            ranges(&[(0x100, w.len())]),
            ranges(&[(0x1000, 64)])
        )
        .is_err());
        // A good DMA_WRITE: its data is the request's last 16 bytes.
        let mut w = encode_dma_write_head(2, 6, &seg, 16);
        w.extend_from_slice(&[9; 16]);
        let req = chain(
            &mem,
            &w,
            ranges(&[(0x100, w.len())]),
            ranges(&[(0x1000, 24)]),
        )
        .unwrap();
        assert_eq!(req.data().unwrap(), vec![9; 16]);
    }

    /// A direct request waiting for its client when the driver restarts (a second
    /// HELLO) is dropped: its chain was the old driver instance's, and giving it back
    /// later would put a head the new instance never posted in its used ring.
    #[test]
    fn a_driver_restart_drops_parked_requests() {
        let link = Link::new(1, RelayLimits::DEFAULT, Vec::new());
        let mem = memory();
        let req = read_request(16);
        let parked = chain(
            &mem,
            &req,
            ranges(&[(0x100, req.len())]),
            ranges(&[(0x1000, 24 + 16)]),
        )
        .unwrap();
        assert!(link.park_direct(parked).is_none());
        assert_eq!(link.counts().parked, 1);
        link.set_up(crate::tunnel::Negotiated {
            pairs: 1,
            guest_max_msg: 1 << 20,
            features: 0,
        });
        assert_eq!(link.counts().parked, 0);
    }

    /// Proves that an answer lands in the chain as a well-formed reply (head, status,
    /// data) and that data that does not fit becomes E2BIG instead of an overrun.
    #[test]
    fn answers_land_in_the_chain() {
        let link = Link::new(1, RelayLimits::DEFAULT, Vec::new());
        let mem = memory();
        let req = read_request(4);
        let answer = |data: Vec<u8>| {
            let r = chain(
                &mem,
                &req,
                ranges(&[(0x100, req.len())]),
                ranges(&[(0x1000, 28)]),
            )
            .unwrap();
            r.answer(&link, Body::DmaReadReply { status: 0, data });
        };
        answer(vec![1, 2, 3, 4]);
        let mut got = [0u8; 28];
        mem.memory()
            .read_slice(&mut got, GuestAddress(0x1000))
            .unwrap();
        let expected = TunnelMessage {
            channel: 2,
            tag: 5,
            body: Body::DmaReadReply {
                status: 0,
                data: vec![1, 2, 3, 4],
            },
        }
        .encode();
        assert_eq!(got.to_vec(), expected);
        // Five bytes do not fit four: E2BIG, and nothing written past the chain.
        mem.memory()
            .write_slice(&[0xaa; 8], GuestAddress(0x1000 + 28))
            .unwrap();
        answer(vec![1, 2, 3, 4, 5]);
        let mut head = [0u8; 32];
        mem.memory()
            .read_slice(&mut head, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            u32::from_le_bytes(head[16..20].try_into().unwrap()),
            libc::E2BIG as u32
        );
        assert_eq!(head[28..], [0xaa; 4]);
    }
}
