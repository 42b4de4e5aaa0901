//! Receiving side: reassembles messages from partial reads and collects their fds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use libc::{c_void, iovec};
use log::warn;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{Limits, TransportError, SCM_MAX_FD};
use crate::vfio_user::{DecodeError, Header, HEADER_SIZE};

/// A whole message as it came off the socket: a valid header, the payload it announced
/// and the fds that came with it. The payload is not decoded yet.
#[derive(Debug)]
pub struct RawMessage {
    /// The decoded header.
    pub header: Header,
    /// `header.size - 16` bytes of payload.
    pub payload: Vec<u8>,
    /// File descriptors received with the message, in order.
    pub fds: Vec<OwnedFd>,
}

/// A message the reader consumed but refused; its fds are already closed. The header is
/// intact, so the receiver can send an error reply (`error.errno()`) and carry on.
#[derive(Debug)]
pub struct Rejected {
    /// The header of the refused message.
    pub header: Header,
    /// Why it was refused.
    pub error: DecodeError,
}

/// What one complete read produced.
#[derive(Debug)]
pub enum Frame {
    /// A message within the limits.
    Message(RawMessage),
    /// A message that broke a limit; the stream is still in sync.
    Rejected(Rejected),
}

#[derive(Debug)]
enum State {
    /// Reading the 16-byte header; `filled` bytes so far.
    Header {
        buf: [u8; HEADER_SIZE],
        filled: usize,
    },
    /// Reading the payload into `payload`, which has its final length.
    Payload {
        header: Header,
        payload: Vec<u8>,
        filled: usize,
    },
    /// Skipping the payload of a message that is over the size limit.
    Discard {
        header: Header,
        remaining: usize,
        error: DecodeError,
    },
}

/// Reads framed messages from a UNIX stream socket. Keep one per connection: it holds
/// the part of a message read so far.
///
/// Two ways of reading: [`MessageReader::new`] reads exactly one message's bytes at a
/// time (a `recvmsg` for the header, one for the payload), so nothing past the message
/// leaves the socket. [`MessageReader::buffered`] reads whatever the socket holds into
/// a buffer of [`READ_BUFFER`] bytes and hands the messages out of it: a message takes
/// one `recvmsg` or a share of one instead of two, and a read that comes back short
/// says the socket is empty without another call ([`MessageReader::drained`]). The
/// buffered reader's caller must look at [`MessageReader::has_buffered_message`]
/// before it waits for the socket to be readable: messages in the buffer do not make
/// it so.
///
/// File descriptors belong to the message they were sent with. The unbuffered reader
/// gives them to the message it is reading when they come (a sender sends a message's
/// fds with its first bytes). A buffered read may take several messages at once, and
/// the kernel ends a read right after the data that carried fds: they were sent with
/// one of the messages that start in that read, the first of the last `sendmsg`, which
/// the read does not show. The buffered reader gives them to the last message starting
/// in the read that may carry fds (its caller says which commands may), else to the
/// last message starting in it, else to the message the read continues. That is the
/// sender's message when each `sendmsg` carries one message, and when a `sendmsg` of
/// several carries the fds of its only message that may take them (a DMA_MAP with its
/// DMA_UNMAP); only a `sendmsg` of two messages that may both take fds, the fds
/// meant for the first, is read otherwise than by the unbuffered reader.
#[derive(Debug)]
pub struct MessageReader {
    limits: Limits,
    state: State,
    fds: Vec<OwnedFd>,
    /// fds of the current message beyond `max_msg_fds`, closed on arrival (the reader
    /// never holds more than the limit, however a peer spreads fds over a message).
    excess_fds: usize,
    /// The buffer of a buffered reader.
    buffer: Option<ReadBuffer>,
    /// Which commands may carry fds (for the buffered reader).
    may_carry_fds: fn(u16) -> bool,
    /// The last `recvmsg` returned fewer bytes than asked for: the socket was empty.
    short: bool,
}

/// Bytes a buffered reader takes from the socket at once; larger messages are read
/// into their own payload, as by an unbuffered reader.
pub const READ_BUFFER: usize = 16 << 10;

