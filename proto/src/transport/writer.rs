//! Sending side: a queue of framed messages flushed with partial writes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{Limits, TransportError};

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
    pub fn flush(&mut self, sock: &UnixStream) -> Result<bool, TransportError> {
        while let Some(out) = self.queue.front_mut() {
            let rest = &out.bytes[out.sent..];
            let res = if out.sent == 0 && !out.fds.is_empty() {
                let raw: Vec<RawFd> = out.fds.iter().map(|f| f.as_raw_fd()).collect();
                sock.send_with_fds(&[rest], &raw)
            } else {
                sock.send_with_fds(&[rest], &[])
            };
            match res {
                Ok(n) => {
                    out.sent += n;
                    self.queued_bytes -= n;
                    if n > 0 {
                        // The fds went with the first byte.
                        out.fds.clear();
                    }
                    if out.sent == out.bytes.len() {
                        self.queue.pop_front();
                    }
                }
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN => return Ok(false),
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
            }
        }
        Ok(true)
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
