//! A channel served on a thread of its own: for servers whose calls may wait (copy-path
//! DMA the relay may have to ask the client for, a bridged server). The engine thread
//! hands the channel's messages over in order; the thread answers through the shared
//! [`super::io::Io`] and waits for DMA answers without holding anything up.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info, warn};
use vfu_proto::tunnel::{Body, Kind, TunnelMessage, VfioUserFrame};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::channel_server::{ChannelServer, Outlet};
use super::dma::TunnelDma;
use super::io::ThreadPort;

/// What the engine thread hands a channel thread.
pub(super) enum Work {
    /// A vfio-user message from the client.
    Frame(VfioUserFrame),
    /// SESSION_START (answered with its tag).
    SessionStart(u32),
    /// SESSION_END (answered with its tag).
    SessionEnd(u32),
    /// DMA windows are mapped here.
    Windows(SharedWindows),
    /// The relay accepts messages up to this size.
    PeerMaxMsg(usize),
}

/// Shared memory region 0, as handed to a channel thread.
pub(super) struct SharedWindows {
    pub base: NonNull<u8>,
    pub len: usize,
}

// SAFETY: the pointer names process-wide shared memory that the transport keeps mapped
// for as long as the engine lives; channel threads hold the engine's I/O half (and so
// the transport) alive through their port.
unsafe impl Send for SharedWindows {}

struct Inbox {
    work: Mutex<(VecDeque<Work>, bool)>,
    wake: EventFd,
}

/// The engine thread's handle on a channel thread. Dropping it stops the thread once
/// it finished what it was doing (a thread stuck in its server is left behind).
pub(super) struct Worker {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
}

const INBOX_TOKEN: u64 = 0;
const SERVER_TOKEN: u64 = 1;

impl Worker {
    /// Starts a thread serving `channel` (device `name`) with `server`.
    pub(super) fn spawn(
        name: &str,
        channel: u32,
        server: Box<dyn ChannelServer>,
        port: Box<dyn ThreadPort>,
        peer_max_msg: usize,
    ) -> Result<Self, (Box<dyn ChannelServer>, std::io::Error)> {
        let setup = || -> std::io::Result<_> {
            let wake = EventFd::new(libc::EFD_NONBLOCK)?;
            let epoll = Epoll::new()?;
            epoll.ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, INBOX_TOKEN),
            )?;
            Ok((wake, epoll))
        };
        let (wake, epoll) = match setup() {
            Ok(x) => x,
            Err(e) => return Err((server, e)),
        };
        let inbox = Arc::new(Inbox {
            work: Mutex::new((VecDeque::new(), false)),
            wake,
        });
        let state = Thread {
            name: name.to_string(),
            channel,
            server,
            port,
            peer_max_msg,
            inbox: inbox.clone(),
            epoll,
            server_fd: None,
            done: None,
        };
        // The state goes over once the thread exists, so a failed spawn keeps it.
        let (tx, rx) = std::sync::mpsc::channel::<Thread>();
        let thread = match std::thread::Builder::new()
            .name(format!("vfu-ch{channel}"))
            .spawn(move || {
                if let Ok(mut state) = rx.recv() {
                    state.run();
                }
            }) {
            Ok(t) => t,
            Err(e) => return Err((state.server, e)),
        };
        let _ = tx.send(state);
        info!("{name}: channel {channel} now served on its own thread");
        Ok(Self {
            inbox,
            thread: Some(thread),
        })
    }

    /// Queues `work` for the thread.
    pub(super) fn push(&self, work: Work) {
        self.inbox
            .work
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push_back(work);
        let _ = self.inbox.wake.write(1);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.inbox.work.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        let _ = self.inbox.wake.write(1);
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

struct Thread {
    name: String,
    channel: u32,
    server: Box<dyn ChannelServer>,
    port: Box<dyn ThreadPort>,
    peer_max_msg: usize,
    inbox: Arc<Inbox>,
    epoll: Epoll,
    server_fd: Option<RawFd>,
    /// The POSTED_DONE of this batch of work, sent once at its end.
    done: Option<TunnelMessage>,
}

impl Thread {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            self.watch_server_fd();
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    warn!("{}: channel thread stops: {e}", self.name);
                    return;
                }
            };
            let serviced = events[..n].iter().any(|e| e.data() == SERVER_TOKEN);
            let _ = self.inbox.wake.read();
            let (work, stop) = {
                let mut inbox = self.inbox.work.lock().unwrap_or_else(|p| p.into_inner());
                (std::mem::take(&mut inbox.0), inbox.1)
            };
            if stop {
                debug!("{}: channel thread stops", self.name);
                return;
            }
            for w in work {
                self.handle(w);
            }
            if let Some(done) = self.done.take() {
                self.port.send(vec![done]);
            }
            if serviced {
                let mut out = Outlet::new(self.channel, self.peer_max_msg);
                let mut dma = TunnelDma {
                    port: &mut *self.port,
                    channel: self.channel,
                };
                self.server.service(&mut dma, &mut out);
                self.port.send(out.take());
            }
        }
    }

    /// Keeps the server's event fd in the epoll set (it may change).
    fn watch_server_fd(&mut self) {
        let fd = self.server.event_fd().map(|f| f.as_raw_fd());
        if fd == self.server_fd {
            return;
        }
        if let Some(old) = self.server_fd.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, old, EpollEvent::default());
        }
        if let Some(new) = fd {
            match self.epoll.ctl(
                ControlOperation::Add,
                new,
                EpollEvent::new(EventSet::IN, SERVER_TOKEN),
            ) {
                Ok(()) => self.server_fd = Some(new),
                Err(e) => warn!("{}: cannot poll the server's event fd: {e}", self.name),
            }
        }
    }

    fn handle(&mut self, work: Work) {
        let mut out = Outlet::new(self.channel, self.peer_max_msg);
        let status = |tag, kind: Kind| TunnelMessage {
            channel: self.channel,
            tag,
            body: Body::Status {
                kind: kind as u16,
                status: 0,
            },
        };
        match work {
            Work::Frame(frame) => {
                let mut dma = TunnelDma {
                    port: &mut *self.port,
                    channel: self.channel,
                };
                let header = frame.header;
                self.server.vfio_user(frame, &mut dma, &mut out);
                out.carried_out(&header);
            }
            Work::SessionStart(tag) => out.push(status(tag, Kind::SessionStart)),
            Work::SessionEnd(tag) => {
                self.server.client_disconnected();
                out.push(status(tag, Kind::SessionEnd));
            }
            Work::Windows(w) => {
                // SAFETY: see `SharedWindows`.
                unsafe { self.server.set_windows(w.base, w.len) };
            }
            Work::PeerMaxMsg(max) => self.peer_max_msg = max,
        }
        let (done, messages): (Vec<_>, Vec<_>) = out
            .take()
            .into_iter()
            .partition(|m| matches!(m.body, Body::PostedDone { .. }));
        if let Some(last) = done.into_iter().last() {
            self.done = Some(last);
        }
        self.port.send(messages);
    }
}
