//! The switch: the threads that own the device sockets, the client connections and
//! the control socket. They accept clients, read their requests (non-blocking, so a
//! slow or hostile client cannot stall the others), forward them into the tunnel,
//! flush replies that did not fit a socket and answer requests that outlive the
//! timeout.
//!
//! There is one switch thread per queue pair the relay offers. Thread `k` owns the
//! devices whose channel id mod the number of threads is `k` (their socket, their
//! client, their timers), so a channel's messages stay on one thread and keep their
//! order; in poll mode it also polls queue pair `k`. Thread 0 also serves the control
//! socket (it adds and removes devices on every thread's behalf) and the removed
//! channels' deadlines.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vfu_proto::poll::{AdaptivePoll, Step};
use vfu_proto::transport::{Frame, Limits, MessageReader, TransportError};
use vfu_proto::tunnel::{Body, TunnelMessage};
use vfu_proto::vfio_user::encode_error_reply;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::access::{self, AccessSpec};
use crate::channel::{Channel, Client, SendOutcome};
use crate::config::DeviceConfig;
use crate::control::server::ControlServer;
use crate::control::{CommandError, Reply, Request};
use crate::dma::Windows;
use crate::sockets;
use crate::table::ChannelTable;
use crate::tunnel::Link;
use crate::version::RelayLimits;
use crate::warn_limited;
use crate::{Config, Error, Result};

const WAKE_TOKEN: u64 = u64::MAX;
const KIND_LISTENER: u64 = 0;
const KIND_CLIENT: u64 = 1;
const KIND_CONTROL_LISTENER: u64 = 2;
const KIND_CONTROL: u64 = 3;

/// The epoll token of an fd of `kind`: device sockets and clients by channel id,
/// control connections by their number.
fn token(kind: u64, n: u64) -> u64 {
    n << 2 | kind
}

/// State shared by the switch, the tunnel threads and the frontend loop.
///
/// Locks: the channel table's is taken outside a channel's, never inside one; the
/// accessors that return channels release it before they return.
#[derive(Debug)]
pub struct Relay {
    /// The configuration (its devices are those the relay started with).
    pub config: Config,
    /// The channels, by id.
    table: RwLock<ChannelTable>,
    /// The tunnel toward the device VM.
    pub link: Link,
    /// What the relay can carry.
    pub limits: RelayLimits,
    /// The switch threads' shares of the devices, by thread index.
    shards: Vec<Shard>,
    stopping: AtomicBool,
    /// DMA windows in the tunnel device's shared memory. Taken inside a channel's
    /// lock, never around one.
    windows: std::sync::Mutex<Windows>,
}

