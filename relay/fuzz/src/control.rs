//! Target `tunnel_control`: the tunnel's control messages as the relay handles them
//! ([`vfu_relay::tunnel::dispatch`] of every kind the device VM may send, and of those
//! it may not), with the clients, channels and device-VM connections around them
//! coming and going: clients connect, send requests (with memfds and eventfds) and
//! answer the relay's DMA commands or not, then leave; devices are added and removed;
//! requests time out; the device VM restarts (a second HELLO) or its VMM disconnects;
//! its driver stops taking messages for a while.
//!
//! The device VM's messages are built from the input (HELLO, replies to the relay's
//! requests and to forwarded vfio-user requests, IRQs, DMA requests, errors, kinds
//! only the relay may send, unknown kinds, raw bytes) and decoded as the link decodes
//! them. The relay's messages arrive in a well-behaved driver's `h2g` buffers
//! ([`H2gDriver`]).
//!
//! Checked after every step:
//! - every message of the relay decodes and fits the driver's limit;
//! - the relay sends requests (CHANNEL_UP, SESSION_START, vfio-user requests, ...)
//!   only on channels it exports, CHANNEL_UP with the channel's name, and nothing
//!   that is not a reply on a channel after its CHANNEL_DOWN;
//! - every reply of the relay answers a request of the current device VM on that
//!   channel and tag (no second answer, no answer to a previous device VM); every ERROR
//!   names a message the device VM sent (or nothing);
//! - no two vfio-user requests in flight on a channel carry the same message ID;
//! - the clients' checks ([`ClientSide::pump`]);
//! - no step makes the relay's state grow by more than a small bound (the HELLO and
//!   CHANNEL_UP replies that bring back every client's setup aside).
//!
//! After the device VM's VMM disconnects, and at the end: every client request has
//! been answered; once the clients left too, the relay holds nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfu_proto::tunnel::{
    features, Body, DmaSegment, Hello, HelloReply, IrqTrigger, Kind, Slot, TunnelError,
    TunnelHeader, TunnelMessage, VfioUserFrame,
};
use vfu_proto::vfio_user::{
    Capabilities, Command, DeviceFeature, DmaMap, DmaUnmap, GetInfoRequest, Header, IrqData,
    MessageType, MigDataRead, MultiWrite, RegionAccess, RegionWrite, Request, SetIrqs, Version,
    IRQ_SET_ACTION_TRIGGER,
};
use vfu_relay::fuzzing::{self, Counts};
use vfu_relay::switch::Relay;
use vfu_relay::tunnel::{dispatch, Incoming};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::env::{
    device, eventfd, good_reply, memfd, memory, relay, Answer, ClientSide, Frontend, H2gDriver,
    Memory, Ring,
};
use crate::input::{Input, Script};

/// Queue pairs the relay offers.
const PAIRS: u16 = 2;
/// `h2g` buffers per queue, and their size.
const BUFFERS: u16 = 32;
const BUFFER_SIZE: u32 = 4096;
/// Where the `h2g` buffers of pair p lie.
fn buffers(p: usize) -> u64 {
    0x8000 + p as u64 * 0x2_0000
}
const MEM_SIZE: usize = 0x8000 + 2 * 0x2_0000;

/// Most steps of one input.
const MAX_STEPS: usize = 256;
/// Most flush rounds after a step (a 1 MiB message takes 8 with 32 buffers of 4 KiB).
const MAX_ROUNDS: usize = 64;
/// How many recent relay requests and forwarded requests the device VM may answer.
const REMEMBERED: usize = 64;

/// Step codes.
pub mod op {
    /// `what: u8, ...`: a message of the device VM (see [`super::Target::device`]).
    pub const DEVICE: u8 = 0;
    /// `blob`: raw bytes from the device VM.
    pub const RAW: u8 = 1;
    /// `sel: u8`: a client connects to an exported device.
    pub const CONNECT: u8 = 2;
    /// `sel: u8, what: u8, ...`: a client sends a request.
    pub const REQUEST: u8 = 3;
    /// `sel: u8, how: u8`: a client answers the relay's oldest DMA command.
    pub const ANSWER: u8 = 4;
    /// `sel: u8`: a client disconnects.
    pub const GONE: u8 = 5;
    /// `tenths: u8`: time passes (requests and removals time out).
    pub const TIME: u8 = 6;
    /// A device is added.
    pub const ADD: u8 = 7;
    /// `sel: u8`: a device is removed.
    pub const REMOVE: u8 = 8;
    /// The device VM's VMM disconnects and a new one connects.
    pub const RECONNECT: u8 = 9;
    /// `on: u8`: the driver stops (odd) or resumes (even) taking messages.
    pub const STARVE: u8 = 10;
    /// Number of codes.
    pub const COUNT: u8 = 11;
}

/// Kinds of device messages (first byte after [`op::DEVICE`]).
pub mod dev {
    /// `flags: u8, major: u16, pairs: u8, max: u8, features: u8, tag: u16`.
    pub const HELLO: u8 = 0;
    /// `sel: u8, status: u8, kind: u16 (used if flags say so), flags: u8`: a reply to
    /// one of the relay's requests.
    pub const STATUS: u8 = 1;
    /// `sel: u8, how: u8, errno: u8, blob`: a reply to a forwarded vfio-user request.
    pub const VFIO_REPLY: u8 = 2;
    /// `ch: u8, command: u16, blob`: a vfio-user command from the device.
    pub const VFIO_COMMAND: u8 = 3;
    /// `ch: u8, index: u8, start: u8, count: u8`.
    pub const IRQ: u8 = 4;
    /// `ch: u8, tag: u16, n: u8, (iova: u8, off: u16, len: u16)*n`.
    pub const DMA_READ: u8 = 5;
    /// As DMA_READ, then `fill: u8`.
    pub const DMA_WRITE: u8 = 6;
    /// `ch: u8, tag: u16, errno: u8, blob`.
    pub const ERROR: u8 = 7;
    /// `ch: u8, tag: u16, which: u8`: a kind only the relay sends.
    pub const WRONG_WAY: u8 = 8;
    /// `ch: u8, tag: u16, kind: u8, reply: u8, blob`: an unknown kind.
    pub const UNKNOWN: u8 = 9;
    /// `sel: u8, msg_id: u16, flags: u8`: POSTED_DONE for a posted request the relay
    /// forwarded (flags bit 0: for `msg_id` on a channel `sel` picks instead).
    pub const POSTED_DONE: u8 = 10;
    /// Number of kinds.
    pub const COUNT: u8 = 11;
}

