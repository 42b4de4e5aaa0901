//! The tunnel protocol engine, driver side (`docs/tunnel.md`): sets up the queue pairs,
//! says HELLO, serves the channels the relay brings up with device servers, and carries
//! vfio-user requests to them and their replies, interrupts and DMA requests back.
//!
//! One engine thread drains the queues and serves every channel whose calls cannot
//! wait (no copy-path DMA: a model whose client memory is all in windows, or who does
//! no DMA), in place, with no hand-off. A channel whose server may wait (copy-path DMA,
//! which the relay may have to ask the client for; a bridged server) moves onto a
//! thread of its own ([`worker`]): the engine hands it the channel's messages in order,
//! and it sends its answers and DMA requests itself through the shared I/O half
//! ([`io::Io`]), so that a device that waits holds up no other.

mod channel_server;
mod channels;
mod dma;
mod io;
mod model_channel;
pub(crate) mod queues;
mod worker;

pub use channel_server::{ChannelServer, Outlet, OutletError};
pub use channels::{check_name, ServeSpec, Served};
pub use dma::{DmaPort, TunnelDma};
pub use io::{ThreadPort, Wakeups};
pub use model_channel::ModelChannel;

use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, info, warn};
use thiserror::Error;
use vfu_proto::poll::{AdaptivePoll, Step};
use vfu_proto::tunnel::{features, Body, Hello, Kind, TunnelMessage, VERSION_MAJOR, VERSION_MINOR};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::transport::{Transport, TransportError};
use channels::Channels;
use io::{Io, SharedIo};
use queues::{PairError, QueuePair};

/// Largest message the driver accepts (1 MiB of data plus headers).
pub const MAX_MSG_SIZE: usize = (1 << 20) + 4096;

/// Epoll data bit marking a model's event fd (the low bits hold the channel).
const MODEL_TOKEN: u64 = 1 << 62;

/// Epoll data of the transport's hang-up fd.
const HANGUP_TOKEN: u64 = u64::MAX - 1;

/// Epoll data of the eventfd channel threads write when the engine must look at the
/// queues.
const WAKE_TOKEN: u64 = u64::MAX;

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
    /// Poll mode: how long the engine thread keeps polling the queues (interrupts
    /// off) after the last message before it sleeps; zero is event mode.
    pub poll: Duration,
    /// The CPU of the engine thread, if it is to be placed.
    pub engine_cpu: Option<usize>,
    /// Misbehave on purpose (the test mode of [`crate::hostile`]).
    pub misbehave: Option<crate::hostile::Misbehave>,
}

/// The driver engine over a transport.
pub struct TunnelDriver<T: Transport + 'static> {
    io: Arc<Mutex<Io<T>>>,
    epoll: Arc<Epoll>,
    channels: Channels,
    up: bool,
    offer_direct: bool,
    poll: Duration,
    engine_cpu: Option<usize>,
}

