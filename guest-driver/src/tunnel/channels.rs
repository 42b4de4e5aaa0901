//! The channels the relay brought up, each with its device server, run on the engine
//! thread or, once its calls may wait ([`ChannelServer::may_block`]), on a thread of its
//! own ([`Worker`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use log::{debug, info, warn};
use vfu_proto::tunnel::{Body, Kind, TunnelMessage};

use super::channel_server::{ChannelServer, Outlet};
use super::dma::{DmaPort, TunnelDma};
use super::io::ThreadPort;
use super::model_channel::ModelChannel;
use super::worker::{SharedWindows, Work, Worker};
use crate::bridge::{Bridge, BridgeConfig};
use crate::models;
use crate::transport::WindowFds;

/// What serves a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// A device model of this name (`vfu-guest --list-models`), through the device API.
    Model(String),
    /// A vfio-user server in the device VM listening on this socket, through the
    /// bridge ([`crate::bridge`]).
    Bridge(PathBuf),
}

/// A device to serve: the name the relay exports it under and what serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSpec {
    /// Channel name (`vfu-relay --device NAME=...`).
    pub name: String,
    /// The model or bridged server behind it.
    pub server: Served,
}

impl ServeSpec {
    /// Parses `--serve NAME=MODEL`, checking that the model exists.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let (name, model) = arg
            .split_once('=')
            .ok_or_else(|| format!("--serve {arg:?}: expected NAME=MODEL"))?;
        check_name(name).map_err(|e| format!("--serve {arg:?}: {e}"))?;
        models::build(model).map_err(|e| format!("--serve {arg:?}: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            server: Served::Model(model.to_string()),
        })
    }

    /// Parses `--bridge NAME=SOCKET`: the vfio-user server listening on SOCKET serves
    /// device NAME. The socket need not exist yet.
    pub fn parse_bridge(arg: &str) -> Result<Self, String> {
        let (name, socket) = arg
            .split_once('=')
            .ok_or_else(|| format!("--bridge {arg:?}: expected NAME=SOCKET"))?;
        check_name(name).map_err(|e| format!("--bridge {arg:?}: {e}"))?;
        if socket.is_empty() {
            return Err(format!("--bridge {arg:?}: empty socket path"));
        }
        Ok(Self {
            name: name.to_string(),
            server: Served::Bridge(PathBuf::from(socket)),
        })
    }

    /// Checks a set of specs: every name served once.
    pub fn check_all(specs: &[ServeSpec]) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for s in specs {
            if !seen.insert(s.name.as_str()) {
                return Err(format!(
                    "device {:?} is given more than once (--serve and --bridge names must differ)",
                    s.name
                ));
            }
        }
        Ok(())
    }

    /// A server for this device.
    fn build(
        &self,
        window_fds: Option<&Arc<dyn WindowFds>>,
    ) -> Result<Box<dyn ChannelServer>, String> {
        match &self.server {
            Served::Model(model) => {
                let model = models::build(model).map_err(|e| e.to_string())?;
                Ok(Box::new(ModelChannel::new(&self.name, model)))
            }
            Served::Bridge(socket) => {
                let bridge = Bridge::new(
                    &self.name,
                    socket,
                    window_fds.cloned(),
                    BridgeConfig::default(),
                )
                .map_err(|e| format!("bridge to {}: {e}", socket.display()))?;
                Ok(Box::new(bridge))
            }
        }
    }
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Served::Model(m) => write!(f, "model {m}"),
            Served::Bridge(p) => write!(f, "bridge to {}", p.display()),
        }
    }
}

/// Checks a channel name as the relay does.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > vfu_proto::tunnel::MAX_CHANNEL_NAME {
        return Err("name must be 1 to 64 bytes".into());
    }
    Ok(())
}

/// Where a channel's server runs.
enum Runner {
    /// On the engine thread: its calls never wait.
    Inline(Box<dyn ChannelServer>),
    /// On its own thread.
    Thread(Worker),
}

struct Channel {
    name: String,
    runner: Runner,
}

/// Starts channel threads: gives each a port onto the engine's I/O half.
pub type PortFactory<'a> = &'a mut dyn FnMut() -> Box<dyn ThreadPort>;

