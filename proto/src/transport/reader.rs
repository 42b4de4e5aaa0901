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
#[derive(Debug)]
pub struct MessageReader {
    limits: Limits,
    state: State,
    fds: Vec<OwnedFd>,
    /// fds of the current message beyond `max_msg_fds`, closed on arrival (the reader
    /// never holds more than the limit, however a peer spreads fds over a message).
    excess_fds: usize,
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
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the limits for the messages that follow (after VERSION negotiation).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether part of a message has been read.
    pub fn is_mid_message(&self) -> bool {
        !matches!(self.state, State::Header { filled: 0, .. })
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
        loop {
            match &mut self.state {
                State::Header { buf, filled } => {
                    let Some(n) = recv(
                        sock,
                        &mut buf[*filled..],
                        &mut self.fds,
                        self.limits.max_msg_fds,
                        &mut self.excess_fds,
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
                let size = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                let header = Header {
                    msg_id: u16::from_le_bytes([bytes[0], bytes[1]]),
                    command: u16::from_le_bytes([bytes[2], bytes[3]]),
                    size,
                    msg_type: crate::vfio_user::MessageType::Command,
                    no_reply: false,
                    error: None,
                };
                return self.discard(header, error);
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
            } => {
                if excess > 0 {
                    let count = fds.len() + excess;
                    warn!(
                        "message {} (command {}) carries {count} fds, limit {}; rejected",
                        header.msg_id, header.command, self.limits.max_msg_fds
                    );
                    return Frame::Rejected(Rejected {
                        header,
                        error: DecodeError::TooManyFds {
                            count,
                            limit: self.limits.max_msg_fds,
                        },
                    });
                }
                Frame::Message(RawMessage {
                    header,
                    payload,
                    fds,
                })
            }
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
    }
}

/// One `recvmsg` into `buf`, adding the fds that came with it to `fds` up to `limit`
/// and closing (counting in `excess`) the rest. `None` on `EAGAIN`; retries `EINTR`.
fn recv(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    limit: usize,
    excess: &mut usize,
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
                return Ok(Some(n));
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if e.errno() == libc::EAGAIN => return Ok(None),
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
