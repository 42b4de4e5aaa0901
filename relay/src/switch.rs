//! The switch: the thread that owns the device sockets and the client connections. It
//! accepts clients, reads their requests (non-blocking, so a slow or hostile client
//! cannot stall the others), forwards them into the tunnel, flushes replies that did not
//! fit a socket, and answers requests that outlive the timeout.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use log::{debug, error, info, warn};
use vfu_proto::transport::{Frame, Limits, MessageReader, TransportError};
use vfu_proto::tunnel::{Body, TunnelMessage};
use vfu_proto::vfio_user::encode_error_reply;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Channel, Client, SendOutcome};
use crate::dma::Windows;
use crate::tunnel::Link;
use crate::version::RelayLimits;
use crate::{Config, Error, Result};

const WAKE_TOKEN: u64 = u64::MAX;
const KIND_LISTENER: u64 = 0;
const KIND_CLIENT: u64 = 1;

fn token(kind: u64, index: usize) -> u64 {
    (index as u64) << 1 | kind
}

/// State shared by the switch, the tunnel threads and the frontend loop.
#[derive(Debug)]
pub struct Relay {
    /// The configuration.
    pub config: Config,
    /// Channels; channel id `n` is `channels[n - 1]`.
    pub channels: Vec<Arc<Channel>>,
    /// The tunnel toward the device VM.
    pub link: Link,
    /// What the relay can carry.
    pub limits: RelayLimits,
    poll: Epoll,
    wake: EventFd,
    stopping: AtomicBool,
    /// DMA windows in the tunnel device's shared memory. Taken inside a channel's
    /// lock, never around one.
    windows: std::sync::Mutex<Windows>,
}

impl Relay {
    /// Builds the shared state for `config`.
    pub fn new(config: Config) -> Result<Self> {
        let channels = config
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| Arc::new(Channel::new(i as u32 + 1, d.name.clone(), d.socket.clone())))
            .collect();
        let limits = RelayLimits::DEFAULT;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let config_shm_bytes = config.shm_size_mib << 20;
        let frontend_timeout = config.request_timeout();
        Ok(Self {
            link: Link::new(config.queue_pairs, limits, Some(wake.try_clone()?)),
            config,
            channels,
            limits,
            poll: Epoll::new()?,
            wake,
            stopping: AtomicBool::new(false),
            windows: std::sync::Mutex::new(Windows::new(config_shm_bytes, frontend_timeout)),
        })
    }

    /// The channel with tunnel id `id`.
    pub fn channel(&self, id: u32) -> Option<&Arc<Channel>> {
        id.checked_sub(1)
            .and_then(|i| self.channels.get(i as usize))
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
                // The connection is marked broken; the switch drops it when it wakes.
                let _ = self.wake.write(1);
            }
        }
    }

    /// [`Relay::after_send`] for a caller that holds the channel's lock.
    pub fn after_send_locked(&self, channel: &Channel, client: &Client, outcome: SendOutcome) {
        match outcome {
            SendOutcome::Done => {}
            SendOutcome::Queued => self.update_interest(channel, client),
            SendOutcome::Broken => {
                let _ = self.wake.write(1);
            }
        }
    }

    /// Sets what the switch waits for on a client: input unless paused, writability
    /// while replies wait. Called with the channel locked, so the two threads that
    /// change it cannot undo each other.
    pub fn update_interest(&self, channel: &Channel, client: &Client) {
        let mut set = EventSet::empty();
        if !client.paused {
            set |= EventSet::IN;
        }
        if client.has_backlog() {
            set |= EventSet::OUT;
        }
        let ev = EpollEvent::new(set, token(KIND_CLIENT, channel.id as usize - 1));
        if let Err(e) = self.poll.ctl(ControlOperation::Modify, client.raw_fd(), ev) {
            warn!("{}: cannot update epoll interest: {e}", channel.name);
        }
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
}

/// A client connection as the switch sees it: the read side.
struct ClientReader {
    sock: Arc<UnixStream>,
    reader: MessageReader,
}

