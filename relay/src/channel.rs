//! One exported device: its vfio-user socket, the client connected to it, the requests
//! in flight through the tunnel, and the client's interrupt eventfds.
//!
//! Requests travel client -> switch thread -> tunnel; replies travel tunnel worker ->
//! client. Both threads work on a channel under its mutex; the tunnel link's lock is
//! always taken inside a channel's, never around it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use log::{debug, info, warn};
use vfu_proto::transport::{Limits, MessageWriter, RawMessage};
use vfu_proto::tunnel::{Body, Slot, TunnelMessage, VfioUserFrame};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, Command, Header, IrqData, MessageType, Reply, Request,
    Version, HEADER_SIZE,
};

use crate::switch::Relay;
use crate::version::negotiate;

/// Whether the device VM serves this channel's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// No device VM, or it has not answered CHANNEL_UP yet.
    Unknown,
    /// The device VM serves the device.
    Served,
    /// The device VM is up but serves no device of this name.
    NotServed,
}

/// What the relay must do when a reply comes back.
#[derive(Debug)]
enum PendingKind {
    /// Forward the reply as it is (after checking it).
    Plain,
    /// Answer with the negotiated version instead of the device's.
    Version(Version),
    /// Apply the eventfd change once the device accepted it.
    SetIrqs { index: u32, change: IrqChange },
}

/// What a SET_IRQS does to the relay's eventfd table.
#[derive(Debug)]
enum IrqChange {
    /// Eventfds for vectors `start ..`.
    Assign { start: u32, fds: Vec<OwnedFd> },
    /// No fds: de-assign `start .. start + count`.
    Deassign { start: u32, count: u32 },
    /// DATA_NONE|TRIGGER with count 0: the whole index is disabled.
    DisableAll,
}

/// A client request waiting for the device VM.
#[derive(Debug)]
struct Pending {
    header: Header,
    deadline: Instant,
    kind: PendingKind,
}

/// The client connected to a channel's socket.
#[derive(Debug)]
pub struct Client {
    /// Write side of the connection (the switch thread reads from its own clone).
    sock: UnixStream,
    writer: MessageWriter,
    pending: VecDeque<Pending>,
    /// The VERSION exchange is done.
    versioned: bool,
    /// Eventfds per (IRQ index, vector).
    irq_fds: HashMap<(u32, u32), File>,
    /// Memory fds of DMA regions, kept for the copy and window paths.
    dma_fds: HashMap<u64, OwnedFd>,
    /// Writing to this connection failed: the switch drops it. The mark sits on the
    /// connection itself, so a newer client on the same channel is never dropped for an
    /// older one's failure.
    broken: bool,
}

/// Mutable state of a channel.
#[derive(Debug)]
pub struct ChannelState {
    /// Whether the device VM serves the device.
    pub guest: GuestState,
    /// The connected client, if any.
    pub client: Option<Client>,
}

/// One exported device.
#[derive(Debug)]
pub struct Channel {
    /// Channel id in the tunnel (1-based).
    pub id: u32,
    /// Device name.
    pub name: String,
    /// The vfio-user socket path.
    pub socket: PathBuf,
    /// State shared by the switch and tunnel threads.
    pub state: Mutex<ChannelState>,
}

/// Outcome of sending bytes to a client.
#[derive(Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// All written.
    Done,
    /// Some bytes wait for the socket to become writable.
    Queued,
    /// The connection failed; the client must be dropped.
    Broken,
}

/// Most bytes queued toward a client that does not read before it is dropped.
const MAX_CLIENT_BACKLOG: usize = 16 << 20;

impl Client {
    /// A freshly accepted client; `sock` is non-blocking.
    pub fn new(sock: UnixStream) -> Self {
        Self {
            sock,
            writer: MessageWriter::new(Limits {
                max_msg_size: usize::MAX,
                max_msg_fds: 1,
            }),
            pending: VecDeque::new(),
            versioned: false,
            irq_fds: HashMap::new(),
            dma_fds: HashMap::new(),
            broken: false,
        }
    }

    /// Whether writing to this connection failed.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Queues a message and writes what the socket takes.
    pub fn send(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) -> SendOutcome {
        if self.writer.push(bytes, fds).is_err() || self.writer.queued_bytes() > MAX_CLIENT_BACKLOG
        {
            return SendOutcome::Broken;
        }
        self.flush()
    }

    /// Writes queued bytes.
    pub fn flush(&mut self) -> SendOutcome {
        match self.writer.flush(&self.sock) {
            Ok(true) => SendOutcome::Done,
            Ok(false) => SendOutcome::Queued,
            Err(e) => {
                debug!("client write failed: {e}");
                SendOutcome::Broken
            }
        }
    }

    /// The connection's fd (for epoll).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// Whether bytes wait for the socket.
    pub fn has_backlog(&self) -> bool {
        !self.writer.is_empty()
    }

