//! The connection to the server: connecting and VERSION, sending requests, and waiting
//! for replies while serving whatever the server sends meanwhile (replies to forward to
//! the client, its own DMA_READ / DMA_WRITE, interrupts). When the server goes away the
//! requests in flight fail with `ENODEV`; the next request connects again and hands the
//! new connection the client's DMA maps and interrupt eventfds.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vfu_proto::transport::{Frame, Limits, MessageReader, MessageWriter, RawMessage};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, DmaMap, DmaReadReply, DmaWriteReply, Header, IrqData,
    MessageType, Reply, Request, SetIrqs, Version, IRQ_SET_ACTION_TRIGGER,
};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::dma::{nonzero, Placement};
use super::irqs::Irqs;
use super::pending::Waiting;
use super::replies::fix_reply;
use super::version::{self, HEADROOM, MAX_DATA_XFER, RECEIVE_MAX_FDS};
use super::Bridge;
use crate::device::errno::{EINVAL, EIO};
use crate::device::{DmaRemote, Errno};
use crate::tunnel::{Outlet, OutletError};

/// Epoll data of the server's socket.
pub(super) const SOCKET_TOKEN: u64 = u64::MAX;

/// `ENODEV`: the server is not there.
pub(super) const ENODEV: Errno = libc::ENODEV as Errno;
/// `ETIMEDOUT`: the server stopped answering.
const ETIMEDOUT: Errno = libc::ETIMEDOUT as Errno;
/// `E2BIG`: a message over a limit.
const E2BIG: Errno = libc::E2BIG as Errno;
/// `ENOSYS`: a command the bridge does not serve.
const ENOSYS: Errno = libc::ENOSYS as Errno;

/// Longest single sleep while waiting (the waits check their deadline in between).
const POLL_STEP: Duration = Duration::from_millis(100);

/// One connection to the server.
#[derive(Debug)]
pub(super) struct Link {
    pub sock: UnixStream,
    pub reader: MessageReader,
    pub writer: MessageWriter,
    /// What the server answered to VERSION (the spec's defaults until then).
    pub server: Version,
}

impl Link {
    fn new(sock: UnixStream) -> Self {
        Self {
            sock,
            reader: MessageReader::new(Limits {
                max_msg_size: MAX_DATA_XFER as usize + HEADROOM,
                max_msg_fds: RECEIVE_MAX_FDS as usize,
            }),
            writer: MessageWriter::new(Limits::DEFAULT),
            server: Version {
                major: 0,
                minor: 0,
                capabilities: None,
            },
        }
    }

    /// Most fds the server takes with one message.
    pub fn max_fds(&self) -> usize {
        self.server.capabilities.unwrap_or_default().max_msg_fds() as usize
    }
}

impl Bridge {
    /// Connects to the server if there is no connection: tries for up to
    /// `connect_wait`, then says VERSION and hands over the client's maps and
    /// interrupts, if it has any (a reconnection). `ENODEV` if the server is not there
    /// or refuses.
    pub(super) fn ensure_connected(
        &mut self,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<(), Errno> {
        if self.link.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.connect_wait;
        let sock = loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    if self.absent_logged {
                        debug!(
                            "{}: server at {} not there: {e}",
                            self.name,
                            self.socket.display()
                        );
                    } else {
                        warn!(
                            "{}: cannot connect to the vfio-user server at {}: {e}; its requests fail \
                             with ENODEV until it is there",
                            self.name,
                            self.socket.display()
                        );
                        self.absent_logged = true;
                    }
                    return Err(ENODEV);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if let Err(e) = sock.set_nonblocking(true).and_then(|()| {
            self.epoll.ctl(
                ControlOperation::Add,
                sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, SOCKET_TOKEN),
            )
        }) {
            warn!("{}: cannot use the server's socket: {e}", self.name);
            return Err(ENODEV);
        }
        self.link = Some(Link::new(sock));
        self.last_heard = Instant::now();
        let server = match self.exchange_request(
            &Request::Version(version::proposal()),
            Vec::new(),
            dma,
            out,
        ) {
            Ok(m) => match Reply::decode(m.header.command, &m.payload, m.fds.len()) {
                Ok(Reply::Version(v)) if v.major == 0 => v,
                other => {
                    self.lost(&format!("unusable VERSION reply {other:?}"), out);
                    return Err(ENODEV);
                }
            },
            Err(e) => {
                self.lost(&format!("VERSION failed with errno {e}"), out);
                return Err(ENODEV);
            }
        };
        let caps = server.capabilities.unwrap_or_default();
        if let Some(link) = self.link.as_mut() {
            link.writer.set_limits(Limits {
                max_msg_size: caps.max_data_xfer_size() as usize + HEADROOM,
                max_msg_fds: caps.max_msg_fds() as usize,
            });
            link.server = server;
        }
        self.absent_logged = false;
        info!(
            "{}: connected to the vfio-user server at {}: {} fds a message, {} bytes a transfer",
            self.name,
            self.socket.display(),
            caps.max_msg_fds(),
            caps.max_data_xfer_size()
        );
        self.hand_over(dma, out);
        if self.link.is_none() {
            return Err(ENODEV);
        }
        Ok(())
    }