impl Relay {
    /// Builds the shared state for `config`, its devices on channels 1, 2, ...
    pub fn new(config: Config) -> Result<Self> {
        let mut table = ChannelTable::default();
        let control = config.control_socket();
        let reserved = [config.frontend_socket.as_path(), control.as_path()];
        for d in &config.devices {
            table
                .insert(d.clone(), config.device_access(d), &reserved)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        let limits = RelayLimits::DEFAULT;
        let shards = (0..config.queue_pairs.max(1))
            .map(|_| Shard::new())
            .collect::<std::io::Result<Vec<_>>>()?;
        let wakes = shards
            .iter()
            .map(|s| s.wake.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        let config_shm_bytes = config.shm_size_mib << 20;
        let frontend_timeout = config.request_timeout();
        Ok(Self {
            link: Link::new(config.queue_pairs, limits, wakes),
            config,
            table: RwLock::new(table),
            limits,
            shards,
            stopping: AtomicBool::new(false),
            windows: std::sync::Mutex::new(Windows::new(config_shm_bytes, frontend_timeout)),
        })
    }

    /// The channel with tunnel id `id`: exported, or removed but not yet withdrawn
    /// from the device VM.
    pub fn channel(&self, id: u32) -> Option<Arc<Channel>> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The exported channels, by id.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active()
            .cloned()
            .collect()
    }

    /// The channel table, locked, for the tunnel's HELLO and disconnect handling: a
    /// device added meanwhile is brought up once, by one or the other. Nothing that
    /// takes the table again may be called while it is held.
    pub(crate) fn table(&self) -> RwLockWriteGuard<'_, ChannelTable> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Paths no device may take: the frontend and control sockets.
    fn reserved_paths(&self) -> [PathBuf; 2] {
        [
            self.config.frontend_socket.clone(),
            self.config.control_socket(),
        ]
    }

    /// Whether `device` can be added now.
    pub fn check_add(&self, device: &DeviceConfig) -> std::result::Result<(), CommandError> {
        let [a, b] = self.reserved_paths();
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .check_add(device, &[&a, &b])
    }

    /// Adds a channel for `device` (its socket is the caller's) and, if a device VM is
    /// connected, brings it up there. The other channels are not touched.
    pub fn add_channel(
        &self,
        device: DeviceConfig,
    ) -> std::result::Result<Arc<Channel>, CommandError> {
        let [a, b] = self.reserved_paths();
        let access = self.config.device_access(&device);
        let mut table = self.table();
        let ch = table.insert(device, access, &[&a, &b])?;
        if self.link.is_up() {
            ch.bring_up(self);
        }
        Ok(ch)
    }

    /// Removes channel `id` (its socket is the caller's): its client is disconnected
    /// and the device VM told. The other channels are not touched.
    pub fn remove_channel(&self, id: u32) -> Option<Arc<Channel>> {
        let mut table = self.table();
        let ch = table.remove(id)?;
        if ch.withdraw(self) {
            table.retire(ch.clone(), Instant::now() + self.config.request_timeout());
        }
        Some(ch)
    }

    /// The device VM acknowledged the CHANNEL_DOWN of channel `id`.
    pub fn on_channel_down_ack(&self, id: u32) {
        let ch = self.table().forget_retiring(id);
        if let Some(ch) = ch {
            debug!("{}: channel {id} withdrawn from the device VM", ch.name);
            ch.on_channel_down_ack(self);
            self.link.forget_channel(id);
        }
    }

    /// When the relay stops waiting for the earliest CHANNEL_DOWN acknowledgement.
    fn next_retiring_deadline(&self) -> Option<Instant> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .next_deadline()
    }

    /// Stops waiting for CHANNEL_DOWN acknowledgements whose deadline passed.
    pub(crate) fn expire_retiring(&self, now: Instant) {
        if self.next_retiring_deadline().is_none_or(|d| d > now) {
            return;
        }
        let expired = self.table().take_expired(now);
        for ch in expired {
            warn!(
                "{}: the device VM did not acknowledge the removal of channel {} in time; its windows go now",
                ch.name, ch.id
            );
            ch.on_channel_down_ack(self);
            self.link.forget_channel(ch.id);
        }
    }

    /// What `list` answers.
    pub fn list(&self) -> Reply {
        Reply::Devices {
            device_vm: self.link.is_up(),
            devices: self.channels().iter().map(|ch| ch.info()).collect(),
        }
    }

    /// Sends a control request to the device VM; a link that is down is logged only
    /// (the device VM gets the full picture again with its next HELLO).
    /// Returns the message's tag.
    pub fn send_control(&self, channel: u32, body: Body) -> u32 {
        let tag = self.link.next_tag();
        let msg = TunnelMessage { channel, tag, body };
        if let Err(e) = self.link.send(&msg) {
            debug!("control message for channel {channel} not sent: {e}");
        }
        tag
    }

    /// Deals with the outcome of writing to a channel's client from any thread.
    pub fn after_send(&self, channel: &Channel, outcome: SendOutcome) {
        match outcome {
            SendOutcome::Done => {}
            SendOutcome::Queued => {
                let st = channel.lock();
                if let Some(client) = st.client.as_ref() {
                    self.update_interest(channel, client);
                }
            }
            SendOutcome::Broken => {
                // The connection is marked broken; its switch thread drops it when it
                // wakes.
                let _ = self.shard_of(channel.id).wake.write(1);
            }
        }
    }

    /// [`Relay::after_send`] for a caller that holds the channel's lock.
    pub fn after_send_locked(&self, channel: &Channel, client: &Client, outcome: SendOutcome) {
        match outcome {
            SendOutcome::Done => {}
            SendOutcome::Queued => self.update_interest(channel, client),
            SendOutcome::Broken => {
                let _ = self.shard_of(channel.id).wake.write(1);
            }
        }
    }

