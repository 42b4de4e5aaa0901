//! Sending side: a queue of framed messages flushed with partial writes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{Limits, TransportError};

/// Most messages one `sendmsg` of [`MessageWriter::flush`] carries.
pub const GATHER: usize = 64;

/// Bytes past which [`MessageWriter::flush`] adds no more messages to a `sendmsg`.
pub const GATHER_BYTES: usize = 256 << 10;

#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

/// Queues encoded messages and writes them out, resuming after partial writes.
///
/// The fds of a message travel with its first byte; they are closed on this side once
/// sent (the receiver has its own copies) or when the writer is dropped.
#[derive(Debug)]
pub struct MessageWriter {
    limits: Limits,
    queue: VecDeque<Outgoing>,
    queued_bytes: usize,
}

impl MessageWriter {
    /// A writer that refuses messages beyond what the peer accepts (`limits`).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            queue: VecDeque::new(),
            queued_bytes: 0,
        }
    }

    /// Changes the peer's limits (after VERSION negotiation).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether messages are waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues one encoded message (header and payload) with its fds.
    pub fn push(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Result<(), TransportError> {
        if bytes.len() > self.limits.max_msg_size {
            return Err(TransportError::SendTooLarge {
                size: bytes.len(),
                limit: self.limits.max_msg_size,
            });
        }
        if fds.len() > self.limits.max_msg_fds {
            return Err(TransportError::SendTooManyFds {
                count: fds.len(),
                limit: self.limits.max_msg_fds,
            });
        }
        self.queued_bytes += bytes.len();
        self.queue.push_back(Outgoing {
            bytes,
            sent: 0,
            fds,
        });
        Ok(())
    }

    /// Writes as much as the socket takes. Returns `true` when the queue is empty,
    /// `false` when the socket would block (wait for it to become writable).
    ///
    /// Queued messages go out together, up to [`GATHER`] of them (and [`GATHER_BYTES`])
    /// per `sendmsg`: a message with fds starts a `sendmsg` of its own, so its fds come
    /// with its first byte and with no earlier message's bytes.
    pub fn flush(&mut self, sock: &UnixStream) -> Result<bool, TransportError> {
        while !self.queue.is_empty() {
            let mut iov: Vec<&[u8]> = Vec::with_capacity(GATHER.min(self.queue.len()));
            let mut bytes = 0;
            for (i, out) in self.queue.iter().enumerate() {
                let fresh_with_fds = out.sent == 0 && !out.fds.is_empty();
                if i > 0 && (fresh_with_fds || iov.len() == GATHER || bytes >= GATHER_BYTES) {
                    break;
                }
                iov.push(&out.bytes[out.sent..]);
                bytes += out.bytes.len() - out.sent;
            }
            let front = &self.queue[0];
            let raw: Vec<RawFd> = if front.sent == 0 {
                front.fds.iter().map(|f| f.as_raw_fd()).collect()
            } else {
                Vec::new()
            };
            match sock.send_with_fds(&iov, &raw) {
                Ok(n) => self.advance(n),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN => return Ok(false),
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
            }
        }
        Ok(true)
    }

    /// Counts `n` bytes written from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        self.queued_bytes -= n;
        if n > 0 {
            if let Some(front) = self.queue.front_mut() {
                front.fds.clear(); // they went with its first byte
            }
        }
        while n > 0 {
            let Some(out) = self.queue.front_mut() else {
                break;
            };
            let take = n.min(out.bytes.len() - out.sent);
            out.sent += take;
            n -= take;
            if out.sent == out.bytes.len() {
                self.queue.pop_front();
            }
        }
    }

    /// Queues a message and writes until the whole queue is out, waiting for the socket
    /// when it is non-blocking.
    pub fn send_blocking(
        &mut self,
        sock: &UnixStream,
        bytes: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), TransportError> {
        self.push(bytes, fds)?;
        while !self.flush(sock)? {
            wait_writable(sock)?;
        }
        Ok(())
    }
}

fn wait_writable(sock: &UnixStream) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