/// Handle of the running switch thread.
pub struct Switch {
    relay: Arc<Relay>,
    thread: Option<JoinHandle<()>>,
}

impl Switch {
    /// Creates every device socket and starts the switch thread.
    pub fn start(relay: Arc<Relay>) -> Result<Self> {
        let mut listeners = Vec::new();
        for (i, ch) in relay.channels.iter().enumerate() {
            let l = bind(&ch.socket)?;
            l.set_nonblocking(true)?;
            relay.poll.ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token(KIND_LISTENER, i)),
            )?;
            info!("{}: vfio-user socket {}", ch.name, ch.socket.display());
            listeners.push(l);
        }
        relay.poll.ctl(
            ControlOperation::Add,
            relay.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        let r = relay.clone();
        let thread = std::thread::Builder::new()
            .name("vfu-switch".into())
            .spawn(move || run(r, listeners))?;
        Ok(Self {
            relay,
            thread: Some(thread),
        })
    }

    /// Stops the switch thread and removes the device sockets.
    pub fn stop(mut self) {
        self.relay.stopping.store(true, Ordering::Release);
        let _ = self.relay.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for ch in &self.relay.channels {
            let _ = std::fs::remove_file(&ch.socket);
        }
    }
}

/// Binds a device socket, replacing a stale socket file but never a live one.
fn bind(path: &Path) -> Result<UnixListener> {
    let socket_err = |source| Error::Socket {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(socket_err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on it",
            )));
        }
        std::fs::remove_file(path).map_err(socket_err)?;
    }
    UnixListener::bind(path).map_err(socket_err)
}

fn run(relay: Arc<Relay>, listeners: Vec<UnixListener>) {
    let mut clients: HashMap<usize, ClientReader> = HashMap::new();
    // A descriptor kept in reserve: when the process runs out of fds, it is given up to
    // accept the waiting connection and close it at once, instead of leaving it in the
    // backlog, where it would wake the switch forever.
    let mut reserve = std::fs::File::open("/dev/null").ok();
    let mut events = vec![EpollEvent::default(); 64];
    while !relay.is_stopping() {
        relay.link.signal_pending();
        let timeout = next_timeout(&relay);
        let n = match relay.poll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("switch: epoll failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let data = ev.data();
            if data == WAKE_TOKEN {
                let _ = relay.wake.read();
                continue;
            }
            let index = (data >> 1) as usize;
            match data & 1 {
                KIND_LISTENER => {
                    accept(&relay, &listeners[index], index, &mut clients, &mut reserve)
                }
                _ => {
                    let set = ev.event_set();
                    if set.contains(EventSet::OUT) {
                        flush_client(&relay, index);
                    }
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                        && !read_client(&relay, index, &mut clients)
                    {
                        drop_client(&relay, index, &mut clients, "closed or failed");
                    }
                }
            }
        }
        if relay.link.take_room_made() {
            resume_paused(&relay);
        }
        let now = Instant::now();
        for (i, ch) in relay.channels.iter().enumerate() {
            let outcome = ch.expire(&relay, now);
            relay.after_send(ch, outcome);
            let broken = ch.lock().client.as_ref().is_some_and(|c| c.is_broken());
            if broken {
                drop_client(&relay, i, &mut clients, "write failed");
            }
        }
    }
    for i in clients.keys().copied().collect::<Vec<_>>() {
        drop_client(&relay, i, &mut clients, "relay stopping");
    }
}

/// Milliseconds until the earliest request deadline (-1: none).
fn next_timeout(relay: &Relay) -> i32 {
    let now = Instant::now();
    relay
        .channels
        .iter()
        .filter_map(|ch| ch.lock().client.as_ref().and_then(|c| c.next_deadline()))
        .min()
        .map_or(-1, |d| {
            let ms = d.saturating_duration_since(now).as_millis();
            (ms.min(i32::MAX as u128) as i32) + 1
        })
}