    /// Sets what the channel's switch thread waits for on its client: input unless
    /// paused, writability while replies wait. Called with the channel locked, so the
    /// two threads that change it cannot undo each other.
    pub fn update_interest(&self, channel: &Channel, client: &Client) {
        let mut set = EventSet::empty();
        if !client.paused {
            set |= EventSet::IN;
        }
        if client.has_backlog() {
            set |= EventSet::OUT;
        }
        let ev = EpollEvent::new(set, token(KIND_CLIENT, u64::from(channel.id)));
        let poll = &self.shard_of(channel.id).poll;
        if let Err(e) = poll.ctl(ControlOperation::Modify, client.raw_fd(), ev) {
            // The switch took the client off epoll already (it is being dropped).
            debug!("{}: cannot update epoll interest: {e}", channel.name);
        }
    }

    /// Reads channel `channel`'s client again after a pause for back-pressure: its
    /// switch thread waits for its input and reads what its reader holds already.
    /// Called with the channel locked, like [`Relay::update_interest`].
    pub fn resume_reading(&self, channel: &Channel, client: &mut Client) {
        client.paused = false;
        self.update_interest(channel, client);
        let shard = self.shard_of(channel.id);
        shard.ready().push(channel.id);
        let _ = shard.wake.write(1);
    }

    /// The DMA windows.
    pub fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether DMA maps get windows: the frontend can map them and the driver said it
    /// uses them.
    pub fn windows_enabled(&self) -> bool {
        self.link.features() & vfu_proto::tunnel::features::WINDOWS != 0
            && self.windows().available()
    }

    /// Whether the relay is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The share of the switch thread that owns channel `id`.
    fn shard_of(&self, id: u32) -> &Shard {
        &self.shards[id as usize % self.shards.len()]
    }
}

/// One switch thread's share: what it waits on and the devices it owns. Another
/// thread touches it only to add or remove a device (thread 0, for the control
/// socket), to change what it waits for on a client ([`Relay::update_interest`]) and
/// to wake it.
///
/// Locks: `devices` is taken outside the channel table's and a channel's lock, never
/// inside them; thread 0 may take another thread's `devices`, nobody else does.
struct Shard {
    poll: Epoll,
    wake: EventFd,
    devices: Mutex<HashMap<u32, Device>>,
    /// Channels whose client must be read without waiting for its socket: messages
    /// wait in its reader's buffer (which does not make the socket readable), after a
    /// full batch or a pause for back-pressure.
    ready: Mutex<Vec<u32>>,
}

impl Shard {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            poll: Epoll::new()?,
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            devices: Mutex::new(HashMap::new()),
            ready: Mutex::new(Vec::new()),
        })
    }

    fn ready(&self) -> MutexGuard<'_, Vec<u32>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn devices(&self) -> MutexGuard<'_, HashMap<u32, Device>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches a device's socket and keeps it.
    fn watch_device(&self, ch: Arc<Channel>, listener: UnixListener) -> std::io::Result<()> {
        self.poll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token(KIND_LISTENER, u64::from(ch.id))),
        )?;
        self.devices().insert(
            ch.id,
            Device {
                ch,
                listener,
                client: None,
            },
        );
        Ok(())
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("devices", &self.devices().len())
            .finish()
    }
}

/// A client connection as the switch sees it: the read side.
struct ClientReader {
    sock: Arc<UnixStream>,
    reader: MessageReader,
}

/// An exported device as the switch sees it: its socket and its client.
struct Device {
    ch: Arc<Channel>,
    listener: UnixListener,
    client: Option<ClientReader>,
}

/// Handle of the running switch threads.
pub struct Switch {
    relay: Arc<Relay>,
    threads: Vec<JoinHandle<()>>,
}

/// The switch with its sockets created, not yet running.
pub struct BoundSwitch {
    relay: Arc<Relay>,
    control: ControlServer,
}

