//! The relay's end of the control socket: non-blocking connections read by the switch
//! thread, which executes each request. A client that sends slowly, floods, or does
//! not read its replies holds up nothing but itself.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::protocol::{CommandError, Reply, Request, MAX_REQUEST_LINE};
use crate::access::{peer_cred, Access};

/// Most control connections open at a time; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Most requests handled for one connection per wake-up of the switch.
const LINES_PER_WAKE: usize = 16;

/// Most reply bytes waiting for a client that does not read them.
const MAX_OUTPUT: usize = 8 << 20;

struct Connection {
    sock: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The client closed its end, or sent a line over the limit: close once the
    /// replies are out.
    closing: bool,
}

/// The control listener and its connections.
pub struct ControlServer {
    listener: UnixListener,
    connections: HashMap<u64, Connection>,
    next_id: u64,
}

impl ControlServer {
    /// Serves `listener` (non-blocking).
    pub fn new(listener: UnixListener) -> Self {
        Self {
            listener,
            connections: HashMap::new(),
            next_id: 0,
        }
    }

    /// Watches the listener under `token` in `poll`.
    pub fn register(&self, poll: &Epoll, token: u64) -> std::io::Result<()> {
        poll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Accepts waiting connections and watches each under `token(id)`.
    pub fn accept(&mut self, poll: &Epoll, token: impl Fn(u64) -> u64) {
        loop {
            let sock = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds, most likely: the connection waits in the backlog
                    // until the next try.
                    warn!("control socket: accept: {e}");
                    return;
                }
            };
            // Mode 0600 keeps others out already; the credentials are checked too, in
            // case the file's mode or owner was changed: root and the relay's user only.
            match peer_cred(&sock) {
                Ok(cred) if Access::default().allows_now(&cred) => {}
                Ok(cred) => {
                    crate::warn_limited!(
                        "control socket: refused {cred}: only root and the relay's user may use it"
                    );
                    continue;
                }
                Err(e) => {
                    crate::warn_limited!(
                        "control socket: refused a connection whose credentials cannot be read: {e}"
                    );
                    continue;
                }
            }
            if self.connections.len() >= MAX_CONNECTIONS {
                crate::warn_limited!(
                    "control socket: {MAX_CONNECTIONS} connections open; refusing another"
                );
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let watch = sock.set_nonblocking(true).and_then(|()| {
                poll.ctl(
                    ControlOperation::Add,
                    sock.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(id)),
                )
            });
            if let Err(e) = watch {
                warn!("control socket: cannot watch a connection: {e}");
                continue;
            }
            self.connections.insert(
                id,
                Connection {
                    sock,
                    input: Vec::new(),
                    output: Vec::new(),
                    closing: false,
                },
            );
        }
    }

    /// Connection `id` is readable or writable: writes waiting replies, reads and
    /// answers requests with `handle`, up to a bounded number per call.
    pub fn ready(
        &mut self,
        id: u64,
        poll: &Epoll,
        token: impl Fn(u64) -> u64,
        mut handle: impl FnMut(Request) -> Reply,
    ) {
        let Some(c) = self.connections.get_mut(&id) else {
            return; // closed earlier in the same batch of events
        };
        let mut lines = 0;
        let interest = loop {
            if !c.output.is_empty() {
                match c.sock.write(&c.output) {
                    Ok(n) => {
                        c.output.drain(..n);
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break Some(EventSet::OUT),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("control connection: write: {e}");
                        break None;
                    }
                }
            }
            if let Some(pos) = c.input.iter().position(|&b| b == b'\n') {
                if lines == LINES_PER_WAKE {
                    // More work for this connection: come back when the switch has
                    // looked at everything else (the socket is writable at once).
                    break Some(EventSet::OUT);
                }
                lines += 1;
                let line: Vec<u8> = c.input.drain(..=pos).collect();
                let reply = match Request::decode(&line[..line.len() - 1]) {
                    Ok(request) => handle(request),
                    Err(e) => {
                        debug!("control connection: bad request: {e}");
                        CommandError::BadRequest {
                            reason: e.to_string(),
                        }
                        .into()
                    }
                };
                c.output.extend_from_slice(&reply.encode());
                if c.output.len() > MAX_OUTPUT {
                    warn!("control connection: the client does not read its replies; closed");
                    break None;
                }
                continue;
            }
            if c.input.len() > MAX_REQUEST_LINE {
                c.input.clear();
                c.closing = true;
                c.output.extend_from_slice(
                    &Reply::from(CommandError::BadRequest {
                        reason: format!("request longer than {MAX_REQUEST_LINE} bytes"),
                    })
                    .encode(),
                );
                continue;
            }
            if c.closing {
                break None;
            }
            let mut buf = [0u8; 4096];
            match c.sock.read(&mut buf) {
                Ok(0) => c.closing = true, // a partial last line is dropped
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Some(EventSet::IN),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("control connection: read: {e}");
                    break None;
                }
            }
        };
        let fd = c.sock.as_raw_fd();
        let watched = interest.is_some_and(|set| {
            poll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, token(id)),
            )
            .is_ok()
        });
        if !watched {
            let _ = poll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.connections.remove(&id);
        }
    }
}