/// The channels the relay brought up.
pub struct Channels {
    serve: Vec<ServeSpec>,
    /// The transport's fds onto windows, for bridged servers.
    window_fds: Option<Arc<dyn WindowFds>>,
    /// Where shared memory region 0 is mapped, once HELLO enabled windows.
    windows: Option<(NonNull<u8>, usize)>,
    /// Largest message the relay accepts (from its HELLO reply).
    peer_max_msg: usize,
    channels: HashMap<u32, Channel>,
}

impl Channels {
    /// No channel up yet; `serve` lists what may be brought up; `window_fds` hands
    /// bridged servers the memory of windows as fds, where the transport can.
    pub fn new(serve: Vec<ServeSpec>, window_fds: Option<Arc<dyn WindowFds>>) -> Self {
        Self {
            serve,
            window_fds,
            windows: None,
            peer_max_msg: vfu_proto::tunnel::MIN_MSG_SIZE as usize,
            channels: HashMap::new(),
        }
    }

    /// Handles one message from the relay; returns the messages to send back now.
    /// `port` carries DMA of servers that run on the engine thread; `spawn` gives a
    /// channel thread its port.
    pub fn handle(
        &mut self,
        channel: u32,
        tag: u32,
        body: Body,
        port: &mut dyn DmaPort,
        spawn: PortFactory<'_>,
    ) -> Vec<TunnelMessage> {
        let status = |kind: Kind, status: u32| {
            vec![TunnelMessage {
                channel,
                tag,
                body: Body::Status {
                    kind: kind as u16,
                    status,
                },
            }]
        };
        match body {
            Body::ChannelUp { name } => {
                status(Kind::ChannelUp, self.channel_up(channel, name, spawn))
            }
            Body::ChannelDown => {
                if let Some(ch) = self.channels.remove(&channel) {
                    info!("{}: channel {channel} down", ch.name);
                }
                status(Kind::ChannelDown, 0)
            }
            Body::SessionStart => match self.channels.get_mut(&channel) {
                Some(Channel {
                    runner: Runner::Thread(w),
                    ..
                }) => {
                    w.push(Work::SessionStart(tag));
                    Vec::new()
                }
                Some(_) => status(Kind::SessionStart, 0),
                None => status(Kind::SessionStart, libc::ENOENT as u32),
            },
            Body::SessionEnd => match self.channels.get_mut(&channel) {
                Some(Channel {
                    runner: Runner::Thread(w),
                    ..
                }) => {
                    w.push(Work::SessionEnd(tag));
                    Vec::new()
                }
                Some(Channel {
                    runner: Runner::Inline(server),
                    ..
                }) => {
                    server.client_disconnected();
                    status(Kind::SessionEnd, 0)
                }
                None => status(Kind::SessionEnd, libc::ENOENT as u32),
            },
            Body::VfioUser(frame) => {
                let Some(ch) = self.channels.get_mut(&channel) else {
                    warn!("vfio-user message for channel {channel}, which is not up");
                    let header = frame.header;
                    if header.msg_type == vfu_proto::vfio_user::MessageType::Command
                        && header.no_reply
                    {
                        let mut out = Outlet::new(channel, self.peer_max_msg);
                        out.carried_out(&header);
                        return out.take();
                    }
                    if header.msg_type == vfu_proto::vfio_user::MessageType::Command
                        && !header.no_reply
                    {
                        let mut out = Outlet::new(channel, self.peer_max_msg);
                        let bytes =
                            vfu_proto::vfio_user::encode_error_reply(&header, libc::ENODEV as u32);
                        let _ = out.vfio_user(&bytes);
                        return out.take();
                    }
                    return Vec::new();
                };
                match &mut ch.runner {
                    Runner::Thread(w) => {
                        w.push(Work::Frame(frame));
                        Vec::new()
                    }
                    Runner::Inline(server) => {
                        let mut out = Outlet::new(channel, self.peer_max_msg);
                        let header = frame.header;
                        server.vfio_user(frame, &mut TunnelDma { port, channel }, &mut out);
                        out.carried_out(&header);
                        self.move_if_blocking(channel, spawn);
                        out.take()
                    }
                }
            }
            Body::Error { errno, text } => {
                warn!("relay reports error {errno} on channel {channel}: {text}");
                Vec::new()
            }
            Body::Doorbell { .. } => Vec::new(),
            other => {
                let (kind, reply) = other.kind();
                if reply {
                    debug!("unsolicited reply of kind {kind:#x} ignored");
                    Vec::new()
                } else {
                    vec![TunnelMessage {
                        channel,
                        tag,
                        body: Body::Status {
                            kind,
                            status: libc::ENOSYS as u32,
                        },
                    }]
                }
            }
        }
    }