impl Switch {
    /// Creates the control socket and every device socket (each with its mode, owner
    /// and group), and watches them; no thread starts yet.
    pub fn bind(relay: Arc<Relay>) -> Result<BoundSwitch> {
        let control_path = relay.config.control_socket();
        let control =
            sockets::bind_with(&control_path, relay.config.control_perms()).map_err(|source| {
                Error::Socket {
                    path: control_path.display().to_string(),
                    source,
                }
            })?;
        let bound = BoundSwitch {
            relay: relay.clone(),
            control: ControlServer::new(control),
        };
        info!("control socket {}", control_path.display());
        let setup = || -> Result<()> {
            bound
                .control
                .register(&relay.shards[0].poll, token(KIND_CONTROL_LISTENER, 0))?;
            for shard in &relay.shards {
                shard.poll.ctl(
                    ControlOperation::Add,
                    shard.wake.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, WAKE_TOKEN),
                )?;
            }
            for ch in relay.channels() {
                let perms = relay.config.perms(&ch.access);
                let listener =
                    sockets::bind_with(&ch.socket, perms).map_err(|source| Error::Socket {
                        path: ch.socket.display().to_string(),
                        source,
                    })?;
                info!(
                    "{}: vfio-user socket {} (channel {})",
                    ch.name,
                    ch.socket.display(),
                    ch.id
                );
                relay.shard_of(ch.id).watch_device(ch, listener)?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            // The sockets created so far are ours: they go.
            bound.remove_sockets();
            return Err(e);
        }
        Ok(bound)
    }

    /// Stops the switch threads, which remove the device and control sockets.
    pub fn stop(self) {
        self.relay.stopping.store(true, Ordering::Release);
        for shard in &self.relay.shards {
            let _ = shard.wake.write(1);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl BoundSwitch {
    /// Starts the switch threads.
    pub fn start(self) -> Result<Switch> {
        let relay = self.relay;
        let mut control = Some(self.control);
        let mut threads = Vec::new();
        for index in 0..relay.shards.len() {
            let state = SwitchThread {
                relay: relay.clone(),
                index,
                control: control.take(),
                reserve: None,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vfu-switch-{index}"))
                .spawn(move || state.run());
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    Switch { relay, threads }.stop();
                    return Err(e.into());
                }
            }
        }
        Ok(Switch { relay, threads })
    }

    /// Gives up before starting: the sockets are removed.
    pub fn abandon(self) {
        self.remove_sockets();
    }

    fn remove_sockets(&self) {
        for shard in &self.relay.shards {
            for dev in shard.devices().values() {
                let _ = std::fs::remove_file(&dev.ch.socket);
            }
        }
        let _ = std::fs::remove_file(self.relay.config.control_socket());
    }
}

/// What a switch thread owns.
struct SwitchThread {
    relay: Arc<Relay>,
    /// Its index: it owns the devices in `relay.shards[index]`.
    index: usize,
    /// The control socket (thread 0 only).
    control: Option<ControlServer>,
    /// A descriptor kept in reserve: when the process runs out of fds, it is given up
    /// to accept the waiting connection and close it at once, instead of leaving it in
    /// the backlog, where it would wake the switch forever.
    reserve: Option<std::fs::File>,
}

impl SwitchThread {
    fn shard(&self) -> &Shard {
        &self.relay.shards[self.index]
    }

    /// The queue pairs this thread polls in poll mode.
    fn pairs(&self) -> impl Iterator<Item = usize> {
        let pairs = usize::from(self.relay.link.offered_pairs);
        (self.index..pairs).step_by(self.relay.shards.len())
    }

    fn run(mut self) {
        let relay = self.relay.clone();
        self.reserve = std::fs::File::open("/dev/null").ok();
        let cpus = &relay.config.switch_cpu;
        if !cpus.is_empty() {
            let cpu = cpus[self.index % cpus.len()];
            match vfu_proto::poll::pin_current_thread(cpu) {
                Ok(()) => info!("switch thread {} on CPU {cpu}", self.index),
                Err(e) => warn!("switch thread {}: cannot run on CPU {cpu}: {e}", self.index),
            }
        }
        let mut poll = AdaptivePoll::new(relay.config.poll());
        if poll.enabled() && self.index == 0 {
            info!(
                "poll mode: client sockets and tunnel queues polled for {} us after the last message",
                relay.config.poll_us
            );
        }
        let mut events = vec![EpollEvent::default(); 64];
        let mut next_expiry = Instant::now();
        while !relay.is_stopping() {
            relay.link.signal_pending();
            let step = poll.step();
            let polling = matches!(step, Step::Poll { .. });
            let timeout = match step {
                Step::Poll { disarm } => {
                    if disarm {
                        for pair in self.pairs() {
                            relay.link.set_polling(pair, true);
                        }
                    }
                    0
                }
                Step::Sleep { arm } => {
                    // (Every pair is re-armed, the first with buffers waiting or not.)
                    let waiting = arm
                        && self
                            .pairs()
                            .fold(false, |w, pair| relay.link.set_polling(pair, false) | w);
                    if waiting {
                        // Buffers came between the last look and the re-arming: no
                        // notification will tell of them.
                        poll.worked();
                        continue;
                    }
                    if self.shard().ready().is_empty() {
                        self.next_timeout()
                    } else {
                        0
                    }
                }
            };
            let n = match self.shard().poll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("switch thread {}: epoll failed: {e}", self.index);
                    break;
                }
            };
            for ev in &events[..n] {
                self.handle(ev);
            }
            let mut worked = n > 0;
            worked |= self.read_ready();
            if polling {
                // The driver's messages, and the buffers it posted for ours.
                let set_up = relay.link.pairs();
                for pair in self.pairs().take_while(|&p| p < set_up) {
                    if relay.link.poll(pair) && crate::tunnel::drain_g2h(&relay, pair) {
                        worked = true;
                    }
                }
            }
            if relay.link.take_room_made(self.index) {
                self.resume_paused();
            }
            if worked {
                poll.worked();
            } else if polling {
                poll.idle();
            }
            let now = Instant::now();
            if polling && now < next_expiry {
                continue; // deadlines are looked at once a millisecond while polling
            }
            next_expiry = now + Duration::from_millis(1);
            self.expire(now);
        }
        let mut devices = relay.shards[self.index].devices();
        let ids: Vec<u32> = devices.keys().copied().collect();
        for id in ids {
            self.drop_client(&mut devices, id, "relay stopping");
        }
        for dev in devices.values() {
            let _ = std::fs::remove_file(&dev.ch.socket);
        }
        if self.control.is_some() {
            let _ = std::fs::remove_file(relay.config.control_socket());
        }
    }