/// What a buffered reader holds between calls.
#[derive(Debug)]
struct ReadBuffer {
    bytes: Box<[u8]>,
    /// `bytes[start..end]` are received and not handed out; `start` is where a message
    /// begins.
    start: usize,
    end: usize,
    /// Stream offset of `bytes[start]`: bytes received before it.
    offset: u64,
    /// fds received and not handed out yet: the stream offset of the message they go
    /// to ([`ReadBuffer::fd_owner`]), the fds, and how many more came and were closed
    /// at once.
    pending: Vec<(u64, Vec<OwnedFd>, usize)>,
}

impl ReadBuffer {
    fn available(&self) -> usize {
        self.end - self.start
    }

    /// The size field of the header at `start`, if a whole header is there.
    fn next_size(&self) -> Option<usize> {
        self.size_at(self.start)
    }

    /// The size field of the header at `at`, if a whole header is there.
    fn size_at(&self, at: usize) -> Option<usize> {
        (at + HEADER_SIZE <= self.end).then(|| {
            let b = &self.bytes[at + 4..at + 8];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
    }

    /// Hands out `n` bytes from `start`, with the fds that came with any of them.
    fn consume(&mut self, n: usize) -> (Vec<OwnedFd>, usize) {
        self.start += n;
        self.offset += n as u64;
        let (mut fds, mut excess) = (Vec::new(), 0);
        let end = self.offset;
        self.pending.retain_mut(|(at, f, x)| {
            if *at < end {
                fds.append(f);
                excess += *x;
                false
            } else {
                true
            }
        });
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        (fds, excess)
    }

    fn pending_fds(&self) -> usize {
        self.pending.iter().map(|(_, f, _)| f.len()).sum()
    }

    /// The stream offset of the message that gets the fds of the read that filled
    /// `bytes[from..self.end]` (see [`MessageReader`]).
    fn fd_owner(&self, from: usize, may_carry_fds: fn(u16) -> bool) -> u64 {
        let mut at = self.start;
        let (mut current, mut last, mut last_carrier) = (self.start, None, None);
        while at < self.end {
            if at < from {
                current = at;
            } else {
                last = Some(at);
                // A start whose command is not here yet may be the carrier.
                let carrier = self
                    .bytes
                    .get(at + 2..at + 4)
                    .is_none_or(|c| may_carry_fds(u16::from_le_bytes([c[0], c[1]])));
                if carrier {
                    last_carrier = Some(at);
                }
            }
            let Some(size) = self.size_at(at).filter(|&s| s >= HEADER_SIZE) else {
                break; // an incomplete or unframeable header: nothing starts after it
            };
            at += size;
        }
        let owner = last_carrier.or(last).unwrap_or(current);
        self.offset + (owner - self.start) as u64
    }
}

/// What the buffered path of a read came to.
enum Buffered {
    Frame(Frame),
    WouldBlock,
    /// The next message is larger than the buffer, or refused: what the buffer held of
    /// it is taken, and the rest is read (or skipped) as by an unbuffered reader.
    Large,
}

/// Upper bound on a message whose payload the reader skips instead of closing the
/// connection: a peer announcing more than this is not speaking vfio-user.
const MAX_DISCARD: usize = 64 << 20;

impl MessageReader {
    /// A reader enforcing `limits` on every message.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Header {
                buf: [0; HEADER_SIZE],
                filled: 0,
            },
            fds: Vec::new(),
            excess_fds: 0,
            buffer: None,
            short: false,
            may_carry_fds: |_| true,
        }
    }

    /// A reader enforcing `limits` that reads through a buffer of [`READ_BUFFER`]
    /// bytes (see [`MessageReader`]): for a caller that looks at
    /// [`MessageReader::has_buffered_message`] before waiting for the socket.
    /// `may_carry_fds` says which commands may come with fds.
    pub fn buffered(limits: Limits, may_carry_fds: fn(u16) -> bool) -> Self {
        Self {
            may_carry_fds,
            buffer: Some(ReadBuffer {
                bytes: vec![0; READ_BUFFER].into_boxed_slice(),
                start: 0,
                end: 0,
                offset: 0,
                pending: Vec::new(),
            }),
            ..Self::new(limits)
        }
    }

    /// Whether the next [`MessageReader::read`] hands out a message (or refuses one)
    /// from the buffer, with no system call.
    pub fn has_buffered_message(&self) -> bool {
        if !self.at_message_start() {
            return false;
        }
        let Some(b) = &self.buffer else {
            return false;
        };
        b.next_size()
            .is_some_and(|size| size < HEADER_SIZE || size <= b.available())
    }

    /// Whether the socket had nothing more to give when it was last read (that read
    /// came back short) and no whole message waits in the buffer: a caller driven by
    /// level-triggered readiness can stop reading until the socket is readable again,
    /// without the `recvmsg` that would say `EAGAIN`.
    pub fn drained(&self) -> bool {
        self.short && !self.has_buffered_message()
    }

    fn at_message_start(&self) -> bool {
        matches!(self.state, State::Header { filled: 0, .. })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the limits for the messages that follow (after VERSION negotiation).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether part of a message has been read (and the rest has not).
    pub fn is_mid_message(&self) -> bool {
        !self.at_message_start()
            || self.buffer.as_ref().is_some_and(|b| b.available() > 0)
                && !self.has_buffered_message()
    }

    /// Reads until one message is complete.
    ///
    /// On a blocking socket this returns `Some` or an error. On a non-blocking socket it
    /// returns `Ok(None)` when no more bytes are available yet; call it again when the
    /// socket is readable.
    pub fn read(&mut self, sock: &UnixStream) -> Result<Option<Frame>, TransportError> {
        let res = self.read_inner(sock);
        if res.is_err() {
            self.reset();
        }
        res
    }

    fn read_inner(&mut self, sock: &UnixStream) -> Result<Option<Frame>, TransportError> {
        if self.buffer.is_some() && self.at_message_start() {
            match self.read_buffered(sock)? {
                Buffered::Frame(f) => return Ok(Some(f)),
                Buffered::WouldBlock => return Ok(None),
                Buffered::Large => {}
            }
        }
        loop {
            match &mut self.state {
                State::Header { buf, filled } => {
                    let Some(n) = recv(
                        sock,
                        &mut buf[*filled..],
                        &mut self.fds,
                        self.limits.max_msg_fds,
                        &mut self.excess_fds,
                        &mut self.short,
                    )?
                    else {
                        return Ok(None);
                    };
                    if n == 0 {
                        return Err(if *filled == 0 {
                            TransportError::Closed
                        } else {
                            TransportError::ClosedMidMessage {
                                received: *filled,
                                expected: HEADER_SIZE,
                            }
                        });
                    }
                    *filled += n;
                    if *filled == HEADER_SIZE {
                        let bytes = *buf;
                        self.start_payload(&bytes)?;
                    }
                }
                State::Payload {
                    payload, filled, ..
                } => {
                    if *filled == payload.len() {
                        return Ok(Some(self.finish()));
                    }
                    let Some(n) = recv(
                        sock,
                        &mut payload[*filled..],
                        &mut self.fds,
                        self.limits.max_msg_fds,
                        &mut self.excess_fds,
                        &mut self.short,
                    )?
                    else {
                        return Ok(None);
                    };
                    if n == 0 {
                        return Err(TransportError::ClosedMidMessage {
                            received: HEADER_SIZE + *filled,
                            expected: HEADER_SIZE + payload.len(),
                        });
                    }
                    *filled += n;
                }
                State::Discard { remaining, .. } => {
                    if *remaining == 0 {
                        return Ok(Some(self.finish()));
                    }
                    let mut scratch = [0u8; 4096];
                    let want = (*remaining).min(scratch.len());
                    let Some(n) = recv(
                        sock,
                        &mut scratch[..want],
                        &mut self.fds,
                        self.limits.max_msg_fds,
                        &mut self.excess_fds,
                        &mut self.short,
                    )?
                    else {
                        return Ok(None);
                    };
                    if n == 0 {
                        return Err(TransportError::ClosedMidMessage {
                            received: 0,
                            expected: *remaining,
                        });
                    }
                    *remaining -= n;
                }
            }
        }
    }

    /// The buffered path, at a message boundary: hands out the next message if the
    /// buffer holds it whole, else reads what the socket has (one `recvmsg`) and looks
    /// again.
    fn read_buffered(&mut self, sock: &UnixStream) -> Result<Buffered, TransportError> {
        let limits = self.limits;
        let Some(b) = self.buffer.as_mut() else {
            return Ok(Buffered::Large);
        };
        loop {
            let available = b.available();
            if let Some(size) = b.next_size() {
                let mut raw = [0u8; HEADER_SIZE];
                raw.copy_from_slice(&b.bytes[b.start..b.start + HEADER_SIZE]);
                let within = size <= limits.max_msg_size;
                match Header::decode(&raw) {
                    Ok(header) if within && size <= available => {
                        let payload = b.bytes[b.start + HEADER_SIZE..b.start + size].to_vec();
                        let (fds, excess) = b.consume(size);
                        return Ok(Buffered::Frame(frame(header, payload, fds, excess, limits)));
                    }
                    Ok(_) if within && size <= b.bytes.len() => {} // the rest comes
                    _ => {
                        self.hand_over(&raw, size.min(available))?;
                        return Ok(Buffered::Large);
                    }
                }
            }
            // Not a whole message: read more behind what is here.
            if b.start > 0 {
                b.bytes.copy_within(b.start..b.end, 0);
                b.end -= b.start;
                b.start = 0;
            }
            let allowed = (2 * limits.max_msg_fds).saturating_sub(b.pending_fds());
            let (mut fds, mut excess) = (Vec::new(), 0);
            let end = b.end;
            let into = &mut b.bytes[end..];
            let Some(n) = recv(sock, into, &mut fds, allowed, &mut excess, &mut self.short)? else {
                return Ok(Buffered::WouldBlock);
            };
            if n == 0 {
                return Err(if available == 0 {
                    TransportError::Closed
                } else {
                    TransportError::ClosedMidMessage {
                        received: available,
                        expected: b.next_size().unwrap_or(HEADER_SIZE),
                    }
                });
            }
            b.end += n;
            if !fds.is_empty() || excess > 0 {
                let owner = b.fd_owner(end, self.may_carry_fds);
                b.pending.push((owner, fds, excess));
            }
        }
    }

    /// Leaves the message at the buffer's start, of which the buffer holds `here` bytes
    /// (its header `raw` among them), to the unbuffered path: one larger than the
    /// buffer, or one to refuse. [`MessageReader::start_payload`] judges the header as
    /// for an unbuffered read; the bytes and fds the buffer holds become the message's.
    fn hand_over(&mut self, raw: &[u8; HEADER_SIZE], here: usize) -> Result<(), TransportError> {
        self.start_payload(raw)?;
        let Some(b) = self.buffer.as_mut() else {
            return Ok(());
        };
        let rest = &b.bytes[b.start + HEADER_SIZE..b.start + here];
        match &mut self.state {
            State::Payload {
                payload, filled, ..
            } => {
                payload[..rest.len()].copy_from_slice(rest);
                *filled = rest.len();
            }
            State::Discard { remaining, .. } => *remaining -= rest.len(),
            State::Header { .. } => {}
        }
        let (fds, excess) = b.consume(here);
        self.adopt_fds(fds, excess);
        Ok(())
    }

    /// Makes `fds` the current message's, up to the limit (the rest is closed and
    /// counted).
    fn adopt_fds(&mut self, fds: Vec<OwnedFd>, excess: usize) {
        self.excess_fds += excess;
        for fd in fds {
            if self.fds.len() < self.limits.max_msg_fds {
                self.fds.push(fd);
            } else {
                self.excess_fds += 1;
            }
        }
    }

    /// Validates a complete header and sets up the payload read.
    fn start_payload(&mut self, bytes: &[u8; HEADER_SIZE]) -> Result<(), TransportError> {
        let header = match Header::decode(bytes) {
            Ok(h) => h,
            Err(DecodeError::SizeTooSmall { size }) => {
                return Err(TransportError::BadHeader(DecodeError::SizeTooSmall {
                    size,
                }));
            }
            Err(error) => {
                // The size field is still usable (it was checked first): skip the message
                // so that the stream stays in sync, then report it. Re-read the raw size.
                return self.discard(raw_header(bytes), error);
            }
        };
        let size = header.size as usize;
        if size > self.limits.max_msg_size {
            let error = DecodeError::TooLarge {
                size,
                limit: self.limits.max_msg_size,
            };
            return self.discard(header, error);
        }
        self.state = State::Payload {
            header,
            payload: vec![0; header.payload_len()],
            filled: 0,
        };
        Ok(())
    }

    fn discard(&mut self, header: Header, error: DecodeError) -> Result<(), TransportError> {
        let size = header.size as usize;
        if size > MAX_DISCARD {
            return Err(TransportError::BadHeader(error));
        }
        self.state = State::Discard {
            header,
            remaining: size - HEADER_SIZE,
            error,
        };
        Ok(())
    }

    /// Hands out the completed message and resets for the next one.
    fn finish(&mut self) -> Frame {
        let state = std::mem::replace(
            &mut self.state,
            State::Header {
                buf: [0; HEADER_SIZE],
                filled: 0,
            },
        );
        let fds = std::mem::take(&mut self.fds);
        let excess = std::mem::take(&mut self.excess_fds);
        match state {
            State::Payload {
                header, payload, ..
            } => frame(header, payload, fds, excess, self.limits),
            State::Discard { header, error, .. } => Frame::Rejected(Rejected { header, error }),
            State::Header { .. } => unreachable!("finish called without a message"),
        }
    }

    fn reset(&mut self) {
        self.state = State::Header {
            buf: [0; HEADER_SIZE],
            filled: 0,
        };
        self.fds.clear();
        self.excess_fds = 0;
        self.short = false;
        if let Some(b) = self.buffer.as_mut() {
            b.start = 0;
            b.end = 0;
            b.pending.clear();
        }
    }
}