fn accept(
    relay: &Relay,
    listener: &UnixListener,
    index: usize,
    clients: &mut HashMap<usize, ClientReader>,
    reserve: &mut Option<std::fs::File>,
) {
    loop {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                warn!(
                    "out of file descriptors: refusing a client on {}",
                    relay.channels[index].name
                );
                *reserve = None;
                drop(listener.accept());
                *reserve = std::fs::File::open("/dev/null").ok();
                return;
            }
            Err(e) => {
                warn!("accept: {e}");
                return;
            }
        };
        let ch = &relay.channels[index];
        // The current client may have gone already with its EOF not yet read (a quick
        // reconnect): take what it sent first.
        if clients.contains_key(&index) && !read_client(relay, index, clients) {
            drop_client(relay, index, clients, "gone before the next client came");
        }
        if clients.contains_key(&index) {
            warn!(
                "{}: refusing a second client (one client per device socket)",
                ch.name
            );
            continue; // dropping `sock` closes it
        }
        let setup = || -> std::io::Result<Arc<UnixStream>> {
            sock.set_nonblocking(true)?;
            relay.poll.ctl(
                ControlOperation::Add,
                sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token(KIND_CLIENT, index)),
            )?;
            Ok(Arc::new(sock))
        };
        match setup() {
            Ok(sock) => {
                clients.insert(
                    index,
                    ClientReader {
                        sock: sock.clone(),
                        reader: MessageReader::new(Limits {
                            max_msg_size: relay.limits.max_data_xfer_size as usize + 4096,
                            max_msg_fds: relay.limits.max_msg_fds as usize,
                        }),
                    },
                );
                ch.on_client_connected(relay, sock);
            }
            Err(e) => warn!("{}: cannot set up client: {e}", ch.name),
        }
    }
}

/// Most messages taken from one client per wake-up, so that a client sending a flood
/// cannot hold the others off (epoll is level-triggered: the rest comes next round).
const BATCH: usize = 32;

/// Reads and forwards up to [`BATCH`] messages. Returns false when the client must go.
fn read_client(relay: &Relay, index: usize, clients: &mut HashMap<usize, ClientReader>) -> bool {
    let Some(c) = clients.get_mut(&index) else {
        return true;
    };
    let ch = &relay.channels[index];
    for _ in 0..BATCH {
        if !c.reader.is_mid_message() {
            // Back-pressure: while the device VM has not taken this channel's messages,
            // or too many requests are in flight, the rest stays in the client's socket.
            let mut st = ch.lock();
            if let Some(client) = st.client.as_mut() {
                if !client.may_read() || !relay.link.has_room(ch.id) {
                    client.paused = true;
                    relay.update_interest(ch, client);
                    return true;
                }
            }
        }
        match c.reader.read(&c.sock) {
            Ok(Some(Frame::Message(msg))) => {
                let outcome = ch.on_client_message(relay, msg);
                if outcome == SendOutcome::Broken {
                    return false;
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
                        return false;
                    }
                    relay.after_send(ch, outcome);
                }
            }
            Ok(None) => return true,
            Err(TransportError::Closed) => return false,
            Err(e) => {
                warn!("{}: dropping client: {e}", ch.name);
                return false;
            }
        }
    }
    true
}

fn flush_client(relay: &Relay, index: usize) {
    let ch = &relay.channels[index];
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

/// Resumes reading clients paused for back-pressure whose channel has room again.
fn resume_paused(relay: &Relay) {
    for ch in &relay.channels {
        if !relay.link.has_room(ch.id) {
            continue;
        }
        let mut st = ch.lock();
        if let Some(client) = st.client.as_mut().filter(|c| c.paused && c.may_read()) {
            client.paused = false;
            relay.update_interest(ch, client);
        }
    }
}

fn drop_client(
    relay: &Relay,
    index: usize,
    clients: &mut HashMap<usize, ClientReader>,
    reason: &str,
) {
    if let Some(c) = clients.remove(&index) {
        debug!("{}: dropping client: {reason}", relay.channels[index].name);
        let fd: RawFd = c.sock.as_raw_fd();
        let _ = relay
            .poll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        relay.channels[index].on_client_disconnected(relay);
    }
}