    /// Handles one epoll event.
    fn handle(&mut self, ev: &EpollEvent) {
        let relay = self.relay.clone();
        let data = ev.data();
        if data == WAKE_TOKEN {
            let _ = self.shard().wake.read();
            return;
        }
        let n = data >> 2;
        // Events of a device removed earlier in this batch find no device: ids are
        // never reused, so they cannot reach a newer one.
        let id = n as u32;
        match data & 3 {
            KIND_LISTENER => {
                let mut devices = relay.shards[self.index].devices();
                self.accept(&mut devices, id);
            }
            KIND_CLIENT => {
                let mut devices = relay.shards[self.index].devices();
                let set = ev.event_set();
                if set.contains(EventSet::OUT) {
                    flush_client(&relay, &devices, id);
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.read(&mut devices, id, "closed or failed");
                }
            }
            kind => {
                // No device lock is held here: adding and removing a device takes the
                // lock of the thread that owns it, which may be this one.
                let Some(control) = self.control.as_mut() else {
                    return;
                };
                let poll = &relay.shards[self.index].poll;
                if kind == KIND_CONTROL_LISTENER {
                    control.accept(poll, |c| token(KIND_CONTROL, c));
                } else {
                    control.ready(
                        n,
                        poll,
                        |c| token(KIND_CONTROL, c),
                        |request| execute(&relay, request),
                    );
                }
            }
        }
    }

    /// Reads the client of device `id` and deals with the outcome; `gone` says why it
    /// is dropped if it must go.
    fn read(&self, devices: &mut HashMap<u32, Device>, id: u32, gone: &str) {
        match read_client(&self.relay, devices, id) {
            ReadOutcome::Idle => {}
            ReadOutcome::Buffered => self.shard().ready().push(id),
            ReadOutcome::Gone => self.drop_client(devices, id, gone),
        }
    }

