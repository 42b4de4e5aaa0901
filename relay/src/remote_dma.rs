//! The copy path for memory the client mapped without an fd: the relay turns the device
//! VM's DMA_READ / DMA_WRITE into vfio-user DMA_READ / DMA_WRITE commands to the client
//! (server-to-client messages on the same socket), chunked to the client's
//! `max_data_xfer_size`, and answers the device VM when every chunk is back.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use log::debug;
use vfu_proto::tunnel::{Body, Kind};
use vfu_proto::vfio_user::{
    encode_request, Command, CountWidth, DmaAccess, DmaReadReply, DmaWrite, DmaWriteReply, Header,
    Request,
};

/// One vfio-user command sent to the client.
#[derive(Debug)]
struct Chunk {
    msg_id: u16,
    command: Command,
    /// The tunnel request it belongs to.
    tag: u32,
    iova: u64,
    len: usize,
    /// Where its bytes go in the operation's data (reads).
    at: usize,
    deadline: Instant,
}

/// A tunnel DMA request being served.
#[derive(Debug)]
struct Op {
    read: bool,
    data: Vec<u8>,
    outstanding: usize,
    status: u32,
    /// Bytes it moves.
    bytes: u64,
}

/// Most DMA operations of the device VM that may wait for one client's answers at
/// once. A driver waits for each of its DMA requests; one client's device has one or a
/// few of them in flight.
pub const MAX_OPS: usize = 16;

/// Most bytes those operations may move together: what the relay holds for them (read
/// buffers, write data in the client's socket) until the client answers.
pub const MAX_BYTES: u64 = 16 << 20;

impl Op {
    fn body(self) -> Body {
        if self.read {
            Body::DmaReadReply {
                status: self.status,
                data: if self.status == 0 {
                    self.data
                } else {
                    Vec::new()
                },
            }
        } else {
            Body::Status {
                kind: Kind::DmaWrite as u16,
                status: self.status,
            }
        }
    }
}

/// The server-to-client DMA commands of one client connection.
#[derive(Debug, Default)]
pub struct RemoteDma {
    next_id: u16,
    chunks: VecDeque<Chunk>,
    ops: HashMap<u32, Op>,
    /// Bytes of the operations in `ops`.
    bytes: u64,
}

/// A finished operation: the tunnel tag and the reply body for the device VM.
pub type Done = (u32, Body);

impl RemoteDma {
    /// Whether operations are in flight.
    pub fn is_idle(&self) -> bool {
        self.ops.is_empty()
    }