    /// The earliest deadline of a request in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    fn error(&mut self, request: &Header, errno: u32) -> SendOutcome {
        if request.no_reply {
            return SendOutcome::Done;
        }
        self.send(encode_error_reply(request, errno), vec![])
    }
}

impl Channel {
    /// A channel with no client and no device VM yet.
    pub fn new(id: u32, name: String, socket: PathBuf) -> Self {
        Self {
            id,
            name,
            socket,
            state: Mutex::new(ChannelState {
                guest: GuestState::Unknown,
                client: None,
            }),
        }
    }

    /// Locks the state, recovering from a poisoned lock (a panicking thread must not
    /// take the other devices down).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client connected: tell the device VM a session starts.
    pub fn on_client_connected(&self, relay: &Relay, sock: UnixStream) {
        let mut st = self.lock();
        st.client = Some(Client::new(sock));
        if st.guest == GuestState::Served {
            relay.send_control(self.id, Body::SessionStart);
        }
        info!("{}: client connected", self.name);
    }

    /// The client went away: drop its state as the spec says (DMA maps, IRQ fds) and
    /// end the device VM's session, which keeps the device state.
    pub fn on_client_disconnected(&self, relay: &Relay) {
        let mut st = self.lock();
        if let Some(client) = st.client.take() {
            info!(
                "{}: client disconnected ({} request(s) in flight dropped)",
                self.name,
                client.pending.len()
            );
        }
        if st.guest == GuestState::Served {
            relay.send_control(self.id, Body::SessionEnd);
        }
    }

    /// One message from the client. Returns how writing the answer went.
    pub fn on_client_message(&self, relay: &Relay, msg: RawMessage) -> SendOutcome {
        let mut st = self.lock();
        let guest = st.guest;
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Broken;
        };
        let header = msg.header;
        if header.msg_type == MessageType::Reply {
            // Replies to server-to-client DMA_READ / DMA_WRITE; the relay sends none yet.
            warn!(
                "{}: unexpected reply from client (msg {})",
                self.name, header.msg_id
            );
            return SendOutcome::Done;
        }
        let request = match Request::decode(header.command, &msg.payload, msg.fds.len()) {
            Ok(r) => r,
            Err(e) => {
                debug!("{}: bad request: {e}", self.name);
                return client.error(&header, e.errno());
            }
        };
        if !client.versioned && !matches!(request, Request::Version(_)) {
            debug!("{}: {:?} before VERSION", self.name, request.command());
            return client.error(&header, libc::EINVAL as u32);
        }
        if request.command().is_server_to_client() {
            return client.error(&header, libc::EINVAL as u32);
        }
        if let Request::RegionRead(a) = &request {
            // The reply would not fit a tunnel message: refuse here, whatever the device
            // would say.
            if a.count > relay.limits.max_data_xfer_size {
                return client.error(&header, libc::EINVAL as u32);
            }
        }
        if guest != GuestState::Served || !relay.link.is_up() {
            let errno = libc::ENODEV as u32;
            debug!(
                "{}: no device VM serving the device; {} gets ENODEV",
                self.name,
                request.command().name()
            );
            return client.error(&header, errno);
        }