    /// Reads the clients with messages in their reader's buffer. Returns whether there
    /// were any.
    fn read_ready(&self) -> bool {
        let mut ids = std::mem::take(&mut *self.shard().ready());
        if ids.is_empty() {
            return false;
        }
        ids.sort_unstable();
        ids.dedup();
        let mut devices = self.shard().devices();
        for id in ids {
            self.read(&mut devices, id, "closed or failed");
        }
        true
    }

    /// Answers the requests of this thread's devices that outlived the timeout, drops
    /// the clients whose connection broke and (thread 0) stops waiting for removed
    /// channels whose deadline passed.
    fn expire(&mut self, now: Instant) {
        let relay = self.relay.clone();
        let mut devices = relay.shards[self.index].devices();
        let mut broken = Vec::new();
        for (&id, dev) in devices.iter() {
            let outcome = dev.ch.expire(&relay, now);
            relay.after_send(&dev.ch, outcome);
            if dev.ch.lock().client.as_ref().is_some_and(|c| c.is_broken()) {
                broken.push(id);
            }
        }
        for id in broken {
            self.drop_client(&mut devices, id, "write failed");
        }
        drop(devices);
        if self.control.is_some() {
            relay.expire_retiring(now);
        }
    }

    /// Milliseconds until the earliest deadline: a request's of this thread's
    /// devices, or (thread 0) a removed channel's (-1: none).
    fn next_timeout(&self) -> i32 {
        let now = Instant::now();
        let retiring = self
            .control
            .as_ref()
            .and_then(|_| self.relay.next_retiring_deadline());
        self.shard()
            .devices()
            .values()
            .filter_map(|d| d.ch.next_deadline())
            .chain(retiring)
            .min()
            .map_or(-1, |d| {
                let ms = d.saturating_duration_since(now).as_millis();
                (ms.min(i32::MAX as u128) as i32) + 1
            })
    }

    fn accept(&mut self, devices: &mut HashMap<u32, Device>, id: u32) {
        let relay = self.relay.clone();
        loop {
            let Some(dev) = devices.get(&id) else {
                return;
            };
            let ch = dev.ch.clone();
            let sock = match dev.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    warn!("out of file descriptors: refusing a client on {}", ch.name);
                    self.reserve = None;
                    drop(dev.listener.accept());
                    self.reserve = std::fs::File::open("/dev/null").ok();
                    return;
                }
                Err(e) => {
                    warn!("accept: {e}");
                    return;
                }
            };
            // Who may connect is checked first, before the current client is looked at:
            // a refused peer is closed at once and touches nothing.
            match access::peer_cred(&sock) {
                Ok(cred) if ch.access.allows_now(&cred) => {
                    debug!("{}: connection from {cred}", ch.name);
                }
                Ok(cred) => {
                    // A local user who may connect (by the socket's mode) can do so at any
                    // rate: the log is rate-limited.
                    warn_limited!(
                        "{}: refused a client on {}: {cred} is not allowed ({})",
                        ch.name,
                        ch.socket.display(),
                        ch.access.describe()
                    );
                    continue; // dropping `sock` closes it
                }
                Err(e) => {
                    warn_limited!(
                        "{}: refused a client on {}: its credentials cannot be read: {e}",
                        ch.name,
                        ch.socket.display()
                    );
                    continue;
                }
            }
            // The current client may have gone already with its EOF not yet read (a
            // quick reconnect): take what it sent first.
            let has_client = dev.client.is_some();
            if has_client {
                self.read(devices, id, "gone before the next client came");
            }
            let Some(dev) = devices.get_mut(&id) else {
                return;
            };
            if dev.client.is_some() {
                // One client per device socket: the second is closed before the relay
                // reads a byte from it, and the first never notices.
                let who = access::peer_cred(&sock).map_or_else(|_| "?".into(), |c| c.to_string());
                warn_limited!(
                    "{}: refused a second client ({who}): one client per device socket, and one is connected",
                    ch.name
                );
                continue; // dropping `sock` closes it
            }
            let setup = || -> std::io::Result<Arc<UnixStream>> {
                sock.set_nonblocking(true)?;
                relay.shards[self.index].poll.ctl(
                    ControlOperation::Add,
                    sock.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(KIND_CLIENT, u64::from(id))),
                )?;
                Ok(Arc::new(sock))
            };
            match setup() {
                Ok(sock) => {
                    dev.client = Some(ClientReader {
                        sock: sock.clone(),
                        reader: MessageReader::buffered(
                            Limits {
                                max_msg_size: relay.limits.max_data_xfer_size as usize + 4096,
                                max_msg_fds: relay.limits.max_msg_fds as usize,
                            },
                            vfu_proto::vfio_user::request_may_carry_fds,
                        ),
                    });
                    ch.on_client_connected(&relay, sock);
                }
                Err(e) => warn!("{}: cannot set up client: {e}", ch.name),
            }
        }
    }

    /// Resumes reading clients paused for back-pressure whose channel has room again.
    fn resume_paused(&self) {
        for dev in self.shard().devices().values() {
            let ch = &dev.ch;
            if !self.relay.link.has_room(ch.id) {
                continue;
            }
            let mut st = ch.lock();
            if let Some(client) = st.client.as_mut().filter(|c| c.paused && c.may_read()) {
                self.relay.resume_reading(ch, client);
            }
        }
    }

    fn drop_client(&self, devices: &mut HashMap<u32, Device>, id: u32, reason: &str) {
        let Some(dev) = devices.get_mut(&id) else {
            return;
        };
        if let Some(c) = dev.client.take() {
            debug!("{}: dropping client: {reason}", dev.ch.name);
            let _ = self.shard().poll.ctl(
                ControlOperation::Delete,
                c.sock.as_raw_fd(),
                EpollEvent::default(),
            );
            dev.ch.on_client_disconnected(&self.relay);
        }
    }
}