    /// Operations in flight, and commands sent to the client for them.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.ops.len(), self.chunks.len())
    }

    /// Whether an operation with tunnel tag `tag` is in flight (a device VM reusing a
    /// tag gets EBUSY instead of mixing two operations).
    pub fn busy(&self, tag: u32) -> bool {
        self.ops.contains_key(&tag)
    }

    /// Whether another operation of `bytes` may start ([`MAX_OPS`], [`MAX_BYTES`]): a
    /// device VM asking for more at once gets EAGAIN, where the relay would otherwise
    /// hold any number of them until the client answers or the timeout passes.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.ops.len() < MAX_OPS && self.bytes.saturating_add(bytes) <= MAX_BYTES
    }

    /// Starts reading `segments`; returns the messages to send to the client.
    pub fn start_read(
        &mut self,
        tag: u32,
        segments: &[(u64, u64)],
        max_xfer: usize,
        deadline: Instant,
    ) -> Vec<Vec<u8>> {
        let total: u64 = segments.iter().map(|s| s.1).sum();
        self.start(tag, segments, None, total as usize, max_xfer, deadline)
    }

    /// Starts writing `data` across `segments`; returns the messages to send.
    pub fn start_write(
        &mut self,
        tag: u32,
        segments: &[(u64, u64)],
        data: &[u8],
        max_xfer: usize,
        deadline: Instant,
    ) -> Vec<Vec<u8>> {
        self.start(tag, segments, Some(data), 0, max_xfer, deadline)
    }

    fn start(
        &mut self,
        tag: u32,
        segments: &[(u64, u64)],
        write: Option<&[u8]>,
        read_len: usize,
        max_xfer: usize,
        deadline: Instant,
    ) -> Vec<Vec<u8>> {
        let max_xfer = max_xfer.max(1);
        let mut out = Vec::new();
        let mut at = 0usize;
        for &(iova, len) in segments {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(max_xfer as u64) as usize;
                let msg_id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1);
                let address = iova + done;
                let (command, req) = match write {
                    None => (
                        Command::DmaRead,
                        Request::DmaRead(DmaAccess {
                            address,
                            count: n as u64,
                            width: CountWidth::U64,
                        }),
                    ),
                    Some(data) => (
                        Command::DmaWrite,
                        Request::DmaWrite(DmaWrite {
                            address,
                            data: data[at..at + n].to_vec(),
                            width: CountWidth::U64,
                        }),
                    ),
                };
                out.push(encode_request(msg_id, &req, false));
                self.chunks.push_back(Chunk {
                    msg_id,
                    command,
                    tag,
                    iova: address,
                    len: n,
                    at,
                    deadline,
                });
                done += n as u64;
                at += n;
            }
        }
        let bytes = segments.iter().fold(0u64, |a, s| a.saturating_add(s.1));
        self.bytes = self.bytes.saturating_add(bytes);
        self.ops.insert(
            tag,
            Op {
                read: write.is_none(),
                data: vec![0; read_len],
                outstanding: out.len(),
                status: 0,
                bytes,
            },
        );
        out
    }

    /// A reply from the client. Returns the operation it completed, if any. A reply
    /// that matches nothing is ignored (logged).
    pub fn on_reply(&mut self, header: &Header, payload: &[u8]) -> Option<Done> {
        let pos = self
            .chunks
            .iter()
            .position(|c| c.msg_id == header.msg_id && c.command as u16 == header.command);
        let Some(pos) = pos else {
            debug!(
                "client reply {} matches no DMA command; ignored",
                header.msg_id
            );
            return None;
        };
        let chunk = self.chunks.remove(pos).expect("position is valid");
        let status = match header.error {
            Some(errno) => {
                debug!("client refused DMA at {:#x}: errno {errno}", chunk.iova);
                libc::EFAULT as u32
            }
            None => self.apply(&chunk, payload),
        };
        self.finish_chunk(chunk.tag, status)
    }

    /// Copies a DMA_READ reply into its operation; checks a DMA_WRITE reply.
    fn apply(&mut self, chunk: &Chunk, payload: &[u8]) -> u32 {
        let fault = libc::EFAULT as u32;
        match chunk.command {
            Command::DmaRead => {
                // The relay sent the u64 layout; QEMU answers in its own (u32, padded),
                // which this endpoint knows to expect from the length it asked for.
                let reply = DmaReadReply::decode_as(payload, CountWidth::U64)
                    .or_else(|_| DmaReadReply::decode_as(payload, CountWidth::U32Padded))
                    .or_else(|_| DmaReadReply::decode_as(payload, CountWidth::U32));
                match reply {
                    Ok(r) if r.address == chunk.iova && r.data.len() == chunk.len => {
                        if let Some(op) = self.ops.get_mut(&chunk.tag) {
                            op.data[chunk.at..chunk.at + chunk.len].copy_from_slice(&r.data);
                        }
                        0
                    }
                    _ => fault,
                }
            }
            _ => match vfu_proto::vfio_user::Reply::decode(chunk.command as u16, payload, 0) {
                Ok(vfu_proto::vfio_user::Reply::DmaWrite(DmaWriteReply::Empty)) => 0,
                Ok(vfu_proto::vfio_user::Reply::DmaWrite(DmaWriteReply::Echo {
                    address,
                    count,
                    ..
                })) if address == chunk.iova && count == chunk.len as u64 => 0,
                _ => fault,
            },
        }
    }

    fn finish_chunk(&mut self, tag: u32, status: u32) -> Option<Done> {
        let op = self.ops.get_mut(&tag)?;
        op.outstanding -= 1;
        if op.status == 0 {
            op.status = status;
        }
        if op.outstanding > 0 {
            return None;
        }
        let op = self.ops.remove(&tag)?;
        self.bytes = self.bytes.saturating_sub(op.bytes);
        Some((tag, op.body()))
    }

    /// Operations whose chunks waited past their deadline fail with ETIMEDOUT.
    pub fn expire(&mut self, now: Instant) -> Vec<Done> {
        let late: Vec<u32> = self
            .chunks
            .iter()
            .filter(|c| c.deadline <= now)
            .map(|c| c.tag)
            .collect();
        self.fail(late, libc::ETIMEDOUT as u32)
    }

    /// Forgets every operation without an answer: the device VM that asked is gone (or
    /// restarted and knows nothing of them). Message IDs go on from where they were, so
    /// the client's late replies to the forgotten commands match nothing.
    pub fn forget_all(&mut self) {
        self.ops.clear();
        self.chunks.clear();
    }

    /// Every operation fails with `errno` (the client went away).
    pub fn fail_all(&mut self, errno: u32) -> Vec<Done> {
        let tags: Vec<u32> = self.ops.keys().copied().collect();
        self.fail(tags, errno)
    }

    fn fail(&mut self, tags: Vec<u32>, errno: u32) -> Vec<Done> {
        let mut out = Vec::new();
        for tag in tags {
            self.chunks.retain(|c| c.tag != tag);
            if let Some(mut op) = self.ops.remove(&tag) {
                self.bytes = self.bytes.saturating_sub(op.bytes);
                op.status = errno;
                out.push((tag, op.body()));
            }
        }
        out
    }

    /// The earliest chunk deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.chunks.iter().map(|c| c.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vfu_proto::vfio_user::{encode_error_reply, encode_reply, Reply, HEADER_SIZE};

    /// At most 16 operations, and 16 MiB, wait for the client at once; an operation
    /// that completes or fails makes room again.
    #[test]
    fn operations_in_flight_are_bounded() {
        let mut r = RemoteDma::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        for tag in 0..MAX_OPS as u32 {
            assert!(r.has_room(4096));
            r.start_read(tag, &[(0x1000, 4096)], 1 << 20, deadline);
        }
        assert!(!r.has_room(1), "16 operations");
        assert_eq!(r.fail(vec![3], libc::EFAULT as u32).len(), 1);
        assert!(r.has_room(4096));
        let mut r = RemoteDma::default();
        for tag in 0..15 {
            r.start_read(tag, &[(0x1000, 1 << 20)], 1 << 20, deadline);
        }
        assert!(r.has_room(1 << 20));
        assert!(!r.has_room((1 << 20) + 1), "16 MiB");
        assert_eq!(r.fail_all(libc::ENODEV as u32).len(), 15);
        assert!(r.has_room(MAX_BYTES));
    }

    fn header(bytes: &[u8]) -> Header {
        Header::decode(bytes).unwrap()
    }

    /// A read split into chunks completes when every chunk is back, with the data in
    /// order; a write completes on the client's replies (either layout).
    #[test]
    fn read_and_write_complete() {
        let mut r = RemoteDma::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        let msgs = r.start_read(7, &[(0x1000, 6), (0x9000, 2)], 4, deadline);
        assert_eq!(msgs.len(), 3, "6 bytes in chunks of 4, then 2");
        let mut done = None;
        for (i, m) in msgs.iter().enumerate().rev() {
            let h = header(m);
            let Request::DmaRead(a) = Request::decode(h.command, &m[HEADER_SIZE..], 0).unwrap()
            else {
                panic!()
            };
            let data: Vec<u8> = (0..a.count as u8).map(|b| b + 10 * i as u8).collect();
            let reply = encode_reply(
                h.msg_id,
                &Reply::DmaRead(DmaReadReply {
                    address: a.address,
                    data,
                    width: CountWidth::U64,
                }),
            );
            done = r.on_reply(&header(&reply), &reply[HEADER_SIZE..]);
        }
        let (tag, body) = done.expect("complete after the last chunk");
        assert_eq!(tag, 7);
        assert_eq!(
            body,
            Body::DmaReadReply {
                status: 0,
                data: vec![0, 1, 2, 3, 10, 11, 20, 21]
            }
        );
        let msgs = r.start_write(8, &[(0x2000, 3)], &[1, 2, 3], 1 << 20, deadline);
        let h = header(&msgs[0]);
        let reply = encode_reply(h.msg_id, &Reply::DmaWrite(DmaWriteReply::Empty));
        let (_, body) = r.on_reply(&header(&reply), &reply[HEADER_SIZE..]).unwrap();
        assert_eq!(
            body,
            Body::Status {
                kind: Kind::DmaWrite as u16,
                status: 0
            }
        );
        assert!(r.is_idle());
    }

    /// A client error reply, a reply with the wrong address, a deadline and a
    /// disconnect all end the operation with an error for the device VM.
    #[test]
    fn failures() {
        let mut r = RemoteDma::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        let m = r.start_read(1, &[(0x1000, 4)], 64, deadline);
        let err = encode_error_reply(&header(&m[0]), libc::EPERM as u32);
        let (_, body) = r.on_reply(&header(&err), &[]).unwrap();
        assert!(matches!(body, Body::DmaReadReply { status, .. } if status == libc::EFAULT as u32));

        let m = r.start_read(2, &[(0x1000, 4)], 64, deadline);
        let wrong = encode_reply(
            header(&m[0]).msg_id,
            &Reply::DmaRead(DmaReadReply {
                address: 0x2000,
                data: vec![0; 4],
                width: CountWidth::U64,
            }),
        );
        let (_, body) = r.on_reply(&header(&wrong), &wrong[HEADER_SIZE..]).unwrap();
        assert!(matches!(body, Body::DmaReadReply { status, .. } if status != 0));

        r.start_read(3, &[(0x1000, 4)], 64, Instant::now());
        assert_eq!(r.expire(Instant::now() + Duration::from_millis(1)).len(), 1);
        r.start_write(4, &[(0x1000, 1)], &[0], 64, deadline);
        let failed = r.fail_all(libc::ENODEV as u32);
        assert_eq!(failed.len(), 1);
        assert!(r.is_idle());
    }
}