impl<T: Transport + 'static> TunnelDriver<T> {
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
        let epoll = Arc::new(Epoll::new()?);
        if let Some(fd) = transport.hangup_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, HANGUP_TOKEN),
            )?;
        }
        // Queues may share one interrupt (INTx): each fd is watched, and acknowledged,
        // once.
        let mut watched = Vec::new();
        for pair in &mut pairs {
            for q in [pair.h2g_index, pair.g2h_index] {
                let fd = transport.interrupt_fd(q);
                if watched.contains(&fd) {
                    continue;
                }
                watched.push(fd);
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
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
        let window_fds = transport.window_fds();
        let mut io = Io::new(transport, pairs, epoll.clone())?;
        if let Some(spec) = config.misbehave {
            let scratch = io.transport.memory().alloc(4096, 4096);
            let shm = io.transport.shared_memory();
            io.hostile = Some(Box::new(crate::hostile::Hostile::new(spec, scratch, shm)));
        }
        epoll.ctl(
            ControlOperation::Add,
            io.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        Ok(Self {
            io: Arc::new(Mutex::new(io)),
            epoll,
            channels: Channels::new(config.serve, window_fds),
            up: false,
            offer_direct: config.direct_data,
            poll: config.poll,
            engine_cpu: config.engine_cpu,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Io<T>> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends HELLO and serves until `stop` is set (checked at least every 200 ms) or the
    /// tunnel fails.
    pub fn run(&mut self, stop: Arc<AtomicBool>) -> Result<(), DriverError> {
        {
            let mut io = self.lock();
            let windows = if io.transport.shared_memory().is_some() {
                features::WINDOWS
            } else {
                0
            };
            let direct = if self.offer_direct {
                features::DIRECT_DATA
            } else {
                0
            };
            let tag = io.next_tag();
            let queue_pairs = io.pairs.len() as u16;
            io.send(TunnelMessage {
                channel: 0,
                tag,
                body: Body::Hello(Hello {
                    version_major: VERSION_MAJOR,
                    version_minor: VERSION_MINOR,
                    queue_pairs,
                    max_msg_size: MAX_MSG_SIZE as u32,
                    features: windows | direct | features::POSTED_DONE,
                }),
            })?;
        }
        if let Some(cpu) = self.engine_cpu {
            match vfu_proto::poll::pin_current_thread(cpu) {
                Ok(()) => info!("engine thread on CPU {cpu}"),
                Err(e) => warn!("engine thread: cannot run on CPU {cpu}: {e}"),
            }
        }
        let mut poll = AdaptivePoll::new(self.poll);
        if poll.enabled() {
            info!(
                "poll mode: the queues are polled for {} us after the last message",
                self.poll.as_micros()
            );
        }
        let mut events = vec![EpollEvent::default(); 16];
        let mut model_fds: Vec<(u32, RawFd)> = Vec::new();
        let shared = self.io.clone();
        let mut spawn = move || Box::new(SharedIo::new(shared.clone())) as Box<dyn ThreadPort>;
        while !stop.load(Ordering::Acquire) {
            let step = poll.step();
            let polling = matches!(step, Step::Poll { .. });
            {
                let mut io = self.lock();
                if io.gone {
                    return Err(DriverError::DeviceGone);
                }
                self.sync_model_fds(&mut model_fds)?;
                if step == (Step::Poll { disarm: true }) {
                    io.set_polling(true);
                }
                if step == (Step::Sleep { arm: true }) {
                    io.wakeups.naps += 1;
                }
                if step == (Step::Sleep { arm: true }) && io.set_polling(false) {
                    // Messages came between the last look and the re-arming: no
                    // interrupt will tell of them.
                    poll.worked();
                    continue;
                }
                // Notify the device last, right before sleeping, so that the relay thread
                // we wake does not preempt this batch half way.
                io.kick_all();
            }
            // Sleep without the lock: channel threads send meanwhile.
            let n = match self.epoll.wait(if polling { 0 } else { 200 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e.into()),
            };
            let io = self.io.clone();
            let mut io = io.lock().unwrap_or_else(|p| p.into_inner());
            if n == 0 && !polling {
                io.wakeups.timeouts += 1;
            }
            for token in io.acknowledge(&events[..n]) {
                let channel = (token & !MODEL_TOKEN) as u32;
                let out = self.channels.service(channel, &mut *io, &mut spawn);
                send_all(&mut io, out)?;
            }
            for p in 0..io.pairs.len() {
                let messages = io.drain(p)?;
                io.deferred.extend(messages);
            }
            let worked = n > 0 || !io.deferred.is_empty();
            while let Some(msg) = io.deferred.pop_front() {
                self.dispatch(&mut io, msg, &mut spawn)?;
            }
            let answers = io.take_answers();
            drop(io);
            answers.into_iter().for_each(io::Answer::deliver);
            if worked {
                poll.worked();
            } else if polling {
                poll.idle();
            }
        }
        println!("VFU-GUEST WAKEUPS {}", self.lock().wakeups);
        Ok(())
    }

    /// Why the engine thread woke up so far.
    pub fn wakeups(&self) -> Wakeups {
        self.lock().wakeups.clone()
    }

    /// Keeps the epoll set in step with the event fds of the servers on this thread
    /// (channels come, go, and move to threads of their own).
    fn sync_model_fds(&self, registered: &mut Vec<(u32, RawFd)>) -> Result<(), DriverError> {
        let current = self.channels.event_fds();
        for old in registered.iter() {
            if !current.contains(old) {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, old.1, EpollEvent::default());
            }
        }
        for new in &current {
            if !registered.contains(new) {
                self.epoll.ctl(
                    ControlOperation::Add,
                    new.1,
                    EpollEvent::new(EventSet::IN, MODEL_TOKEN | u64::from(new.0)),
                )?;
            }
        }
        *registered = current;
        Ok(())
    }

    fn dispatch(
        &mut self,
        io: &mut Io<T>,
        msg: TunnelMessage,
        spawn: &mut dyn FnMut() -> Box<dyn ThreadPort>,
    ) -> Result<(), DriverError> {
        let (channel, tag) = (msg.channel, msg.tag);
        let replies = match msg.body {
            Body::HelloReply(r) => {
                if r.status != 0 {
                    return Err(DriverError::HelloRefused(r.status));
                }
                io.active_pairs = r.queue_pairs.clamp(1, io.pairs.len() as u16);
                io.relay_max_msg = r.max_msg_size as usize;
                io.posted_done = r.features & features::POSTED_DONE != 0;
                self.channels.set_peer_max_msg(r.max_msg_size as usize);
                io.direct = r.features & features::DIRECT_DATA != 0
                    && io
                        .enable_direct()
                        .inspect_err(|e| {
                            warn!("no memory for direct DMA data ({e}); data goes in messages")
                        })
                        .is_ok();
                if r.features & features::WINDOWS != 0 {
                    if let Some((base, len)) = io.transport.shared_memory() {
                        let len = len.min(usize::try_from(r.shm_size).unwrap_or(usize::MAX));
                        if let Some(base) = NonNull::new(base) {
                            // SAFETY: the transport keeps shared memory region 0 mapped
                            // for as long as it lives, and channel threads keep it alive.
                            unsafe { self.channels.set_windows(base, len) };
                            info!("DMA windows in use: {} MiB of shared memory", len >> 20);
                        }
                    }
                }
                self.up = true;
                info!(
                    "relay answered HELLO: tunnel {}.{}, {} queue pair(s), direct DMA data {}",
                    r.version_major,
                    r.version_minor,
                    io.active_pairs,
                    if io.direct { "on" } else { "off" }
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
                let session_end = matches!(body, Body::SessionEnd);
                let replies = self.channels.handle(channel, tag, body, io, spawn);
                if session_end {
                    // A console marker when a client goes away: how the engine was woken
                    // while it was served (tests read it to tell interrupts from polling).
                    println!("VFU-GUEST WAKEUPS {}", io.wakeups);
                }
                replies
            }
        };
        send_all(io, replies)
    }
}

fn send_all<T: Transport>(io: &mut Io<T>, messages: Vec<TunnelMessage>) -> Result<(), DriverError> {
    for m in messages {
        io.send(m)?;
    }
    Ok(())
}