/// What reading a client came to.
enum ReadOutcome {
    /// Nothing more to read until its socket is readable (or it is resumed).
    Idle,
    /// A batch was read and more messages wait in its reader's buffer.
    Buffered,
    /// The client must go.
    Gone,
}

/// Reads and forwards up to [`BATCH`] messages of the client of device `id`.
fn read_client(relay: &Relay, devices: &mut HashMap<u32, Device>, id: u32) -> ReadOutcome {
    let Some(Device {
        ch,
        client: Some(c),
        ..
    }) = devices.get_mut(&id)
    else {
        return ReadOutcome::Idle;
    };
    for i in 0..BATCH {
        if i > 0 && c.reader.drained() {
            // The last read emptied the socket: epoll says when more comes.
            return ReadOutcome::Idle;
        }
        if !c.reader.is_mid_message() {
            // Back-pressure: while the device VM has not taken this channel's
            // messages, or too many requests are in flight, the rest stays in the
            // client's socket (and the reader's buffer); resuming reads it.
            let mut st = ch.lock();
            if let Some(client) = st.client.as_mut() {
                if !client.may_read() || !relay.link.has_room(ch.id) {
                    client.paused = true;
                    relay.update_interest(ch, client);
                    return ReadOutcome::Idle;
                }
            }
        }
        match c.reader.read(&c.sock) {
            Ok(Some(Frame::Message(msg))) => {
                let outcome = ch.on_client_message(relay, msg);
                if outcome == SendOutcome::Broken {
                    return ReadOutcome::Gone;
                }
                relay.after_send(ch, outcome);
            }
            Ok(Some(Frame::Rejected(r))) => {
                debug!("{}: rejected message: {}", ch.name, r.error);
                if !r.header.no_reply {
                    let mut st = ch.lock();
                    let outcome = match st.client.as_mut() {
                        Some(client) => {
                            client.send(encode_error_reply(&r.header, r.error.errno()), vec![])
                        }
                        None => SendOutcome::Broken,
                    };
                    drop(st);
                    if outcome == SendOutcome::Broken {
                        return ReadOutcome::Gone;
                    }
                    relay.after_send(ch, outcome);
                }
            }
            Ok(None) => return ReadOutcome::Idle,
            Err(TransportError::Closed) => return ReadOutcome::Gone,
            Err(e) => {
                warn!("{}: dropping client: {e}", ch.name);
                return ReadOutcome::Gone;
            }
        }
    }
    if c.reader.has_buffered_message() {
        ReadOutcome::Buffered
    } else {
        ReadOutcome::Idle
    }
}