/// Client requests (byte after the channel selector of [`op::REQUEST`]; bit 7: posted).
pub mod req {
    /// `major: u8, xfer: u8`.
    pub const VERSION: u8 = 0;
    /// `region: u8, offset: u16, count: u8`.
    pub const REGION_READ: u8 = 1;
    /// `region: u8, offset: u16, blob`.
    pub const REGION_WRITE: u8 = 2;
    /// `iova: u8, pages: u8, flags: u8, fd: u8`.
    pub const DMA_MAP: u8 = 3;
    /// `which: u8`.
    pub const DMA_UNMAP: u8 = 4;
    /// `how: u8, index: u8, start: u8, count: u8`.
    pub const SET_IRQS: u8 = 5;
    /// `which: u8, index: u8`.
    pub const INFO: u8 = 6;
    /// `which: u8, size: u32`.
    pub const MIGRATION: u8 = 7;
    /// `command: u16, blob`.
    pub const RAW: u8 = 8;
    /// `n: u8`.
    pub const WRITE_MULTI: u8 = 9;
    /// Number of kinds.
    pub const COUNT: u8 = 10;
    /// The request is posted (NO_REPLY).
    pub const POSTED: u8 = 0x80;
}

/// A vfio-user request the relay forwarded, which the device VM may answer.
#[derive(Debug, Clone)]
struct Forwarded {
    channel: u32,
    header: Header,
    payload: Vec<u8>,
    slots: usize,
}

struct Target {
    relay: Arc<Relay>,
    mem: Memory,
    rings: Vec<Ring>,
    fe: Frontend,
    drivers: Vec<H2gDriver>,
    starving: bool,
    /// Largest message the driver takes (its last HELLO's).
    driver_max: usize,
    clients: BTreeMap<u32, ClientSide>,
    /// The DMA maps each channel's client asked for: IOVA, size.
    maps: BTreeMap<u32, Vec<(u64, u64)>>,
    /// Every channel id the relay gave out, and the names.
    names: BTreeMap<u32, String>,
    active: BTreeSet<u32>,
    /// Channels the relay sent CHANNEL_DOWN for.
    down: BTreeSet<u32>,
    added: usize,
    /// The relay's requests the device VM has not answered: channel, tag, kind.
    relay_requests: Vec<(u32, u32, u16)>,
    forwarded: Vec<Forwarded>,
    /// Posted requests the relay forwarded (POSTED_DONE): channel, message ID.
    posted: Vec<(u32, u16)>,
    /// Relay message IDs in flight, per channel (current device VM).
    in_flight: HashSet<(u32, u16)>,
    /// The current device VM's requests that want a reply, by channel and tag.
    device_requests: HashMap<(u32, u32), usize>,
    /// Channel and tag of every message the device VM sent (ERROR names one).
    device_sent: HashSet<(u32, u32)>,
    /// The interrupt eventfds each channel's client passed (it keeps a duplicate):
    /// index, vector.
    irq_fds: BTreeMap<u32, Vec<(u32, u32, std::fs::File)>>,
    /// The IRQ messages of the device VM in this step: channel and trigger.
    raised: Vec<(u32, IrqTrigger)>,
    /// Eventfds found signalled (each checked).
    signalled: usize,
}

fn units(c: &Counts) -> usize {
    c.link.queued
        + c.link.parked
        + c.channels.pending
        + c.channels.remote_ops
        + c.channels.retired_sessions
        + c.channels.clients
        + c.channels.dma_regions
        + c.channels.irq_fds
        + c.retiring
        + c.active
}

impl Target {
    fn new(devices: usize) -> Self {
        let relay = relay(devices, PAIRS);
        let mem = memory(&[(0, MEM_SIZE)]);
        let rings: Vec<Ring> = (0..2 * PAIRS as usize)
            .map(|q| Ring::standard(q, BUFFERS))
            .collect();
        let fe = Frontend::connect(&relay, &mem, &rings, false);
        let drivers = Self::drivers(&mem, &rings);
        relay
            .link
            .attach_vrings(relay.link.generation(), 0, &fe.vrings);
        let names = relay
            .channels()
            .iter()
            .map(|ch| (ch.id, ch.name.clone()))
            .collect::<BTreeMap<_, _>>();
        let active = names.keys().copied().collect();
        Self {
            relay,
            mem,
            rings,
            fe,
            drivers,
            starving: false,
            driver_max: 0,
            clients: BTreeMap::new(),
            maps: BTreeMap::new(),
            names,
            active,
            down: BTreeSet::new(),
            added: 0,
            relay_requests: Vec::new(),
            forwarded: Vec::new(),
            posted: Vec::new(),
            in_flight: HashSet::new(),
            device_requests: HashMap::new(),
            device_sent: HashSet::new(),
            irq_fds: BTreeMap::new(),
            raised: Vec::new(),
            signalled: 0,
        }
    }

    fn drivers(mem: &Memory, rings: &[Ring]) -> Vec<H2gDriver> {
        (0..PAIRS as usize)
            .map(|p| H2gDriver::new(mem, rings[2 * p], buffers(p), BUFFER_SIZE))
            .collect()
    }

    /// A channel id: an exported one mostly, else any the relay gave out, 0, or one it
    /// never did.
    fn channel(&self, sel: u8) -> u32 {
        let all: Vec<u32> = self.names.keys().copied().collect();
        let active: Vec<u32> = self.active.iter().copied().collect();
        match sel {
            0..=199 if !active.is_empty() => active[usize::from(sel) % active.len()],
            200..=239 if !all.is_empty() => all[usize::from(sel) % all.len()],
            240..=247 => 0,
            _ => u32::MAX - u32::from(sel),
        }
    }

    /// A connected client's channel.
    fn client_channel(&self, sel: u8) -> Option<u32> {
        let ids: Vec<u32> = self.clients.keys().copied().collect();
        (!ids.is_empty()).then(|| ids[usize::from(sel) % ids.len()])
    }

    /// An IOVA some client mapped (or not).
    fn iova(&self, sel: u8) -> u64 {
        let all: Vec<u64> = self.maps.values().flatten().map(|m| m.0).collect();
        match sel {
            0..=223 if !all.is_empty() => all[usize::from(sel) % all.len()],
            224..=239 => u64::from(sel) << 20,
            _ => u64::MAX - 4095,
        }
    }