/// A whole message and its fds, or its refusal when more fds came with it than
/// `limits` allow.
fn frame(
    header: Header,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
    excess: usize,
    limits: Limits,
) -> Frame {
    let count = fds.len() + excess;
    if count > limits.max_msg_fds {
        warn!(
            "message {} (command {}) carries {count} fds, limit {}; rejected",
            header.msg_id, header.command, limits.max_msg_fds
        );
        return Frame::Rejected(Rejected {
            header,
            error: DecodeError::TooManyFds {
                count,
                limit: limits.max_msg_fds,
            },
        });
    }
    Frame::Message(RawMessage {
        header,
        payload,
        fds,
    })
}

/// What can be told of a header that does not decode: its id, command and size.
fn raw_header(bytes: &[u8; HEADER_SIZE]) -> Header {
    Header {
        msg_id: u16::from_le_bytes([bytes[0], bytes[1]]),
        command: u16::from_le_bytes([bytes[2], bytes[3]]),
        size: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        msg_type: crate::vfio_user::MessageType::Command,
        no_reply: false,
        error: None,
    }
}

/// One `recvmsg` into `buf`, adding the fds that came with it to `fds` up to `limit`
/// and closing (counting in `excess`) the rest. `None` on `EAGAIN`; retries `EINTR`.
/// `short` says whether the socket gave less than `buf` asked for (nothing, on
/// `EAGAIN`): it was empty then.
fn recv(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    limit: usize,
    excess: &mut usize,
    short: &mut bool,
) -> Result<Option<usize>, TransportError> {
    let mut raw = [0 as RawFd; SCM_MAX_FD];
    loop {
        let mut iov = [iovec {
            iov_base: buf.as_mut_ptr() as *mut c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points into `buf`, which is valid for writes of its length
        // for the duration of the call.
        let res = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        match res {
            Ok((n, nfds)) => {
                for &fd in &raw[..nfds] {
                    // SAFETY: the kernel just installed `fd` in our table for us; nothing
                    // else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if fds.len() < limit {
                        set_cloexec(&owned);
                        fds.push(owned);
                    } else {
                        *excess += 1; // dropping `owned` closes it
                    }
                }
                *short = n < buf.len();
                return Ok(Some(n));
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if e.errno() == libc::EAGAIN => {
                *short = true;
                return Ok(None);
            }
            // vmm-sys-util closes the fds of a truncated control message itself.
            Err(e) if e.errno() == libc::ENOBUFS => return Err(TransportError::FdsTruncated),
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    }
}

/// Marks a received fd close-on-exec (`recvmsg` without MSG_CMSG_CLOEXEC leaves it
/// inheritable).
fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: F_SETFD on an fd we own has no memory effects.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}
