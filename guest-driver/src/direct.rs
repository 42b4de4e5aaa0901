//! Direct mode: a device model served as a plain vfio-user server on a UNIX socket, no
//! relay (`vfu-guest --listen SOCKET --model MODEL`).
//!
//! One client at a time: a second client that connects while one is served is
//! accepted and closed at once (and logged). When the client disconnects, the server
//! applies the spec's rules ([`DeviceServer::client_disconnected`]: DMA maps and IRQ
//! eventfds dropped, device state kept) and waits for the next one, which starts again
//! with VERSION.
//!
//! The loop is single-threaded around `poll(2)`: the listening socket, the client
//! socket (non-blocking; [`MessageReader`] resumes partial messages), the model's
//! event fd ([`DeviceModel::event_fd`]) and the [`Stop`] eventfd. A request is decoded
//! with the vfu-proto codec and answered by the [`DeviceServer`]; a message the
//! transport or the decoder refuses gets an error reply with its errno (unless it asked
//! for no reply) and the connection carries on. A client that breaks framing is
//! disconnected.
//!
//! DMA: a DMA_MAP with an fd is mmapped by the server ([`crate::device::dma`]); memory
//! the client mapped without an fd is reached with the spec's server-to-client
//! commands, DMA_READ and DMA_WRITE, on the same socket ([`DmaRemote`] for the
//! connection). They carry a u64 count ([`CountWidth::U64`]) and at most the client's
//! `max_data_xfer_size` bytes of data each (its VERSION capabilities, capped at this
//! server's); larger accesses are split into several. While the server waits for the
//! reply, whatever the client sends is kept, in order, and handled after the current
//! request; an error reply, a reply that does not match, a client that goes away or
//! does not answer within [`DMA_REPLY_TIMEOUT`] fails the access with `EFAULT` (the
//! model sees a DMA fault). A client that sends more than [`MAX_BACKLOG`] messages (or
//! [`MAX_BACKLOG_BYTES`] of payload) while it is waited for is disconnected.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use thiserror::Error;
use vfu_proto::transport::{Frame, Limits, MessageReader, MessageWriter, TransportError};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, encode_request, Command, CountWidth, DmaAccess, DmaWrite,
    DmaWriteReply, Header, MessageType, Reply, Request, HEADER_SIZE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::errno::{Errno, EFAULT, EINVAL};
use crate::device::server::{MAX_DATA_XFER_SIZE, MAX_MSG_FDS};
use crate::device::{DeviceModel, DeviceServer, DmaRemote, EventFdIrqs, NoRemote, Response};

/// How often the loop looks at the stop flag when nothing else wakes it.
const STOP_CHECK_MS: i32 = 200;

/// How long the server waits for the client's reply to a DMA_READ or DMA_WRITE.
pub const DMA_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most messages kept from the client while a DMA reply is awaited.
pub const MAX_BACKLOG: usize = 1024;

/// Most payload bytes kept from the client while a DMA reply is awaited.
pub const MAX_BACKLOG_BYTES: usize = 64 << 20;

/// Asks a serving loop to return. Clones share the same signal.
///
/// It is a flag, checked at least every 200 ms, plus an eventfd that wakes the loop at
/// once when [`stop`](Self::stop) is called. A plain `Arc<AtomicBool>` converts into a
/// `Stop` (e.g. one a signal handler sets).
#[derive(Debug, Clone)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    event: Option<Arc<EventFd>>,
}

impl Stop {
    /// A stop signal that has not fired.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            flag: Arc::new(AtomicBool::new(false)),
            event: Some(Arc::new(EventFd::new(EFD_NONBLOCK)?)),
        })
    }

    /// A stop signal driven by `flag` (set it to stop the loop); [`stop`](Self::stop)
    /// sets it too.
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        let event = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| warn!("stop signal without eventfd (flag only): {e}"))
            .ok()
            .map(Arc::new);
        Self { flag, event }
    }

    /// Fires the signal: the loop returns `Ok(())` soon after.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(e) = &self.event {
            if let Err(err) = e.write(1) {
                warn!("stop signal: eventfd write failed: {err}");
            }
        }
    }

    /// Whether the flag is set (a write to [`raw_fd`](Self::raw_fd) from elsewhere is
    /// seen by the loop, not here).
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The eventfd that wakes the loop: writing an 8-byte non-zero value to it (which
    /// is async-signal-safe, e.g. from a SIGTERM handler) stops the loop too.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.event.as_ref().map(|e| e.as_raw_fd())
    }
}

impl From<Arc<AtomicBool>> for Stop {
    fn from(flag: Arc<AtomicBool>) -> Self {
        Self::from_flag(flag)
    }
}

impl From<&Stop> for Stop {
    fn from(stop: &Stop) -> Self {
        stop.clone()
    }
}

/// Why direct mode gave up.
#[derive(Debug, Error)]
pub enum DirectError {
    /// The socket path cannot be examined, removed or bound.
    #[error("socket path {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    /// A live server already listens there.
    #[error("another server is listening on {0}")]
    InUse(PathBuf),
    /// Accepting connections failed for good.
    #[error("accept: {0}")]
    Accept(io::Error),
    /// Waiting for events failed.
    #[error("poll: {0}")]
    Poll(io::Error),
}

/// Serves `model` on a UNIX socket at `path` until `stop` fires or a fatal error.
///
/// `stop` is a [`Stop`] (or `&Stop`), or an `Arc<AtomicBool>` that something sets.
/// A stale socket file at `path` is removed first (a live server there is an error,
/// and so is a file that is not a socket); the socket file is removed on return.
pub fn serve(
    path: &Path,
    model: Box<dyn DeviceModel>,
    stop: impl Into<Stop>,
) -> Result<(), DirectError> {
    let stop = stop.into();
    prepare_path(path)?;
    let listener = UnixListener::bind(path).map_err(|source| DirectError::Path {
        path: path.to_owned(),
        source,
    })?;
    info!("serving on {}", path.display());
    let result = serve_listener(listener, model, &stop);
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
    result
}