    /// Hands bytes of the device VM to the relay as one message, as the link decodes
    /// them, noting what the device VM may get back: a reply to a request of the kinds
    /// that have one (an unknown kind included: ENOSYS), an ERROR for what it sent.
    fn deliver_device(&mut self, bytes: Vec<u8>) {
        if crate::tracing() {
            eprintln!(
                "  device sends {:?}",
                TunnelMessage::decode(&bytes, usize::MAX)
            );
        }
        match TunnelMessage::decode(&bytes, usize::MAX) {
            Ok(m) => {
                self.device_sent.insert((m.channel, m.tag));
                if let Body::Irq(t) = m.body {
                    self.raised.push((m.channel, t));
                }
                let (kind, reply) = m.body.kind();
                let wants_reply =
                    !reply && matches!(Kind::from_u16(kind), Some(Kind::DmaRead | Kind::DmaWrite));
                if let Body::Hello(h) = &m.body {
                    // The driver restarted: it forgets what it had, and expects the
                    // reply on channel 0.
                    self.device_requests.clear();
                    self.in_flight.clear();
                    *self.device_requests.entry((0, m.tag)).or_default() += 1;
                    self.driver_max = (h.max_msg_size as usize).min(self.relay.link.max_msg_size);
                    for d in &mut self.drivers {
                        d.forget_partial();
                    }
                } else if wants_reply {
                    *self.device_requests.entry((m.channel, m.tag)).or_default() += 1;
                }
            }
            Err(e) => match TunnelHeader::decode(&bytes) {
                Ok(h) => {
                    self.device_sent.insert((h.channel, h.tag));
                    if matches!(e, TunnelError::UnknownKind { .. }) {
                        *self.device_requests.entry((h.channel, h.tag)).or_default() += 1;
                    }
                }
                // Not even a header: the link reports it on channel 0.
                Err(_) => {
                    self.device_sent.insert((0, 0));
                }
            },
        }
        let decoded = fuzzing::decode_g2h(bytes);
        dispatch(&self.relay, Incoming::Message(decoded));
    }

    fn send_device(&mut self, msg: TunnelMessage) {
        self.deliver_device(msg.encode());
    }

    fn device(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % dev::COUNT {
            dev::HELLO => {
                let flags = inp.u8();
                let major = inp.u16();
                let pairs = u16::from(inp.u8() % 4);
                let max = inp.u8();
                let feats = u64::from(inp.u8());
                let tag = u32::from(inp.u16());
                let max_msg_size = if max & 0x80 == 0 {
                    4096 << (max % 10)
                } else {
                    u32::from(max) * 61
                };
                let channel = if flags & 2 != 0 {
                    self.channel(inp.u8())
                } else {
                    0
                };
                self.send_device(TunnelMessage {
                    channel,
                    tag,
                    body: Body::Hello(Hello {
                        version_major: if flags & 1 == 0 { 1 } else { major },
                        version_minor: 0,
                        queue_pairs: pairs,
                        max_msg_size,
                        features: feats & (features::ALL | 0x30),
                    }),
                });
            }
            dev::STATUS => {
                let sel = usize::from(inp.u8());
                let status = inp.u8();
                let raw_kind = inp.u16();
                let flags = inp.u8();
                let (channel, tag, kind) = if self.relay_requests.is_empty() || flags & 1 != 0 {
                    (
                        self.channel(flags),
                        u32::from(raw_kind),
                        Kind::ChannelUp as u16,
                    )
                } else {
                    let i = sel % self.relay_requests.len();
                    let r = self.relay_requests[i];
                    if flags & 2 == 0 {
                        self.relay_requests.remove(i);
                    }
                    r
                };
                let kind = if flags & 4 != 0 { raw_kind } else { kind };
                let status = if status < 192 {
                    0
                } else {
                    u32::from(status - 191)
                };
                self.send_device(TunnelMessage {
                    channel,
                    tag,
                    body: Body::Status { kind, status },
                });
            }
            dev::VFIO_REPLY => {
                let sel = usize::from(inp.u8());
                let how = inp.u8();
                let errno = inp.u8();
                let junk = inp.blob().to_vec();
                if self.forwarded.is_empty() {
                    return;
                }
                let i = sel % self.forwarded.len();
                let f = if how & 0x80 == 0 {
                    self.forwarded.remove(i)
                } else {
                    self.forwarded[i].clone()
                };
                self.in_flight.remove(&(f.channel, f.header.msg_id));
                let good = || good_reply(f.header.command, &f.payload, f.slots);
                let (header, payload, slots) = match how % 8 {
                    0..=3 => match good() {
                        Some(r) => {
                            let mut p = Vec::new();
                            r.encode(&mut p);
                            (Header::reply_to(&f.header, p.len()), p, vec![])
                        }
                        None => (Header::reply_to(&f.header, 0), vec![], vec![]),
                    },
                    4 => (
                        Header::error_reply_to(&f.header, u32::from(errno)),
                        vec![],
                        vec![],
                    ),
                    5 => (Header::reply_to(&f.header, junk.len()), junk, vec![]),
                    6 => {
                        let mut p = Vec::new();
                        if let Some(r) = good() {
                            r.encode(&mut p);
                        }
                        (
                            Header::reply_to(&f.header, p.len()),
                            p,
                            vec![Slot::eventfd()],
                        )
                    }
                    _ => {
                        // For another request: the next message ID.
                        let mut h = Header::reply_to(&f.header, 0);
                        h.msg_id = h.msg_id.wrapping_add(1);
                        (h, vec![], vec![])
                    }
                };
                self.send_device(TunnelMessage::new(
                    f.channel,
                    Body::VfioUser(VfioUserFrame {
                        header,
                        payload,
                        slots,
                    }),
                ));
            }
            dev::VFIO_COMMAND => {
                let channel = self.channel(inp.u8());
                let command = inp.u16();
                let payload = inp.blob().to_vec();
                self.send_device(TunnelMessage::new(
                    channel,
                    Body::VfioUser(VfioUserFrame {
                        header: Header::command(0, command, payload.len()),
                        payload,
                        slots: vec![],
                    }),
                ));
            }
            dev::IRQ => {
                let channel = self.channel(inp.u8());
                let (index, start, count) = (inp.u8() % 6, inp.u8(), inp.u8());
                self.send_device(TunnelMessage::new(
                    channel,
                    Body::Irq(IrqTrigger {
                        index: u32::from(index),
                        start: u32::from(start),
                        count: u32::from(count),
                    }),
                ));
            }
            kind @ (dev::DMA_READ | dev::DMA_WRITE) => {
                let channel = self.channel(inp.u8());
                let tag = u32::from(inp.u16());
                let n = 1 + inp.u8() % 4;
                let segments: Vec<DmaSegment> = (0..n)
                    .map(|_| {
                        let iova = self.iova(inp.u8()).wrapping_add(u64::from(inp.u16()));
                        let len = match inp.u16() {
                            0xffff => 1 << 20,
                            l => u64::from(l),
                        };
                        DmaSegment { iova, len }
                    })
                    .collect();
                let body = if kind == dev::DMA_READ {
                    Body::DmaRead { segments }
                } else {
                    let total: u64 = segments.iter().map(|s| s.len).sum();
                    let fill = inp.u8();
                    Body::DmaWrite {
                        data: vec![fill; total.min(2 << 20) as usize],
                        segments,
                    }
                };
                self.send_device(TunnelMessage { channel, tag, body });
            }
            dev::ERROR => {
                let channel = self.channel(inp.u8());
                let tag = u32::from(inp.u16());
                let errno = u32::from(inp.u8());
                let text = String::from_utf8_lossy(inp.blob()).into_owned();
                self.send_device(TunnelMessage {
                    channel,
                    tag,
                    body: Body::Error { errno, text },
                });
            }
            dev::WRONG_WAY => {
                let channel = self.channel(inp.u8());
                let tag = u32::from(inp.u16());
                let body = match inp.u8() % 7 {
                    0 => Body::ChannelUp {
                        name: "dev1".into(),
                    },
                    1 => Body::ChannelDown,
                    2 => Body::SessionStart,
                    3 => Body::SessionEnd,
                    4 => Body::HelloReply(HelloReply {
                        status: 0,
                        version_major: 1,
                        version_minor: 0,
                        queue_pairs: 1,
                        max_msg_size: 4096,
                        features: 0,
                        shm_size: 0,
                    }),
                    5 => Body::DmaReadReply {
                        status: 0,
                        data: vec![1, 2, 3],
                    },
                    _ => Body::Doorbell { id: 1, count: 1 },
                };
                self.send_device(TunnelMessage { channel, tag, body });
            }
            dev::POSTED_DONE => {
                let sel = inp.u8();
                let raw = inp.u16();
                let flags = inp.u8();
                let (channel, msg_id) = if self.posted.is_empty() || flags & 1 != 0 {
                    (self.channel(sel), raw)
                } else {
                    let (channel, msg_id) = self.posted[usize::from(sel) % self.posted.len()];
                    // Done up to it: the earlier ones of its channel are done too.
                    let at = self
                        .posted
                        .iter()
                        .position(|&p| p == (channel, msg_id))
                        .expect("picked from the list");
                    let mut i = 0;
                    self.posted.retain(|&(c, _)| {
                        i += 1;
                        c != channel || i > at + 1
                    });
                    (channel, msg_id)
                };
                self.send_device(TunnelMessage::new(channel, Body::PostedDone { msg_id }));
            }
            _ => {
                let channel = self.channel(inp.u8());
                let tag = u32::from(inp.u16());
                let kind = 0x0d + u16::from(inp.u8());
                let reply = inp.u8() & 1 != 0;
                let body = inp.blob().to_vec();
                let header = TunnelHeader {
                    len: body.len() as u32,
                    channel,
                    kind,
                    reply,
                    tag,
                };
                let mut bytes = header.to_bytes().to_vec();
                bytes.extend_from_slice(&body);
                self.deliver_device(bytes);
            }
        }
    }

