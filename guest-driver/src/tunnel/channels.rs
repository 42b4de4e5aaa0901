//! The devices this driver serves, one device server per channel the relay brought up,
//! and the translation between tunnel messages and the device API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use log::{debug, info, warn};
use vfu_proto::tunnel::{Body, IrqTrigger, Kind, TunnelMessage, VfioUserFrame};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, Header, MessageType, Request, HEADER_SIZE,
};

use super::dma::{DmaPort, TunnelDma};
use crate::device::{DeviceServer, IrqSink, Response};
use crate::models;

/// A device to serve: the name the relay exports it under and the model behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSpec {
    /// Channel name (`vfu-relay --device NAME=...`).
    pub name: String,
    /// Model name (`vfu-guest --list-models`).
    pub model: String,
}

impl ServeSpec {
    /// Parses `NAME=MODEL`, checking that the model exists.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let (name, model) = arg
            .split_once('=')
            .ok_or_else(|| format!("--serve {arg:?}: expected NAME=MODEL"))?;
        if name.is_empty() || name.len() > vfu_proto::tunnel::MAX_CHANNEL_NAME {
            return Err(format!("--serve {arg:?}: name must be 1 to 64 bytes"));
        }
        models::build(model).map_err(|e| format!("--serve {arg:?}: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            model: model.to_string(),
        })
    }
}

/// Interrupts of one channel: the relay keeps the client's eventfds; the device raises
/// vectors with IRQ messages, for the vectors the client assigned.
struct TunnelIrqs {
    channel: u32,
    assigned: HashMap<(u32, u32), ()>,
    outbox: Arc<Mutex<Vec<TunnelMessage>>>,
}

impl IrqSink for TunnelIrqs {
    fn set_eventfds(
        &mut self,
        index: u32,
        start: u32,
        count: u32,
        fds: Option<Vec<std::os::fd::OwnedFd>>,
    ) {
        // No fds exist inside the device VM; treat as slots.
        self.assign_slots(index, start, count, fds.is_some());
    }

    fn assign_slots(&mut self, index: u32, start: u32, count: u32, assigned: bool) {
        for v in start..start.saturating_add(count) {
            if assigned {
                self.assigned.insert((index, v), ());
            } else {
                self.assigned.remove(&(index, v));
            }
        }
    }

    fn trigger(&mut self, index: u32, vector: u32) {
        if self.assigned.contains_key(&(index, vector)) {
            let msg = TunnelMessage::new(
                self.channel,
                Body::Irq(IrqTrigger {
                    index,
                    start: vector,
                    count: 1,
                }),
            );
            self.outbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(msg);
        }
    }

    fn clear(&mut self) {
        self.assigned.clear();
    }
}

/// The channels the relay brought up.
pub struct Channels {
    serve: Vec<ServeSpec>,
    /// Where shared memory region 0 is mapped, once HELLO enabled windows.
    windows: Option<(*mut u8, usize)>,
    /// Largest message the relay accepts (from its HELLO reply).
    peer_max_msg: usize,
    servers: HashMap<u32, (String, DeviceServer)>,
    outbox: Arc<Mutex<Vec<TunnelMessage>>>,
}