fn prepare_path(path: &Path) -> Result<(), DirectError> {
    let path_err = |source| DirectError::Path {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(path_err(e)),
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(DirectError::InUse(path.to_owned()));
            }
            info!("removing stale socket {}", path.display());
            fs::remove_file(path).map_err(path_err)
        }
        Ok(_) => Err(DirectError::NotASocket(path.to_owned())),
    }
}

/// Serves `model` on connections accepted from `listener` (already bound) until `stop`
/// fires or a fatal error.
pub fn serve_listener(
    listener: UnixListener,
    model: Box<dyn DeviceModel>,
    stop: &Stop,
) -> Result<(), DirectError> {
    listener
        .set_nonblocking(true)
        .map_err(DirectError::Accept)?;
    let mut server = DeviceServer::new(model, Box::new(EventFdIrqs::new()));
    let mut conn: Option<Connection> = None;
    loop {
        if stop.is_stopped() {
            return Ok(());
        }
        let model_fd = server.event_fd().map(|f| f.as_raw_fd());
        let mut fds = vec![
            pollfd(stop.raw_fd().unwrap_or(-1)),
            pollfd(listener.as_raw_fd()),
            pollfd(model_fd.unwrap_or(-1)),
        ];
        if let Some(c) = &conn {
            fds.push(pollfd(c.link.sock.as_raw_fd()));
        }
        let backlog = conn.as_ref().is_some_and(|c| !c.link.backlog.is_empty());
        poll(&mut fds, if backlog { 0 } else { STOP_CHECK_MS }).map_err(DirectError::Poll)?;
        if fds[0].revents != 0 || stop.is_stopped() {
            info!("stop requested");
            return Ok(());
        }
        if fds[2].revents != 0 {
            match &mut conn {
                Some(c) => server.service(&mut c.link),
                None => server.service(&mut NoRemote),
            }
            if let Some(c) = &mut conn {
                if let Some(end) = c.link.broken.take() {
                    end.log();
                    conn = None;
                    server.client_disconnected();
                }
            }
        }
        // The client first: a client that hung up before the next one connected is
        // gone by the time the listener is looked at, so the newcomer is not refused.
        // Messages kept while a DMA reply was awaited are handled one per round, before
        // the socket is read again.
        let client_ready = fds.get(3).is_some_and(|f| f.revents != 0)
            || conn.as_ref().is_some_and(|c| !c.link.backlog.is_empty());
        if client_ready {
            if let Some(c) = &mut conn {
                if let Err(end) = c.pump(&mut server, stop) {
                    end.log();
                    conn = None;
                    server.client_disconnected();
                }
            }
        }
        if fds[1].revents != 0 {
            accept_all(&listener, &mut conn, stop)?;
        }
    }
}