    fn raw(&mut self, inp: &mut Input<'_>) {
        let mut bytes = inp.blob().to_vec();
        // The link hands on only what its framing put together: `16 + len` bytes.
        if let Some(len) = bytes.len().checked_sub(16) {
            bytes[..4].copy_from_slice(&(len as u32).to_le_bytes());
        }
        self.deliver_device(bytes);
    }

    fn request(&mut self, inp: &mut Input<'_>) {
        let sel = inp.u8();
        let what = inp.u8();
        let posted = what & req::POSTED != 0;
        let Some(channel) = self.client_channel(sel) else {
            return;
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        let request = match (what & !req::POSTED) % req::COUNT {
            req::VERSION => {
                let major = u16::from(inp.u8() % 3 / 2);
                let xfer = match inp.u8() % 5 {
                    0 => None,
                    1 => Some(4096),
                    2 => Some(1 << 20),
                    3 => Some(4095),
                    _ => Some(u32::MAX),
                };
                Request::Version(Version {
                    major,
                    minor: 0,
                    capabilities: Some(Capabilities {
                        max_msg_fds: Some(16),
                        max_data_xfer_size: xfer,
                        ..Capabilities::default()
                    }),
                })
            }
            req::REGION_READ => {
                let (region, offset) = (u32::from(inp.u8() % 10), u64::from(inp.u16()));
                let count = match inp.u8() {
                    0xff => (1 << 20) + 1,
                    0xfe => 1 << 20,
                    c => u32::from(c),
                };
                Request::RegionRead(RegionAccess {
                    offset,
                    region,
                    count,
                })
            }
            req::REGION_WRITE => Request::RegionWrite(RegionWrite {
                region: u32::from(inp.u8() % 10),
                offset: u64::from(inp.u16()),
                data: inp.blob().to_vec(),
            }),
            req::DMA_MAP => {
                let address = u64::from(inp.u8() % 16) << 20;
                let pages = u64::from(inp.u8() % 8) + 1;
                let flags = inp.u8();
                let size = pages * 4096;
                match inp.u8() % 5 {
                    0 => {}
                    1 => fds.push(memfd(size, true, 0)),
                    2 => fds.push(memfd(size, false, 0)),
                    3 => fds.push(memfd(4096, true, 0)),
                    _ => fds.push(eventfd()),
                }
                self.maps.entry(channel).or_default().push((address, size));
                Request::DmaMap(DmaMap {
                    read: flags & 1 != 0,
                    write: flags & 2 != 0,
                    offset: 0,
                    address,
                    size,
                })
            }
            req::DMA_UNMAP => {
                let which = inp.u8();
                let maps = self.maps.get(&channel).cloned().unwrap_or_default();
                match which {
                    0..=199 if !maps.is_empty() => {
                        let (a, s) = maps[usize::from(which) % maps.len()];
                        Request::DmaUnmap(DmaUnmap::region(a, s))
                    }
                    200..=229 => Request::DmaUnmap(DmaUnmap::all()),
                    _ => Request::DmaUnmap(DmaUnmap::region(u64::from(which) << 12, 4096)),
                }
            }
            req::SET_IRQS => {
                let how = inp.u8();
                let index = u32::from(inp.u8() % 5);
                let start = u32::from(inp.u8() % 4);
                let count = u32::from(inp.u8() % 4) + 1;
                let data = match how % 3 {
                    0 => {
                        for k in 0..count {
                            let e = eventfd();
                            let mine = std::fs::File::from(e.try_clone().expect("dup"));
                            self.irq_fds
                                .entry(channel)
                                .or_default()
                                .push((index, start + k, mine));
                            fds.push(e);
                        }
                        IrqData::EventFd { assign: true }
                    }
                    1 => IrqData::EventFd { assign: false },
                    _ => IrqData::None,
                };
                Request::DeviceSetIrqs(SetIrqs {
                    action: IRQ_SET_ACTION_TRIGGER,
                    index,
                    start,
                    count: if how % 3 == 2 { 0 } else { count },
                    data,
                })
            }
            req::INFO => {
                let which = inp.u8();
                let index = u32::from(inp.u8() % 12);
                let info = GetInfoRequest { argsz: 32, index };
                match which % 4 {
                    0 => Request::DeviceGetInfo(GetInfoRequest {
                        argsz: 16,
                        index: 0,
                    }),
                    1 => Request::DeviceGetRegionInfo(info),
                    2 => Request::DeviceGetIrqInfo(GetInfoRequest { argsz: 16, index }),
                    _ => Request::DeviceReset,
                }
            }
            req::MIGRATION => {
                let which = inp.u8();
                let size = inp.u32();
                if which & 1 == 0 {
                    Request::MigDataRead(MigDataRead::new(size))
                } else {
                    Request::DeviceFeature(DeviceFeature::logging_report(
                        0,
                        u64::from(size) << 12,
                        4096,
                    ))
                }
            }
            req::RAW => {
                let command = inp.u16();
                let payload = inp.blob().to_vec();
                self.client_send(channel, |c, relay, ch| {
                    c.raw(relay, ch, command, payload, posted)
                });
                return;
            }
            _ => {
                let n = usize::from(inp.u8() % 8) + 1;
                Request::RegionWriteMulti(
                    (0..n)
                        .map(|i| MultiWrite {
                            offset: i as u64 * 4,
                            region: 0,
                            count: 4,
                            data: [i as u8; 8],
                        })
                        .collect(),
                )
            }
        };
        self.client_send(channel, |c, relay, ch| {
            c.request(relay, ch, &request, fds, posted)
        });
    }

    /// Gives the client of `channel` a message to send, if the switch would read it
    /// now; drops the client if the relay broke the connection.
    fn client_send(
        &mut self,
        channel: u32,
        f: impl FnOnce(&mut ClientSide, &Relay, &vfu_relay::channel::Channel) -> bool,
    ) {
        let Some(ch) = self.relay.channel(channel) else {
            return;
        };
        if !ClientSide::may_send(&self.relay, &ch) {
            return;
        }
        let Some(c) = self.clients.get_mut(&channel) else {
            return;
        };
        if !f(c, &self.relay, &ch) {
            self.drop_client(channel);
        }
    }

    /// What the switch does when a client goes.
    fn drop_client(&mut self, channel: u32) {
        self.irq_fds.remove(&channel);
        if self.clients.remove(&channel).is_some() {
            if let Some(ch) = self.relay.channel(channel) {
                ch.on_client_disconnected(&self.relay);
            }
        }
        self.maps.remove(&channel);
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        let before = units(&fuzzing::counts(&self.relay));
        let c = fuzzing::counts(&self.relay);
        let allowance =
            16 + 2 * (c.channels.dma_regions + c.channels.irq_fds + c.active + c.channels.clients);
        let code = inp.u8() % op::COUNT;
        if crate::tracing() {
            eprintln!("step {code}: {:?}", fuzzing::counts(&self.relay));
        }
        match code {
            op::DEVICE => self.device(inp),
            op::RAW => self.raw(inp),
            op::CONNECT => {
                let channel = self.channel(inp.u8());
                if self.active.contains(&channel) && !self.clients.contains_key(&channel) {
                    if let Some(ch) = self.relay.channel(channel) {
                        self.clients
                            .insert(channel, ClientSide::connect(&self.relay, &ch));
                    }
                }
            }
            op::REQUEST => self.request(inp),
            op::ANSWER => {
                let sel = inp.u8();
                let how = Answer::from_u8(inp.u8());
                if let Some(channel) = self.client_channel(sel) {
                    if let Some(ch) = self.relay.channel(channel) {
                        if let Some(c) = self.clients.get_mut(&channel) {
                            c.answer(&self.relay, &ch, how);
                        }
                    }
                }
            }
            op::GONE => {
                if let Some(channel) = self.client_channel(inp.u8()) {
                    self.drop_client(channel);
                }
            }
            op::TIME => {
                let later = Instant::now() + Duration::from_millis(100 * u64::from(inp.u8()));
                for ch in self.relay.channels() {
                    let outcome = ch.expire(&self.relay, later);
                    self.relay.after_send(&ch, outcome);
                }
                fuzzing::expire_retiring(&self.relay, later);
            }
            op::ADD => {
                self.added += 1;
                if let Ok(ch) = self.relay.add_channel(device(self.added)) {
                    self.names.insert(ch.id, ch.name.clone());
                    self.active.insert(ch.id);
                }
            }
            op::REMOVE => {
                let channel = self.channel(inp.u8());
                if self.active.remove(&channel) {
                    // The switch takes the client off its loop; the relay answers its
                    // requests in flight and closes the connection.
                    self.clients.remove(&channel);
                    self.maps.remove(&channel);
                    self.irq_fds.remove(&channel);
                    self.relay.remove_channel(channel);
                }
            }
            op::RECONNECT => self.reconnect(),
            _ => {
                self.starving = inp.u8() & 1 != 0;
                for d in &mut self.drivers {
                    d.repost = !self.starving;
                    if !self.starving {
                        d.release(&self.mem);
                    }
                }
            }
        }
        self.settle();
        self.check_interrupts();
        let after = fuzzing::counts(&self.relay);
        let grown = units(&after).saturating_sub(before);
        assert!(
            grown <= allowance,
            "one step grew the relay's state by {grown} (allowed {allowance}): {after:?}"
        );
        assert!(
            after.channels.remote_chunks <= after.channels.remote_ops * (256 + 64),
            "more DMA commands to clients than their operations need: {after:?}"
        );
    }

    /// Every client eventfd the relay signalled was one the device VM's IRQ of this
    /// step named: its channel, index and vector.
    fn check_interrupts(&mut self) {
        use std::io::Read;
        let raised = std::mem::take(&mut self.raised);
        for (&channel, fds) in &mut self.irq_fds {
            for (index, vector, fd) in fds {
                let mut count = [0u8; 8];
                if fd.read(&mut count).is_err() {
                    continue; // not signalled
                }
                self.signalled += 1;
                let named = raised.iter().any(|&(c, t)| {
                    c == channel
                        && t.index == *index
                        && u64::from(*vector) >= u64::from(t.start)
                        && u64::from(*vector) < u64::from(t.start) + u64::from(t.count)
                });
                assert!(
                    named,
                    "the relay signalled the eventfd of channel {channel}, index {index}, vector {vector}; the device VM raised {raised:?}"
                );
            }
        }
    }

    /// The device VM's VMM disconnects; a new one connects with new rings.
    fn reconnect(&mut self) {
        fuzzing::device_vm_gone(&self.relay);
        self.settle();
        self.check_all_answered("after the device VM's VMM disconnected");
        let _ = self
            .mem
            .memory()
            .write_slice(&vec![0u8; 0x8000], GuestAddress(0));
        self.fe = Frontend::connect(&self.relay, &self.mem, &self.rings, false);
        self.drivers = Self::drivers(&self.mem, &self.rings);
        for d in &mut self.drivers {
            d.repost = !self.starving;
        }
        self.relay
            .link
            .attach_vrings(self.relay.link.generation(), 0, &self.fe.vrings);
        self.relay_requests.clear();
        self.forwarded.clear();
        self.posted.clear();
        self.in_flight.clear();
        self.device_requests.clear();
        self.driver_max = 0;
    }

    /// Every client request has had its answer.
    fn check_all_answered(&self, when: &str) {
        for (channel, c) in &self.clients {
            assert!(
                c.awaiting.is_empty(),
                "{when}: the client of channel {channel} still waits for {:?}",
                c.awaiting
            );
        }
    }

    /// Lets the relay write what the driver takes and the clients read, checking all
    /// of it.
    fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let mut got = Vec::new();
            for p in 0..self.drivers.len() {
                self.fe.kick(2 * p);
                let max = self.driver_max.max(4096);
                match self.drivers[p].harvest(&self.mem, max) {
                    Ok(msgs) => got.extend(msgs),
                    Err(e) => panic!("h2g queue of pair {p}: {e}"),
                }
            }
            for m in &got {
                self.check_relay_message(m);
            }
            let channels: Vec<u32> = self.clients.keys().copied().collect();
            for channel in channels {
                let alive = match (self.relay.channel(channel), self.clients.get_mut(&channel)) {
                    (Some(ch), Some(c)) => match c.pump(&ch) {
                        Ok(alive) => alive,
                        Err(e) => panic!("client of channel {channel}: {e}"),
                    },
                    _ => false,
                };
                if !alive {
                    self.drop_client(channel);
                }
            }
            if self.relay.link.take_room_made(0) {
                // What the switch does: read paused clients again.
                for ch in self.relay.channels() {
                    if !self.relay.link.has_room(ch.id) {
                        continue;
                    }
                    let mut st = ch.lock();
                    if let Some(c) = st.client.as_mut().filter(|c| c.paused && c.may_read()) {
                        c.paused = false;
                    }
                }
            }
            if got.is_empty() {
                break;
            }
        }
    }

    fn check_relay_message(&mut self, m: &TunnelMessage) {
        if crate::tracing() {
            eprintln!("  relay sends {m:?}");
        }
        let (kind, reply) = m.body.kind();
        let (channel, tag) = (m.channel, m.tag);
        if reply {
            let key = match m.body {
                Body::HelloReply(_) => (0, tag),
                _ => (channel, tag),
            };
            match self.device_requests.get_mut(&key) {
                Some(n) if *n > 0 => *n -= 1,
                _ => panic!(
                    "the relay answered (channel {channel}, tag {tag}, kind {kind:#x}) though the device VM has no such request: {m:?}"
                ),
            }
            return;
        }
        if let Body::Error { .. } = m.body {
            assert!(
                self.device_sent.contains(&(channel, tag)) || (channel, tag) == (0, 0),
                "the relay reported an error for (channel {channel}, tag {tag}), which the device VM never sent: {m:?}"
            );
            return;
        }
        // A request of the relay.
        assert!(
            self.names.contains_key(&channel),
            "the relay sent {m:?} on channel {channel}, which it never exported"
        );
        assert!(
            !self.down.contains(&channel),
            "the relay sent {m:?} on channel {channel} after its CHANNEL_DOWN"
        );
        match &m.body {
            Body::ChannelUp { name } => assert_eq!(
                Some(name),
                self.names.get(&channel),
                "CHANNEL_UP with another channel's name"
            ),
            Body::ChannelDown => {
                self.down.insert(channel);
            }
            Body::VfioUser(f) => {
                assert!(
                    f.header.msg_type == MessageType::Command,
                    "the relay forwarded {:?}: not a command",
                    f.header
                );
                if f.header.no_reply {
                    // Posted: only with POSTED_DONE, and only requests whose reply the
                    // relay does not need for its own tables.
                    let posted_done = self.relay.link.features() & features::POSTED_DONE != 0;
                    let needs_reply = matches!(
                        Command::try_from(f.header.command),
                        Ok(Command::Version
                            | Command::DmaMap
                            | Command::DmaUnmap
                            | Command::DeviceSetIrqs)
                    );
                    assert!(
                        posted_done && !needs_reply,
                        "the relay forwarded {:?} posted (POSTED_DONE in force: {posted_done})",
                        f.header
                    );
                    if self.posted.len() == REMEMBERED {
                        self.posted.remove(0);
                    }
                    self.posted.push((channel, f.header.msg_id));
                } else {
                    assert!(
                        self.in_flight.insert((channel, f.header.msg_id)),
                        "two requests in flight on channel {channel} with message ID {}",
                        f.header.msg_id
                    );
                }
                if self.forwarded.len() == REMEMBERED {
                    self.forwarded.remove(0);
                }
                self.forwarded.push(Forwarded {
                    channel,
                    header: f.header,
                    payload: f.payload.clone(),
                    slots: f.slots.len(),
                });
                return;
            }
            Body::SessionStart | Body::SessionEnd => {}
            other => panic!("the relay sent the device VM {other:?}"),
        }
        if self.relay_requests.len() == REMEMBERED {
            self.relay_requests.remove(0);
        }
        self.relay_requests.push((channel, tag, kind));
    }

    /// The device VM's VMM goes: every client request is answered; the clients go: the
    /// relay holds nothing.
    fn finish(mut self) {
        fuzzing::device_vm_gone(&self.relay);
        self.settle();
        self.check_all_answered("at the end, the device VM gone");
        let channels: Vec<u32> = self.clients.keys().copied().collect();
        for channel in channels {
            self.drop_client(channel);
        }
        fuzzing::expire_retiring(&self.relay, Instant::now() + Duration::from_secs(3600));
        let counts = fuzzing::counts(&self.relay);
        assert!(
            counts.is_idle(),
            "the relay holds state after its clients and the device VM left: {counts:?}"
        );
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    execute(data).finish();
}

