//! The tunnel protocol engine, driver side (`docs/tunnel.md`): sets up the queue pairs,
//! says HELLO, serves the channels the relay brings up with device servers, and carries
//! vfio-user requests to them and their replies and interrupts back.

mod channels;
mod queues;

pub use channels::ServeSpec;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, info, warn};
use thiserror::Error;
use vfu_proto::tunnel::{
    pair_of_channel, Body, Hello, TunnelMessage, MIN_MSG_SIZE, VERSION_MAJOR, VERSION_MINOR,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::transport::{Transport, TransportError};
use channels::Channels;
use queues::{PairError, QueuePair};

/// Epoll data bit marking a model's event fd (the low bits hold the channel).
const MODEL_TOKEN: u64 = 1 << 62;

/// Largest message the driver accepts (1 MiB of data plus headers).
pub const MAX_MSG_SIZE: usize = (1 << 20) + 4096;

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
}

/// The driver engine over a transport.
pub struct TunnelDriver<T: Transport> {
    transport: T,
    pairs: Vec<QueuePair>,
    channels: Channels,
    /// Pairs agreed in HELLO (until then: 1).
    active_pairs: u16,
    up: bool,
    tag: u32,
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
        // Tell the device about the buffers posted during setup.
        for p in &mut pairs {
            let _ = p.kicks_needed();
            transport.notify(p.h2g_index);
        }
        info!(
            "tunnel device ready: {npairs} queue pair(s) of {size} entries, event_idx {event_idx}"
        );
        Ok(Self {
            transport,
            pairs,
            channels: Channels::new(config.serve),
            active_pairs: 1,
            up: false,
            tag: 0,
        })
    }

    /// Sends HELLO and serves until `stop` is set (checked at least every 200 ms) or the
    /// tunnel fails.
    pub fn run(&mut self, stop: Arc<AtomicBool>) -> Result<(), DriverError> {
        let epoll = Epoll::new()?;
        let npairs = self.pairs.len();
        for pair in &self.pairs {
            for q in [pair.h2g_index, pair.g2h_index] {
                epoll.ctl(
                    ControlOperation::Add,
                    self.transport.interrupt_fd(q),
                    EpollEvent::new(EventSet::IN, u64::from(q)),
                )?;
            }
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::MAX),
        )?;
        self.tag += 1;
        self.send(TunnelMessage {
            channel: 0,
            tag: self.tag,
            body: Body::Hello(Hello {
                version_major: VERSION_MAJOR,
                version_minor: VERSION_MINOR,
                queue_pairs: npairs as u16,
                max_msg_size: MAX_MSG_SIZE.max(MIN_MSG_SIZE as usize) as u32,
                features: 0,
            }),
        })?;
        let mut events = vec![EpollEvent::default(); 16];
        let mut model_fds: Vec<(u32, RawFd)> = Vec::new();
        while !stop.load(Ordering::Acquire) {
            self.sync_model_fds(&epoll, &mut model_fds)?;
            // Notify the device last, right before sleeping, so that the relay thread we
            // wake does not preempt this batch half way.
            for p in 0..npairs {
                self.kick(p);
            }
            let n = match epoll.wait(200, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                if ev.data() == u64::MAX {
                    continue;
                }
                if ev.data() & MODEL_TOKEN != 0 {
                    let channel = (ev.data() & !MODEL_TOKEN) as u32;
                    for msg in self.channels.service(channel) {
                        self.send(msg)?;
                    }
                    continue;
                }
                // The token is the queue index.
                self.transport.ack_interrupt(ev.data() as u16);
            }
            for p in 0..npairs {
                self.service(p)?;
            }
        }
        Ok(())
    }

    /// Keeps the epoll set in step with the models' event fds (channels come and go).
    fn sync_model_fds(
        &mut self,
        epoll: &Epoll,
        registered: &mut Vec<(u32, RawFd)>,
    ) -> Result<(), DriverError> {
        let current = self.channels.event_fds();
        for old in registered.iter() {
            if !current.contains(old) {
                let _ = epoll.ctl(ControlOperation::Delete, old.1, EpollEvent::default());
            }
        }
        for new in &current {
            if !registered.contains(new) {
                epoll.ctl(
                    ControlOperation::Add,
                    new.1,
                    EpollEvent::new(EventSet::IN, MODEL_TOKEN | u64::from(new.0)),
                )?;
            }
        }
        *registered = current;
        Ok(())
    }

    /// Processes everything pair `p` has, until its interrupts are re-armed with no
    /// work left.
    fn service(&mut self, p: usize) -> Result<(), DriverError> {
        loop {
            self.pairs[p].reclaim_tx()?;
            let messages = self.pairs[p].receive()?;
            for msg in messages {
                match msg {
                    Ok(m) => self.dispatch(m)?,
                    Err(e) => warn!("malformed message from the relay: {e}"),
                }
            }
            self.pairs[p].flush_tx()?;
            if !self.pairs[p].rearm() {
                return Ok(());
            }
        }
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

    fn send(&mut self, msg: TunnelMessage) -> Result<(), DriverError> {
        let p = pair_of_channel(msg.channel, self.active_pairs) as usize;
        let p = p.min(self.pairs.len() - 1);
        self.pairs[p].send(&msg)?;
        Ok(())
    }

    fn dispatch(&mut self, msg: TunnelMessage) -> Result<(), DriverError> {
        let (channel, tag) = (msg.channel, msg.tag);
        let replies = match msg.body {
            Body::HelloReply(r) => {
                if r.status != 0 {
                    return Err(DriverError::HelloRefused(r.status));
                }
                self.active_pairs = r.queue_pairs.clamp(1, self.pairs.len() as u16);
                self.channels.set_peer_max_msg(r.max_msg_size as usize);
                self.up = true;
                info!(
                    "relay answered HELLO: tunnel {}.{}, {} queue pair(s)",
                    r.version_major, r.version_minor, self.active_pairs
                );
                Vec::new()
            }
            body => {
                if !self.up {
                    debug!("message before the HELLO reply; handled anyway");
                }
                self.channels.handle(channel, tag, body)
            }
        };
        for reply in replies {
            self.send(reply)?;
        }
        Ok(())
    }
}