        let mut fds = msg.fds;
        let mut slots = Vec::new();
        let kind = match &request {
            Request::Version(v) => PendingKind::Version(v.clone()),
            Request::DeviceSetIrqs(s) => match s.data {
                IrqData::EventFd { assign } => {
                    slots = vec![Slot::eventfd(); s.fd_count()];
                    let change = if assign {
                        IrqChange::Assign {
                            start: s.start,
                            fds: std::mem::take(&mut fds),
                        }
                    } else {
                        IrqChange::Deassign {
                            start: s.start,
                            count: s.count,
                        }
                    };
                    PendingKind::SetIrqs {
                        index: s.index,
                        change,
                    }
                }
                IrqData::None if s.count == 0 => PendingKind::SetIrqs {
                    index: s.index,
                    change: IrqChange::DisableAll,
                },
                _ => PendingKind::Plain,
            },
            Request::DmaMap(m) => {
                // The fd stays here; the device VM reaches the memory through the relay.
                if let Some(fd) = fds.pop() {
                    client.dma_fds.insert(m.address, fd);
                }
                PendingKind::Plain
            }
            Request::DmaUnmap(u) => {
                if u.all {
                    client.dma_fds.clear();
                } else {
                    client.dma_fds.remove(&u.address);
                }
                PendingKind::Plain
            }
            _ => PendingKind::Plain,
        };
        let frame = VfioUserFrame {
            header,
            payload: msg.payload,
            slots,
        };
        if let Err(e) = relay
            .link
            .send(&TunnelMessage::new(self.id, Body::VfioUser(frame)))
        {
            debug!("{}: tunnel refused a request: {e}", self.name);
            return client.error(&header, e.errno());
        }
        if !header.no_reply {
            client.pending.push_back(Pending {
                header,
                deadline: Instant::now() + relay.config.request_timeout(),
                kind,
            });
        }
        SendOutcome::Done
    }

    /// A vfio-user message from the device VM on this channel.
    pub fn on_device_message(&self, relay: &Relay, frame: VfioUserFrame) -> SendOutcome {
        let mut st = self.lock();
        let Some(client) = st.client.as_mut() else {
            debug!("{}: device message with no client; dropped", self.name);
            return SendOutcome::Done;
        };
        let h = frame.header;
        if h.msg_type != MessageType::Reply {
            warn!(
                "{}: device sent command {} toward the client; not supported yet",
                self.name, h.command
            );
            return SendOutcome::Done;
        }
        let Some(pos) = client
            .pending
            .iter()
            .position(|p| p.header.msg_id == h.msg_id && p.header.command == h.command)
        else {
            warn!(
                "{}: reply to no request in flight (msg {}, command {}); dropped",
                self.name, h.msg_id, h.command
            );
            return SendOutcome::Done;
        };
        let pending = client.pending.remove(pos).expect("position is valid");
        if let Some(errno) = h.error {
            // Whatever the device refused is not applied here either.
            return client.send(encode_error_reply(&pending.header, errno), vec![]);
        }
        let reply = match Reply::decode(h.command, &frame.payload, frame.slots.len()) {
            Ok(r) => r,
            Err(e) => {
                warn!("{}: invalid reply from the device VM: {e}", self.name);
                return client.send(
                    encode_error_reply(&pending.header, libc::EIO as u32),
                    vec![],
                );
            }
        };
        if !frame.slots.is_empty() {
            warn!(
                "{}: reply carries fd slots the relay does not hand out yet",
                self.name
            );
            return client.send(
                encode_error_reply(&pending.header, libc::EIO as u32),
                vec![],
            );
        }
        match (pending.kind, reply) {
            (PendingKind::Version(proposal), Reply::Version(device)) => {
                let answer = negotiate(&proposal, &device, relay.limits);
                client.versioned = true;
                debug!("{}: VERSION negotiated: {answer:?}", self.name);
                client.send(encode_reply(h.msg_id, &Reply::Version(answer)), vec![])
            }
            (PendingKind::SetIrqs { index, change }, reply @ Reply::DeviceSetIrqs) => {
                apply_irq_change(&mut client.irq_fds, index, change);
                client.send(encode_reply(h.msg_id, &reply), vec![])
            }
            _ => {
                // Checked above; forwarded byte for byte.
                let mut bytes = Vec::with_capacity(HEADER_SIZE + frame.payload.len());
                Header::reply_to(&pending.header, frame.payload.len()).encode(&mut bytes);
                bytes.extend_from_slice(&frame.payload);
                client.send(bytes, vec![])
            }
        }
    }

    /// The device VM raised vectors `start .. start + count` of `index`.
    pub fn on_irq(&self, index: u32, start: u32, count: u32) {
        let mut st = self.lock();
        let Some(client) = st.client.as_mut() else {
            return;
        };
        for v in start..start.saturating_add(count) {
            if let Some(f) = client.irq_fds.get_mut(&(index, v)) {
                if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                    warn!("{}: signalling IRQ {index}/{v}: {e}", self.name);
                }
            }
        }
    }

    /// Answers requests whose deadline passed with ETIMEDOUT.
    pub fn expire(&self, now: Instant) -> SendOutcome {
        let mut st = self.lock();
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Done;
        };
        let mut outcome = SendOutcome::Done;
        while let Some(pos) = client.pending.iter().position(|p| p.deadline <= now) {
            let p = client.pending.remove(pos).expect("position is valid");
            warn!(
                "{}: {} (msg {}) timed out waiting for the device VM",
                self.name,
                Command::try_from(p.header.command).map_or("?", |c| c.name()),
                p.header.msg_id
            );
            let o = client.send(
                encode_error_reply(&p.header, libc::ETIMEDOUT as u32),
                vec![],
            );
            if o != SendOutcome::Done {
                outcome = o;
            }
        }
        outcome
    }

    /// The device VM went away or restarted: requests in flight fail with `errno`.
    pub fn fail_pending(&self, errno: u32) -> SendOutcome {
        let mut st = self.lock();
        st.guest = GuestState::Unknown;
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Done;
        };
        let mut outcome = SendOutcome::Done;
        while let Some(p) = client.pending.pop_front() {
            let o = client.send(encode_error_reply(&p.header, errno), vec![]);
            if o != SendOutcome::Done {
                outcome = o;
            }
        }
        outcome
    }
}

/// Applies a SET_IRQS to the relay's eventfd table, once the device accepted it.
fn apply_irq_change(table: &mut HashMap<(u32, u32), File>, index: u32, change: IrqChange) {
    match change {
        IrqChange::Assign { start, fds } => {
            for (v, fd) in (start..).zip(fds) {
                table.insert((index, v), File::from(fd));
            }
        }
        IrqChange::Deassign { start, count } => {
            table.retain(|&(i, v), _| i != index || v < start || v - start >= count);
        }
        IrqChange::DisableAll => table.retain(|&(i, _), _| i != index),
    }
}