fn flush_client(relay: &Relay, devices: &HashMap<u32, Device>, id: u32) {
    let Some(dev) = devices.get(&id) else {
        return;
    };
    let ch = &dev.ch;
    let mut st = ch.lock();
    let Some(client) = st.client.as_mut() else {
        return;
    };
    match client.flush() {
        SendOutcome::Done | SendOutcome::Queued => relay.update_interest(ch, client),
        SendOutcome::Broken => {
            drop(st);
            relay.after_send(ch, SendOutcome::Broken);
        }
    }
}

/// Most messages taken from one client per wake-up, so that a client sending a flood
/// cannot hold the others off (epoll is level-triggered: the rest comes next round).
const BATCH: usize = 32;

/// Carries out a control request. Only switch thread 0 adds and removes devices (for
/// every switch thread), so what is checked here still holds when it is done.
fn execute(relay: &Relay, request: Request) -> Reply {
    let result = match request {
        Request::Add {
            name,
            socket,
            access,
        } => add_device(relay, name, socket, access),
        Request::Remove { name } => remove_device(relay, &name),
        Request::List => Ok(relay.list()),
    };
    result.unwrap_or_else(|e| {
        info!("control: refused: {e}");
        e.into()
    })
}

fn add_device(
    relay: &Relay,
    name: String,
    socket: String,
    access: AccessSpec,
) -> std::result::Result<Reply, CommandError> {
    let device = DeviceConfig {
        name,
        socket: PathBuf::from(&socket),
        access,
    };
    relay.check_add(&device)?;
    if !device.socket.is_absolute() {
        return Err(CommandError::InvalidDevice {
            reason: format!(
                "socket path {socket:?} must be absolute (the relay's working directory is not the caller's)"
            ),
        });
    }
    let socket_error = |e: std::io::Error| CommandError::Socket {
        socket: socket.clone(),
        reason: e.to_string(),
    };
    let perms = relay.config.perms(&relay.config.device_access(&device));
    let listener = sockets::bind_with(&device.socket, perms).map_err(socket_error)?;
    let path = device.socket.clone();
    let unlink = |path: &Path| {
        let _ = std::fs::remove_file(path);
    };
    let ch = match relay.add_channel(device) {
        Ok(ch) => ch,
        Err(e) => {
            unlink(&path);
            return Err(e);
        }
    };
    if let Err(e) = relay.shard_of(ch.id).watch_device(ch.clone(), listener) {
        relay.remove_channel(ch.id);
        unlink(&path);
        return Err(socket_error(e));
    }
    info!(
        "{}: added on channel {}, vfio-user socket {}",
        ch.name,
        ch.id,
        ch.socket.display()
    );
    Ok(Reply::Added {
        name: ch.name.clone(),
        socket,
        channel: ch.id,
    })
}

fn remove_device(relay: &Relay, name: &str) -> std::result::Result<Reply, CommandError> {
    let unknown = || CommandError::UnknownDevice {
        name: name.to_string(),
    };
    let id = relay
        .channels()
        .iter()
        .find(|ch| ch.name == name)
        .map(|ch| ch.id)
        .ok_or_else(unknown)?;
    let shard = relay.shard_of(id);
    let dev = shard.devices().remove(&id).ok_or_else(unknown)?;
    let _ = shard.poll.ctl(
        ControlOperation::Delete,
        dev.listener.as_raw_fd(),
        EpollEvent::default(),
    );
    drop(dev.listener);
    let _ = std::fs::remove_file(&dev.ch.socket);
    if let Some(c) = dev.client {
        let _ = shard.poll.ctl(
            ControlOperation::Delete,
            c.sock.as_raw_fd(),
            EpollEvent::default(),
        );
    }
    relay.remove_channel(id);
    info!("{name}: removed (channel {id})");
    Ok(Reply::Removed {
        name: name.to_string(),
    })
}