    /// Gives a new connection what the client set up through the old one: its DMA maps
    /// and its interrupt eventfds. The device state itself is the server's (a restarted
    /// server starts from reset, as after a device reset).
    fn hand_over(&mut self, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        let maps = self.regions.maps();
        let irqs: Vec<(u32, u32, Vec<OwnedFd>)> = self
            .irqs
            .runs()
            .into_iter()
            .filter_map(|(index, start, fds)| Some((index, start, Irqs::dup_all(fds).ok()?)))
            .collect();
        if maps.is_empty() && irqs.is_empty() {
            return;
        }
        info!(
            "{}: handing the client's {} DMA map(s) and {} interrupt run(s) to the new connection",
            self.name,
            maps.len(),
            irqs.len()
        );
        for (m, placement) in maps {
            if let Err(e) = self.map_on_server(&m, placement, dma, out) {
                warn!(
                    "{}: DMA map {:#x}+{:#x} not handed over: errno {e}",
                    self.name, m.address, m.size
                );
            }
        }
        for (index, start, fds) in irqs {
            let count = fds.len() as u32;
            if let (_, Err(e)) = self.assign_on_server(index, start, fds, dma, out) {
                warn!(
                    "{}: interrupts {index}/{start}+{count} not handed over: errno {e}",
                    self.name
                );
            }
        }
    }