/// Runs the steps of one input.
fn execute(data: &[u8]) -> Target {
    let mut inp = Input::new(data);
    let devices = 1 + usize::from(inp.u8() % 3);
    let mut t = Target::new(devices);
    let mut steps = 0;
    while !inp.is_empty() && steps < MAX_STEPS {
        t.step(&mut inp);
        steps += 1;
    }
    t
}

/// Builds inputs for this target.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    s: Script,
}

impl Builder {
    /// A relay with `devices` devices (1 to 3).
    pub fn new(devices: u8) -> Self {
        let mut s = Script::default();
        s.u8(devices - 1);
        Self { s }
    }

    /// The driver's HELLO (1 pair, 1 MiB messages, DIRECT_DATA), tag `tag`.
    pub fn hello(self, tag: u16) -> Self {
        self.hello_with(0, 1, 1, 8, features::DIRECT_DATA as u8, tag)
    }

    /// A HELLO with every field given.
    pub fn hello_with(
        mut self,
        flags: u8,
        major: u16,
        pairs: u8,
        max: u8,
        f: u8,
        tag: u16,
    ) -> Self {
        self.s
            .u8(op::DEVICE)
            .u8(dev::HELLO)
            .u8(flags)
            .u16(major)
            .u8(pairs)
            .u8(max)
            .u8(f)
            .u16(tag);
        self
    }