    /// Moves an engine-thread channel whose server may now wait onto its own thread.
    /// Called between two messages, so the channel's order holds.
    fn move_if_blocking(&mut self, channel: u32, spawn: PortFactory<'_>) {
        let blocking = matches!(
            self.channels.get(&channel),
            Some(Channel { runner: Runner::Inline(server), .. }) if server.may_block()
        );
        if !blocking {
            return;
        }
        let Some(Channel {
            name,
            runner: Runner::Inline(server),
        }) = self.channels.remove(&channel)
        else {
            return;
        };
        let runner = match Worker::spawn(&name, channel, server, spawn(), self.peer_max_msg) {
            Ok(worker) => Runner::Thread(worker),
            Err((server, e)) => {
                warn!("{name}: no thread for channel {channel} ({e}); served inline");
                Runner::Inline(server)
            }
        };
        self.channels.insert(channel, Channel { name, runner });
    }

    /// DMA windows are mapped at `base` (`len` bytes): DMA maps that come with a window
    /// slot are reached there, by every device server now and later.
    ///
    /// # Safety
    /// The memory stays mapped for as long as the engine lives.
    pub unsafe fn set_windows(&mut self, base: NonNull<u8>, len: usize) {
        self.windows = Some((base, len));
        for ch in self.channels.values_mut() {
            match &mut ch.runner {
                // SAFETY: the caller keeps the memory mapped while the engine lives.
                Runner::Inline(server) => unsafe { server.set_windows(base, len) },
                Runner::Thread(w) => w.push(Work::Windows(SharedWindows { base, len })),
            }
        }
    }

    /// The relay accepts messages up to `max` bytes.
    pub fn set_peer_max_msg(&mut self, max: usize) {
        self.peer_max_msg = max;
        for ch in self.channels.values() {
            if let Runner::Thread(w) = &ch.runner {
                w.push(Work::PeerMaxMsg(max));
            }
        }
    }

    /// The event fds of the servers on the engine thread (channel, fd), to poll.
    pub fn event_fds(&self) -> Vec<(u32, RawFd)> {
        self.channels
            .iter()
            .filter_map(|(&id, ch)| match &ch.runner {
                Runner::Inline(server) => server.event_fd().map(|fd| (id, fd.as_raw_fd())),
                Runner::Thread(_) => None,
            })
            .collect()
    }

    /// Lets the server of `channel` do work it announced on its event fd; returns the
    /// messages that resulted.
    pub fn service(
        &mut self,
        channel: u32,
        port: &mut dyn DmaPort,
        spawn: PortFactory<'_>,
    ) -> Vec<TunnelMessage> {
        let mut out = Outlet::new(channel, self.peer_max_msg);
        if let Some(Channel {
            runner: Runner::Inline(server),
            ..
        }) = self.channels.get_mut(&channel)
        {
            server.service(&mut TunnelDma { port, channel }, &mut out);
            self.move_if_blocking(channel, spawn);
        }
        out.take()
    }

    fn channel_up(&mut self, channel: u32, name: String, spawn: PortFactory<'_>) -> u32 {
        if let Some(existing) = self.channels.get(&channel) {
            if existing.name == name {
                // The relay came back: the device keeps its state.
                return 0;
            }
        }
        let Some(spec) = self.serve.iter().find(|s| s.name == name) else {
            info!("channel {channel} ({name}): not served here");
            return libc::ENODEV as u32;
        };
        let mut server = match spec.build(self.window_fds.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                warn!("{name}: {e}");
                return libc::ENODEV as u32;
            }
        };
        if let Some((base, len)) = self.windows {
            // SAFETY: as in `set_windows`.
            unsafe { server.set_windows(base, len) };
        }
        info!("{name}: channel {channel} up, {}", spec.server);
        self.channels.insert(
            channel,
            Channel {
                name,
                runner: Runner::Inline(server),
            },
        );
        self.move_if_blocking(channel, spawn);
        0
    }
}
