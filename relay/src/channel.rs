//! One exported device: its vfio-user socket, the client connected to it, the requests
//! in flight through the tunnel, and the client's interrupt eventfds.
//!
//! Requests travel client -> switch thread -> tunnel; replies travel tunnel worker ->
//! client. Both threads work on a channel under its mutex; the tunnel link's lock is
//! always taken inside a channel's, never around it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::{debug, info, warn};
use vfu_proto::transport::fds::{is_eventfd, set_nonblocking, signal_eventfd};
use vfu_proto::transport::{Limits, MessageWriter, RawMessage};
use vfu_proto::tunnel::{features, Body, Slot, TunnelMessage, VfioUserFrame};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, logging_bitmap_len, Capabilities, Command, DeviceFeature,
    DmaMap, FeatureData, Header, IrqData, MessageType, Reply, Request, SetIrqs, Version,
    HEADER_SIZE, IRQ_SET_ACTION_TRIGGER,
};
use vm_memory::VolatileSlice;

use crate::access::Access;
use crate::client_memory::{self, Direction};
use crate::control::{DeviceInfo, Served};
use crate::dma::{DmaError, DmaTable, Region, WindowMap, MAX_CLIENT_FDS};
use crate::remote_dma::RemoteDma;
use crate::switch::Relay;
use crate::version::{negotiate, MIN_CLIENT_DATA_XFER_SIZE};
use crate::warn_limited;

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
    /// The relay's own request, restoring a client's setup in a restarted device VM:
    /// nothing to forward, a failure is logged.
    Restore,
    /// Keep the region's fd once the device accepted the map.
    DmaMap { address: u64, id: u64 },
    /// The regions the unmap took out of the table (when it was forwarded, so that
    /// pipelined maps see the table as the client does); released once the device
    /// acknowledged, or gave up on, the unmap.
    DmaUnmap(u64),
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
    /// The client's header (its message ID goes back in the reply).
    header: Header,
    /// The message ID the relay gave the request toward the device VM.
    relay_id: u16,
    deadline: Instant,
    kind: PendingKind,
    /// The client sent the request with NO_REPLY: the relay asked for the reply itself
    /// (to commit or release DMA regions, and to count the request in flight until the
    /// device is done with it) and does not pass it on.
    silent: bool,
    /// Forwarded as posted (tunnel feature `POSTED_DONE`): no reply comes; the driver's
    /// POSTED_DONE says when it is carried out.
    posted: bool,
    /// Payload bytes (counted in [`Client::may_read`]).
    bytes: usize,
}

/// The client connected to a channel's socket.
#[derive(Debug)]
pub struct Client {
    /// The connection (the switch thread reads from it, replies are written here; one
    /// descriptor, so epoll is always asked about the fd it watches).
    sock: Arc<UnixStream>,
    writer: MessageWriter,
    pending: VecDeque<Pending>,
    /// Payload bytes of the requests in `pending`.
    pending_bytes: usize,
    /// VERSION was forwarded (requests before it are refused).
    versioned: bool,
    /// What the client stated about itself in VERSION.
    caps: Capabilities,
    /// DMA commands the relay sent to the client for regions mapped without an fd.
    remote: RemoteDma,
    /// Eventfds per (IRQ index, vector), non-blocking.
    irq_fds: HashMap<(u32, u32), OwnedFd>,
    /// Memory fds of DMA regions, kept for the copy and window paths.
    dma: DmaTable,
    /// The switch stopped reading this client: its channel's budget toward the device
    /// VM is used up (back-pressure).
    pub paused: bool,
    /// Writing to this connection failed: the switch drops it. The mark sits on the
    /// connection itself, so a newer client on the same channel is never dropped for an
    /// older one's failure.
    broken: bool,
    /// Its channel's id.
    channel: u32,
    /// Messages wait in the writer for the end of the batch being dispatched
    /// ([`batch_client_writes`]).
    deferred: bool,
}

std::thread_local! {
    /// While this thread dispatches a batch of the device VM's messages: the channels
    /// whose client has messages queued and not written yet.
    static DEFERRED: std::cell::RefCell<Option<Vec<u32>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `dispatch` (the handling of one batch of the device VM's messages) with what
/// it sends to clients queued, then writes each of those clients' queues at once: the
/// replies of a batch to one client go out in one `sendmsg` (a few for many), not one
/// each. Order is kept: a client's messages wait in its one queue, and whoever writes
/// next writes them first.
pub fn batch_client_writes<R>(relay: &Relay, dispatch: impl FnOnce() -> R) -> R {
    let nested = DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        let nested = d.is_some();
        if !nested {
            *d = Some(Vec::new());
        }
        nested
    });
    let result = dispatch();
    if nested {
        return result;
    }
    let ids = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    for id in ids {
        let Some(ch) = relay.channel(id) else {
            continue;
        };
        let mut st = ch.lock();
        if let Some(client) = st.client.as_mut().filter(|c| c.deferred) {
            client.deferred = false;
            let outcome = client.flush();
            relay.after_send_locked(&ch, client, outcome);
        }
    }
    result
}

/// The DMA regions of a client that went away, kept until the device VM acknowledges
/// the end of its session (SESSION_END with `tag`) or `deadline` passes.
#[derive(Debug)]
struct Retired {
    tag: u32,
    regions: Vec<Region>,
    deadline: Instant,
}

/// Mutable state of a channel.
#[derive(Debug)]
pub struct ChannelState {
    /// Whether the device VM serves the device.
    pub guest: GuestState,
    /// The tag of the CHANNEL_UP the relay waits to be answered, if any: a status under
    /// another tag, or when none is outstanding, is not the device VM's answer.
    channel_up: Option<u32>,
    /// The connected client, if any.
    pub client: Option<Client>,
    /// Message ID for the next request forwarded to the device VM. The relay numbers
    /// requests itself, across clients, so a late reply (after a timeout, or for a
    /// client that went away) never matches a newer request that reused the ID.
    next_id: u16,
    /// Regions of clients that went away, by the tag of their SESSION_END: their
    /// windows stay until the device VM acknowledges it, or the request timeout
    /// passes.
    retired: Vec<Retired>,
    /// Relay message IDs of requests that were in flight when their client went: the
    /// device VM's late replies to them are expected and dropped quietly (a client
    /// that leaves with 1024 requests in flight, again and again, must not fill the
    /// log). An ID leaves the set when it is given to a new request.
    abandoned: HashSet<u16>,
    /// Client requests forwarded to the device VM (for `list`).
    requests: u64,
    /// Client connections accepted (for `list`).
    connections: u64,
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
    /// Who may connect to the socket.
    pub access: Access,
    /// State shared by the switch and tunnel threads.
    pub state: Mutex<ChannelState>,
}

/// What a channel holds (for the fuzz targets' checks that it stays bounded and goes
/// back to nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCounts {
    /// A client is connected.
    pub clients: usize,
    /// Its requests in flight.
    pub pending: usize,
    /// Payload bytes of those requests.
    pub pending_bytes: usize,
    /// The device VM's DMA operations waiting for the client, and the commands sent
    /// to the client for them.
    pub remote_ops: usize,
    /// Commands sent to the client for those operations.
    pub remote_chunks: usize,
    /// DMA regions: mapped, and with an unmap in flight.
    pub dma_regions: usize,
    /// Memory files the client's regions hold.
    pub dma_files: usize,
    /// Interrupt eventfds assigned.
    pub irq_fds: usize,
    /// Sessions of clients that left, waiting for the device VM's SESSION_END reply.
    pub retired_sessions: usize,
    /// Their regions.
    pub retired_regions: usize,
    /// Relay message IDs of requests whose client left.
    pub abandoned: usize,
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

/// Most requests of one client in flight through the tunnel. Beyond it the switch stops
/// reading the client until replies come back (back-pressure, bounded state).
pub const MAX_IN_FLIGHT: usize = 1024;

/// Most payload bytes of one client's requests in flight: what the device VM may have
/// to hold for the client's device at once (posted writes included: the relay asks
/// for their replies itself), whatever the device's pace.
pub const MAX_IN_FLIGHT_BYTES: usize = 8 << 20;

impl Client {
    /// A freshly accepted client of channel `channel`; `sock` is non-blocking.
    pub fn new(sock: Arc<UnixStream>, channel: u32) -> Self {
        Self {
            sock,
            writer: MessageWriter::new(Limits {
                max_msg_size: usize::MAX,
                max_msg_fds: 1,
            }),
            pending: VecDeque::new(),
            pending_bytes: 0,
            versioned: false,
            caps: Capabilities::default(),
            remote: RemoteDma::default(),
            irq_fds: HashMap::new(),
            dma: DmaTable::default(),
            paused: false,
            broken: false,
            channel,
            deferred: false,
        }
    }