    /// The device VM answers the relay's `sel`-th pending request with `status`.
    pub fn ack(mut self, sel: u8, status: u8) -> Self {
        self.s
            .u8(op::DEVICE)
            .u8(dev::STATUS)
            .u8(sel)
            .u8(status)
            .u16(0)
            .u8(0);
        self
    }

    /// The device VM answers the `sel`-th forwarded request (`how`: 0 right).
    pub fn reply(mut self, sel: u8, how: u8, errno: u8) -> Self {
        self.s
            .u8(op::DEVICE)
            .u8(dev::VFIO_REPLY)
            .u8(sel)
            .u8(how)
            .u8(errno)
            .blob(&[]);
        self
    }

    /// Any device message, from its kind on.
    pub fn device(mut self, kind: u8, rest: &[u8]) -> Self {
        self.s.u8(op::DEVICE).u8(kind).bytes(rest);
        self
    }

    /// A DMA request of the device VM on channel selector `ch`: segments of (IOVA
    /// selector, offset, length).
    pub fn dma(mut self, write: bool, ch: u8, tag: u16, segs: &[(u8, u16, u16)]) -> Self {
        let kind = if write { dev::DMA_WRITE } else { dev::DMA_READ };
        self.s
            .u8(op::DEVICE)
            .u8(kind)
            .u8(ch)
            .u16(tag)
            .u8(segs.len() as u8 - 1);
        for &(iova, off, len) in segs {
            self.s.u8(iova).u16(off).u16(len);
        }
        if write {
            self.s.u8(0x5c);
        }
        self
    }