fn accept_all(
    listener: &UnixListener,
    conn: &mut Option<Connection>,
    stop: &Stop,
) -> Result<(), DirectError> {
    loop {
        match listener.accept() {
            Ok((sock, _)) => {
                if conn.is_some() {
                    warn!("refusing a second client: this server serves one client at a time");
                    drop(sock);
                    continue;
                }
                match Connection::new(sock, stop) {
                    Ok(c) => {
                        info!("client connected");
                        *conn = Some(c);
                    }
                    Err(e) => warn!("cannot set up the client socket: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                // Out of fds: the connection stays queued; try again on the next event.
                error!("accept: {e}");
                return Ok(());
            }
            Err(e) => return Err(DirectError::Accept(e)),
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
enum ConnEnd {
    Closed,
    Stopped,
    Error(TransportError),
    /// The client broke a rule of this server (kept messages beyond the limit).
    Misbehaved(&'static str),
}

impl ConnEnd {
    fn log(&self) {
        match self {
            ConnEnd::Closed => info!("client disconnected"),
            ConnEnd::Stopped => {}
            ConnEnd::Error(e) => warn!("client dropped: {e}"),
            ConnEnd::Misbehaved(why) => warn!("client dropped: {why}"),
        }
    }
}

impl From<TransportError> for ConnEnd {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Closed => ConnEnd::Closed,
            e => ConnEnd::Error(e),
        }
    }
}

/// The socket side of a connection: framing both ways, and the server-to-client DMA
/// commands ([`DmaRemote`]).
struct Link {
    sock: UnixStream,
    reader: MessageReader,
    writer: MessageWriter,
    /// Frames from the client that arrived while a DMA reply was awaited, in order.
    backlog: VecDeque<Frame>,
    /// Payload bytes in `backlog`.
    backlog_bytes: usize,
    /// Message ID of the next server-to-client command.
    next_id: u16,
    /// Most data bytes per DMA_READ / DMA_WRITE.
    max_xfer: usize,
    /// Set when the connection broke (or the stop signal fired) during a DMA wait;
    /// the serving loop then ends the connection.
    broken: Option<ConnEnd>,
    stop: Stop,
}

struct Connection {
    link: Link,
    negotiated: bool,
}

impl Connection {
    fn new(sock: UnixStream, stop: &Stop) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let limits = Limits {
            max_msg_size: MAX_DATA_XFER_SIZE as usize + 4096,
            max_msg_fds: MAX_MSG_FDS as usize,
        };
        Ok(Self {
            link: Link {
                sock,
                reader: MessageReader::new(limits),
                writer: MessageWriter::new(Limits {
                    max_msg_size: MAX_DATA_XFER_SIZE as usize + 4096,
                    max_msg_fds: MAX_MSG_FDS as usize,
                }),
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                next_id: 1,
                max_xfer: vfu_proto::vfio_user::DEFAULT_MAX_DATA_XFER_SIZE as usize,
                broken: None,
                stop: stop.clone(),
            },
            negotiated: false,
        })
    }

    /// Reads from the socket until one message is complete (or it would block) and
    /// handles it. One message per call: the loop polls again in between, so model
    /// events that happened before a request are serviced before it.
    fn pump(&mut self, server: &mut DeviceServer, stop: &Stop) -> Result<(), ConnEnd> {
        if let Some(end) = self.link.broken.take() {
            return Err(end);
        }
        let frame = match self.link.backlog.pop_front() {
            Some(f) => {
                self.link.backlog_bytes -= frame_bytes(&f);
                f
            }
            None => match self.link.reader.read(&self.link.sock)? {
                None => return Ok(()),
                Some(f) => f,
            },
        };
        let result = self.on_frame(server, frame, stop);
        match self.link.broken.take() {
            Some(end) => Err(end),
            None => result,
        }
    }

    fn on_frame(
        &mut self,
        server: &mut DeviceServer,
        frame: Frame,
        stop: &Stop,
    ) -> Result<(), ConnEnd> {
        match frame {
            Frame::Message(m) => {
                if m.header.msg_type != MessageType::Command {
                    warn!(
                        "unexpected reply (msg {}, command {}) from the client; dropped",
                        m.header.msg_id, m.header.command
                    );
                    return Ok(());
                }
                self.on_command(server, &m.header, &m.payload, m.fds, stop)
            }
            Frame::Rejected(r) => {
                warn!(
                    "message {} (command {}) refused: {}",
                    r.header.msg_id, r.header.command, r.error
                );
                if r.header.msg_type == MessageType::Command && !r.header.no_reply {
                    self.send(
                        encode_error_reply(&r.header, r.error.errno()),
                        Vec::new(),
                        stop,
                    )?;
                }
                Ok(())
            }
        }
    }

    fn on_command(
        &mut self,
        server: &mut DeviceServer,
        header: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        stop: &Stop,
    ) -> Result<(), ConnEnd> {
        let request = match Request::decode(header.command, payload, fds.len()) {
            Ok(r) => r,
            Err(e) => {
                warn!(
                    "message {} (command {}) invalid: {e}",
                    header.msg_id, header.command
                );
                if !header.no_reply {
                    self.send(encode_error_reply(header, e.errno()), Vec::new(), stop)?;
                }
                return Ok(());
            }
        };
        let is_version = request.command() == Command::Version;
        if !self.negotiated && !is_version {
            warn!("{} before VERSION; refused", request.command().name());
            if !header.no_reply {
                self.send(encode_error_reply(header, EINVAL), Vec::new(), stop)?;
            }
            return Ok(());
        }
        debug!("msg {}: {}", header.msg_id, request.command().name());
        let response = server.handle(header, request, fds, &mut self.link);
        if is_version && !matches!(response, Response::Error(_)) {
            self.negotiated = true;
            let client = server.client_capabilities().max_data_xfer_size();
            self.link.max_xfer = client.clamp(1, MAX_DATA_XFER_SIZE) as usize;
        }
        if self.link.broken.is_some() {
            // The connection broke during the model's DMA: no point answering.
            return Ok(());
        }
        match response {
            Response::Reply { reply, fds } => {
                self.send(encode_reply(header.msg_id, &reply), fds, stop)
            }
            Response::Error(errno) => {
                debug!("msg {}: error {errno}", header.msg_id);
                self.send(encode_error_reply(header, errno), Vec::new(), stop)
            }
            Response::NoReply => Ok(()),
        }
    }

    /// Sends a message ([`Link::send`]).
    fn send(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>, stop: &Stop) -> Result<(), ConnEnd> {
        self.link.send(bytes, fds, stop)
    }
}

impl Link {
    /// Queues a message and writes it out, waiting for the socket (or the stop
    /// signal) when it is full.
    fn send(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>, stop: &Stop) -> Result<(), ConnEnd> {
        if let Err(e) = self.writer.push(bytes.clone(), fds) {
            // Our own reply is beyond what we send: answer with an error instead.
            warn!("reply not sendable ({e}); sending an error reply");
            let header = Header::decode(&bytes[..HEADER_SIZE.min(bytes.len())])
                .map_err(|e| ConnEnd::Error(TransportError::BadHeader(e)))?;
            let request = Header::command(header.msg_id, header.command, 0);
            self.writer
                .push(encode_error_reply(&request, EINVAL), Vec::new())?;
        }
        loop {
            if self.writer.flush(&self.sock)? {
                return Ok(());
            }
            let mut fds = [
                pollfd(stop.raw_fd().unwrap_or(-1)),
                pollfd(self.sock.as_raw_fd()),
            ];
            fds[1].events = libc::POLLOUT;
            poll(&mut fds, STOP_CHECK_MS).map_err(|e| ConnEnd::Error(e.into()))?;
            if fds[0].revents != 0 || stop.is_stopped() {
                return Err(ConnEnd::Stopped);
            }
        }
    }
}

impl Link {
    /// Sends the server-to-client command `request` and waits for its reply, keeping
    /// whatever else the client sends meanwhile. `EFAULT` when the reply does not come
    /// (the connection broke, the stop signal fired: then `broken` is set; or the
    /// timeout passed).
    fn call(&mut self, request: &Request) -> Result<(Header, Vec<u8>), Errno> {
        if self.broken.is_some() {
            return Err(EFAULT);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let name = request.command().name();
        if let Err(e) = self
            .writer
            .push(encode_request(id, request, false), Vec::new())
        {
            warn!("{name} to the client not sendable: {e}");
            return Err(EFAULT);
        }
        let deadline = Instant::now() + DMA_REPLY_TIMEOUT;
        loop {
            if let Err(e) = self.writer.flush(&self.sock) {
                self.broken = Some(e.into());
                return Err(EFAULT);
            }
            loop {
                let frame = match self.reader.read(&self.sock) {
                    Ok(None) => break,
                    Ok(Some(f)) => f,
                    Err(e) => {
                        self.broken = Some(e.into());
                        return Err(EFAULT);
                    }
                };
                let header = match &frame {
                    Frame::Message(m) => m.header,
                    Frame::Rejected(r) => r.header,
                };
                if header.msg_type == MessageType::Reply {
                    if header.msg_id != id {
                        warn!(
                            "unexpected reply (msg {}, command {}) from the client; dropped",
                            header.msg_id, header.command
                        );
                        continue;
                    }
                    return match frame {
                        Frame::Message(m) if m.header.command == request.command() as u16 => {
                            Ok((m.header, m.payload))
                        }
                        Frame::Message(m) => {
                            warn!("reply to {name} has command {}; EFAULT", m.header.command);
                            Err(EFAULT)
                        }
                        Frame::Rejected(r) => {
                            warn!("reply to {name} refused: {}; EFAULT", r.error);
                            Err(EFAULT)
                        }
                    };
                }
                let bytes = frame_bytes(&frame);
                if self.backlog.len() >= MAX_BACKLOG
                    || self.backlog_bytes + bytes > MAX_BACKLOG_BYTES
                {
                    self.broken = Some(ConnEnd::Misbehaved(
                        "too many requests while a DMA reply was awaited",
                    ));
                    return Err(EFAULT);
                }
                self.backlog_bytes += bytes;
                self.backlog.push_back(frame);
            }
            let now = Instant::now();
            if now >= deadline {
                warn!("no reply to {name} (msg {id}) within {DMA_REPLY_TIMEOUT:?}; EFAULT");
                return Err(EFAULT);
            }
            let left = (deadline - now).as_millis().clamp(1, STOP_CHECK_MS as u128) as i32;
            let mut fds = [
                pollfd(self.stop.raw_fd().unwrap_or(-1)),
                pollfd(self.sock.as_raw_fd()),
            ];
            if !self.writer.is_empty() {
                fds[1].events |= libc::POLLOUT;
            }
            if let Err(e) = poll(&mut fds, left) {
                self.broken = Some(ConnEnd::Error(e.into()));
                return Err(EFAULT);
            }
            if fds[0].revents != 0 || self.stop.is_stopped() {
                self.broken = Some(ConnEnd::Stopped);
                return Err(EFAULT);
            }
        }
    }
}

impl DmaRemote for Link {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let step = self.max_xfer.max(1);
        let mut address = iova;
        for chunk in buf.chunks_mut(step) {
            let request = Request::DmaRead(DmaAccess {
                address,
                count: chunk.len() as u64,
                width: CountWidth::U64,
            });
            let (header, payload) = self.call(&request)?;
            if let Some(e) = header.error {
                debug!(
                    "client failed DMA_READ {address:#x}+{:#x}: errno {e}",
                    chunk.len()
                );
                return Err(EFAULT);
            }
            match Reply::decode(header.command, &payload, 0) {
                Ok(Reply::DmaRead(r)) if r.address == address && r.data.len() == chunk.len() => {
                    chunk.copy_from_slice(&r.data);
                }
                other => {
                    warn!(
                        "DMA_READ {address:#x}+{:#x}: bad reply {other:?}",
                        chunk.len()
                    );
                    return Err(EFAULT);
                }
            }
            address = address.checked_add(chunk.len() as u64).ok_or(EFAULT)?;
        }
        Ok(())
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let step = self.max_xfer.max(1);
        let mut address = iova;
        for chunk in data.chunks(step) {
            let request = Request::DmaWrite(DmaWrite {
                address,
                data: chunk.to_vec(),
                width: CountWidth::U64,
            });
            let (header, payload) = self.call(&request)?;
            if let Some(e) = header.error {
                debug!(
                    "client failed DMA_WRITE {address:#x}+{:#x}: errno {e}",
                    chunk.len()
                );
                return Err(EFAULT);
            }
            match Reply::decode(header.command, &payload, 0) {
                Ok(Reply::DmaWrite(DmaWriteReply::Empty)) => {}
                Ok(Reply::DmaWrite(DmaWriteReply::Echo {
                    address: a, count, ..
                })) if a == address && count == chunk.len() as u64 => {}
                other => {
                    warn!(
                        "DMA_WRITE {address:#x}+{:#x}: bad reply {other:?}",
                        chunk.len()
                    );
                    return Err(EFAULT);
                }
            }
            address = address.checked_add(chunk.len() as u64).ok_or(EFAULT)?;
        }
        Ok(())
    }
}

/// Payload bytes a kept frame holds.
fn frame_bytes(frame: &Frame) -> usize {
    match frame {
        Frame::Message(m) => m.payload.len(),
        Frame::Rejected(_) => 0,
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// `poll(2)`, retried on EINTR.
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds
        // for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::atomic::AtomicUsize;
    use std::thread;

    use vfu_proto::vfio_user::{
        encode_request, pci_irq, pci_region, Capabilities, GetInfoRequest, IrqData, RegionAccess,
        RegionWrite, Reply, SetIrqs, Version, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET,
        IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    };

    use crate::device::dma::tests::{memfd, pread};
    use crate::device::errno::EFAULT;
    use crate::models::dma_engine::{self, crc32c, reg as dreg, DmaEngine};
    use crate::models::gpio::{self, Gpio};
    use vfu_proto::vfio_user::{DmaMap, DmaReadReply, DmaUnmap};

    /// A blocking vfio-user client built on the vfu-proto transport.
    struct Client {
        sock: UnixStream,
        reader: MessageReader,
        writer: MessageWriter,
        id: u16,
    }

    impl Client {
        fn connect(path: &Path) -> Self {
            let deadline = Instant::now() + Duration::from_secs(10);
            let sock = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("connect {}: {e}", path.display()),
                }
            };
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let limits = Limits {
                max_msg_size: 2 << 20,
                max_msg_fds: 16,
            };
            Self {
                sock,
                reader: MessageReader::new(limits),
                writer: MessageWriter::new(limits),
                id: 0,
            }
        }

        fn call_fds(&mut self, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, u32> {
            self.id = self.id.wrapping_add(1);
            let bytes = encode_request(self.id, &req, false);
            self.writer.send_blocking(&self.sock, bytes, fds).unwrap();
            match self.reader.read(&self.sock).unwrap() {
                Some(Frame::Message(m)) => {
                    assert_eq!(m.header.msg_id, self.id);
                    assert_eq!(m.header.msg_type, MessageType::Reply);
                    if let Some(e) = m.header.error {
                        return Err(e);
                    }
                    Ok(Reply::decode(m.header.command, &m.payload, m.fds.len()).unwrap())
                }
                other => panic!("unexpected {other:?}"),
            }
        }

        fn call(&mut self, req: Request) -> Result<Reply, u32> {
            self.call_fds(req, Vec::new())
        }

        fn version(&mut self) {
            let caps = Capabilities {
                max_msg_fds: Some(8),
                ..Capabilities::default()
            };
            match self.call(Request::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Some(caps),
            })) {
                Ok(Reply::Version(v)) => {
                    assert_eq!((v.major, v.minor), (0, 0));
                    let c = v.capabilities.unwrap();
                    assert_eq!(c.max_msg_fds, Some(16));
                    assert_eq!(c.max_data_xfer_size, Some(1 << 20));
                    assert_eq!(c.pgsizes, Some(4096));
                }
                other => panic!("{other:?}"),
            }
        }

        fn read(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
            match self.call(Request::RegionRead(RegionAccess {
                offset,
                region,
                count,
            })) {
                Ok(Reply::RegionRead(r)) => r.data,
                other => panic!("{other:?}"),
            }
        }

        fn write(&mut self, region: u32, offset: u64, data: &[u8]) {
            let r = self.call(Request::RegionWrite(RegionWrite {
                offset,
                region,
                data: data.to_vec(),
            }));
            assert!(matches!(r, Ok(Reply::RegionWrite(_))), "{r:?}");
        }

        /// Whether the server closed the connection (EOF) within the read timeout.
        fn sees_eof(&mut self) -> bool {
            matches!(self.reader.read(&self.sock), Err(TransportError::Closed))
        }
    }

    fn socket_path(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "vfu-direct-{tag}-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ))
    }

    fn eventfd() -> (EventFd, OwnedFd) {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let dup = efd.try_clone().unwrap();
        // SAFETY: `into_raw_fd` hands over the only owner of a freshly duplicated fd.
        let owned = unsafe { OwnedFd::from_raw_fd(dup.into_raw_fd()) };
        (efd, owned)
    }

    /// Waits up to 10 s for the eventfd to be signalled and returns its counter.
    fn wait_signal(efd: &EventFd) -> Option<u64> {
        let mut fds = [pollfd(efd.as_raw_fd())];
        poll(&mut fds, 10_000).unwrap();
        efd.read().ok()
    }

    /// End to end over a real socket: VERSION, GET_INFO, REGION_INFO, config reads of
    /// the IDs, BAR 2 read/write, an INTx eventfd signalled by a gpio input change, a
    /// second concurrent client refused, and disconnect + reconnect keeping the device
    /// state while the IRQ assignment is dropped; stop ends the loop and removes the
    /// socket.
    #[test]
    fn direct_mode_end_to_end() {
        let path = socket_path("e2e");
        // A stale socket file from an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let gpio = Gpio::new();
        let inputs = gpio.inputs();
        let stop = Stop::new().unwrap();
        let server = {
            let (path, stop) = (path.clone(), stop.clone());
            thread::spawn(move || serve(&path, Box::new(gpio), stop))
        };
        let mut c = Client::connect(&path);
        // Anything before VERSION is refused.
        assert_eq!(
            c.call(Request::DeviceGetInfo(GetInfoRequest {
                argsz: 16,
                index: 0
            })),
            Err(EINVAL)
        );
        c.version();
        match c.call(Request::DeviceGetInfo(GetInfoRequest {
            argsz: 16,
            index: 0,
        })) {
            Ok(Reply::DeviceGetInfo(i)) => {
                assert_eq!(i.flags, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
                assert_eq!((i.num_regions, i.num_irqs), (9, 5));
            }
            other => panic!("{other:?}"),
        }
        match c.call(Request::DeviceGetRegionInfo(GetInfoRequest {
            argsz: 32,
            index: 2,
        })) {
            Ok(Reply::DeviceGetRegionInfo(r)) => assert_eq!((r.index, r.size), (2, 0x100)),
            other => panic!("{other:?}"),
        }
        match c.call(Request::DeviceGetRegionInfo(GetInfoRequest {
            argsz: 32,
            index: pci_region::CONFIG,
        })) {
            Ok(Reply::DeviceGetRegionInfo(r)) => assert_eq!(r.size, 256),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.read(pci_region::CONFIG, 0, 4),
            vec![0x4f, 0x49, 0xc8, 0x0d]
        );
        assert_eq!(c.read(pci_region::CONFIG, 0x3d, 1), vec![1], "INTA");
        c.write(2, gpio::reg::OUT0_7, &[0x5a]);
        c.write(2, gpio::reg::OUT8_15, &[0xc3]);
        assert_eq!(c.read(2, gpio::reg::OUT0_7, 1), vec![0x5a]);
        // A bad access is an error reply, and the connection carries on.
        assert_eq!(
            c.call(Request::RegionRead(RegionAccess {
                offset: 0xff,
                region: 2,
                count: 2
            })),
            Err(EINVAL)
        );
        // INTx eventfd, IRQs enabled on the card, then an input changes.
        let (efd, fd) = eventfd();
        let set = SetIrqs {
            action: IRQ_SET_ACTION_TRIGGER,
            index: pci_irq::INTX,
            start: 0,
            count: 1,
            data: IrqData::EventFd { assign: true },
        };
        assert_eq!(
            c.call_fds(Request::DeviceSetIrqs(set), vec![fd]),
            Ok(Reply::DeviceSetIrqs)
        );
        c.read(2, gpio::reg::IRQ_CTL, 1);
        inputs.set(0x0010);
        assert_eq!(wait_signal(&efd), Some(1));
        assert_eq!(c.read(2, gpio::reg::IRQ_STATUS, 1), vec![0x05]);
        assert_eq!(c.read(2, gpio::reg::IN0_7, 1), vec![0x10]);
        // A second client is accepted and closed at once; the first carries on.
        let mut second = Client::connect(&path);
        assert!(second.sees_eof());
        assert_eq!(c.read(2, gpio::reg::OUT8_15, 1), vec![0xc3]);
        // Disconnect and reconnect: device state kept, IRQ assignment dropped.
        drop(c);
        let mut c = Client::connect(&path);
        c.version();
        assert_eq!(c.read(2, gpio::reg::OUT0_7, 1), vec![0x5a]);
        assert_eq!(c.read(2, gpio::reg::IRQ_STATUS, 1), vec![0x05]);
        c.write(2, gpio::reg::IN0_7, &[0]); // ack
        let unmask = SetIrqs {
            action: IRQ_SET_ACTION_UNMASK,
            index: pci_irq::INTX,
            start: 0,
            count: 1,
            data: IrqData::None,
        };
        assert_eq!(
            c.call(Request::DeviceSetIrqs(unmask)),
            Ok(Reply::DeviceSetIrqs)
        );
        inputs.set(0x0000);
        // Round trip so the server has serviced the change before checking.
        assert_eq!(c.read(2, gpio::reg::IRQ_STATUS, 1), vec![0x05]);
        assert!(
            efd.read().is_err(),
            "the old client's eventfd is no longer signalled"
        );
        stop.stop();
        server.join().unwrap().unwrap();
        assert!(!path.exists(), "socket removed");
    }

    /// A plain `Arc<AtomicBool>` set from another thread stops the loop (it is
    /// checked every 200 ms), closing the client's connection.
    #[test]
    fn atomic_flag_stops() {
        let path = socket_path("flag");
        let flag = Arc::new(AtomicBool::new(false));
        let server = {
            let (path, flag) = (path.clone(), flag.clone());
            thread::spawn(move || serve(&path, Box::new(Gpio::new()), flag))
        };
        let mut c = Client::connect(&path);
        c.version();
        flag.store(true, Ordering::SeqCst);
        server.join().unwrap().unwrap();
        assert!(c.sees_eof());
    }

    /// A socket path occupied by a regular file is not removed, and a live server on
    /// the path is detected.
    #[test]
    fn refuses_foreign_paths() {
        let path = socket_path("file");
        fs::write(&path, b"not a socket").unwrap();
        let stop = Stop::new().unwrap();
        assert!(matches!(
            serve(&path, Box::new(Gpio::new()), &stop),
            Err(DirectError::NotASocket(_))
        ));
        fs::remove_file(&path).unwrap();
        let path = socket_path("live");
        let _live = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            serve(&path, Box::new(Gpio::new()), &stop),
            Err(DirectError::InUse(_))
        ));
        fs::remove_file(&path).unwrap();
    }

    /// Frames the transport refuses (too many fds, an unknown command, a truncated
    /// payload) get error replies with their errno, a NO_REPLY message gets none, and
    /// a header below 16 bytes closes the connection.
    #[test]
    fn refused_frames_get_error_replies() {
        let path = socket_path("bad");
        let stop = Stop::new().unwrap();
        let server = {
            let (path, stop) = (path.clone(), stop.clone());
            thread::spawn(move || serve(&path, Box::new(Gpio::new()), stop))
        };
        let mut c = Client::connect(&path);
        c.version();
        // Unknown command 14: ENOSYS.
        let mut raw = Header::command(100, 14, 0).to_bytes().to_vec();
        c.writer
            .send_blocking(&c.sock, raw.clone(), Vec::new())
            .unwrap();
        match c.reader.read(&c.sock).unwrap() {
            Some(Frame::Message(m)) => {
                assert_eq!(m.header.msg_id, 100);
                assert_eq!(m.header.error, Some(libc::ENOSYS as u32));
            }
            other => panic!("{other:?}"),
        }
        // Truncated REGION_READ with NO_REPLY: nothing comes back; the next call works.
        raw = {
            let mut h = Header::command(101, 9, 4);
            h.no_reply = true;
            let mut v = h.to_bytes().to_vec();
            v.extend_from_slice(&[0; 4]);
            v
        };
        c.writer.send_blocking(&c.sock, raw, Vec::new()).unwrap();
        assert_eq!(c.read(pci_region::CONFIG, 2, 2), vec![0xc8, 0x0d]);
        // 17 fds: more than max_msg_fds, E2BIG.
        let fds: Vec<OwnedFd> = (0..17).map(|_| eventfd().1).collect();
        let mut w = MessageWriter::new(Limits {
            max_msg_size: 4096,
            max_msg_fds: 32,
        });
        let msg = encode_request(102, &Request::DeviceReset, false);
        w.send_blocking(&c.sock, msg, fds).unwrap();
        match c.reader.read(&c.sock).unwrap() {
            Some(Frame::Message(m)) => assert_eq!(m.header.error, Some(libc::E2BIG as u32)),
            other => panic!("{other:?}"),
        }
        // A header claiming 8 bytes: the server hangs up.
        let mut bad = Header::command(103, 1, 0).to_bytes();
        bad[4] = 8;
        c.writer
            .send_blocking(&c.sock, bad.to_vec(), Vec::new())
            .unwrap();
        assert!(c.sees_eof());
        stop.stop();
        server.join().unwrap().unwrap();
    }

    /// How the test client answers the server's DMA commands.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Answer {
        /// From its memory.
        Memory,
        /// DMA_READ with an error reply (EIO), DMA_WRITE from its memory.
        FailReads,
        /// Close the connection at the first DMA command.
        Hang,
    }

    /// What the client saw while waiting for its replies.
    #[derive(Debug, Default)]
    struct Seen {
        /// Replies in arrival order: (msg id, result).
        replies: Vec<(u16, Result<Reply, u32>)>,
        /// DMA commands: (is a write, address, count).
        dma: Vec<(bool, u64, u64)>,
    }

    impl Client {
        /// Sends `req` without waiting; returns its message ID.
        fn post(&mut self, req: Request) -> u16 {
            self.id = self.id.wrapping_add(1);
            let bytes = encode_request(self.id, &req, false);
            self.writer
                .send_blocking(&self.sock, bytes, Vec::new())
                .unwrap();
            self.id
        }

        /// Reads until the replies to `want` have come, answering DMA_READ / DMA_WRITE
        /// against `mem`, client memory at IOVA `base`.
        fn serve_dma(&mut self, want: &[u16], mem: &mut [u8], base: u64, answer: Answer) -> Seen {
            let mut seen = Seen::default();
            while seen.replies.len() < want.len() {
                let m = match self.reader.read(&self.sock).unwrap() {
                    Some(Frame::Message(m)) => m,
                    other => panic!("unexpected {other:?}"),
                };
                if m.header.msg_type == MessageType::Reply {
                    assert!(want.contains(&m.header.msg_id), "{:?}", m.header);
                    let r = match m.header.error {
                        Some(e) => Err(e),
                        None => Ok(Reply::decode(m.header.command, &m.payload, 0).unwrap()),
                    };
                    seen.replies.push((m.header.msg_id, r));
                    continue;
                }
                if answer == Answer::Hang {
                    return seen;
                }
                let reply = match Request::decode(m.header.command, &m.payload, 0).unwrap() {
                    Request::DmaRead(a) => {
                        seen.dma.push((false, a.address, a.count));
                        assert_eq!(a.width, CountWidth::U64);
                        if answer == Answer::FailReads {
                            encode_error_reply(&m.header, libc::EIO as u32)
                        } else {
                            let at = (a.address - base) as usize;
                            let data = mem[at..at + a.count as usize].to_vec();
                            encode_reply(
                                m.header.msg_id,
                                &Reply::DmaRead(DmaReadReply {
                                    address: a.address,
                                    data,
                                    width: CountWidth::U64,
                                }),
                            )
                        }
                    }
                    Request::DmaWrite(w) => {
                        seen.dma.push((true, w.address, w.data.len() as u64));
                        let at = (w.address - base) as usize;
                        mem[at..at + w.data.len()].copy_from_slice(&w.data);
                        encode_reply(
                            m.header.msg_id,
                            &Reply::DmaWrite(DmaWriteReply::Echo {
                                address: w.address,
                                count: w.data.len() as u64,
                                width: CountWidth::U64,
                            }),
                        )
                    }
                    other => panic!("unexpected command {other:?}"),
                };
                self.writer
                    .send_blocking(&self.sock, reply, Vec::new())
                    .unwrap();
            }
            seen
        }

        fn reg_write(&mut self, offset: u64, value: u64, width: usize) {
            self.write(0, offset, &value.to_le_bytes()[..width]);
        }

        fn reg_read(&mut self, offset: u64) -> u32 {
            u32::from_le_bytes(self.read(0, offset, 4).try_into().unwrap())
        }
    }

    /// Direct mode DMA with the dma-engine: the client maps one region without an fd
    /// (reached by DMA_READ / DMA_WRITE sent to it) and one memfd (mmapped by the
    /// server). The copy's DMA_READs are split to the client's max_data_xfer_size
    /// (4 KiB) and use u64 counts; a REGION_READ the client sends while the server waits
    /// for its DMA replies is answered after the START write, and sees the finished
    /// operation. Copying back writes the client's memory with DMA_WRITEs. A client
    /// error reply to DMA_READ is a fault (STATUS error EFAULT, still a completion
    /// record); a client that hangs up while it is waited for is dropped, and the next
    /// client is served.
    #[test]
    fn direct_mode_dma() {
        const BASE: u64 = 0x10_0000;
        let path = socket_path("dma");
        let stop = Stop::new().unwrap();
        let server = {
            let (path, stop) = (path.clone(), stop.clone());
            thread::spawn(move || serve(&path, Box::new(DmaEngine::new()), stop))
        };
        let mut c = Client::connect(&path);
        let caps = Capabilities {
            max_data_xfer_size: Some(4096),
            ..Capabilities::default()
        };
        let v = c.call(Request::Version(Version {
            major: 0,
            minor: 0,
            capabilities: Some(caps),
        }));
        assert!(matches!(v, Ok(Reply::Version(_))), "{v:?}");
        let fd = memfd(0x10000);
        let remote_map = DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: BASE,
            size: 0x10000,
        };
        let local_map = DmaMap {
            address: 0x20_0000,
            ..remote_map
        };
        assert_eq!(c.call(Request::DmaMap(remote_map)), Ok(Reply::DmaMap));
        assert_eq!(
            c.call_fds(Request::DmaMap(local_map), vec![fd.try_clone().unwrap()]),
            Ok(Reply::DmaMap)
        );
        let mut mem = vec![0u8; 0x10000];
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 13 % 256) as u8).collect();
        mem[..data.len()].copy_from_slice(&data);
        // Remote source, local destination, remote completion record.
        c.reg_write(dreg::SRC_IOVA, BASE, 8);
        c.reg_write(dreg::DST_IOVA, 0x20_0000, 8);
        c.reg_write(dreg::COMPLETION_IOVA, BASE + 0xf000, 8);
        c.reg_write(dreg::LEN, data.len() as u64, 4);
        let start = c.post(Request::RegionWrite(RegionWrite {
            offset: dreg::CONTROL,
            region: 0,
            data: 1u32.to_le_bytes().to_vec(),
        }));
        let seq = c.post(Request::RegionRead(RegionAccess {
            offset: dreg::SEQ,
            region: 0,
            count: 4,
        }));
        let seen = c.serve_dma(&[start, seq], &mut mem, BASE, Answer::Memory);
        assert_eq!(
            seen.dma,
            vec![
                (false, BASE, 4096),
                (false, BASE + 4096, 4096),
                (false, BASE + 8192, 10_000 - 8192),
                (true, BASE + 0xf000, 16),
            ]
        );
        assert_eq!(seen.replies.len(), 2);
        assert_eq!(seen.replies[0].0, start, "START answered first");
        match &seen.replies[1] {
            (id, Ok(Reply::RegionRead(r))) if *id == seq => {
                assert_eq!(r.data, 1u32.to_le_bytes(), "the operation was done")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(pread(&fd, 0, data.len()), data);
        let crc = crc32c(&data);
        let record: Vec<u8> = [0, crc, data.len() as u32, 1]
            .iter()
            .flat_map(|v: &u32| v.to_le_bytes())
            .collect();
        assert_eq!(&mem[0xf000..0xf010], &record[..]);
        assert_eq!(c.reg_read(dreg::STATUS), dma_engine::state::DONE);
        // Local source, remote destination: DMA_WRITEs of at most 4 KiB.
        c.reg_write(dreg::SRC_IOVA, 0x20_0000, 8);
        c.reg_write(dreg::DST_IOVA, BASE + 0x8000, 8);
        let start = c.post(Request::RegionWrite(RegionWrite {
            offset: dreg::CONTROL,
            region: 0,
            data: 1u32.to_le_bytes().to_vec(),
        }));
        let seen = c.serve_dma(&[start], &mut mem, BASE, Answer::Memory);
        assert_eq!(
            seen.dma.iter().map(|d| (d.0, d.2)).collect::<Vec<_>>(),
            vec![
                (true, 4096),
                (true, 4096),
                (true, 10_000 - 8192),
                (true, 16)
            ]
        );
        assert_eq!(&mem[0x8000..0x8000 + data.len()], &data[..]);
        // The client fails the reads: a DMA fault, reported in STATUS and the record.
        c.reg_write(dreg::SRC_IOVA, BASE, 8);
        let start = c.post(Request::RegionWrite(RegionWrite {
            offset: dreg::CONTROL,
            region: 0,
            data: 1u32.to_le_bytes().to_vec(),
        }));
        let seen = c.serve_dma(&[start], &mut mem, BASE, Answer::FailReads);
        assert_eq!(seen.dma.len(), 2, "one failed read, the record");
        assert_eq!(
            c.reg_read(dreg::STATUS),
            dma_engine::state::ERROR | EFAULT << 16
        );
        assert_eq!(&mem[0xf000..0xf004], &EFAULT.to_le_bytes());
        // DMA_UNMAP of the mmapped region (unmapped before the reply).
        assert_eq!(
            c.call(Request::DmaUnmap(DmaUnmap::region(0x20_0000, 0x10000))),
            Ok(Reply::DmaUnmap(DmaUnmap::region(0x20_0000, 0x10000)))
        );
        // A client that hangs up while the server waits for it is dropped.
        let start = c.post(Request::RegionWrite(RegionWrite {
            offset: dreg::CONTROL,
            region: 0,
            data: 1u32.to_le_bytes().to_vec(),
        }));
        c.serve_dma(&[start], &mut mem, BASE, Answer::Hang);
        drop(c);
        let mut c = Client::connect(&path);
        c.version();
        assert_eq!(c.reg_read(dreg::SEQ), 4, "device state kept");
        assert_eq!(
            c.reg_read(dreg::STATUS),
            dma_engine::state::ERROR | EFAULT << 16
        );
        stop.stop();
        server.join().unwrap().unwrap();
    }

    /// The worked example of docs/dma-engine.md, step by step over a real socket: a
    /// memfd buffer, MSI-X vector 0 with an eventfd, a 4 KiB copy, the eventfd
    /// signalled before the START write is answered, STATUS, CRC32C and the completion
    /// record as documented, and DMA_UNMAP.
    #[test]
    fn dma_engine_worked_example() {
        let path = socket_path("example");
        let stop = Stop::new().unwrap();
        let server = {
            let (path, stop) = (path.clone(), stop.clone());
            thread::spawn(move || serve(&path, Box::new(DmaEngine::new()), stop))
        };
        let mut c = Client::connect(&path);
        c.version(); // 1
        match c.call(Request::DeviceGetRegionInfo(GetInfoRequest {
            argsz: 32,
            index: 0,
        })) {
            Ok(Reply::DeviceGetRegionInfo(r)) => assert_eq!(r.size, 4096), // 2
            other => panic!("{other:?}"),
        }
        match c.call(Request::DeviceGetIrqInfo(GetInfoRequest {
            argsz: 16,
            index: pci_irq::MSIX,
        })) {
            Ok(Reply::DeviceGetIrqInfo(i)) => assert_eq!(i.count, 2), // 3
            other => panic!("{other:?}"),
        }
        let fd = memfd(0x10000);
        let map = DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: 0x10_0000,
            size: 0x10000,
        };
        assert_eq!(
            c.call_fds(Request::DmaMap(map), vec![fd.try_clone().unwrap()]),
            Ok(Reply::DmaMap)
        ); // 4
        c.write(pci_region::CONFIG, 0x04, &[0x06, 0x00]); // 5
        let (efd, efd_owned) = eventfd();
        let set = SetIrqs {
            action: IRQ_SET_ACTION_TRIGGER,
            index: pci_irq::MSIX,
            start: 0,
            count: 1,
            data: IrqData::EventFd { assign: true },
        };
        assert_eq!(
            c.call_fds(Request::DeviceSetIrqs(set), vec![efd_owned]),
            Ok(Reply::DeviceSetIrqs)
        ); // 6
        assert_eq!(
            c.read(pci_region::CONFIG, 0x84, 1),
            vec![0x11],
            "MSI-X at 0x84"
        );
        c.write(pci_region::CONFIG, 0x87, &[0x80]); // 7
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 256) as u8).collect();
        crate::device::dma::tests::pwrite(&fd, 0, &data); // 8
        c.write(0, 0x08, &[0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0]); // 9
        c.write(0, 0x10, &[0x00, 0x10, 0x10, 0x00, 0, 0, 0, 0]); // 10
        c.write(0, 0x18, &[0x00, 0xf0, 0x10, 0x00, 0, 0, 0, 0]); // 11
        c.write(0, 0x20, &[0x00, 0x10, 0x00, 0x00]); // 12
        c.write(0, 0x24, &[0x01, 0x00, 0x00, 0x00]); // 13
        assert_eq!(efd.read().ok(), Some(1), "signalled before the reply"); // 14
        let crc = crc32c(&data);
        let mut status = vec![0x01, 0, 0, 0];
        status.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(c.read(0, 0x28, 8), status); // 15
        assert_eq!(pread(&fd, 0x1000, 4096), data);
        let mut record = vec![0, 0, 0, 0];
        record.extend_from_slice(&crc.to_le_bytes());
        record.extend_from_slice(&[0x00, 0x10, 0, 0, 0x01, 0, 0, 0]);
        assert_eq!(pread(&fd, 0xf000, 16), record); // 16
        c.write(0, 0x34, &[0x01, 0, 0, 0]); // 17
        assert_eq!(c.read(0, 0x34, 4), vec![0; 4]);
        let unmap = DmaUnmap::region(0x10_0000, 0x10000);
        assert_eq!(c.call(Request::DmaUnmap(unmap)), Ok(Reply::DmaUnmap(unmap))); // 18
        stop.stop();
        server.join().unwrap().unwrap();
    }
}