    /// Sends a DMA_MAP for `m` to the server, with an fd onto its window when the
    /// transport gives one (the server then maps the memory itself), else without (the
    /// server uses DMA_READ / DMA_WRITE).
    pub(super) fn map_on_server(
        &mut self,
        m: &DmaMap,
        placement: Placement,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<(), Errno> {
        let max_fds = self.link.as_ref().map_or(0, Link::max_fds);
        let fd = match (placement, &self.window_fds) {
            (Placement::Window(off), Some(w)) if max_fds >= 1 => w.window_fd(off, m.size),
            _ => None,
        };
        let (fds, offset) = match fd {
            Some((fd, offset)) => (vec![fd], offset),
            None => (Vec::new(), 0),
        };
        let with_fd = !fds.is_empty();
        let req = Request::DmaMap(DmaMap { offset, ..*m });
        self.exchange_request(&req, fds, dma, out)?;
        debug!(
            "{}: DMA map {:#x}+{:#x} handed to the server {}",
            self.name,
            m.address,
            m.size,
            if with_fd {
                "as an fd"
            } else {
                "without an fd (in-band DMA)"
            }
        );
        Ok(())
    }

    /// Hands eventfds for vectors `start..` of `index` to the server, in as many
    /// SET_IRQS as its `max_msg_fds` needs. Stops at the first refusal; returns how
    /// many the server took, and the outcome.
    pub(super) fn assign_on_server(
        &mut self,
        index: u32,
        start: u32,
        fds: Vec<OwnedFd>,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> (usize, Result<(), Errno>) {
        let per = self.link.as_ref().map_or(0, Link::max_fds);
        if per == 0 {
            warn!(
                "{}: the server takes no fds; interrupts cannot be assigned",
                self.name
            );
            return (0, Err(libc::EOPNOTSUPP as Errno));
        }
        let mut fds = fds.into_iter();
        let mut at = start;
        let mut taken = 0;
        loop {
            let part: Vec<OwnedFd> = fds.by_ref().take(per).collect();
            if part.is_empty() {
                return (taken, Ok(()));
            }
            let count = part.len() as u32;
            let req = Request::DeviceSetIrqs(SetIrqs {
                action: IRQ_SET_ACTION_TRIGGER,
                index,
                start: at,
                count,
                data: IrqData::EventFd { assign: true },
            });
            if let Err(e) = self.exchange_request(&req, part, dma, out) {
                return (taken, Err(e));
            }
            taken += count as usize;
            at += count;
        }
    }

    /// Sends `req` (with `fds`) as the bridge's own request and waits for the reply;
    /// an error reply is its errno (0 made `EIO`).
    pub(super) fn exchange_request(
        &mut self,
        req: &Request,
        fds: Vec<OwnedFd>,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<RawMessage, Errno> {
        let mut payload = Vec::new();
        req.encode(&mut payload);
        let command = req.command() as u16;
        self.wait_until(dma, out, |b| b.pending.len() < b.config.max_in_flight)?;
        let id = self.send(
            command,
            &payload,
            fds,
            false,
            Some(Waiting::Bridge),
            dma,
            out,
        )?;
        let mut answer = None;
        let waited = self.wait_until(dma, out, |b| {
            answer = b.answers.remove(&id);
            answer.is_some()
        });
        if waited.is_err() {
            self.pending.take(id);
        }
        waited?;
        let msg = answer.ok_or(EIO)??;
        if msg.header.command != command {
            warn!(
                "{}: reply {id} to command {command} is for command {}",
                self.name, msg.header.command
            );
            return Err(EIO);
        }
        match msg.header.error {
            Some(errno) => Err(nonzero(errno)),
            None => Ok(msg),
        }
    }

    /// Serves the connection until `done` holds. `ENODEV` when the server goes away
    /// meanwhile; when it says nothing for `reply_timeout` while something is in
    /// flight or queued, it is taken for hung: disconnected, `ETIMEDOUT`.
    pub(super) fn wait_until(
        &mut self,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), Errno> {
        let start = Instant::now();
        loop {
            if done(self) {
                return Ok(());
            }
            if self.link.is_none() {
                return Err(ENODEV);
            }
            let quiet = start.max(self.last_heard).elapsed();
            if quiet >= self.config.reply_timeout {
                let why = format!("no answer for {} ms", quiet.as_millis());
                self.lost(&why, out);
                return Err(ETIMEDOUT);
            }
            let step = (self.config.reply_timeout - quiet).min(POLL_STEP);
            self.pump(step, dma, out);
        }
    }

    /// Queues a request for the server and writes it out (waiting while the socket is
    /// full, serving the server meanwhile). Returns its message ID; `waiting` says what
    /// becomes of the reply (none is expected with `no_reply`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        no_reply: bool,
        waiting: Option<Waiting>,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<u16, Errno> {
        let id = self.pending.next_id();
        let mut header = Header::command(id, command, payload.len());
        header.no_reply = no_reply;
        let mut bytes = Vec::with_capacity(header.size as usize);
        header.encode(&mut bytes);
        bytes.extend_from_slice(payload);
        let link = self.link.as_mut().ok_or(ENODEV)?;
        if let Err(e) = link.writer.push(bytes, fds) {
            debug!("{}: request {command} not sent: {e}", self.name);
            return Err(E2BIG);
        }
        if self.pending.is_empty() {
            // Silence before this request is not the server's fault.
            self.last_heard = Instant::now();
        }
        if let (Some(w), false) = (waiting, no_reply) {
            self.pending.insert(id, w);
        }
        self.flush(out);
        self.wait_until(dma, out, |b| {
            b.link.as_ref().is_none_or(|l| l.writer.is_empty())
        })?;
        Ok(id)
    }

    /// Writes what the socket takes; a failed write loses the connection.
    fn flush(&mut self, out: &mut Outlet) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Err(e) = link.writer.flush(&link.sock) {
            self.lost(&e.to_string(), out);
        }
    }

    /// Waits up to `timeout` for the server or an interrupt, and handles everything
    /// that is ready: replies, the server's requests, interrupts, room to write.
    pub(super) fn pump(&mut self, timeout: Duration, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        let mut fds = [
            libc::pollfd {
                fd: self.epoll.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: libc::POLLOUT,
                revents: 0,
            },
        ];
        if let Some(link) = &self.link {
            if !link.writer.is_empty() {
                fds[1].fd = link.sock.as_raw_fd();
            }
        }
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call (a
        // negative fd is ignored by poll).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if r <= 0 {
            return;
        }
        if fds[1].revents != 0 {
            self.flush(out);
        }
        if fds[0].revents == 0 {
            return;
        }
        let mut events = [EpollEvent::default(); 16];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            if ev.data() == SOCKET_TOKEN {
                self.read_server(dma, out);
            } else {
                self.irqs.fired(ev.data(), out);
            }
        }
    }

    /// Handles every whole message the server has sent.
    fn read_server(&mut self, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        loop {
            let frame = match self.link.as_mut() {
                Some(l) => l.reader.read(&l.sock),
                None => return,
            };
            match frame {
                Ok(Some(Frame::Message(m))) => {
                    self.last_heard = Instant::now();
                    self.on_message(m, dma, out);
                }
                Ok(Some(Frame::Rejected(r))) => {
                    self.last_heard = Instant::now();
                    warn!(
                        "{}: message from the server refused: {}",
                        self.name, r.error
                    );
                    let h = r.header;
                    if h.msg_type == MessageType::Command {
                        if !h.no_reply {
                            self.answer_server(encode_error_reply(&h, r.error.errno()), out);
                        }
                    } else {
                        self.on_reply_error(h.msg_id, r.error.errno(), out);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.lost(&e.to_string(), out);
                    return;
                }
            }
        }
    }

    fn on_message(&mut self, m: RawMessage, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        let h = m.header;
        if h.msg_type == MessageType::Command {
            let reply = self.serve_server_request(&m, dma);
            if !h.no_reply {
                let bytes = match reply {
                    Ok(r) => encode_reply(h.msg_id, &r),
                    Err(errno) => encode_error_reply(&h, errno),
                };
                self.answer_server(bytes, out);
            }
            return;
        }
        match self.pending.take(h.msg_id) {
            None => debug!(
                "{}: reply {} answers nothing in flight; dropped",
                self.name, h.msg_id
            ),
            Some(Waiting::Bridge) => {
                self.answers.insert(h.msg_id, Ok(m));
            }
            Some(Waiting::Client { header, fix }) => {
                let bytes = if h.command != header.command {
                    warn!(
                        "{}: reply {} is for command {}, not {}",
                        self.name, h.msg_id, h.command, header.command
                    );
                    encode_error_reply(&header, EIO)
                } else if let Some(errno) = h.error {
                    encode_error_reply(&header, nonzero(errno))
                } else {
                    if !m.fds.is_empty() {
                        debug!(
                            "{}: {} fd(s) of a reply closed (they cannot cross the tunnel)",
                            self.name,
                            m.fds.len()
                        );
                    }
                    match fix_reply(h.command, &m.payload, fix, header.msg_id) {
                        Ok(payload) => {
                            let mut b = Vec::with_capacity(16 + payload.len());
                            Header::reply_to(&header, payload.len()).encode(&mut b);
                            b.extend_from_slice(&payload);
                            b
                        }
                        Err(errno) => {
                            warn!(
                                "{}: reply to command {} does not decode; EIO",
                                self.name, h.command
                            );
                            encode_error_reply(&header, errno)
                        }
                    }
                };
                to_client(&self.name, &header, &bytes, out);
            }
        }
    }

    /// A reply the reader refused (over a limit): its request fails with `errno`.
    fn on_reply_error(&mut self, id: u16, errno: Errno, out: &mut Outlet) {
        match self.pending.take(id) {
            Some(Waiting::Bridge) => {
                self.answers.insert(id, Err(errno));
            }
            Some(Waiting::Client { header, .. }) => to_client(
                &self.name,
                &header,
                &encode_error_reply(&header, errno),
                out,
            ),
            None => {}
        }
    }

    /// The server's own requests: DMA_READ and DMA_WRITE on the client's memory.
    fn serve_server_request(
        &mut self,
        m: &RawMessage,
        dma: &mut dyn DmaRemote,
    ) -> Result<Reply, Errno> {
        let req = Request::decode(m.header.command, &m.payload, m.fds.len()).map_err(|e| {
            debug!("{}: bad request from the server: {e}", self.name);
            e.errno()
        })?;
        match req {
            Request::DmaRead(a) => {
                let data = self.regions.read(&a, dma)?;
                Ok(Reply::DmaRead(DmaReadReply {
                    address: a.address,
                    data,
                    width: a.width,
                }))
            }
            Request::DmaWrite(w) => {
                self.regions.write(&w, dma)?;
                Ok(Reply::DmaWrite(DmaWriteReply::Echo {
                    address: w.address,
                    count: w.data.len() as u64,
                    width: w.width,
                }))
            }
            other => {
                debug!(
                    "{}: the server sent {:?}, which only a client may send",
                    self.name,
                    other.command()
                );
                Err(if other.command().is_server_to_client() {
                    ENOSYS
                } else {
                    EINVAL
                })
            }
        }
    }

    /// Queues an answer to the server's request (written as the socket takes it).
    fn answer_server(&mut self, bytes: Vec<u8>, out: &mut Outlet) {
        if let Some(link) = self.link.as_mut() {
            if let Err(e) = link.writer.push(bytes, Vec::new()) {
                warn!("{}: answer to the server not sent: {e}", self.name);
                return;
            }
        }
        self.flush(out);
    }

    /// The server went away (or is taken for hung): the connection is dropped, the
    /// client's requests in flight fail with `ENODEV`; the client's maps and interrupt
    /// assignments are kept for the next connection.
    pub(super) fn lost(&mut self, why: &str, out: &mut Outlet) {
        if let Some(link) = self.link.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                link.sock.as_raw_fd(),
                EpollEvent::default(),
            );
            warn!(
                "{}: connection to the vfio-user server at {} lost ({why}); {} request(s) in \
                 flight fail with ENODEV, the next request connects again",
                self.name,
                self.socket.display(),
                self.pending.len()
            );
        }
        for w in self.pending.drain() {
            if let Waiting::Client { header, .. } = w {
                to_client(
                    &self.name,
                    &header,
                    &encode_error_reply(&header, ENODEV),
                    out,
                );
            }
        }
        self.answers.clear();
    }
}

/// Queues a reply for the client; one too large for the tunnel becomes `E2BIG`.
pub(super) fn to_client(name: &str, request: &Header, bytes: &[u8], out: &mut Outlet) {
    if request.no_reply {
        return;
    }
    match out.vfio_user(bytes) {
        Ok(()) => {}
        Err(OutletError::TooBig { len, max }) => {
            warn!(
                "{name}: reply to message {} has {len} bytes, the tunnel takes {max}; E2BIG",
                request.msg_id
            );
            let _ = out.vfio_user(&encode_error_reply(request, E2BIG));
        }
        Err(e) => warn!("{name}: reply to message {} not sent: {e}", request.msg_id),
    }
}

/// A SET_IRQS that disables every vector of `index` (`DATA_NONE | TRIGGER`, count 0).
pub(super) fn disable_index(index: u32) -> Request {
    Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index,
        start: 0,
        count: 0,
        data: IrqData::None,
    })
}
