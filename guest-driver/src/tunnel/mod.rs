//! The tunnel protocol engine, driver side (`docs/tunnel.md`): sets up the queue pairs,
//! says HELLO, serves the channels the relay brings up with device servers, and carries
//! vfio-user requests to them and their replies, interrupts and DMA requests back.
//!
//! The engine is one thread. A device model that reads or writes client memory through
//! the copy path waits for the relay's answer inside its own call: the engine's I/O half
//! ([`Io`]) then takes messages off the queues itself, keeps the ones that are not the
//! answer, and dispatches them once the call returns, in the order they came.

mod channels;
mod dma;
mod queues;

pub use channels::ServeSpec;
pub use dma::{DmaPort, TunnelDma};

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use thiserror::Error;
use vfu_proto::tunnel::{
    encode_dma_write_head, features, pair_of_channel, Body, DmaSegment, Hello, Kind, TunnelHeader,
    TunnelMessage, MIN_MSG_SIZE, REPLY_HEAD_SIZE, VERSION_MAJOR, VERSION_MINOR,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::errno::EFAULT;
use crate::device::Errno;
use crate::transport::{Transport, TransportError};
use channels::Channels;
use queues::{PairError, QueuePair, DIRECT_READ_REPLY, DIRECT_WRITE_REQUEST};

/// Largest message the driver accepts (1 MiB of data plus headers).
pub const MAX_MSG_SIZE: usize = (1 << 20) + 4096;

/// How long a model waits for the relay to answer a DMA request.
const DMA_TIMEOUT: Duration = Duration::from_secs(10);

/// Epoll data bit marking a model's event fd (the low bits hold the channel).
const MODEL_TOKEN: u64 = 1 << 62;

/// Epoll data of the transport's hang-up fd.
const HANGUP_TOKEN: u64 = u64::MAX - 1;

/// Why the engine stopped.
#[derive(Debug, Error)]
pub enum DriverError {
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A queue failed (the device misbehaved, or memory ran out).
    #[error("queue: {0}")]
    Queue(#[from] PairError),
    /// The relay refused HELLO.
    #[error("the relay refused HELLO with errno {0}")]
    HelloRefused(u32),
    /// The device went away (the relay closed the vhost-user connection).
    #[error("the relay closed the connection; this device VM must be started again")]
    DeviceGone,
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Devices served, by name.
    pub serve: Vec<ServeSpec>,
    /// Queue pairs to set up (bounded by what the device offers).
    pub queue_pairs: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Offer `DIRECT_DATA`: copy-path DMA data placed in the driver's buffers.
    pub direct_data: bool,
}

/// The I/O half of the engine: transport, queue pairs, and the messages taken off the
/// queues while a model waited for a DMA answer.
pub struct Io<T: Transport> {
    transport: T,
    pairs: Vec<QueuePair>,
    epoll: Epoll,
    /// Pairs agreed in HELLO (until then: 1).
    active_pairs: u16,
    /// Largest message the relay accepts.
    relay_max_msg: usize,
    tag: u32,
    deferred: VecDeque<TunnelMessage>,
    /// The relay answers DMA requests in their own chain (`DIRECT_DATA`).
    direct: bool,
    /// The transport reported that the device is gone.
    gone: bool,
}

impl<T: Transport> Io<T> {
    fn next_tag(&mut self) -> u32 {
        self.tag = self.tag.wrapping_add(1).max(1);
        self.tag
    }

    fn send(&mut self, msg: TunnelMessage) -> Result<(), PairError> {
        let p = pair_of_channel(msg.channel, self.active_pairs) as usize;
        let p = p.min(self.pairs.len() - 1);
        self.pairs[p].send(&msg)
    }

    fn kick(&mut self, p: usize) {
        let (h2g, g2h) = self.pairs[p].kicks_needed();
        if h2g {
            self.transport.notify(self.pairs[p].h2g_index);
        }
        if g2h {
            self.transport.notify(self.pairs[p].g2h_index);
        }
    }

    fn kick_all(&mut self) {
        for p in 0..self.pairs.len() {
            self.kick(p);
        }
    }

    /// Takes every message pair `p` has; re-arms its interrupts when there is nothing
    /// left. Returns the messages.
    fn drain(&mut self, p: usize) -> Result<Vec<TunnelMessage>, PairError> {
        let mut out = Vec::new();
        loop {
            self.pairs[p].reclaim_tx()?;
            for msg in self.pairs[p].receive()? {
                match msg {
                    Ok(m) => out.push(m),
                    Err(e) => warn!("malformed message from the relay: {e}"),
                }
            }
            self.pairs[p].flush_tx()?;
            if !self.pairs[p].rearm() {
                return Ok(out);
            }
        }
    }

    /// Waits up to `ms` for an interrupt (or a model event) and acknowledges it.
    fn wait(&mut self, ms: i32, events: &mut [EpollEvent]) -> std::io::Result<Vec<u64>> {
        let n = match self.epoll.wait(ms, events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let mut others = Vec::new();
        for ev in &events[..n] {
            let data = ev.data();
            if data == HANGUP_TOKEN {
                self.gone = true;
            } else if data & MODEL_TOKEN != 0 || data == u64::MAX {
                others.push(data);
            } else {
                // The token is the queue index.
                self.transport.ack_interrupt(data as u16);
            }
        }
        Ok(others)
    }
}

impl<T: Transport> Io<T> {
    /// Sends a DMA request as a message and waits for the reply message.
    fn exchange(&mut self, channel: u32, body: Body) -> Result<Body, Errno> {
        let tag = self.next_tag();
        let expected = body.kind().0;
        self.send(TunnelMessage { channel, tag, body })
            .map_err(|_| libc::EIO as u32)?;
        let mut found = None;
        self.wait_for(|io| {
            if let Some(i) = io.deferred.iter().position(|m| {
                let (kind, reply) = m.body.kind();
                reply && kind == expected && m.channel == channel && m.tag == tag
            }) {
                found = io.deferred.remove(i).map(|m| m.body);
            }
            found.is_some()
        })?;
        found.ok_or(libc::EIO as u32)
    }

    /// Serves the queues (keeping the messages for later) until `done` says so, or the
    /// relay took too long.
    fn wait_for(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> Result<(), Errno> {
        let deadline = Instant::now() + DMA_TIMEOUT;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            self.kick_all();
            for p in 0..self.pairs.len() {
                let messages = self.drain(p).map_err(|_| libc::EIO as u32)?;
                self.deferred.extend(messages);
            }
            if done(self) {
                return Ok(());
            }
            if self.gone {
                return Err(libc::EIO as u32);
            }
            if Instant::now() > deadline {
                warn!("the relay did not answer a DMA request in time");
                return Err(libc::EIO as u32);
            }
            // Model events seen meanwhile are picked up by the main loop (level-triggered).
            self.wait(100, &mut events).map_err(|_| libc::EIO as u32)?;
        }
    }

    /// Sets each pair's direct buffer aside.
    fn enable_direct(&mut self) -> Result<(), PairError> {
        let mem = self.transport.memory();
        self.pairs.iter_mut().try_for_each(|p| p.enable_direct(mem))
    }

    /// The pair of `channel`, if its direct buffer is free and the relay takes direct
    /// requests.
    fn direct_pair(&self, channel: u32) -> Option<usize> {
        if !self.direct {
            return None;
        }
        let p = (pair_of_channel(channel, self.active_pairs) as usize).min(self.pairs.len() - 1);
        self.pairs[p].direct_ready().then_some(p)
    }

    /// Posts a direct request and waits for the relay to give its chain back; returns
    /// the reply head and the bytes of answer.
    fn direct_exchange(
        &mut self,
        p: usize,
        request: (usize, usize),
        reply: (usize, usize),
    ) -> Result<([u8; REPLY_HEAD_SIZE], usize), Errno> {
        self.pairs[p]
            .post_direct(request.0, request.1, reply.0, reply.1)
            .map_err(|_| libc::EIO as u32)?;
        let mut used = None;
        let waited = self.wait_for(|io| {
            used = io.pairs[p].take_direct_answer();
            used.is_some()
        });
        if waited.is_err() {
            self.pairs[p].abandon_direct();
        }
        waited?;
        let used = used.unwrap_or(0) as usize;
        let mut head = [0u8; REPLY_HEAD_SIZE];
        match self.pairs[p]
            .direct_area()
            .and_then(|a| a.slice(reply.0, REPLY_HEAD_SIZE))
        {
            Some(s) if used >= REPLY_HEAD_SIZE => s.copy_to(&mut head),
            _ => return Err(libc::EIO as u32),
        };
        Ok((head, used))
    }
}

/// Checks a direct reply head against the request; returns its status.
fn check_reply(
    head: &[u8; REPLY_HEAD_SIZE],
    channel: u32,
    tag: u32,
    kind: Kind,
) -> Result<(TunnelHeader, u32), Errno> {
    let h = TunnelHeader::decode(head).map_err(|_| libc::EIO as u32)?;
    if h.channel != channel || h.tag != tag || h.kind != kind as u16 || !h.reply {
        warn!("the relay answered a direct DMA request with a foreign head: {h:?}");
        return Err(libc::EIO as u32);
    }
    let status = u32::from_le_bytes([head[16], head[17], head[18], head[19]]);
    Ok((h, status))
}

impl<T: Transport> DmaPort for Io<T> {
    fn read(&mut self, channel: u32, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let segments = vec![DmaSegment {
            iova,
            len: buf.len() as u64,
        }];
        let Some(p) = self.direct_pair(channel) else {
            return match self.exchange(channel, Body::DmaRead { segments })? {
                Body::DmaReadReply { status: 0, data } if data.len() == buf.len() => {
                    buf.copy_from_slice(&data);
                    Ok(())
                }
                _ => Err(EFAULT),
            };
        };
        let tag = self.next_tag();
        let request = TunnelMessage {
            channel,
            tag,
            body: Body::DmaRead { segments },
        }
        .encode();
        let direct = self.pairs[p].direct_area().ok_or(libc::EIO as u32)?;
        direct
            .slice(0, request.len())
            .ok_or(libc::EIO as u32)?
            .copy_from(&request);
        let reply_len = REPLY_HEAD_SIZE + buf.len();
        let (head, used) =
            self.direct_exchange(p, (0, request.len()), (DIRECT_READ_REPLY, reply_len))?;
        let (h, status) = check_reply(&head, channel, tag, Kind::DmaRead)?;
        if status != 0 {
            return Err(EFAULT);
        }
        if used != reply_len || h.len as usize != 8 + buf.len() {
            warn!("the relay's direct DMA read reply has {used} bytes, not {reply_len}");
            return Err(libc::EIO as u32);
        }
        let direct = self.pairs[p].direct_area().ok_or(libc::EIO as u32)?;
        direct
            .slice(DIRECT_READ_REPLY + REPLY_HEAD_SIZE, buf.len())
            .ok_or(libc::EIO as u32)?
            .copy_to(buf);
        Ok(())
    }

    fn write(&mut self, channel: u32, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let segments = vec![DmaSegment {
            iova,
            len: data.len() as u64,
        }];
        let Some(p) = self.direct_pair(channel) else {
            let body = Body::DmaWrite {
                segments,
                data: data.to_vec(),
            };
            return match self.exchange(channel, body)? {
                Body::Status { status: 0, .. } => Ok(()),
                _ => Err(EFAULT),
            };
        };
        let tag = self.next_tag();
        let head = encode_dma_write_head(channel, tag, &segments, data.len());
        let direct = self.pairs[p].direct_area().ok_or(libc::EIO as u32)?;
        let at = DIRECT_WRITE_REQUEST;
        direct
            .slice(at, head.len())
            .ok_or(libc::EIO as u32)?
            .copy_from(&head);
        direct
            .slice(at + head.len(), data.len())
            .ok_or(libc::EIO as u32)?
            .copy_from(data);
        let (reply, _) =
            self.direct_exchange(p, (at, head.len() + data.len()), (0, REPLY_HEAD_SIZE))?;
        match check_reply(&reply, channel, tag, Kind::DmaWrite)? {
            (_, 0) => Ok(()),
            _ => Err(EFAULT),
        }
    }

    fn max_chunk(&self) -> usize {
        // Room for the tunnel and DMA headers of one segment.
        self.relay_max_msg
            .min(MAX_MSG_SIZE)
            .saturating_sub(64)
            .max(1)
    }
}

/// The driver engine over a transport.
pub struct TunnelDriver<T: Transport> {
    io: Io<T>,
    channels: Channels,
    up: bool,
    offer_direct: bool,
}

impl<T: Transport> TunnelDriver<T> {
    /// Negotiates features, sets up the queues and starts the device.
    pub fn new(mut transport: T, config: DriverConfig) -> Result<Self, DriverError> {
        let features =
            transport.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX)?;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let pairs_available = (transport.max_queues() / 2).max(1);
        let npairs = config.queue_pairs.clamp(1, pairs_available);
        let size = config
            .queue_size
            .min(transport.max_queue_size())
            .max(2)
            .next_power_of_two();
        let mut pairs = Vec::new();
        for p in 0..npairs {
            let pair = QueuePair::new(transport.memory(), p, size, event_idx, MAX_MSG_SIZE)?;
            for (index, qsize, rings) in pair.rings() {
                transport.setup_queue(index, qsize, rings)?;
            }
            pairs.push(pair);
        }
        transport.start()?;
        let epoll = Epoll::new()?;
        if let Some(fd) = transport.hangup_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, HANGUP_TOKEN),
            )?;
        }
        for pair in &mut pairs {
            for q in [pair.h2g_index, pair.g2h_index] {
                epoll.ctl(
                    ControlOperation::Add,
                    transport.interrupt_fd(q),
                    EpollEvent::new(EventSet::IN, u64::from(q)),
                )?;
            }
            // Tell the device about the buffers posted during setup.
            let _ = pair.kicks_needed();
            transport.notify(pair.h2g_index);
        }
        info!(
            "tunnel device ready: {npairs} queue pair(s) of {size} entries, event_idx {event_idx}"
        );
        Ok(Self {
            io: Io {
                transport,
                pairs,
                epoll,
                active_pairs: 1,
                relay_max_msg: MIN_MSG_SIZE as usize,
                tag: 0,
                deferred: VecDeque::new(),
                direct: false,
                gone: false,
            },
            channels: Channels::new(config.serve),
            up: false,
            offer_direct: config.direct_data,
        })
    }

    /// Sends HELLO and serves until `stop` is set (checked at least every 200 ms) or the
    /// tunnel fails.
    pub fn run(&mut self, stop: Arc<AtomicBool>) -> Result<(), DriverError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        self.io.epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::MAX),
        )?;
        let windows = if self.io.transport.shared_memory().is_some() {
            features::WINDOWS
        } else {
            0
        };
        let direct = if self.offer_direct {
            features::DIRECT_DATA
        } else {
            0
        };
        let wanted = windows | direct;
        let tag = self.io.next_tag();
        self.io.send(TunnelMessage {
            channel: 0,
            tag,
            body: Body::Hello(Hello {
                version_major: VERSION_MAJOR,
                version_minor: VERSION_MINOR,
                queue_pairs: self.io.pairs.len() as u16,
                max_msg_size: MAX_MSG_SIZE as u32,
                features: wanted,
            }),
        })?;
        let mut events = vec![EpollEvent::default(); 16];
        let mut model_fds: Vec<(u32, RawFd)> = Vec::new();
        while !stop.load(Ordering::Acquire) {
            if self.io.gone {
                return Err(DriverError::DeviceGone);
            }
            self.sync_model_fds(&mut model_fds)?;
            // Notify the device last, right before sleeping, so that the relay thread we
            // wake does not preempt this batch half way.
            self.io.kick_all();
            for token in self.io.wait(200, &mut events)? {
                if token & MODEL_TOKEN != 0 {
                    let channel = (token & !MODEL_TOKEN) as u32;
                    let out = self.channels.service(channel, &mut self.io);
                    self.send_all(out)?;
                }
            }
            for p in 0..self.io.pairs.len() {
                let messages = self.io.drain(p)?;
                self.io.deferred.extend(messages);
            }
            while let Some(msg) = self.io.deferred.pop_front() {
                self.dispatch(msg)?;
            }
        }
        Ok(())
    }

    /// Keeps the epoll set in step with the models' event fds (channels come and go).
    fn sync_model_fds(&mut self, registered: &mut Vec<(u32, RawFd)>) -> Result<(), DriverError> {
        let current = self.channels.event_fds();
        for old in registered.iter() {
            if !current.contains(old) {
                let _ = self
                    .io
                    .epoll
                    .ctl(ControlOperation::Delete, old.1, EpollEvent::default());
            }
        }
        for new in &current {
            if !registered.contains(new) {
                self.io.epoll.ctl(
                    ControlOperation::Add,
                    new.1,
                    EpollEvent::new(EventSet::IN, MODEL_TOKEN | u64::from(new.0)),
                )?;
            }
        }
        *registered = current;
        Ok(())
    }

    fn send_all(&mut self, messages: Vec<TunnelMessage>) -> Result<(), DriverError> {
        for m in messages {
            self.io.send(m)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, msg: TunnelMessage) -> Result<(), DriverError> {
        let (channel, tag) = (msg.channel, msg.tag);
        let replies = match msg.body {
            Body::HelloReply(r) => {
                if r.status != 0 {
                    return Err(DriverError::HelloRefused(r.status));
                }
                self.io.active_pairs = r.queue_pairs.clamp(1, self.io.pairs.len() as u16);
                self.io.relay_max_msg = r.max_msg_size as usize;
                self.channels.set_peer_max_msg(r.max_msg_size as usize);
                self.io.direct = r.features & features::DIRECT_DATA != 0
                    && self
                        .io
                        .enable_direct()
                        .inspect_err(|e| {
                            warn!("no memory for direct DMA data ({e}); data goes in messages")
                        })
                        .is_ok();
                if r.features & features::WINDOWS != 0 {
                    if let Some((base, len)) = self.io.transport.shared_memory() {
                        let len = len.min(usize::try_from(r.shm_size).unwrap_or(usize::MAX));
                        self.channels.set_windows(base, len);
                        info!("DMA windows in use: {} MiB of shared memory", len >> 20);
                    }
                }
                self.up = true;
                info!(
                    "relay answered HELLO: tunnel {}.{}, {} queue pair(s), direct DMA data {}",
                    r.version_major,
                    r.version_minor,
                    self.io.active_pairs,
                    if self.io.direct { "on" } else { "off" }
                );
                Vec::new()
            }
            Body::DmaReadReply { .. } => {
                debug!("late DMA read answer (tag {tag}) ignored");
                Vec::new()
            }
            Body::Status { kind, .. } if kind == Kind::DmaWrite as u16 => {
                debug!("late DMA write answer (tag {tag}) ignored");
                Vec::new()
            }
            body => {
                if !self.up {
                    debug!("message before the HELLO reply; handled anyway");
                }
                self.channels.handle(channel, tag, body, &mut self.io)
            }
        };
        self.send_all(replies)
    }
}