    /// Whether writing to this connection failed.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Queues a message and writes what the socket takes.
    pub fn send(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) -> SendOutcome {
        if self.broken
            || self.writer.queued_bytes() + bytes.len() > MAX_CLIENT_BACKLOG
            || self.writer.push(bytes, fds).is_err()
        {
            // A client that does not read its replies is dropped rather than buffered
            // for without bound.
            self.broken = true;
            return SendOutcome::Broken;
        }
        if self.deferred {
            return SendOutcome::Done; // written with the rest at the end of the batch
        }
        let batching = DEFERRED.with(|d| {
            d.borrow_mut()
                .as_mut()
                .map(|ids| ids.push(self.channel))
                .is_some()
        });
        if batching {
            self.deferred = true;
            return SendOutcome::Done;
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
                self.broken = true;
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

    /// Whether the switch may read another request: few enough in flight.
    pub fn may_read(&self) -> bool {
        self.pending.len() < MAX_IN_FLIGHT && self.pending_bytes < MAX_IN_FLIGHT_BYTES
    }

    /// Whether a paused client may be read again: half of what may be in flight is
    /// back.
    fn may_resume(&self) -> bool {
        self.pending.len() <= MAX_IN_FLIGHT / 2 && self.pending_bytes <= MAX_IN_FLIGHT_BYTES / 2
    }

    fn push_pending(&mut self, p: Pending) {
        self.pending_bytes += p.bytes;
        self.pending.push_back(p);
    }

    fn remove_pending(&mut self, pos: usize) -> Option<Pending> {
        let p = self.pending.remove(pos)?;
        self.pending_bytes -= p.bytes;
        Some(p)
    }

    fn pop_pending(&mut self) -> Option<Pending> {
        self.remove_pending(0)
    }

    /// The earliest deadline of a request in flight, or of a DMA command sent to the
    /// client.
    pub fn next_deadline(&self) -> Option<Instant> {
        let own = self.pending.iter().map(|p| p.deadline).min();
        match (own, self.remote.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn error(&mut self, request: &Header, errno: u32) -> SendOutcome {
        if request.no_reply {
            return SendOutcome::Done;
        }
        self.send(encode_error_reply(request, errno), vec![])
    }
}

/// The relay's message ID for the next request toward the device VM (`next_id` and
/// `abandoned` of a [`ChannelState`]).
fn take_id(next_id: &mut u16, abandoned: &mut HashSet<u16>) -> u16 {
    let id = *next_id;
    *next_id = next_id.wrapping_add(1);
    abandoned.remove(&id);
    id
}

impl Channel {
    /// A channel with no client and no device VM yet.
    pub fn new(id: u32, name: String, socket: PathBuf, access: Access) -> Self {
        Self {
            id,
            name,
            socket,
            access,
            state: Mutex::new(ChannelState {
                guest: GuestState::Unknown,
                channel_up: None,
                client: None,
                next_id: 0,
                retired: Vec::new(),
                abandoned: HashSet::new(),
                requests: 0,
                connections: 0,
            }),
        }
    }

    /// Locks the state, recovering from a poisoned lock (a panicking thread must not
    /// take the other devices down).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the device VM whether it serves this channel's device (CHANNEL_UP); its
    /// answer goes to [`Channel::on_channel_up_status`].
    pub fn bring_up(&self, relay: &Relay) {
        let mut st = self.lock();
        let tag = relay.send_control(
            self.id,
            Body::ChannelUp {
                name: self.name.clone(),
            },
        );
        st.channel_up = Some(tag);
    }

    /// The tag of the CHANNEL_UP the relay waits to be answered, if any.
    pub(crate) fn channel_up_tag(&self) -> Option<u32> {
        self.lock().channel_up
    }

    /// The device VM answered a CHANNEL_UP with `status` under `tag`. Only the answer
    /// to the CHANNEL_UP outstanding counts: whether the device is served then decides
    /// whether its client's session starts (and its setup is restored), which must
    /// happen once per CHANNEL_UP, not whenever the device VM says so.
    pub fn on_channel_up_status(&self, relay: &Relay, tag: u32, status: u32) {
        let mut st = self.lock();
        if st.channel_up != Some(tag) {
            warn_limited!(
                "{}: the device VM answered a CHANNEL_UP the relay did not ask for (tag {tag}); ignored",
                self.name
            );
            return;
        }
        st.channel_up = None;
        if status == 0 {
            st.guest = GuestState::Served;
            info!("{}: served by the device VM", self.name);
            drop(st);
            self.start_session(relay);
        } else {
            st.guest = GuestState::NotServed;
            warn!(
                "{}: the device VM does not serve this device (errno {status}); clients get ENODEV",
                self.name
            );
        }
    }

    /// A client connected: tell the device VM a session starts.
    pub fn on_client_connected(&self, relay: &Relay, sock: Arc<UnixStream>) {
        let mut st = self.lock();
        st.client = Some(Client::new(sock, self.id));
        st.connections += 1;
        let served = st.guest == GuestState::Served;
        drop(st);
        info!("{}: client connected", self.name);
        if served {
            self.start_session(relay);
        }
    }

    /// The device VM serves the channel (again): if a client is connected, start its
    /// session and hand the device VM what the client set up with the previous one: its
    /// DMA regions (with new windows) and its interrupt eventfd assignments. The client
    /// goes on without reconnecting. The device's own state (registers, config space)
    /// was the old device VM's: the client finds the device as after a reset.
    pub fn start_session(&self, relay: &Relay) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(client) = st.client.as_mut() else {
            return;
        };
        relay.send_control(self.id, Body::SessionStart);
        let mut requests = Vec::new();
        for r in client.dma.committed_mut() {
            let m = DmaMap {
                read: r.read,
                write: r.write,
                offset: r.fd_offset,
                address: r.iova,
                size: r.size,
            };
            let fd = r.file.as_ref().map(|f| &f.fd);
            let (window, unconfirmed) = window_for(relay, &self.name, fd, &m);
            r.window = window;
            r.unconfirmed_window = unconfirmed;
            let slots = window
                .map(|offset| vec![Slot::window(offset, m.read, m.write)])
                .unwrap_or_default();
            requests.push((Request::DmaMap(m), slots));
        }
        let mut vectors: Vec<(u32, u32)> = client.irq_fds.keys().copied().collect();
        vectors.sort_unstable();
        for run in vectors.chunk_by(|a, b| a.0 == b.0 && a.1 + 1 == b.1) {
            let count = run.len() as u32;
            let set = SetIrqs {
                action: IRQ_SET_ACTION_TRIGGER,
                index: run[0].0,
                start: run[0].1,
                count,
                data: IrqData::EventFd { assign: true },
            };
            requests.push((
                Request::DeviceSetIrqs(set),
                vec![Slot::eventfd(); run.len()],
            ));
        }
        if !requests.is_empty() {
            info!(
                "{}: restoring the client's setup in the device VM ({} request(s))",
                self.name,
                requests.len()
            );
        }
        for (request, slots) in requests {
            let relay_id = take_id(&mut st.next_id, &mut st.abandoned);
            let mut payload = Vec::new();
            request.encode(&mut payload);
            let header = Header::command(relay_id, request.command() as u16, payload.len());
            let frame = VfioUserFrame {
                header,
                payload,
                slots,
            };
            if let Err(e) = relay
                .link
                .send(&TunnelMessage::new(self.id, Body::VfioUser(frame)))
            {
                warn!("{}: restoring {}: {e}", self.name, request.command().name());
                continue;
            }
            client.push_pending(Pending {
                header,
                relay_id,
                deadline: Instant::now() + relay.config.request_timeout(),
                kind: PendingKind::Restore,
                silent: true,
                posted: false,
                bytes: 0,
            });
        }
    }

    /// The client went away: drop its state as the spec says (DMA maps, IRQ fds) and
    /// end the device VM's session, which keeps the device state.
    pub fn on_client_disconnected(&self, relay: &Relay) {
        let mut st = self.lock();
        if let Some(mut client) = st.client.take() {
            info!(
                "{}: client disconnected ({} request(s) in flight dropped)",
                self.name,
                client.pending.len()
            );
            // Windows stay until the device VM says it let go of the memory, those of
            // unmaps still in flight included (take_all holds them).
            let regions = client.dma.take_all();
            st.abandoned
                .extend(client.pending.iter().map(|p| p.relay_id));
            client.pending.clear();
            client.pending_bytes = 0;
            if st.guest == GuestState::Served && relay.link.is_up() {
                let tag = relay.send_control(self.id, Body::SessionEnd);
                st.retired.push(Retired {
                    tag,
                    regions,
                    deadline: Instant::now() + relay.config.request_timeout(),
                });
            } else {
                release(relay, regions);
            }
            for (tag, body) in client.remote.fail_all(libc::ENODEV as u32) {
                send_tunnel_reply(relay, self.id, tag, body);
            }
        }
    }

    /// The device is removed from the relay: requests in flight are answered with
    /// ENODEV and the client is disconnected (it reads those answers, then EOF), its
    /// session ends as for any client that goes, and the device VM is told the channel
    /// is withdrawn (CHANNEL_DOWN). Returns whether it was: then the windows of the
    /// last client stay until the device VM acknowledges
    /// ([`Channel::on_channel_down_ack`]).
    pub fn withdraw(&self, relay: &Relay) -> bool {
        let mut st = self.lock();
        if let Some(client) = st.client.as_mut() {
            // The regions of requests in flight stay in the DMA table: they go with
            // the session, once the device VM has let go of them.
            while let Some(p) = client.pop_pending() {
                if !p.silent {
                    let _ = client.send(encode_error_reply(&p.header, libc::ENODEV as u32), vec![]);
                }
            }
            let _ = client.sock.shutdown(std::net::Shutdown::Both);
        }
        drop(st);
        self.on_client_disconnected(relay);
        let mut st = self.lock();
        if relay.link.is_up() {
            relay.send_control(self.id, Body::ChannelDown);
            return true;
        }
        for r in std::mem::take(&mut st.retired) {
            release(relay, r.regions);
        }
        false
    }

    /// The device VM acknowledged the CHANNEL_DOWN of this (removed) channel, or the
    /// relay stopped waiting for it: whatever it still had of the channel goes.
    pub fn on_channel_down_ack(&self, relay: &Relay) {
        let mut st = self.lock();
        for r in std::mem::take(&mut st.retired) {
            release(relay, r.regions);
        }
    }

    /// What the channel holds now.
    pub fn counts(&self) -> ChannelCounts {
        let st = self.lock();
        let mut c = ChannelCounts {
            retired_sessions: st.retired.len(),
            retired_regions: st.retired.iter().map(|r| r.regions.len()).sum(),
            abandoned: st.abandoned.len(),
            ..ChannelCounts::default()
        };
        if let Some(client) = st.client.as_ref() {
            (c.remote_ops, c.remote_chunks) = client.remote.in_flight();
            c.clients = 1;
            c.pending = client.pending.len();
            c.pending_bytes = client.pending_bytes;
            c.dma_regions = client.dma.len() + client.dma.unmapping_len();
            c.dma_files = client.dma.files_held();
            c.irq_fds = client.irq_fds.len();
        }
        c
    }

    /// The channel as `vfu-relay ctl list` shows it.
    pub fn info(&self) -> DeviceInfo {
        let st = self.lock();
        DeviceInfo {
            name: self.name.clone(),
            socket: self.socket.display().to_string(),
            channel: self.id,
            client: st.client.is_some(),
            device_vm: match st.guest {
                GuestState::Served => Served::Served,
                GuestState::NotServed => Served::NotServed,
                GuestState::Unknown => Served::Unknown,
            },
            in_flight: st.client.as_ref().map_or(0, |c| c.pending.len()),
            requests: st.requests,
            connections: st.connections,
            access: Some(self.access.clone()),
        }
    }

    /// One message from the client. Returns how writing the answer went.
    pub fn on_client_message(&self, relay: &Relay, msg: RawMessage) -> SendOutcome {
        let mut guard = self.lock();
        let st = &mut *guard;
        let guest = st.guest;
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Broken;
        };
        let header = msg.header;
        if header.msg_type == MessageType::Reply {
            // The client answers a DMA_READ / DMA_WRITE the relay sent for the device VM.
            if let Some((tag, body)) = client.remote.on_reply(&header, &msg.payload) {
                send_tunnel_reply(relay, self.id, tag, body);
            }
            return SendOutcome::Done;
        }
        let request = match Request::decode(header.command, &msg.payload, msg.fds.len()) {
            Ok(r) => r,
            Err(e) => {
                debug!("{}: bad request: {e}", self.name);
                return client.error(&header, e.errno());
            }
        };
        let fds_ok = || match request {
            Request::DeviceSetIrqs(_) => {
                let held = irq_fds_held(&client.pending, &client.irq_fds) + client.dma.files_held();
                if held + msg.fds.len() > MAX_CLIENT_FDS {
                    return Err(DmaError::TooManyFds.errno());
                }
                check_irq_fds(&msg.fds)
            }
            _ => Ok(()),
        };
        if let Err(errno) = check_request(client, &request, relay).and_then(|()| fds_ok()) {
            debug!(
                "{}: {} refused: errno {errno}",
                self.name,
                request.command().name()
            );
            return client.error(&header, errno);
        }
        if guest != GuestState::Served || !relay.link.is_up() {
            debug!(
                "{}: no device VM serving the device; {} gets ENODEV",
                self.name,
                request.command().name()
            );
            return client.error(&header, libc::ENODEV as u32);
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
            // The memory fd stays with the relay: it serves the copy path from it and,
            // where the frontend supports it, has it mapped into a window of shared
            // memory region 0.
            Request::DmaMap(m) => {
                let fd = fds.pop();
                // A file shorter than the range is refused: the device VM would fault
                // on the part that is not there.
                if let Some(Err(e)) = fd
                    .as_ref()
                    .map(|fd| vfu_proto::mem::check_positional_io(fd.as_fd(), m.offset, m.size))
                {
                    warn!(
                        "{}: DMA region {:#x}: its fd cannot back DMA (not a regular file, O_APPEND, or too short): {e}",
                        self.name, m.address
                    );
                    return client.error(&header, e.raw_os_error().unwrap_or(libc::EINVAL) as u32);
                }
                // Only memory file systems: on FUSE or a network mount, the copy
                // path's pread/pwrite (on the thread all devices share) could wait
                // as long as the client's file system likes.
                if !relay.config.any_memory_file
                    && fd
                        .as_ref()
                        .is_some_and(|fd| !vfu_proto::mem::is_memory_file(fd.as_fd()))
                {
                    warn_limited!(
                        "{}: DMA region {:#x}: its fd is not on tmpfs or hugetlbfs (a memfd, /dev/shm, /dev/hugepages); refused (any_memory_file accepts any file, for trusted clients)",
                        self.name, m.address
                    );
                    return client.error(&header, libc::EINVAL as u32);
                }
                // One descriptor per file: a map of a file the client mapped before
                // shares it; a new file counts against the client's descriptors.
                let (pending, irq_fds) = (&client.pending, &client.irq_fds);
                let others = || irq_fds_held(pending, irq_fds);
                let file = match fd.map(|fd| client.dma.file(fd, others, MAX_CLIENT_FDS)) {
                    Some(Err(e)) => {
                        warn!(
                            "{}: DMA region {:#x}: the client holds {MAX_CLIENT_FDS} descriptors already; refused",
                            self.name, m.address
                        );
                        return client.error(&header, e.errno());
                    }
                    Some(Ok(file)) => Some(file),
                    None => None,
                };
                let (window, unconfirmed_window) =
                    window_for(relay, &self.name, file.as_ref().map(|f| &f.fd), m);
                if let Some(offset) = window {
                    slots.push(Slot::window(offset, m.read, m.write));
                }
                let id = client.dma.insert(Region {
                    iova: m.address,
                    size: m.size,
                    read: m.read,
                    write: m.write,
                    fd_offset: m.offset,
                    file,
                    window,
                    committed: false,
                    unconfirmed_window,
                    id: 0,
                });
                PendingKind::DmaMap {
                    address: m.address,
                    id,
                }
            }
            Request::DmaUnmap(u) => {
                PendingKind::DmaUnmap(client.dma.begin_unmap(u.address, u.size, u.all))
            }
            _ => PendingKind::Plain,
        };
        let relay_id = take_id(&mut st.next_id, &mut st.abandoned);
        st.requests += 1;
        let mut forwarded = header;
        forwarded.msg_id = relay_id;
        // The relay always asks for the reply: DMA maps and unmaps change its own state
        // when it comes, and a posted request is in flight until the device is done
        // with it (a client posting faster than its device works is held back, not
        // queued in the device VM without bound).
        let silent = header.no_reply;
        // With POSTED_DONE, a posted request that changes nothing in the relay goes as
        // posted: the driver answers a batch of them with one POSTED_DONE.
        let posted = silent
            && matches!(kind, PendingKind::Plain)
            && relay.link.features() & features::POSTED_DONE != 0;
        forwarded.no_reply = posted;
        let bytes = msg.payload.len();
        let frame = VfioUserFrame {
            header: forwarded,
            payload: msg.payload,
            slots,
        };
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Broken;
        };
        if let Err(e) = relay
            .link
            .send(&TunnelMessage::new(self.id, Body::VfioUser(frame)))
        {
            debug!("{}: tunnel refused a request: {e}", self.name);
            undo(relay, client, kind);
            return client.error(&header, e.errno());
        }
        if let Request::Version(v) = &request {
            // Requests may follow at once: the channel keeps their order behind it.
            client.versioned = true;
            client.caps = v.capabilities.unwrap_or_default();
        }
        client.push_pending(Pending {
            header,
            relay_id,
            deadline: Instant::now() + relay.config.request_timeout(),
            kind,
            silent,
            posted,
            bytes,
        });
        SendOutcome::Done
    }

    /// A vfio-user message from the device VM on this channel.
    pub fn on_device_message(&self, relay: &Relay, frame: VfioUserFrame) -> SendOutcome {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(client) = st.client.as_mut() else {
            debug!("{}: device message with no client; dropped", self.name);
            return SendOutcome::Done;
        };
        let h = frame.header;
        if h.msg_type != MessageType::Reply {
            warn_limited!(
                "{}: device sent command {} toward the client; not supported yet",
                self.name,
                h.command
            );
            return SendOutcome::Done;
        }
        // Replies come in order; the first entry is the usual match.
        let matches = |p: &Pending| p.relay_id == h.msg_id && p.header.command == h.command;
        let found = if client.pending.front().is_some_and(matches) {
            Some(0)
        } else {
            client.pending.iter().position(matches)
        };
        let Some(pos) = found else {
            if st.abandoned.remove(&h.msg_id) {
                debug!(
                    "{}: late reply to a request of a client that left (msg {}); dropped",
                    self.name, h.msg_id
                );
            } else {
                warn_limited!(
                    "{}: reply to no request in flight (msg {}, command {}); dropped",
                    self.name,
                    h.msg_id,
                    h.command
                );
            }
            return SendOutcome::Done;
        };
        let pending = client.remove_pending(pos).expect("position is valid");
        if client.paused && client.may_resume() && relay.link.has_room(self.id) {
            relay.resume_reading(self, client);
        }
        let mut result = match h.error {
            Some(errno) => Err(errno),
            None => match Reply::decode(h.command, &frame.payload, frame.slots.len()) {
                Ok(_) if !frame.slots.is_empty() => {
                    warn_limited!(
                        "{}: reply carries fd slots the relay does not hand out yet",
                        self.name
                    );
                    Err(libc::EIO as u32)
                }
                Ok(r) => Ok(r),
                Err(e) => {
                    warn_limited!("{}: invalid reply from the device VM: {e}", self.name);
                    Err(libc::EIO as u32)
                }
            },
        };
        let client_id = pending.header.msg_id;
        // What the reply means for the relay's own state. A refused request changes
        // nothing, except that a refused map and any unmap remove the region here too.
        let mut version = None;
        let restore = matches!(pending.kind, PendingKind::Restore);
        match (pending.kind, &result) {
            (PendingKind::Version(proposal), Ok(Reply::Version(device))) => {
                version = Some(negotiate(&proposal, device, relay.limits));
            }
            (PendingKind::SetIrqs { index, change }, Ok(Reply::DeviceSetIrqs)) => {
                apply_irq_change(&mut client.irq_fds, index, change);
            }
            (PendingKind::DmaMap { address, id }, Ok(Reply::DmaMap)) => {
                client.dma.commit(address, id)
            }
            (kind @ (PendingKind::DmaMap { .. } | PendingKind::Version(_)), _) => {
                undo(relay, client, kind)
            }
            (PendingKind::DmaUnmap(id), _) => {
                // The device VM no longer uses the memory: the windows go before the
                // client hears back. If the device VM's VMM does not confirm that, the
                // client must not reuse the memory as if it were unmapped.
                let confirmed = release(relay, client.dma.finish_unmap(id));
                if !confirmed {
                    warn!(
                        "{}: DMA_UNMAP: the device VM may still see the memory; answering EIO",
                        self.name
                    );
                    result = Err(libc::EIO as u32);
                }
            }
            _ => {}
        }
        if pending.silent {
            if let (true, Err(errno)) = (restore, &result) {
                warn!(
                    "{}: the restarted device VM refused the client's earlier {} (errno {errno}); that setup is lost",
                    self.name,
                    Command::try_from(h.command).map_or("?", |c| c.name())
                );
            }
            return SendOutcome::Done;
        }
        match (result, version) {
            (Err(errno), _) => client.send(encode_error_reply(&pending.header, errno), vec![]),
            (Ok(_), Some(answer)) => {
                debug!("{}: VERSION negotiated: {answer:?}", self.name);
                client.send(encode_reply(client_id, &Reply::Version(answer)), vec![])
            }
            (Ok(_), None) => {
                // Checked above; forwarded byte for byte under the client's message ID.
                let mut bytes = Vec::with_capacity(HEADER_SIZE + frame.payload.len());
                Header::reply_to(&pending.header, frame.payload.len()).encode(&mut bytes);
                bytes.extend_from_slice(&frame.payload);
                client.send(bytes, vec![])
            }
        }
    }

    /// The driver carried out the posted requests forwarded up to and including the one
    /// with message ID `relay_id` (POSTED_DONE): they leave the count in flight. An ID
    /// of no posted request in flight (one that timed out, or of a client that left)
    /// changes nothing.
    pub fn on_posted_done(&self, relay: &Relay, relay_id: u16) {
        let mut guard = self.lock();
        let Some(client) = guard.client.as_mut() else {
            debug!("{}: POSTED_DONE with no client; ignored", self.name);
            return;
        };
        let Some(last) = client
            .pending
            .iter()
            .position(|p| p.posted && p.relay_id == relay_id)
        else {
            debug!(
                "{}: POSTED_DONE for message {relay_id}, which is not in flight; ignored",
                self.name
            );
            return;
        };
        let mut pos = 0;
        for _ in 0..=last {
            if client.pending[pos].posted {
                client.remove_pending(pos);
            } else {
                pos += 1;
            }
        }
        if client.paused && client.may_resume() && relay.link.has_room(self.id) {
            relay.resume_reading(self, client);
        }
    }

    /// The device VM acknowledged the SESSION_END with `tag`: that client's windows can
    /// go.
    pub fn on_session_end_ack(&self, relay: &Relay, tag: u32) {
        let mut st = self.lock();
        match st.retired.iter().position(|r| r.tag == tag) {
            Some(pos) => {
                let r = st.retired.remove(pos);
                release(relay, r.regions);
            }
            None => warn_limited!(
                "{}: the device VM acknowledged a SESSION_END (tag {tag}) the relay is not waiting for",
                self.name
            ),
        }
    }

    /// The driver restarted (a new HELLO on the same frontend connection): it knows
    /// nothing of the windows, so they go, from the frontend too; the regions stay for
    /// the copy path.
    pub fn on_driver_restart(&self, relay: &Relay) {
        let mut st = self.lock();
        for r in std::mem::take(&mut st.retired) {
            release(relay, r.regions);
        }
        if let Some(client) = st.client.as_mut() {
            let mut windows = relay.windows();
            client
                .dma
                .unmap_windows(|offset, size| windows.unmap(offset, size));
        }
    }

    /// The device VM asks to read client memory (copy path). Returns the reply body, or
    /// `None` when the data comes from the client (mapped without an fd) and the reply
    /// follows when it has answered.
    pub fn on_dma_read(&self, relay: &Relay, tag: u32, segments: &[(u64, u64)]) -> Option<Body> {
        // The reply must fit one message toward the driver: refused before anything is
        // allocated.
        let total = segments.iter().fold(0u64, |a, s| a.saturating_add(s.1));
        if total.saturating_add(64) > relay.link.guest_max_msg() as u64 {
            warn_limited!(
                "{}: the device VM's DMA read of {total} bytes cannot fit a message; E2BIG",
                self.name
            );
            return Some(Body::DmaReadReply {
                status: libc::E2BIG as u32,
                data: Vec::new(),
            });
        }
        let mut st = self.lock();
        let Some(client) = st.client.as_mut() else {
            return Some(dma_read_error(DmaError::Fault));
        };
        if client.remote.busy(tag) {
            return Some(Body::DmaReadReply {
                status: libc::EBUSY as u32,
                data: Vec::new(),
            });
        }
        // Read while the spans borrow the table; the client is needed mutably after.
        let local = match client.dma.local_spans(segments, false) {
            Ok(Some(spans)) => Ok(Some(client_memory::read_to_vec(&spans))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match local {
            Ok(Some(read)) => Some(match read {
                Ok(data) => Body::DmaReadReply { status: 0, data },
                Err(e) => dma_read_error(e),
            }),
            Ok(None) => {
                if !client.remote.has_room(total) {
                    remote_full(&self.name);
                    return Some(Body::DmaReadReply {
                        status: libc::EAGAIN as u32,
                        data: Vec::new(),
                    });
                }
                let max = client.caps.max_data_xfer_size() as usize;
                let deadline = Instant::now() + relay.config.request_timeout();
                for m in client.remote.start_read(tag, segments, max, deadline) {
                    let outcome = client.send(m, vec![]);
                    relay.after_send_locked(self, client, outcome);
                }
                None
            }
            Err(e) => {
                dma_refused(&self.name, "read", segments, e);
                Some(dma_read_error(e))
            }
        }
    }

    /// Copies between the client's memory and `buffers` (device-VM memory holding a
    /// direct request's data), when the client's fds reach every segment: `Some` with
    /// the outcome (also for segments outside the client's maps, and for no client).
    /// `None` when some segment has no fd: the request must go to the client.
    pub fn copy_local(
        &self,
        segments: &[(u64, u64)],
        buffers: &[VolatileSlice<'_>],
        direction: Direction,
    ) -> Option<Result<(), DmaError>> {
        let st = self.lock();
        let Some(client) = st.client.as_ref() else {
            return Some(Err(DmaError::Fault));
        };
        let write = direction == Direction::ToClient;
        match client.dma.local_spans(segments, write) {
            Ok(Some(spans)) => Some(client_memory::copy(&spans, buffers, direction)),
            Ok(None) => None,
            Err(e) => {
                dma_refused(
                    &self.name,
                    if write { "write" } else { "read" },
                    segments,
                    e,
                );
                Some(Err(e))
            }
        }
    }

    /// The device VM asks to write client memory (copy path). Returns the status, or
    /// `None` when the client itself writes it and the status follows.
    pub fn on_dma_write(
        &self,
        relay: &Relay,
        tag: u32,
        segments: &[(u64, u64)],
        data: &mut [u8],
    ) -> Option<u32> {
        let mut st = self.lock();
        let Some(client) = st.client.as_mut() else {
            return Some(DmaError::Fault.errno());
        };
        if client.remote.busy(tag) {
            return Some(libc::EBUSY as u32);
        }
        let local = match client.dma.local_spans(segments, true) {
            Ok(Some(spans)) => Ok(Some(client_memory::copy(
                &spans,
                &[VolatileSlice::from(&mut *data)],
                Direction::ToClient,
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match local {
            Ok(Some(written)) => Some(written.map_or_else(DmaError::errno, |()| 0)),
            Ok(None) => {
                if !client.remote.has_room(data.len() as u64) {
                    remote_full(&self.name);
                    return Some(libc::EAGAIN as u32);
                }
                let max = client.caps.max_data_xfer_size() as usize;
                let deadline = Instant::now() + relay.config.request_timeout();
                for m in client
                    .remote
                    .start_write(tag, segments, data, max, deadline)
                {
                    let outcome = client.send(m, vec![]);
                    relay.after_send_locked(self, client, outcome);
                }
                None
            }
            Err(e) => {
                dma_refused(&self.name, "write", segments, e);
                Some(e.errno())
            }
        }
    }

    /// The device VM raised vectors `start .. start + count` of `index`: signal the
    /// client's eventfds among them (the others are not assigned).
    pub fn on_irq(&self, index: u32, start: u32, count: u32) {
        let st = self.lock();
        let Some(client) = st.client.as_ref() else {
            return;
        };
        let end = u64::from(start) + u64::from(count);
        let mut signalled = false;
        for (&(i, v), fd) in &client.irq_fds {
            if i == index && u64::from(v) >= u64::from(start) && u64::from(v) < end {
                signalled = true;
                if let Err(e) = signal_eventfd(fd) {
                    warn!("{}: signalling IRQ {index}/{v}: {e}", self.name);
                }
            }
        }
        if !signalled {
            warn_limited!(
                "{}: the device VM raised IRQ index {index} vectors {start}+{count}, where the client has no eventfd assigned; ignored",
                self.name
            );
        }
    }

    /// The earliest deadline of the channel: a request's of its client, or the
    /// acknowledgement of a session's end.
    pub fn next_deadline(&self) -> Option<Instant> {
        let st = self.lock();
        let retired = st.retired.iter().map(|r| r.deadline).min();
        let client = st.client.as_ref().and_then(Client::next_deadline);
        retired.into_iter().chain(client).min()
    }

    /// Answers requests whose deadline passed with ETIMEDOUT; lets go of the memory of
    /// clients that left whose session's end the device VM did not acknowledge in time.
    pub fn expire(&self, relay: &Relay, now: Instant) -> SendOutcome {
        let mut st = self.lock();
        if st.retired.iter().any(|r| r.deadline <= now) {
            let (late, kept) = std::mem::take(&mut st.retired)
                .into_iter()
                .partition(|r| r.deadline <= now);
            st.retired = kept;
            for r in late {
                warn!(
                    "{}: the device VM did not acknowledge the end of the session (tag {}) in time; the client's memory goes now",
                    self.name, r.tag
                );
                release(relay, r.regions);
            }
        }
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Done;
        };
        for (tag, body) in client.remote.expire(now) {
            warn!(
                "{}: the client did not answer a DMA command in time",
                self.name
            );
            send_tunnel_reply(relay, self.id, tag, body);
        }
        let mut outcome = SendOutcome::Done;
        while let Some(pos) = client.pending.iter().position(|p| p.deadline <= now) {
            let p = client.remove_pending(pos).expect("position is valid");
            warn!(
                "{}: {} (msg {}) timed out waiting for the device VM",
                self.name,
                Command::try_from(p.header.command).map_or("?", |c| c.name()),
                p.header.msg_id
            );
            // A map the device never confirmed is dropped; an unmap's memory goes now,
            // whatever the device VM still thinks (its late reply finds nothing).
            undo(relay, client, p.kind);
            if p.silent {
                continue;
            }
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

    /// The device VM went away or restarted: requests in flight fail with `errno`
    /// (posted ones silently), and what forwarding them did to the DMA table is taken
    /// back: maps the device never accepted and unmaps it never finished release their
    /// regions. The device VM's DMA requests that wait for the client are forgotten.
    pub fn fail_pending(&self, relay: &Relay, errno: u32) -> SendOutcome {
        let mut st = self.lock();
        st.guest = GuestState::Unknown;
        st.channel_up = None;
        // The frontend took its windows with it; what is left are fds and mappings.
        st.retired.clear();
        st.abandoned.clear();
        if let Some(client) = st.client.as_mut() {
            client.dma.forget_windows();
        }
        let Some(client) = st.client.as_mut() else {
            return SendOutcome::Done;
        };
        // The device VM's DMA requests waiting for the client are its old instance's:
        // an answer would reach the new one as a reply to a tag it may be using (and
        // the tag, still busy, would refuse its new request).
        client.remote.forget_all();
        let mut outcome = SendOutcome::Done;
        while let Some(p) = client.pop_pending() {
            undo(relay, client, p.kind);
            if p.silent {
                continue;
            }
            let o = client.send(encode_error_reply(&p.header, errno), vec![]);
            if o != SendOutcome::Done {
                outcome = o;
            }
        }
        outcome
    }
}

/// The window a DMA region gets in shared memory region 0, if any, and whether its
/// map went unconfirmed. A window is always readable (SHMEM_MAP has no write-only
/// mapping), so a region the client did not make readable goes through the copy path.
/// So does memory the client could shrink under the device VM's mapping, unless the
/// operator trusts clients with it.
fn window_for(relay: &Relay, name: &str, fd: Option<&OwnedFd>, m: &DmaMap) -> (Option<u64>, bool) {
    let window = match (fd, m.read && relay.windows_enabled()) {
        (Some(fd), true)
            if relay.config.unsealed_windows || vfu_proto::mem::cannot_shrink(fd.as_fd()) =>
        {
            relay.windows().map(fd, m.offset, m.size, m.write)
        }
        (Some(_), true) => {
            debug!(
                "{name}: DMA region {:#x} is not sealed against shrinking: copy path",
                m.address
            );
            WindowMap::None
        }
        _ => WindowMap::None,
    };
    match window {
        WindowMap::Mapped(offset) => (Some(offset), false),
        WindowMap::None => (None, false),
        WindowMap::Unconfirmed => (None, true),
    }
}

/// Checks a request against what the relay itself allows, before it goes anywhere.
fn check_request(client: &Client, request: &Request, relay: &Relay) -> Result<(), u32> {
    let einval = libc::EINVAL as u32;
    // VERSION first, and once: a second one would renegotiate limits in force (a
    // refused VERSION may be sent again).
    if client.versioned == matches!(request, Request::Version(_)) {
        return Err(einval);
    }
    match request {
        r if r.command().is_server_to_client() => Err(einval),
        // The relay speaks 0.x; it would chunk the device's DMA toward a client that
        // takes less than a page per message into that many messages.
        Request::Version(v) => match v.capabilities {
            _ if v.major != 0 => Err(einval),
            Some(c) if c.max_data_xfer_size() < MIN_CLIENT_DATA_XFER_SIZE => Err(einval),
            _ => Ok(()),
        },
        // The reply would not fit a tunnel message.
        Request::RegionRead(a) if a.count > relay.limits.max_data_xfer_size => Err(einval),
        Request::MigDataRead(r) if r.size > relay.limits.max_data_xfer_size => Err(einval),
        Request::DeviceFeature(f) if !report_fits(f, relay.limits.max_data_xfer_size) => {
            Err(libc::E2BIG as u32)
        }
        Request::DmaMap(m) => client
            .dma
            .check_map(
                m.address,
                m.size,
                m.offset,
                relay.limits.max_dma_maps as usize,
            )
            .map_err(DmaError::errno),
        Request::DmaUnmap(u) if !u.all && !client.dma.has_exact(u.address, u.size) => {
            Err(DmaError::NotFound.errno())
        }
        _ => Ok(()),
    }
}

/// Whether a DMA_LOGGING_REPORT's bitmap fits one tunnel message (`max` bytes of
/// data); other features always do.
fn report_fits(f: &DeviceFeature, max: u32) -> bool {
    match &f.data {
        FeatureData::LoggingReport {
            length, page_size, ..
        } => logging_bitmap_len(*length, *page_size).is_some_and(|b| b <= u64::from(max)),
        _ => true,
    }
}

/// Interrupt eventfds the relay holds for a client: assigned, and in SET_IRQS
/// requests in flight.
fn irq_fds_held(pending: &VecDeque<Pending>, irq_fds: &HashMap<(u32, u32), OwnedFd>) -> usize {
    let in_flight: usize = pending
        .iter()
        .map(|p| match &p.kind {
            PendingKind::SetIrqs {
                change: IrqChange::Assign { fds, .. },
                ..
            } => fds.len(),
            _ => 0,
        })
        .sum();
    irq_fds.len() + in_flight
}

/// Checks that every fd of a SET_IRQS is an eventfd, and makes them non-blocking so that
/// signalling one never stalls the relay.
fn check_irq_fds(fds: &[OwnedFd]) -> Result<(), u32> {
    for fd in fds {
        if is_eventfd(fd.as_fd()) == Some(false) || set_nonblocking(fd.as_fd()).is_err() {
            return Err(libc::EINVAL as u32);
        }
    }
    Ok(())
}

/// Applies a SET_IRQS to the relay's eventfd table, once the device accepted it.
fn apply_irq_change(table: &mut HashMap<(u32, u32), OwnedFd>, index: u32, change: IrqChange) {
    match change {
        IrqChange::Assign { start, fds } => {
            for (v, fd) in (start..=u32::MAX).zip(fds) {
                table.insert((index, v), fd);
            }
        }
        IrqChange::Deassign { start, count } => {
            table.retain(|&(i, v), _| i != index || v < start || v - start >= count);
        }
        IrqChange::DisableAll => table.retain(|&(i, _), _| i != index),
    }
}

/// Drops regions: their windows are unmapped from the device VM (acknowledged by the
/// frontend), then the relay's mappings and the client's fds are closed. Returns false
/// if the frontend did not confirm that every window is gone.
fn release(relay: &Relay, regions: Vec<Region>) -> bool {
    let mut confirmed = !regions.iter().any(|r| r.unconfirmed_window);
    if regions.iter().any(|r| r.window.is_some()) {
        let mut windows = relay.windows();
        for r in &regions {
            if let Some(offset) = r.window {
                confirmed &= windows.unmap(offset, r.size);
            }
        }
    }
    drop(regions);
    confirmed
}

/// Logs a DMA request of the device VM refused for the DMA operations already waiting
/// for the client.
fn remote_full(name: &str) {
    warn_limited!(
        "{name}: the device VM has {} DMA operations or {} MiB waiting for the client (memory mapped without an fd); EAGAIN",
        crate::remote_dma::MAX_OPS,
        crate::remote_dma::MAX_BYTES >> 20
    );
}

/// Logs a DMA request of the device VM that the client's maps do not allow.
fn dma_refused(name: &str, op: &str, segments: &[(u64, u64)], e: DmaError) {
    let (iova, len) = segments.first().copied().unwrap_or_default();
    warn_limited!(
        "{name}: the device VM's DMA {op} of {} segment(s), the first {len:#x} bytes at {iova:#x}, is outside the client's maps or against their permission; errno {}",
        segments.len(),
        e.errno()
    );
}

fn dma_read_error(e: DmaError) -> Body {
    Body::DmaReadReply {
        status: e.errno(),
        data: Vec::new(),
    }
}

/// Answers a tunnel request of the device VM (in its chain, if it was a direct one).
fn send_tunnel_reply(relay: &Relay, channel: u32, tag: u32, body: Body) {
    relay.link.reply(channel, tag, body);
}

/// Takes back what forwarding a request did to the relay's state, when the request
/// never reached the device VM or the device VM refused or ignored it.
fn undo(relay: &Relay, client: &mut Client, kind: PendingKind) {
    match kind {
        PendingKind::DmaMap { address, id } => {
            release(
                relay,
                client.dma.remove_id(address, id).into_iter().collect(),
            );
        }
        PendingKind::DmaUnmap(id) => {
            release(relay, client.dma.finish_unmap(id));
        }
        // A VERSION that failed leaves the client unversioned: it may try again, and
        // nothing else is forwarded meanwhile.
        PendingKind::Version(_) => {
            client.versioned = false;
            client.caps = Capabilities::default();
        }
        _ => {}
    }
}

/// DMA maps and unmaps pipelined, refused, timed out and cut off by a device-VM
/// restart, against a relay whose link has no device VM behind it (replies are fed in).
#[cfg(test)]
mod pipelined_dma_tests {
    use super::*;
    use crate::config::{Config, DeviceConfig};
    use crate::tunnel::Negotiated;
    use std::io::Read;
    use vfu_proto::vfio_user::{encode_request, DmaMap, DmaUnmap};
    use vhost_user_backend::{VringRwLock, VringT};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    const X: u64 = 0x10_0000;
    const SZ: u64 = 0x2000;

    pub(super) fn relay() -> Relay {
        let relay = Relay::new(Config {
            frontend_socket: "/tmp/review-f.sock".into(),
            control_socket: None,
            devices: vec![DeviceConfig::parse("dev0=/tmp/review-d.sock").unwrap()],
            request_timeout_ms: 3000,
            queue_pairs: 1,
            shm_size_mib: 0,
            ..Config::default()
        })
        .unwrap();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vrings: Vec<VringRwLock> = (0..2)
            .map(|_| VringRwLock::new(mem.clone(), 256).unwrap())
            .collect();
        relay
            .link
            .attach_vrings(relay.link.generation(), 0, &vrings);
        relay.link.set_up(Negotiated {
            pairs: 1,
            guest_max_msg: 2 << 20,
            features: 0,
        });
        relay
    }

    pub(super) fn connect(relay: &Relay) -> UnixStream {
        let ch = &relay.channel(1).unwrap();
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        ch.lock().guest = GuestState::Served;
        ch.on_client_connected(relay, Arc::new(ours));
        ch.lock().client.as_mut().unwrap().versioned = true;
        peer
    }

    fn raw(msg_id: u16, req: &Request, no_reply: bool, fds: Vec<OwnedFd>) -> RawMessage {
        let b = encode_request(msg_id, req, no_reply);
        RawMessage {
            header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
            payload: b[HEADER_SIZE..].to_vec(),
            fds,
        }
    }

    fn memfd() -> OwnedFd {
        crate::dma::tests::memfd(SZ)
    }

    fn map_req() -> Request {
        Request::DmaMap(DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: X,
            size: SZ,
        })
    }

    fn device_reply(relay_id: u16, cmd: Command, errno: Option<u32>) -> VfioUserFrame {
        let req = Header::command(relay_id, cmd as u16, 0);
        VfioUserFrame {
            header: match errno {
                Some(e) => Header::error_reply_to(&req, e),
                None => Header::reply_to(&req, 0),
            },
            payload: vec![],
            slots: vec![],
        }
    }

    /// MAP X, UNMAP X, MAP X pipelined; the device refuses the first map and accepts the
    /// second. Undoing the first map must not touch the second region (regions are told
    /// apart by ID, not address), which stays mapped.
    #[test]
    fn refused_map_leaves_the_pipelined_remap() {
        let relay = relay();
        let _peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let unmap = Request::DmaUnmap(DmaUnmap::region(X, SZ));
        assert_eq!(
            ch.on_client_message(&relay, raw(1, &map_req(), false, vec![memfd()])),
            SendOutcome::Done
        );
        assert_eq!(
            ch.on_client_message(&relay, raw(2, &unmap, false, vec![])),
            SendOutcome::Done
        );
        assert_eq!(
            ch.on_client_message(&relay, raw(3, &map_req(), false, vec![memfd()])),
            SendOutcome::Done
        );
        // Relay IDs 0, 1, 2.
        ch.on_device_message(
            &relay,
            device_reply(0, Command::DmaMap, Some(libc::ENOSPC as u32)),
        );
        ch.on_device_message(
            &relay,
            device_reply(1, Command::DmaUnmap, Some(libc::ENOENT as u32)),
        );
        ch.on_device_message(&relay, device_reply(2, Command::DmaMap, None));
        // The client now believes X is mapped (its third request succeeded).
        let st = ch.lock();
        let dma = &st.client.as_ref().unwrap().dma;
        assert!(
            dma.has_exact(X, SZ),
            "the region the device accepted is kept"
        );
    }

    /// Same, with the first map timing out instead of being refused.
    #[test]
    fn timed_out_map_leaves_the_pipelined_remap() {
        let relay = relay();
        let _peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let unmap = Request::DmaUnmap(DmaUnmap::region(X, SZ));
        ch.on_client_message(&relay, raw(1, &map_req(), false, vec![memfd()]));
        ch.on_client_message(&relay, raw(2, &unmap, true, vec![]));
        std::thread::sleep(std::time::Duration::from_millis(5));
        ch.on_client_message(&relay, raw(3, &map_req(), false, vec![memfd()]));
        let first_deadline = ch.lock().client.as_ref().unwrap().pending[0].deadline;
        ch.expire(&relay, first_deadline); // only the first map (and posted unmap) expire
        ch.on_device_message(&relay, device_reply(2, Command::DmaMap, None));
        let st = ch.lock();
        assert!(
            st.client.as_ref().unwrap().dma.has_exact(X, SZ),
            "the first map's timeout leaves the second map's region"
        );
    }

    /// A HELLO of a tunnel version the relay does not speak, in the middle of a
    /// session, is still a driver restart: the request in flight fails at once
    /// (ECONNRESET) instead of waiting for an answer the new instance will never give,
    /// and the channel waits for the next HELLO.
    #[test]
    fn a_hello_of_another_version_fails_requests_in_flight() {
        use vfu_proto::tunnel::{Body, Hello, TunnelMessage};
        let relay = relay();
        let mut peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        ch.on_client_message(&relay, raw(5, &map_req(), false, vec![memfd()]));
        assert_eq!(ch.lock().client.as_ref().unwrap().pending.len(), 1);
        let hello = TunnelMessage {
            channel: 0,
            tag: 1,
            body: Body::Hello(Hello {
                version_major: vfu_proto::tunnel::VERSION_MAJOR + 1,
                version_minor: 0,
                queue_pairs: 1,
                max_msg_size: 1 << 20,
                features: 0,
            }),
        };
        crate::tunnel::dispatch(&relay, crate::tunnel::Incoming::Message(Ok(hello)));
        let mut buf = [0u8; 64];
        let n = peer.read(&mut buf).expect("an answer at once");
        let reply = Header::decode(&buf[..n.min(HEADER_SIZE)]).unwrap();
        assert_eq!(reply.msg_id, 5);
        assert_eq!(reply.error, Some(libc::ECONNRESET as u32));
        assert!(ch.lock().client.as_ref().unwrap().pending.is_empty());
        assert!(
            !relay.link.is_up(),
            "the link waits for a HELLO it can take"
        );
    }

    /// A posted (NO_REPLY) DMA_UNMAP cut off by a driver restart (or the device VM going
    /// away) gets no reply, and its region is released, not served for good.
    #[test]
    fn cut_off_posted_unmap_is_silent_and_released() {
        let relay = relay();
        let mut peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        ch.on_client_message(&relay, raw(1, &map_req(), false, vec![memfd()]));
        ch.on_device_message(&relay, device_reply(0, Command::DmaMap, None));
        let mut buf = [0u8; 64];
        assert_eq!(peer.read(&mut buf).unwrap(), HEADER_SIZE, "map reply");
        let unmap = Request::DmaUnmap(DmaUnmap::region(X, SZ));
        ch.on_client_message(&relay, raw(7, &unmap, true, vec![]));
        ch.fail_pending(&relay, libc::ECONNRESET as u32);
        let unsolicited = peer.read(&mut buf).ok();
        let st = ch.lock();
        let c = st.client.as_ref().unwrap();
        let still_served = c.dma.check_segments(&[(X, 8)], false).is_ok();
        assert!(
            unsolicited.is_none() && !still_served,
            "reply {unsolicited:?} to a posted unmap, or region still served: {still_served}"
        );
    }

    /// Removing the device while its client has a request in flight: the request is
    /// answered with ENODEV, then the connection closes; the region of the map in
    /// flight is kept (the device VM may be using its window) until the device VM
    /// acknowledges the channel's withdrawal.
    #[test]
    fn withdraw_answers_requests_in_flight_and_closes() {
        let relay = relay();
        let mut peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        ch.on_client_message(&relay, raw(5, &map_req(), false, vec![memfd()]));
        assert!(ch.withdraw(&relay), "CHANNEL_DOWN is sent: the link is up");
        peer.set_nonblocking(false).unwrap();
        let mut bytes = Vec::new();
        peer.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len(), HEADER_SIZE, "one reply, then EOF");
        let h = Header::decode(&bytes).unwrap();
        assert_eq!((h.msg_id, h.error), (5, Some(libc::ENODEV as u32)));
        let kept = |ch: &Channel| {
            ch.lock()
                .retired
                .iter()
                .map(|r| r.regions.len())
                .sum::<usize>()
        };
        assert!(ch.lock().client.is_none());
        assert_eq!(kept(ch), 1, "the region waits for the device VM");
        ch.on_channel_down_ack(&relay);
        assert_eq!(kept(ch), 0);
    }

    /// Only the answer to the CHANNEL_UP the relay sent starts the client's session
    /// (and restores its DMA maps in the device VM), once: an answer nobody asked for,
    /// or a second one, changes nothing.
    #[test]
    fn only_the_channel_up_asked_for_starts_a_session() {
        let relay = relay();
        let _peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        ch.on_client_message(&relay, raw(1, &map_req(), false, vec![memfd()]));
        ch.on_device_message(&relay, device_reply(0, Command::DmaMap, None));
        let pending = |ch: &Channel| ch.lock().client.as_ref().unwrap().pending.len();
        assert_eq!(pending(ch), 0);
        ch.on_channel_up_status(&relay, 77, 0);
        assert_eq!(pending(ch), 0, "no session started again, no map restored");
        ch.lock().guest = GuestState::Unknown;
        ch.bring_up(&relay);
        let tag = ch.lock().channel_up.expect("a CHANNEL_UP is outstanding");
        ch.on_channel_up_status(&relay, tag.wrapping_add(1), 0);
        assert_eq!(ch.lock().guest, GuestState::Unknown, "another tag");
        ch.on_channel_up_status(&relay, tag, 0);
        assert_eq!(ch.lock().guest, GuestState::Served);
        assert_eq!(pending(ch), 1, "the client's map restored, once");
        ch.on_channel_up_status(&relay, tag, 0);
        assert_eq!(pending(ch), 1, "a second answer changes nothing");
    }

    /// A client that leaves with a DMA region mapped: the region (its fd, its
    /// mapping, its window) waits for the device VM to acknowledge the end of the
    /// session; a device VM that does not (or answers another tag) keeps it only until
    /// the request timeout, which is the channel's next deadline meanwhile.
    #[test]
    fn unacknowledged_session_end_lets_go_at_the_timeout() {
        let relay = relay();
        let _peer = connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let file = memfd();
        // The relay keeps this very descriptor; the test tells it by its file's inode.
        let held = std::os::fd::AsRawFd::as_raw_fd(&file);
        let inode = |fd: std::os::fd::RawFd| {
            // SAFETY: fstat writes into a local stat; a closed fd gives an error.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
        };
        let ino = inode(held);
        ch.on_client_message(&relay, raw(1, &map_req(), false, vec![file]));
        ch.on_device_message(&relay, device_reply(0, Command::DmaMap, None));
        ch.on_client_disconnected(&relay);
        let deadline = {
            let st = ch.lock();
            assert_eq!(st.retired.len(), 1);
            st.retired[0].deadline
        };
        assert_eq!(ch.next_deadline(), Some(deadline));
        ch.on_session_end_ack(&relay, 0xdead_beef);
        ch.expire(&relay, deadline - std::time::Duration::from_millis(1));
        assert_eq!(ch.lock().retired.len(), 1, "kept until the deadline");
        assert_eq!(inode(held), ino, "the relay still holds the file");
        ch.expire(&relay, deadline);
        assert!(ch.lock().retired.is_empty());
        assert_eq!(ch.next_deadline(), None);
        // Closed (or the number reused since, for another file).
        assert_ne!(
            inode(held),
            ino,
            "the relay's descriptor of the file is closed"
        );
    }
}

/// Migration commands through the relay: forwarded to the device VM as sent and
/// answered byte for byte; those whose reply could not cross the tunnel are refused
/// before they go anywhere.
#[cfg(test)]
mod migration_tests {
    use super::*;
    use std::io::Read;
    use vfu_proto::vfio_user::{
        encode_request, FeatureOp, MigDataRead, MigState, FEATURE_MIG_DEVICE_STATE,
    };

    fn client_request(id: u16, req: &Request) -> RawMessage {
        let b = encode_request(id, req, false);
        RawMessage {
            header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
            payload: b[HEADER_SIZE..].to_vec(),
            fds: Vec::new(),
        }
    }

    /// MIG_DEVICE_STATE SET goes to the device VM under the relay's message ID, and the
    /// device's reply reaches the client under the client's ID with the payload
    /// unchanged; an oversized MIG_DATA_READ and a DMA_LOGGING_REPORT whose bitmap
    /// would not fit a tunnel message are answered EINVAL and E2BIG by the relay.
    #[test]
    fn forwarded_and_bounded() {
        let relay = pipelined_dma_tests::relay();
        let mut peer = pipelined_dma_tests::connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let set = DeviceFeature::request(
            FEATURE_MIG_DEVICE_STATE,
            FeatureOp::Set,
            FeatureData::MigState {
                state: MigState::StopCopy,
                data_fd: -1,
            },
        );
        let req = Request::DeviceFeature(set.clone());
        assert_eq!(
            ch.on_client_message(&relay, client_request(40, &req)),
            SendOutcome::Done
        );
        let relay_id = ch.lock().client.as_ref().unwrap().pending[0].relay_id;
        let mut payload = Vec::new();
        req.encode(&mut payload);
        let reply = VfioUserFrame {
            header: Header::reply_to(
                &Header::command(relay_id, Command::DeviceFeature as u16, 0),
                payload.len(),
            ),
            payload: payload.clone(),
            slots: vec![],
        };
        ch.on_device_message(&relay, reply);
        let mut buf = vec![0u8; 256];
        let n = peer.read(&mut buf).unwrap();
        let h = Header::decode(&buf[..HEADER_SIZE]).unwrap();
        assert_eq!((h.msg_id, h.error), (40, None));
        assert_eq!(&buf[HEADER_SIZE..n], &payload[..], "byte for byte");

        let big = Request::MigDataRead(MigDataRead::new(relay.limits.max_data_xfer_size + 1));
        let report = Request::DeviceFeature(DeviceFeature::logging_report(0, 1 << 40, 4096));
        for (id, req, errno) in [(41, big, libc::EINVAL), (42, report, libc::E2BIG)] {
            ch.on_client_message(&relay, client_request(id, &req));
            let n = peer.read(&mut buf).unwrap();
            assert_eq!(n, HEADER_SIZE);
            let h = Header::decode(&buf[..HEADER_SIZE]).unwrap();
            assert_eq!((h.msg_id, h.error), (id, Some(errno as u32)));
            assert!(ch.lock().client.as_ref().unwrap().pending.is_empty());
        }
    }
}

/// VERSION through the relay: first and once, major 0, a transfer size of at least a
/// page; a VERSION the device refuses leaves the client unversioned.
#[cfg(test)]
mod version_tests {
    use super::*;
    use std::io::Read;
    use vfu_proto::vfio_user::{encode_request, RegionAccess};

    fn raw(id: u16, req: &Request) -> RawMessage {
        let b = encode_request(id, req, false);
        RawMessage {
            header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
            payload: b[HEADER_SIZE..].to_vec(),
            fds: Vec::new(),
        }
    }

    fn version(major: u16, max_data_xfer_size: Option<u32>) -> Request {
        Request::Version(Version {
            major,
            minor: 0,
            capabilities: Some(Capabilities {
                max_data_xfer_size,
                ..Default::default()
            }),
        })
    }

    /// The errno of the next reply the client reads (None: a success).
    fn next_errno(peer: &mut UnixStream, id: u16) -> Option<u32> {
        let mut buf = [0u8; HEADER_SIZE];
        peer.read_exact(&mut buf).unwrap();
        let h = Header::decode(&buf).unwrap();
        assert_eq!(h.msg_id, id);
        h.error
    }

    #[test]
    fn version_first_once_and_bounded() {
        let relay = pipelined_dma_tests::relay();
        let mut peer = pipelined_dma_tests::connect(&relay);
        peer.set_nonblocking(false).unwrap();
        let ch = &relay.channel(1).unwrap();
        ch.lock().client.as_mut().unwrap().versioned = false;
        let einval = Some(libc::EINVAL as u32);
        let pending = |ch: &Channel| ch.lock().client.as_ref().unwrap().pending.len();

        for (id, req) in [
            (1, version(0, Some(0))),
            (2, version(0, Some(4095))),
            (3, version(1, None)),
        ] {
            ch.on_client_message(&relay, raw(id, &req));
            assert_eq!(next_errno(&mut peer, id), einval, "VERSION {id}");
            assert_eq!(pending(ch), 0, "refused by the relay itself");
        }
        ch.on_client_message(&relay, raw(4, &version(0, Some(4096))));
        assert_eq!(pending(ch), 1, "forwarded");
        // A second VERSION, even while the first is in flight.
        ch.on_client_message(&relay, raw(5, &version(0, None)));
        assert_eq!(next_errno(&mut peer, 5), einval);
        // The device refuses the first: the client is not versioned.
        let relay_id = ch.lock().client.as_ref().unwrap().pending[0].relay_id;
        let refused = VfioUserFrame {
            header: Header::error_reply_to(
                &Header::command(relay_id, Command::Version as u16, 0),
                libc::EINVAL as u32,
            ),
            payload: vec![],
            slots: vec![],
        };
        ch.on_device_message(&relay, refused);
        assert_eq!(next_errno(&mut peer, 4), einval);
        let read = Request::RegionRead(RegionAccess {
            offset: 0,
            region: 7,
            count: 4,
        });
        ch.on_client_message(&relay, raw(6, &read));
        assert_eq!(next_errno(&mut peer, 6), einval, "not versioned");
        ch.on_client_message(&relay, raw(7, &version(0, None)));
        assert_eq!(pending(ch), 1, "VERSION may be sent again");
    }
}

/// Late replies to the requests of a client that left are recognised (and dropped
/// quietly), however many there were; the set of such IDs stays bounded.
#[cfg(test)]
mod abandoned_tests {
    use super::*;
    use vfu_proto::vfio_user::{encode_request, RegionAccess};

    #[test]
    fn late_replies_of_a_client_that_left() {
        let relay = pipelined_dma_tests::relay();
        let ch = &relay.channel(1).unwrap();
        let _peer = pipelined_dma_tests::connect(&relay);
        let read = Request::RegionRead(RegionAccess {
            offset: 0,
            region: 7,
            count: 4,
        });
        let b = encode_request(9, &read, false);
        for _ in 0..3 {
            let msg = RawMessage {
                header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
                payload: b[HEADER_SIZE..].to_vec(),
                fds: Vec::new(),
            };
            assert_eq!(ch.on_client_message(&relay, msg), SendOutcome::Done);
        }
        ch.on_client_disconnected(&relay);
        assert_eq!(ch.lock().abandoned.len(), 3, "relay IDs 0, 1, 2");
        let _peer = pipelined_dma_tests::connect(&relay);
        let late = |id: u16| VfioUserFrame {
            header: Header::reply_to(&Header::command(id, Command::RegionRead as u16, 0), 0),
            payload: vec![],
            slots: vec![],
        };
        ch.on_device_message(&relay, late(0));
        assert!(!ch.lock().abandoned.contains(&0), "recognised once");
        // A new request takes the next ID (3); ID 1 is forgotten when it comes round.
        ch.lock().next_id = 1;
        let msg = RawMessage {
            header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
            payload: b[HEADER_SIZE..].to_vec(),
            fds: Vec::new(),
        };
        ch.on_client_message(&relay, msg);
        assert_eq!(
            ch.lock().abandoned.iter().copied().collect::<Vec<_>>(),
            vec![2]
        );
        ch.fail_pending(&relay, libc::ENODEV as u32);
        assert!(
            ch.lock().abandoned.is_empty(),
            "a device VM that went sends none"
        );
    }
}

/// Posted (NO_REPLY) requests are in flight until the device VM is done with them:
/// the relay asks for their replies, counts them (number and bytes) for
/// back-pressure, and passes nothing on to the client.
#[cfg(test)]
mod posted_tests {
    use super::*;
    use std::io::Read;
    use vfu_proto::vfio_user::{encode_request, RegionWrite};

    #[test]
    fn posted_requests_are_counted_until_answered() {
        let relay = pipelined_dma_tests::relay();
        let mut peer = pipelined_dma_tests::connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let write = Request::RegionWrite(RegionWrite {
            offset: 0,
            region: 2,
            data: vec![0; 1 << 20],
        });
        let b = encode_request(3, &write, true);
        let posted = || RawMessage {
            header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
            payload: b[HEADER_SIZE..].to_vec(),
            fds: Vec::new(),
        };
        let mut sent = 0;
        while ch.lock().client.as_ref().unwrap().may_read() {
            assert_eq!(ch.on_client_message(&relay, posted()), SendOutcome::Done);
            sent += 1;
        }
        assert_eq!(
            sent, 8,
            "8 MiB of posted writes in flight, then back-pressure"
        );
        let relay_id = {
            let st = ch.lock();
            let p = &st.client.as_ref().unwrap().pending[0];
            assert!(p.silent);
            p.relay_id
        };
        let reply = VfioUserFrame {
            header: Header::reply_to(
                &Header::command(relay_id, Command::RegionWrite as u16, 0),
                16,
            ),
            payload: region_write_reply(),
            slots: vec![],
        };
        ch.on_device_message(&relay, reply);
        let st = ch.lock();
        let c = st.client.as_ref().unwrap();
        assert_eq!(c.pending.len(), 7);
        assert_eq!(c.pending_bytes, 7 * (16 + (1 << 20)));
        drop(st);
        let mut buf = [0u8; 16];
        assert!(peer.read(&mut buf).is_err(), "nothing for the client");
    }

    /// With POSTED_DONE the driver answers no posted request; one POSTED_DONE takes
    /// every posted request up to the one it names out of the count, in order, and
    /// leaves the requests that wait for a reply. An ID not in flight changes nothing.
    #[test]
    fn posted_done_releases_posted_requests_in_order() {
        let relay = pipelined_dma_tests::relay();
        relay.link.set_up(crate::tunnel::Negotiated {
            pairs: 1,
            guest_max_msg: 2 << 20,
            features: features::POSTED_DONE,
        });
        let _peer = pipelined_dma_tests::connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let message = |id: u16, req: &Request, no_reply: bool| {
            let b = encode_request(id, req, no_reply);
            RawMessage {
                header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
                payload: b[HEADER_SIZE..].to_vec(),
                fds: Vec::new(),
            }
        };
        let write = Request::RegionWrite(RegionWrite {
            offset: 0,
            region: 2,
            data: vec![7; 4],
        });
        let read = Request::RegionRead(vfu_proto::vfio_user::RegionAccess {
            offset: 0,
            region: 2,
            count: 4,
        });
        for (id, req, no_reply) in [
            (1, &write, true),
            (2, &write, true),
            (3, &read, false),
            (4, &write, true),
        ] {
            assert_eq!(
                ch.on_client_message(&relay, message(id, req, no_reply)),
                SendOutcome::Done
            );
        }
        let in_flight = |ch: &Channel| -> Vec<(u16, bool)> {
            let st = ch.lock();
            let c = st.client.as_ref().unwrap();
            c.pending
                .iter()
                .map(|p| (p.header.msg_id, p.posted))
                .collect()
        };
        assert_eq!(in_flight(ch), [(1, true), (2, true), (3, false), (4, true)]);
        let relay_id = |ch: &Channel, client_id: u16| {
            let st = ch.lock();
            let c = st.client.as_ref().unwrap();
            c.pending
                .iter()
                .find(|p| p.header.msg_id == client_id)
                .unwrap()
                .relay_id
        };
        let (second, fourth) = (relay_id(ch, 2), relay_id(ch, 4));
        ch.on_posted_done(&relay, second);
        assert_eq!(in_flight(ch), [(3, false), (4, true)]);
        ch.on_posted_done(&relay, second);
        ch.on_posted_done(&relay, relay_id(ch, 3));
        assert_eq!(
            in_flight(ch),
            [(3, false), (4, true)],
            "IDs not in flight, or of requests that wait for a reply, change nothing"
        );
        ch.on_posted_done(&relay, fourth);
        assert_eq!(in_flight(ch), [(3, false)]);
        assert_eq!(ch.lock().client.as_ref().unwrap().pending_bytes, 16);
    }

    /// The payload of a REGION_WRITE reply: offset, region, count.
    fn region_write_reply() -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&2u32.to_le_bytes());
        p.extend_from_slice(&(1u32 << 20).to_le_bytes());
        p
    }
}

/// The device VM's DMA requests that wait for a client (memory mapped without an fd)
/// belong to the device VM instance that sent them.
#[cfg(test)]
mod remote_dma_restart_tests {
    use super::*;
    use vfu_proto::vfio_user::encode_request;

    /// A DMA_READ waiting for the client when the driver restarts (a second HELLO, or
    /// a new device VM) is forgotten, not answered: the new instance may use the same
    /// tag at once and gets its own answer, not EBUSY, and when the client leaves the
    /// relay answers only that one. (Found by the `tunnel_control` fuzz target: the old
    /// request got ENODEV sent to the new driver, and the new one EBUSY.)
    #[test]
    fn a_restarted_driver_gets_no_answer_for_its_old_instance() {
        let relay = pipelined_dma_tests::relay();
        let _peer = pipelined_dma_tests::connect(&relay);
        let ch = &relay.channel(1).unwrap();
        let map = Request::DmaMap(DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: 0x10_0000,
            size: 0x1000,
        });
        let b = encode_request(1, &map, false);
        ch.on_client_message(
            &relay,
            RawMessage {
                header: Header::decode(&b[..HEADER_SIZE]).unwrap(),
                payload: b[HEADER_SIZE..].to_vec(),
                fds: Vec::new(),
            },
        );
        let relay_id = ch.lock().client.as_ref().unwrap().pending[0].relay_id;
        let req = Header::command(relay_id, Command::DmaMap as u16, 0);
        ch.on_device_message(
            &relay,
            VfioUserFrame {
                header: Header::reply_to(&req, 0),
                payload: vec![],
                slots: vec![],
            },
        );
        let segments = [(0x10_0000, 16)];
        assert!(
            ch.on_dma_read(&relay, 12, &segments).is_none(),
            "asked of the client"
        );
        assert_eq!(ch.counts().remote_ops, 1);

        ch.fail_pending(&relay, libc::ECONNRESET as u32);
        assert_eq!(ch.counts().remote_ops, 0, "forgotten with its driver");
        assert!(
            ch.on_dma_read(&relay, 12, &segments).is_none(),
            "the new driver's request with the same tag is asked of the client too"
        );
        let mut st = ch.lock();
        let answers = st
            .client
            .as_mut()
            .unwrap()
            .remote
            .fail_all(libc::ENODEV as u32);
        assert_eq!(
            answers.len(),
            1,
            "one answer when the client leaves: the new one"
        );
    }
}