    /// A client request (`what` from [`req`]) and its arguments.
    pub fn request(mut self, sel: u8, what: u8, args: &[u8]) -> Self {
        self.s.u8(op::REQUEST).u8(sel).u8(what).bytes(args);
        self
    }

    /// Any other step and its arguments.
    pub fn op(mut self, code: u8, args: &[u8]) -> Self {
        self.s.u8(code).bytes(args);
        self
    }

    /// Raw bytes from the device VM.
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.s.u8(op::RAW).blob(bytes);
        self
    }

    /// The input.
    pub fn build(self) -> Vec<u8> {
        self.s.0
    }
}

/// A client's VERSION on channel selector `sel` (1 MiB transfers).
fn version(b: Builder, sel: u8) -> Builder {
    b.request(sel, req::VERSION, &[0, 2])
}

/// Seed inputs: sessions as a device VM and clients run them, and the usual ways they
/// go wrong.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |name: &str, b: Builder| out.push((name.to_string(), b.build()));
    // HELLO, both CHANNEL_UPs answered, a client: VERSION and register access.
    let up = |devices: u8| {
        let mut b = Builder::new(devices).hello(1);
        for _ in 0..devices {
            b = b.ack(0, 0);
        }
        b
    };
    let session = |b: Builder| {
        // CONNECT: SESSION_START (answered); VERSION answered.
        version(b.op(op::CONNECT, &[0]).ack(0, 0), 0).reply(0, 0, 0)
    };
    add(
        "session_register_access",
        session(up(2))
            .request(0, req::REGION_WRITE, &[2, 4, 0, 1, 0, 0x5a])
            .reply(0, 0, 0)
            .request(0, req::REGION_READ, &[2, 4, 0, 1])
            .reply(0, 0, 0)
            .request(0, req::REGION_WRITE | req::POSTED, &[2, 4, 0, 1, 0, 0x5b])
            .reply(0, 0, 0)
            .request(0, req::INFO, &[0, 0])
            .reply(0, 0, 0)
            .op(op::GONE, &[0])
            .ack(0, 0),
    );
    add(
        "dma_copy_path",
        session(up(1))
            .request(0, req::DMA_MAP, &[1, 2, 3, 1])
            .reply(0, 0, 0)
            .dma(false, 0, 9, &[(0, 0, 100), (0, 4000, 200)])
            .dma(true, 0, 10, &[(0, 16, 64)])
            .dma(false, 0, 11, &[(230, 0, 16)])
            .request(0, req::DMA_UNMAP, &[0])
            .reply(0, 0, 0),
    );
    add(
        "dma_through_the_client",
        session(up(1))
            .request(0, req::DMA_MAP, &[2, 1, 3, 0])
            .reply(0, 0, 0)
            .dma(false, 0, 12, &[(0, 0, 5000)])
            .op(op::ANSWER, &[0, 0])
            .op(op::ANSWER, &[0, 0])
            .dma(true, 0, 13, &[(0, 8, 16)])
            .op(op::ANSWER, &[0, 3])
            .dma(false, 0, 14, &[(0, 0, 16)])
            .op(op::GONE, &[0]),
    );
    add(
        "interrupts",
        session(up(1))
            .request(0, req::SET_IRQS, &[0, 2, 0, 1])
            .reply(0, 0, 0)
            .device(dev::IRQ, &[0, 2, 0, 2])
            .request(0, req::SET_IRQS, &[2, 2, 0, 0])
            .reply(0, 0, 0),
    );
    add(
        "remove_with_requests_in_flight",
        session(up(2))
            .request(0, req::DMA_MAP, &[1, 2, 3, 1])
            .request(0, req::REGION_READ, &[7, 0, 0, 4])
            .op(op::REMOVE, &[0])
            .ack(0, 0)
            .ack(0, 0)
            .op(op::TIME, &[50]),
    );
    add(
        "add_device",
        up(1)
            .op(op::ADD, &[])
            .ack(0, 0)
            .op(op::CONNECT, &[1])
            .ack(0, 0),
    );
    add(
        "device_vm_restarts",
        session(up(1))
            .request(0, req::DMA_MAP, &[1, 2, 3, 1])
            .reply(0, 0, 0)
            .request(0, req::SET_IRQS, &[0, 2, 0, 1])
            .reply(0, 0, 0)
            .request(0, req::REGION_READ, &[2, 0, 0, 4])
            .hello(2)
            .ack(0, 0)
            .ack(0, 0)
            .reply(0, 0, 0)
            .reply(0, 0, 0)
            .op(op::RECONNECT, &[])
            .hello(3)
            .ack(0, 0),
    );
    add(
        "driver_falls_behind",
        session(up(1))
            .op(op::STARVE, &[1])
            .request(0, req::REGION_READ, &[2, 0, 0, 0xfe])
            .reply(0, 0, 0)
            .request(0, req::REGION_READ, &[2, 0, 0, 0xfe])
            .reply(0, 0, 0)
            .op(op::STARVE, &[0]),
    );
    add(
        "requests_time_out",
        session(up(1))
            .request(0, req::REGION_READ, &[2, 0, 0, 4])
            .request(0, req::DMA_MAP, &[3, 1, 3, 2])
            .op(op::TIME, &[40])
            .reply(0, 0, 0)
            .reply(0, 0, 0),
    );
    add(
        "wrong_messages",
        up(2)
            .hello_with(1, 2, 1, 8, 0, 5)
            .device(dev::WRONG_WAY, &[0, 1, 0, 0])
            .device(dev::UNKNOWN, &[0, 2, 0, 1, 0, 0, 0])
            .device(dev::ERROR, &[0, 3, 0, 5, 2, 0, b'n', b'o'])
            .device(dev::VFIO_COMMAND, &[0, 1, 0, 0, 0])
            .device(dev::IRQ, &[250, 0, 0, 1])
            .dma(false, 245, 4, &[(0, 0, 8)])
            .raw(&[1, 2, 3])
            .raw(&TunnelMessage::new(1, Body::ChannelDown).encode()[..12])
            .raw(
                &TunnelMessage::new(
                    1,
                    Body::DmaRead {
                        segments: vec![DmaSegment { iova: 0, len: 8 }],
                    },
                )
                .encode()[..28],
            ),
    );
    add("posted_done", {
        let b = Builder::new(1)
            .hello_with(
                0,
                1,
                1,
                8,
                (features::DIRECT_DATA | features::POSTED_DONE) as u8,
                1,
            )
            .ack(0, 0);
        version(b.op(op::CONNECT, &[0]).ack(0, 0), 0)
            .reply(0, 0, 0)
            .request(0, req::REGION_WRITE | req::POSTED, &[2, 4, 0, 1, 0, 0x5a])
            .request(0, req::REGION_WRITE | req::POSTED, &[2, 4, 0, 1, 0, 0x5b])
            .request(0, req::DMA_MAP | req::POSTED, &[1, 2, 3, 1])
            .device(dev::POSTED_DONE, &[1, 0, 0, 0])
            .reply(0, 0, 0)
            .request(0, req::REGION_WRITE | req::POSTED, &[2, 4, 0, 1, 0, 0x5c])
            .device(dev::POSTED_DONE, &[0, 9, 0, 1])
    });
    add(
        "bad_replies",
        session(up(1))
            .request(0, req::REGION_READ, &[2, 0, 0, 4])
            .reply(0, 5, 0)
            .request(0, req::REGION_READ, &[2, 0, 0, 4])
            .reply(0, 6, 0)
            .request(0, req::REGION_READ, &[2, 0, 0, 4])
            .reply(0, 7, 0)
            .request(0, req::REGION_READ, &[2, 0, 0, 4])
            .reply(0, 4, 5),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        crate::seed(seeds(), name)
    }

    /// Every seed runs through the target without a finding.
    #[test]
    fn seeds_pass() {
        crate::run_seeds(seeds(), run);
    }

    /// The seeds reach what they are named for: a session's requests answered, the
    /// client's eventfd signalled by an IRQ, DMA commands to a client answered, a
    /// removed channel's CHANNEL_DOWN.
    #[test]
    fn seeds_reach_their_paths() {
        let t = execute(&seed("session_register_access"));
        assert!(t.clients.is_empty() && t.forwarded.is_empty());
        t.finish();
        let t = execute(&seed("interrupts"));
        assert_eq!(t.signalled, 2, "vectors 0 and 1 of MSI-X, raised once");
        assert_eq!(t.clients[&1].replies, 3, "VERSION and two SET_IRQS");
        assert_eq!(t.clients[&1].errors, 0);
        t.finish();
        let t = execute(&seed("remove_with_requests_in_flight"));
        assert!(t.down.contains(&1));
        t.finish();
        let t = execute(&seed("dma_copy_path"));
        assert_eq!(t.clients[&1].replies, 3, "VERSION, DMA_MAP, DMA_UNMAP");
        assert_eq!(t.clients[&1].errors, 0);
        t.finish();
    }
}