impl Channels {
    /// No channel up yet; `serve` lists what may be brought up.
    pub fn new(serve: Vec<ServeSpec>) -> Self {
        Self {
            serve,
            windows: None,
            peer_max_msg: vfu_proto::tunnel::MIN_MSG_SIZE as usize,
            servers: HashMap::new(),
            outbox: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Handles one message from the relay; returns the messages to send back. `port`
    /// carries the models' copy-path DMA.
    pub fn handle(
        &mut self,
        channel: u32,
        tag: u32,
        body: Body,
        port: &mut dyn DmaPort,
    ) -> Vec<TunnelMessage> {
        let status = |kind: Kind, status: u32| TunnelMessage {
            channel,
            tag,
            body: Body::Status {
                kind: kind as u16,
                status,
            },
        };
        let mut out = match body {
            Body::ChannelUp { name } => {
                vec![status(Kind::ChannelUp, self.channel_up(channel, name))]
            }
            Body::ChannelDown => {
                if let Some((name, _)) = self.servers.remove(&channel) {
                    info!("{name}: channel {channel} down");
                }
                vec![status(Kind::ChannelDown, 0)]
            }
            Body::SessionStart => {
                let errno = if self.servers.contains_key(&channel) {
                    0
                } else {
                    libc::ENOENT as u32
                };
                vec![status(Kind::SessionStart, errno)]
            }
            Body::SessionEnd => {
                let errno = match self.servers.get_mut(&channel) {
                    Some((name, server)) => {
                        debug!("{name}: client disconnected");
                        server.client_disconnected();
                        0
                    }
                    None => libc::ENOENT as u32,
                };
                vec![status(Kind::SessionEnd, errno)]
            }
            Body::VfioUser(frame) => self.vfio_user(channel, frame, port),
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
        };
        out.append(&mut self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        out
    }

    /// DMA windows are mapped at `base` (`len` bytes): DMA maps that come with a window
    /// slot are reached there, by every device server now and later.
    pub fn set_windows(&mut self, base: *mut u8, len: usize) {
        self.windows = Some((base, len));
        for (_, server) in self.servers.values_mut() {
            // SAFETY: the transport keeps the shared memory region mapped for as long as
            // the engine (and so every server) lives.
            unsafe { server.set_windows(base, len) };
        }
    }

    /// The relay accepts messages up to `max` bytes.
    pub fn set_peer_max_msg(&mut self, max: usize) {
        self.peer_max_msg = max;
    }

    /// The event fds of the served models (channel, fd), to poll.
    pub fn event_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        self.servers
            .iter()
            .filter_map(|(&ch, (_, server))| server.event_fd().map(|fd| (ch, fd.as_raw_fd())))
            .collect()
    }

    /// Lets the model of `channel` do work it announced on its event fd; returns the
    /// messages (interrupts) that resulted.
    pub fn service(&mut self, channel: u32, port: &mut dyn DmaPort) -> Vec<TunnelMessage> {
        if let Some((_, server)) = self.servers.get_mut(&channel) {
            server.service(&mut TunnelDma { port, channel });
        }
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn channel_up(&mut self, channel: u32, name: String) -> u32 {
        if let Some((existing, _)) = self.servers.get(&channel) {
            if *existing == name {
                // The relay came back: the device keeps its state.
                return 0;
            }
        }
        let Some(spec) = self.serve.iter().find(|s| s.name == name) else {
            info!("channel {channel} ({name}): not served here");
            return libc::ENODEV as u32;
        };
        let model = match models::build(&spec.model) {
            Ok(m) => m,
            Err(e) => {
                warn!("{name}: {e}");
                return libc::ENODEV as u32;
            }
        };
        let irqs = TunnelIrqs {
            channel,
            assigned: HashMap::new(),
            outbox: self.outbox.clone(),
        };
        let mut server = DeviceServer::new(model, Box::new(irqs));
        if let Some((base, len)) = self.windows {
            // SAFETY: as in `set_windows`.
            unsafe { server.set_windows(base, len) };
        }
        info!("{name}: channel {channel} up, model {}", spec.model);
        self.servers.insert(channel, (name, server));
        0
    }

    fn vfio_user(
        &mut self,
        channel: u32,
        frame: VfioUserFrame,
        port: &mut dyn DmaPort,
    ) -> Vec<TunnelMessage> {
        let header = frame.header;
        let Some((name, server)) = self.servers.get_mut(&channel) else {
            warn!("vfio-user message for channel {channel}, which is not up");
            if header.msg_type == MessageType::Command && !header.no_reply {
                return reply_frame(channel, encode_error_reply(&header, libc::ENODEV as u32));
            }
            return Vec::new();
        };
        if header.msg_type != MessageType::Command {
            debug!("{name}: reply from the relay ignored (no requests toward clients yet)");
            return Vec::new();
        }
        let request = match Request::decode(header.command, &frame.payload, frame.slots.len()) {
            Ok(r) => r,
            Err(e) => {
                debug!("{name}: bad request: {e}");
                if header.no_reply {
                    return Vec::new();
                }
                return reply_frame(channel, encode_error_reply(&header, e.errno()));
            }
        };
        let mut dma = TunnelDma { port, channel };
        match server.handle_tunnel(&header, request, &frame.slots, &mut dma) {
            Response::Reply { reply, fds } => {
                if !fds.is_empty() {
                    warn!("{name}: a reply with fds cannot cross the tunnel; EIO");
                    return reply_frame(channel, encode_error_reply(&header, libc::EIO as u32));
                }
                let bytes = encode_reply(header.msg_id, &reply);
                if bytes.len() + TUNNEL_OVERHEAD > self.peer_max_msg {
                    warn!(
                        "{name}: reply of {} bytes exceeds what the relay accepts",
                        bytes.len()
                    );
                    return reply_frame(channel, encode_error_reply(&header, libc::E2BIG as u32));
                }
                reply_frame(channel, bytes)
            }
            Response::Error(errno) => reply_frame(channel, encode_error_reply(&header, errno)),
            Response::NoReply => Vec::new(),
        }
    }
}

/// Tunnel header bytes around a vfio-user message.
const TUNNEL_OVERHEAD: usize = vfu_proto::tunnel::TUNNEL_HEADER_SIZE;

/// A vfio-user message (header and payload) as a VFIO_USER tunnel message.
fn reply_frame(channel: u32, bytes: Vec<u8>) -> Vec<TunnelMessage> {
    let Ok(header) = Header::decode(&bytes) else {
        return Vec::new();
    };
    vec![TunnelMessage::new(
        channel,
        Body::VfioUser(VfioUserFrame {
            header,
            payload: bytes[HEADER_SIZE..].to_vec(),
            slots: Vec::new(),
        }),
    )]
}
