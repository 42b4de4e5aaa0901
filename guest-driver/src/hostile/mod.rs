//! A device VM that misbehaves on purpose: the test mode of the driver that the hostile
//! device VM suite of vfu-relay runs (`tests/tests/e2e_hostile_device_vm.rs`,
//! `docs/security.md`, "Hostile device VM").
//!
//! `vfu-guest --loopback SOCKET --serve dma0=dma-engine ... --misbehave dma0:CASE[,CASE]`
//! runs the ordinary driver, serving every device as usual, and misbehaves toward the
//! relay on the channel of one device (`dma0` here) only, at well-defined moments, so
//! that a neighbour channel served by the same device VM can be checked while it
//! happens. Each case fires once, at its trigger (below); several cases of the same
//! trigger fire in the order given, one per trigger.
//!
//! | trigger | cases |
//! |---|---|
//! | the reply to a read of the device IDs (4 bytes at offset 0 of config space) | descriptor chains, ring indexes, `h2g` buffers, replies and message framing, probes the driver sends of its own (DMA requests, control kinds), floods |
//! | a DMA access of the device's model | DMA to addresses outside the client's maps or against their permission |
//! | an interrupt the model raises | interrupts for vectors, indexes or channels nobody assigned |
//! | the acknowledgement of a DMA_UNMAP | use of the memory (window or copy path) after it |
//! | the acknowledgement of a SESSION_END | acknowledging it wrongly, or not at all |
//!
//! The hooks sit where the driver's messages meet its queues ([`crate::tunnel`]'s I/O
//! half): every message it sends and receives passes [`Hostile::send`] and
//! [`Hostile::incoming`], every copy-path DMA request [`Hostile::dma_iova`]. Ring-level
//! misbehaviour goes through [`QueuePair::send_shaped`] and the index helpers of
//! [`crate::virtqueue::DriverQueue`], which the normal path never calls. Without
//! `--misbehave` the driver holds no [`Hostile`] and the hooks are one `Option` test
//! each.
//!
//! Everything the mode does is logged (`HOSTILE <case>: ...`), and so is what the relay
//! answers to the requests it makes of its own ("probes").

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use log::{info, warn};
use vfu_proto::tunnel::{
    Body, DmaSegment, IrqTrigger, Kind, Slot, SlotType, TunnelMessage, VfioUserFrame,
    TUNNEL_HEADER_SIZE,
};
use vfu_proto::vfio_user::{pci_irq, pci_region, Command, Header, MessageType, Request};

use crate::tunnel::queues::{PairError, QueuePair};
use crate::virtqueue::{
    Allocation, Descriptor, Segment, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

macro_rules! cases {
    ($($variant:ident = $name:literal, $trigger:ident: $about:literal,)*) => {
        /// One way of misbehaving.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Case {
            $(#[doc = $about] $variant,)*
        }

        impl Case {
            /// Every case.
            pub const ALL: &'static [Case] = &[$(Case::$variant,)*];

            /// The case's name on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $(Case::$variant => $name,)*
                }
            }

            /// What the case does.
            pub fn about(self) -> &'static str {
                match self {
                    $(Case::$variant => $about,)*
                }
            }

            /// When the case fires.
            pub fn trigger(self) -> Trigger {
                match self {
                    $(Case::$variant => Trigger::$trigger,)*
                }
            }
        }
    };
}

/// When a case fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The reply to a read of the device IDs (4 bytes at offset 0 of config space).
    IdRead,
    /// A DMA read of the device's model.
    DmaRead,
    /// A DMA write of the device's model.
    DmaWrite,
    /// An interrupt the device's model raises.
    Irq,
    /// The acknowledgement of a DMA_UNMAP of the device's client.
    UnmapAck,
    /// The acknowledgement of a SESSION_END of the device's channel.
    SessionEnd,
}

cases! {
    // Descriptor chains of the g2h queue (the chain carries the ID read's reply).
    ChainLoopsToItself = "chain_loops_to_itself", IdRead:
        "the reply's descriptor links to itself",
    ChainLoopsThroughTwo = "chain_loops_through_two", IdRead:
        "the reply in two descriptors, the second linking back to the first",
    ChainNextOutOfRange = "chain_next_out_of_range", IdRead:
        "the reply's descriptor links to an index beyond the queue",
    ChainIndirect = "chain_indirect", IdRead:
        "the reply behind an indirect descriptor table (VIRTIO_RING_F_INDIRECT_DESC is not negotiated)",
    ChainOutsideGuestMemory = "chain_outside_guest_memory", IdRead:
        "the reply's descriptor points 1 TiB into guest-physical space, beyond guest memory",
    ChainAddressWraps = "chain_address_wraps", IdRead:
        "the reply's descriptor starts 8 bytes below 2^64 and wraps around",
    ChainLongerThanMessage = "chain_longer_than_message", IdRead:
        "the reply's descriptor is 100 bytes longer than the message",
    ChainShorterThanHeader = "chain_shorter_than_header", IdRead:
        "the reply's descriptor is 10 bytes long: not even a tunnel header",
    ChainEmptyBuffer = "chain_empty_buffer", IdRead:
        "the reply's descriptor has length 0",
    Chain4GibBuffer = "chain_4gib_buffer", IdRead:
        "the reply's descriptor claims 4 GiB - 1",
    ChainDeviceWritable = "chain_device_writable", IdRead:
        "the reply in a device-writable descriptor (wrong direction)",
    ChainWritableBeforeReadable = "chain_writable_before_readable", IdRead:
        "a device-writable descriptor, then the reply (readable after writable)",
    ChainWritableAfterMessage = "chain_writable_after_message", IdRead:
        "the reply, then a device-writable descriptor: not a DMA request, so no direct reply may go there",
    AvailHeadOutOfRange = "avail_head_out_of_range", IdRead:
        "instead of the reply, an available-ring entry naming descriptor size + 3",
    // Ring indexes: the ring itself becomes unusable.
    AvailIndexJumps = "avail_index_jumps", IdRead:
        "instead of the reply, the g2h available index moved ahead by the queue size + 1",
    H2gAvailIndexJumps = "h2g_avail_index_jumps", IdRead:
        "after the reply, the h2g available index moved ahead by the queue size + 1",
    // h2g buffers (the next buffer posted again after the ID read's reply).
    H2gBufferReadOnly = "h2g_buffer_read_only", IdRead:
        "an h2g buffer posted device-readable (wrong direction)",
    H2gBufferOutsideGuestMemory = "h2g_buffer_outside_guest_memory", IdRead:
        "an h2g buffer posted 1 TiB into guest-physical space",
    H2gBufferLoops = "h2g_buffer_loops", IdRead:
        "an h2g buffer whose descriptor links to itself",
    H2gBufferTiny = "h2g_buffer_tiny", IdRead:
        "an h2g buffer of 8 bytes (the spec asks for 256 at least)",
    // The reply's message.
    ReplyUnknownMessageId = "reply_unknown_message_id", IdRead:
        "the reply with a message ID no request has",
    ReplyWrongCommand = "reply_wrong_command", IdRead:
        "the reply names REGION_WRITE instead of REGION_READ",
    ReplyUnknownChannel = "reply_unknown_channel", IdRead:
        "the reply on a channel that does not exist",
    ReplyOnChannelZero = "reply_on_channel_zero", IdRead:
        "the reply on channel 0 (the tunnel itself)",
    ReplyTwice = "reply_twice", IdRead:
        "the reply sent twice",
    ReplyMalformedPayload = "reply_malformed_payload", IdRead:
        "the reply's count says 256 bytes, 4 follow",
    ReplyWithFdSlot = "reply_with_fd_slot", IdRead:
        "the reply carries an EVENTFD slot",
    ReplyVfioHeaderSizeMismatch = "reply_vfio_header_size_mismatch", IdRead:
        "the vfio-user header inside the reply claims 8 bytes more than the message has",
    ReplyReservedFlags = "reply_reserved_flags", IdRead:
        "the reply's tunnel header has reserved flag bits set",
    ReplyLengthOverLimit = "reply_length_over_limit", IdRead:
        "instead of the reply, a tunnel header claiming a 64 MiB body",
    ReplyUnknownKind = "reply_unknown_kind", IdRead:
        "the reply's tunnel kind is 0x77, which does not exist",
    ReplyAsCommand = "reply_as_command", IdRead:
        "the reply sent as a vfio-user command toward the client",
    DeviceOnlyKinds = "device_only_kinds", IdRead:
        "after the reply: CHANNEL_UP, SESSION_START and DOORBELL, which only the relay sends",
    StatusForUnknownChannel = "status_for_unknown_channel", IdRead:
        "after the reply: a CHANNEL_UP status for a channel that does not exist",
    ChannelUpStatusRepeated = "channel_up_status_repeated", IdRead:
        "after the reply: 50 CHANNEL_UP statuses (success) for the device's channel, which the relay did not ask for",
    // Probes: requests of the driver's own, after the reply.
    DmaSegmentsOneBad = "dma_segments_one_bad", IdRead:
        "a DMA_WRITE of 64 segments into the client's first writable map, the last one outside every map",
    DmaSegmentWraps = "dma_segment_wraps", IdRead:
        "a DMA_READ whose segment wraps around 2^64",
    DmaReadLargerThanMessage = "dma_read_larger_than_message", IdRead:
        "a DMA_READ of 2 MiB, whose reply cannot fit a message",
    DmaUnknownChannel = "dma_unknown_channel", IdRead:
        "a DMA_READ on a channel that does not exist",
    // The model's DMA, redirected.
    DmaReadOutsideMaps = "dma_read_outside_maps", DmaRead:
        "the model's DMA read goes to an IOVA no map covers",
    DmaReadAcrossMapEnd = "dma_read_across_map_end", DmaRead:
        "the model's DMA read starts half its length before the end of its map",
    DmaWriteToReadOnlyMap = "dma_write_to_read_only_map", DmaWrite:
        "the model's DMA write goes to the client's first read-only map",
    DmaWriteOutsideMaps = "dma_write_outside_maps", DmaWrite:
        "the model's DMA write goes just past the end of its map",
    // After the unmap.
    DmaWriteAfterUnmap = "dma_write_after_unmap", UnmapAck:
        "after acknowledging a DMA_UNMAP, a DMA_WRITE into the range unmapped",
    WindowWriteAfterUnmap = "window_write_after_unmap", UnmapAck:
        "after acknowledging a DMA_UNMAP, 600 ms of writes into its window",
    // Interrupts.
    IrqUnassignedVector = "irq_unassigned_vector", Irq:
        "the model's interrupt raised on MSI-X vector 1, which the client did not assign",
    IrqIndexOutOfRange = "irq_index_out_of_range", Irq:
        "the model's interrupt raised on IRQ index 0x1000",
    IrqVectorRangeOverflows = "irq_vector_range_overflows", Irq:
        "the model's interrupt raised for 2^32 - 1 vectors from 2^32 - 1",
    IrqUnknownChannel = "irq_unknown_channel", Irq:
        "the model's interrupt raised on a channel that does not exist",
    // Sessions.
    SessionEndNeverAcknowledged = "session_end_never_acknowledged", SessionEnd:
        "the SESSION_END of the client that left is never acknowledged",
    SessionEndWrongTag = "session_end_wrong_tag", SessionEnd:
        "the SESSION_END is acknowledged with a tag the relay never used",
    // Floods, after the reply.
    IrqFlood = "irq_flood", IdRead:
        "100000 interrupts on the client's MSI-X vector 0",
    UnsolicitedReplyFlood = "unsolicited_reply_flood", IdRead:
        "20000 vfio-user replies to requests nobody made",
    MalformedMessageFlood = "malformed_message_flood", IdRead:
        "20000 tunnel headers with reserved flag bits",
    ErrorReportFlood = "error_report_flood", IdRead:
        "20000 ERROR messages",
    DmaReadFloodUnread = "dma_read_flood_unread", IdRead:
        "stops reading its h2g queue, then 400 DMA_READs of up to 1 MiB of the client's first map",
    RemoteDmaFlood = "remote_dma_flood", IdRead:
        "300 DMA_READs of up to 1 MiB of the client's first map (mapped without an fd: the relay asks the client)",
}

impl std::str::FromStr for Case {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Case::ALL
            .iter()
            .copied()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown misbehaviour {s:?}; the cases are: {}",
                    names.join(", ")
                )
            })
    }
}

/// `--misbehave DEVICE:CASE[,CASE]`: the device whose channel the driver misbehaves
/// on, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misbehave {
    /// The device's name (as the relay exports it).
    pub device: String,
    /// The cases, in the order they fire.
    pub cases: Vec<Case>,
}

impl Misbehave {
    /// Parses `DEVICE:CASE[,CASE]`.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let (device, cases) = arg
            .split_once(':')
            .ok_or_else(|| format!("--misbehave {arg:?}: expected DEVICE:CASE[,CASE]"))?;
        if device.is_empty() {
            return Err(format!("--misbehave {arg:?}: no device"));
        }
        let cases = cases
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<Case>, String>>()?;
        Ok(Self {
            device: device.to_string(),
            cases,
        })
    }
}

/// A channel that does not exist (the relay numbers channels from 1, densely).
const NO_CHANNEL: u32 = 0x7fff_0000;
/// An IOVA no client of the suite maps.
const FAR_IOVA: u64 = 0x7e00_0000_0000;
/// A guest-physical address well beyond the loopback VMM's guest memory.
const FAR_GPA: u64 = 1 << 40;
/// Tags of the requests the mode makes of its own: far above the driver's, which count
/// up from 1.
const PROBE_TAGS: u32 = 0xf000_0000;
/// The byte the mode writes where it must not.
const POISON: u8 = 0xee;

/// A DMA map of the client, as the driver saw it go by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientMap {
    iova: u64,
    size: u64,
    read: bool,
    write: bool,
    /// Offset of its window in shared memory region 0.
    window: Option<u64>,
}

impl ClientMap {
    fn end(&self) -> u64 {
        self.iova.saturating_add(self.size)
    }
}

/// The misbehaving part of the driver.
pub struct Hostile {
    device: String,
    cases: Vec<Case>,
    /// The device's channel, once the relay brought it up.
    channel: Option<u32>,
    fired: HashSet<Case>,
    maps: Vec<ClientMap>,
    /// DMA_UNMAPs in flight: their (relay) message ID and the maps they take out.
    unmaps: HashMap<u16, Vec<ClientMap>>,
    /// Requests of the mode's own, by tag.
    probes: HashMap<u32, Case>,
    /// Answers to them, per case.
    answers: HashMap<Case, u64>,
    next_probe: u32,
    /// Pairs whose `g2h` ring was made unusable: nothing more is sent there.
    dead: Vec<usize>,
    /// Pairs whose `h2g` queue is no longer read.
    unread: Vec<usize>,
    /// One `h2g` buffer to post wrongly, per pair.
    rx_edits: Vec<(usize, Case)>,
    /// Memory for indirect tables and writable buffers that hold nothing.
    scratch: Option<Allocation>,
    /// Shared memory region 0 (address, length) in this process.
    shm: Option<(usize, usize)>,
    /// Queues to notify the device of now (the driver's own bookkeeping would not).
    kicks: Vec<u16>,
}

impl Hostile {
    /// The mode for `spec`; `scratch` is a page of shared memory of its own, `shm` where
    /// shared memory region 0 is mapped.
    pub fn new(
        spec: Misbehave,
        scratch: Option<Allocation>,
        shm: Option<(*mut u8, usize)>,
    ) -> Self {
        for case in &spec.cases {
            warn!(
                "HOSTILE: misbehaving on {} on purpose: {} ({})",
                spec.device,
                case.name(),
                case.about()
            );
        }
        Self {
            device: spec.device,
            cases: spec.cases,
            channel: None,
            fired: HashSet::new(),
            maps: Vec::new(),
            unmaps: HashMap::new(),
            probes: HashMap::new(),
            answers: HashMap::new(),
            next_probe: PROBE_TAGS,
            dead: Vec::new(),
            unread: Vec::new(),
            rx_edits: Vec::new(),
            scratch,
            shm: shm.map(|(p, n)| (p as usize, n)),
            kicks: Vec::new(),
        }
    }

    /// The first case of `trigger` that has not fired yet, now marked as fired.
    fn fire(&mut self, trigger: Trigger) -> Option<Case> {
        let case = self
            .cases
            .iter()
            .copied()
            .find(|c| c.trigger() == trigger && !self.fired.contains(c))?;
        self.fired.insert(case);
        warn!("HOSTILE {}: {}", case.name(), case.about());
        Some(case)
    }

    fn is_target(&self, channel: u32) -> bool {
        self.channel == Some(channel)
    }

    /// The queues the device must be notified of now: a misbehaviour it must see
    /// (the driver's kick bookkeeping follows its own index, not the one published).
    pub fn take_kicks(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.kicks)
    }

    /// Whether the `h2g` queue of pair `p` is still read.
    pub fn reads_h2g(&self, p: usize) -> bool {
        !self.unread.contains(&p)
    }

    /// How to post the next `h2g` buffer of pair `p`, when it is to be posted wrongly.
    pub fn take_rx_edit(&mut self, p: usize) -> Option<impl FnOnce(&mut [Descriptor], &[u16])> {
        let at = self.rx_edits.iter().position(|(q, _)| *q == p)?;
        let (_, case) = self.rx_edits.remove(at);
        warn!("HOSTILE {}: posting that h2g buffer now", case.name());
        Some(move |d: &mut [Descriptor], at: &[u16]| match case {
            Case::H2gBufferReadOnly => d[0].flags &= !VIRTQ_DESC_F_WRITE,
            Case::H2gBufferOutsideGuestMemory => d[0].addr = FAR_GPA,
            Case::H2gBufferLoops => {
                d[0].flags |= VIRTQ_DESC_F_NEXT;
                d[0].next = at[0];
            }
            Case::H2gBufferTiny => d[0].len = 8,
            _ => {}
        })
    }

    /// A message from the relay goes by. Returns true when it answers a request of the
    /// mode's own (it is not the driver's business).
    pub fn incoming(&mut self, msg: &TunnelMessage) -> bool {
        if let Some(&case) = self.probes.get(&msg.tag) {
            let what = match &msg.body {
                Body::DmaReadReply { status, data } => {
                    format!("DMA_READ reply, status {status}, {} bytes", data.len())
                }
                Body::Status { kind, status } => format!("status {status} (kind {kind:#x})"),
                Body::Error { errno, text } => format!("ERROR {errno}: {text}"),
                other => format!("{:?}", other.kind()),
            };
            let n = self.answers.entry(case).or_default();
            *n += 1;
            if *n <= 3 || *n % 100 == 0 {
                info!("HOSTILE {}: the relay answered #{n}: {what}", case.name());
            }
            return true;
        }
        match &msg.body {
            Body::ChannelUp { name } if *name == self.device => {
                self.channel = Some(msg.channel);
            }
            Body::VfioUser(f) if self.is_target(msg.channel) => self.saw_request(f),
            _ => {}
        }
        false
    }

    /// Remembers the client's DMA maps and unmaps.
    fn saw_request(&mut self, f: &VfioUserFrame) {
        if f.header.msg_type != MessageType::Command {
            return;
        }
        match Request::decode(f.header.command, &f.payload, f.slots.len()) {
            Ok(Request::DmaMap(m)) => {
                let window = f
                    .slots
                    .iter()
                    .find(|s| s.slot_type == SlotType::DmaWindow)
                    .map(|s| s.value);
                self.maps.push(ClientMap {
                    iova: m.address,
                    size: m.size,
                    read: m.read,
                    write: m.write,
                    window,
                });
            }
            Ok(Request::DmaUnmap(u)) => {
                let (gone, kept): (Vec<ClientMap>, Vec<ClientMap>) = self
                    .maps
                    .iter()
                    .partition(|m| u.all || (m.iova == u.address && m.size == u.size));
                self.maps = kept;
                self.unmaps.insert(f.header.msg_id, gone);
            }
            _ => {}
        }
    }

    /// Where a DMA access of the model of `channel` goes: `iova`, unless a case
    /// redirects it.
    pub fn dma_iova(&mut self, channel: u32, iova: u64, len: usize, write: bool) -> u64 {
        if !self.is_target(channel) {
            return iova;
        }
        let trigger = if write {
            Trigger::DmaWrite
        } else {
            Trigger::DmaRead
        };
        let Some(case) = self.fire(trigger) else {
            return iova;
        };
        let own = self
            .maps
            .iter()
            .find(|m| m.iova <= iova && iova < m.end())
            .copied();
        let to = match case {
            Case::DmaReadOutsideMaps => FAR_IOVA,
            Case::DmaReadAcrossMapEnd => own.map_or(FAR_IOVA, |m| {
                m.end().saturating_sub((len as u64 / 2).max(1))
            }),
            Case::DmaWriteToReadOnlyMap => self
                .maps
                .iter()
                .find(|m| m.read && !m.write)
                .map_or(FAR_IOVA, |m| m.iova),
            Case::DmaWriteOutsideMaps => own.map_or(FAR_IOVA, |m| m.end()),
            _ => iova,
        };
        warn!(
            "HOSTILE {}: DMA {} of {len} bytes at {iova:#x} sent to {to:#x}",
            case.name(),
            if write { "write" } else { "read" }
        );
        to
    }

    /// Sends `msg` on pair `p`, misbehaving where a case says so.
    pub fn send(
        &mut self,
        msg: TunnelMessage,
        p: usize,
        pairs: &mut [QueuePair],
    ) -> Result<(), PairError> {
        if self.dead.contains(&p) {
            return Ok(()); // its ring is broken: the relay reads nothing more there
        }
        if !self.is_target(msg.channel) {
            return pairs[p].send(&msg);
        }
        match &msg.body {
            Body::VfioUser(f) if is_id_read_reply(f) => {
                if let Some(case) = self.fire(Trigger::IdRead) {
                    return self.on_id_read(case, msg, p, pairs);
                }
            }
            Body::VfioUser(f)
                if f.header.msg_type == MessageType::Reply
                    && f.header.command == Command::DmaUnmap as u16 =>
            {
                let gone = self.unmaps.remove(&f.header.msg_id).unwrap_or_default();
                if let Some(case) = self.fire(Trigger::UnmapAck) {
                    pairs[p].send(&msg)?;
                    return self.after_unmap(case, msg.channel, &gone, p, pairs);
                }
            }
            Body::Irq(t) => {
                if let Some(case) = self.fire(Trigger::Irq) {
                    let mut msg = msg.clone();
                    let mut t = *t;
                    match case {
                        Case::IrqUnassignedVector => t.start = 1,
                        Case::IrqIndexOutOfRange => t.index = 0x1000,
                        Case::IrqVectorRangeOverflows => {
                            t.start = u32::MAX;
                            t.count = u32::MAX;
                        }
                        Case::IrqUnknownChannel => msg.channel = NO_CHANNEL,
                        _ => {}
                    }
                    msg.body = Body::Irq(t);
                    return pairs[p].send(&msg);
                }
            }
            Body::Status { kind, .. } if *kind == Kind::SessionEnd as u16 => {
                if let Some(case) = self.fire(Trigger::SessionEnd) {
                    match case {
                        Case::SessionEndWrongTag => {
                            let mut msg = msg.clone();
                            msg.tag ^= 0x5555_0000;
                            return pairs[p].send(&msg);
                        }
                        _ => return Ok(()), // never acknowledged
                    }
                }
            }
            _ => {}
        }
        pairs[p].send(&msg)
    }

    /// A request of the mode's own on `channel`.
    fn probe(
        &mut self,
        case: Case,
        channel: u32,
        body: Body,
        p: usize,
        pairs: &mut [QueuePair],
    ) -> Result<(), PairError> {
        let tag = self.next_probe;
        self.next_probe = self.next_probe.wrapping_add(1).max(PROBE_TAGS);
        self.probes.insert(tag, case);
        pairs[p].send(&TunnelMessage { channel, tag, body })
    }

    /// The misbehaviour of `case` around the reply to an ID read, `msg`.
    fn on_id_read(
        &mut self,
        case: Case,
        msg: TunnelMessage,
        p: usize,
        pairs: &mut [QueuePair],
    ) -> Result<(), PairError> {
        let channel = msg.channel;
        let Body::VfioUser(frame) = &msg.body else {
            return pairs[p].send(&msg);
        };
        let mut frame = frame.clone();
        let with_frame = |frame: VfioUserFrame| TunnelMessage {
            channel,
            tag: msg.tag,
            body: Body::VfioUser(frame),
        };
        match case {
            Case::ChainLoopsToItself
            | Case::ChainLoopsThroughTwo
            | Case::ChainNextOutOfRange
            | Case::ChainIndirect
            | Case::ChainOutsideGuestMemory
            | Case::ChainAddressWraps
            | Case::ChainLongerThanMessage
            | Case::ChainShorterThanHeader
            | Case::ChainEmptyBuffer
            | Case::Chain4GibBuffer
            | Case::ChainDeviceWritable
            | Case::ChainWritableBeforeReadable
            | Case::ChainWritableAfterMessage => self.send_chain(case, &msg, p, pairs),
            Case::AvailHeadOutOfRange => {
                let q = pairs[p].g2h_queue();
                let bogus = q.size().wrapping_add(3);
                q.publish_head(bogus);
                self.kicks.push(pairs[p].g2h_index);
                Ok(())
            }
            Case::AvailIndexJumps => {
                let q = pairs[p].g2h_queue();
                let idx = q.avail_idx().wrapping_add(q.size()).wrapping_add(1);
                q.publish_avail_idx(idx);
                self.kicks.push(pairs[p].g2h_index);
                self.dead.push(p);
                Ok(())
            }
            Case::H2gAvailIndexJumps => {
                pairs[p].send(&msg)?;
                let q = pairs[p].h2g_queue();
                let idx = q.avail_idx().wrapping_add(q.size()).wrapping_add(1);
                q.publish_avail_idx(idx);
                // Posting buffers again would write a sane index over it.
                self.unread.push(p);
                Ok(())
            }
            Case::H2gBufferReadOnly
            | Case::H2gBufferOutsideGuestMemory
            | Case::H2gBufferLoops
            | Case::H2gBufferTiny => {
                self.rx_edits.push((p, case));
                pairs[p].send(&msg)
            }
            Case::ReplyUnknownMessageId => {
                frame.header.msg_id = frame.header.msg_id.wrapping_add(0x8000);
                pairs[p].send(&with_frame(frame))
            }
            Case::ReplyWrongCommand => {
                frame.header.command = Command::RegionWrite as u16;
                pairs[p].send(&with_frame(frame))
            }
            Case::ReplyUnknownChannel | Case::ReplyOnChannelZero => {
                let mut msg = msg.clone();
                msg.channel = if case == Case::ReplyOnChannelZero {
                    0
                } else {
                    NO_CHANNEL
                };
                pairs[p].send(&msg)
            }
            Case::ReplyTwice => {
                pairs[p].send(&msg)?;
                pairs[p].send(&msg)
            }
            Case::ReplyMalformedPayload => {
                // offset (8), region (4), count (4), data.
                if let Some(count) = frame.payload.get_mut(12..16) {
                    count.copy_from_slice(&256u32.to_le_bytes());
                }
                pairs[p].send(&with_frame(frame))
            }
            Case::ReplyWithFdSlot => {
                frame.slots.push(Slot::eventfd());
                pairs[p].send(&with_frame(frame))
            }
            Case::ReplyVfioHeaderSizeMismatch => {
                let mut bytes = msg.encode();
                let at = TUNNEL_HEADER_SIZE + 4;
                let size = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
                bytes[at..at + 4].copy_from_slice(&size.wrapping_add(8).to_le_bytes());
                pairs[p].send_bytes(bytes)
            }
            Case::ReplyReservedFlags => {
                let mut bytes = msg.encode();
                bytes[10..12].copy_from_slice(&0x8000u16.to_le_bytes());
                pairs[p].send_bytes(bytes)
            }
            Case::ReplyLengthOverLimit => {
                let mut bytes = msg.encode();
                bytes.truncate(TUNNEL_HEADER_SIZE);
                bytes[0..4].copy_from_slice(&(64u32 << 20).to_le_bytes());
                pairs[p].send_bytes(bytes)
            }
            Case::ReplyUnknownKind => {
                let mut bytes = msg.encode();
                bytes[8..10].copy_from_slice(&0x77u16.to_le_bytes());
                pairs[p].send_bytes(bytes)
            }
            Case::ReplyAsCommand => {
                frame.header.msg_type = MessageType::Command;
                frame.header.error = None;
                pairs[p].send(&with_frame(frame))
            }
            Case::DeviceOnlyKinds => {
                pairs[p].send(&msg)?;
                for body in [
                    Body::ChannelUp {
                        name: self.device.clone(),
                    },
                    Body::SessionStart,
                    Body::Doorbell { id: 1, count: 1 },
                ] {
                    self.probe(case, channel, body, p, pairs)?;
                }
                Ok(())
            }
            Case::StatusForUnknownChannel => {
                pairs[p].send(&msg)?;
                pairs[p].send(&TunnelMessage {
                    channel: NO_CHANNEL,
                    tag: 1,
                    body: Body::Status {
                        kind: Kind::ChannelUp as u16,
                        status: 0,
                    },
                })
            }
            Case::ChannelUpStatusRepeated => {
                pairs[p].send(&msg)?;
                for i in 0..50 {
                    pairs[p].send(&TunnelMessage {
                        channel,
                        tag: PROBE_TAGS - 1 - i,
                        body: Body::Status {
                            kind: Kind::ChannelUp as u16,
                            status: 0,
                        },
                    })?;
                }
                Ok(())
            }
            Case::DmaSegmentsOneBad => {
                pairs[p].send(&msg)?;
                let base = self
                    .maps
                    .iter()
                    .find(|m| m.write && m.size >= 64 * 64)
                    .map_or(FAR_IOVA, |m| m.iova);
                let mut segments: Vec<DmaSegment> = (0..63)
                    .map(|i| DmaSegment {
                        iova: base + 64 * i,
                        len: 8,
                    })
                    .collect();
                segments.push(DmaSegment {
                    iova: FAR_IOVA,
                    len: 8,
                });
                let data = vec![POISON; 8 * segments.len()];
                self.probe(case, channel, Body::DmaWrite { segments, data }, p, pairs)
            }
            Case::DmaSegmentWraps => {
                pairs[p].send(&msg)?;
                let segments = vec![DmaSegment {
                    iova: u64::MAX - 15,
                    len: 32,
                }];
                self.probe(case, channel, Body::DmaRead { segments }, p, pairs)
            }
            Case::DmaReadLargerThanMessage => {
                pairs[p].send(&msg)?;
                let iova = self.maps.first().map_or(FAR_IOVA, |m| m.iova);
                let segments = vec![DmaSegment { iova, len: 2 << 20 }];
                self.probe(case, channel, Body::DmaRead { segments }, p, pairs)
            }
            Case::DmaUnknownChannel => {
                pairs[p].send(&msg)?;
                let iova = self.maps.first().map_or(FAR_IOVA, |m| m.iova);
                let segments = vec![DmaSegment { iova, len: 8 }];
                self.probe(case, NO_CHANNEL, Body::DmaRead { segments }, p, pairs)
            }
            Case::IrqFlood => {
                pairs[p].send(&msg)?;
                for _ in 0..100_000 {
                    pairs[p].send(&TunnelMessage::new(
                        channel,
                        Body::Irq(IrqTrigger {
                            index: pci_irq::MSIX,
                            start: 0,
                            count: 1,
                        }),
                    ))?;
                }
                Ok(())
            }
            Case::UnsolicitedReplyFlood => {
                pairs[p].send(&msg)?;
                for i in 0..20_000u32 {
                    let request = Header::command(
                        0x9000 + (i % 0x1000) as u16,
                        Command::RegionRead as u16,
                        0,
                    );
                    let header = Header::error_reply_to(&request, libc::EIO as u32);
                    pairs[p].send(&TunnelMessage::new(
                        channel,
                        Body::VfioUser(VfioUserFrame {
                            header,
                            payload: Vec::new(),
                            slots: Vec::new(),
                        }),
                    ))?;
                }
                Ok(())
            }
            Case::MalformedMessageFlood => {
                pairs[p].send(&msg)?;
                for _ in 0..20_000 {
                    let mut bytes = TunnelMessage::new(channel, Body::SessionStart).encode();
                    bytes[10..12].copy_from_slice(&0x8000u16.to_le_bytes());
                    pairs[p].send_bytes(bytes)?;
                }
                Ok(())
            }
            Case::ErrorReportFlood => {
                pairs[p].send(&msg)?;
                for i in 0..20_000 {
                    pairs[p].send(&TunnelMessage::new(
                        channel,
                        Body::Error {
                            errno: libc::EIO as u32,
                            text: format!("hostile report {i}"),
                        },
                    ))?;
                }
                Ok(())
            }
            Case::DmaReadFloodUnread | Case::RemoteDmaFlood => {
                pairs[p].send(&msg)?;
                let (count, unread) = if case == Case::DmaReadFloodUnread {
                    (400, true)
                } else {
                    (300, false)
                };
                if unread {
                    self.unread.push(p);
                }
                let (iova, len) = self
                    .maps
                    .first()
                    .map_or((FAR_IOVA, 4096), |m| (m.iova, m.size.min(1 << 20)));
                for _ in 0..count {
                    let segments = vec![DmaSegment { iova, len }];
                    self.probe(case, channel, Body::DmaRead { segments }, p, pairs)?;
                }
                Ok(())
            }
            _ => pairs[p].send(&msg),
        }
    }

    /// Sends the reply `msg` in a chain shaped by `case`.
    fn send_chain(
        &mut self,
        case: Case,
        msg: &TunnelMessage,
        p: usize,
        pairs: &mut [QueuePair],
    ) -> Result<(), PairError> {
        let bytes = msg.encode();
        let size = pairs[p].g2h_queue().size();
        let scratch = self.scratch;
        // A device-writable buffer that holds nothing (scratch memory, 64 bytes in).
        let junk = scratch.map(|s| Segment {
            gpa: s.gpa + 64,
            len: 64,
            device_writable: true,
        });
        if case == Case::ChainIndirect {
            // The table goes in the first 16 bytes of scratch; it is filled in below,
            // once the buffer holding the message is known.
            if scratch.is_none() {
                warn!("HOSTILE {}: no scratch memory; sent as usual", case.name());
                return pairs[p].send(msg);
            }
        }
        let shape = |s: Segment| -> Vec<Segment> {
            match case {
                Case::ChainLoopsThroughTwo => vec![
                    Segment {
                        len: TUNNEL_HEADER_SIZE as u32,
                        ..s
                    },
                    Segment {
                        gpa: s.gpa + TUNNEL_HEADER_SIZE as u64,
                        len: s.len - TUNNEL_HEADER_SIZE as u32,
                        ..s
                    },
                ],
                Case::ChainWritableBeforeReadable => junk.into_iter().chain([s]).collect(),
                Case::ChainWritableAfterMessage => [s].into_iter().chain(junk).collect(),
                _ => vec![s],
            }
        };
        let edit = |d: &mut [Descriptor], at: &[u16]| match case {
            Case::ChainLoopsToItself => {
                d[0].flags |= VIRTQ_DESC_F_NEXT;
                d[0].next = at[0];
            }
            Case::ChainLoopsThroughTwo => {
                d[1].flags |= VIRTQ_DESC_F_NEXT;
                d[1].next = at[0];
            }
            Case::ChainNextOutOfRange => {
                d[0].flags |= VIRTQ_DESC_F_NEXT;
                d[0].next = size.wrapping_add(5);
            }
            Case::ChainIndirect => {
                if let Some(s) = scratch {
                    let entry = Descriptor {
                        next: 0,
                        flags: 0,
                        ..d[0]
                    };
                    if let Some(table) = s.slice(0, 16) {
                        table.copy_from(&entry.to_bytes());
                    }
                    d[0] = Descriptor {
                        addr: s.gpa,
                        len: 16,
                        flags: VIRTQ_DESC_F_INDIRECT,
                        next: 0,
                    };
                }
            }
            Case::ChainOutsideGuestMemory => d[0].addr = FAR_GPA,
            Case::ChainAddressWraps => d[0].addr = u64::MAX - 7,
            Case::ChainLongerThanMessage => d[0].len += 100,
            Case::ChainShorterThanHeader => d[0].len = 10,
            Case::ChainEmptyBuffer => d[0].len = 0,
            Case::Chain4GibBuffer => d[0].len = u32::MAX,
            Case::ChainDeviceWritable => d[0].flags |= VIRTQ_DESC_F_WRITE,
            _ => {}
        };
        if !pairs[p].send_shaped(&bytes, shape, edit)? {
            warn!(
                "HOSTILE {}: the message could not go in a chain of its own; sent as usual",
                case.name()
            );
            self.fired.remove(&case);
            return pairs[p].send(msg);
        }
        Ok(())
    }

    /// The misbehaviour of `case` after acknowledging the DMA_UNMAP of `gone`.
    fn after_unmap(
        &mut self,
        case: Case,
        channel: u32,
        gone: &[ClientMap],
        p: usize,
        pairs: &mut [QueuePair],
    ) -> Result<(), PairError> {
        let Some(map) = gone.first().copied() else {
            warn!("HOSTILE {}: the unmap took out no map", case.name());
            return Ok(());
        };
        match case {
            Case::DmaWriteAfterUnmap => {
                let segments = vec![DmaSegment {
                    iova: map.iova,
                    len: 64,
                }];
                let data = vec![POISON; 64];
                self.probe(case, channel, Body::DmaWrite { segments, data }, p, pairs)
            }
            Case::WindowWriteAfterUnmap => {
                let (Some(offset), Some((base, len))) = (map.window, self.shm) else {
                    warn!("HOSTILE {}: the map had no window", case.name());
                    return Ok(());
                };
                let size = usize::try_from(map.size).unwrap_or(0).min(4096);
                let Some(at) = usize::try_from(offset)
                    .ok()
                    .filter(|o| o.saturating_add(size) <= len)
                    .map(|o| base + o)
                else {
                    return Ok(());
                };
                let spawned = std::thread::Builder::new()
                    .name("vfu-hostile".into())
                    .spawn(move || write_after_unmap(case, at, size));
                if let Err(e) = spawned {
                    warn!("HOSTILE {}: no thread: {e}", case.name());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Whether `f` is the reply to a read of the device IDs: 4 bytes at offset 0 of config
/// space.
fn is_id_read_reply(f: &VfioUserFrame) -> bool {
    if f.header.msg_type != MessageType::Reply
        || f.header.error.is_some()
        || f.header.command != Command::RegionRead as u16
        || f.payload.len() < 16
    {
        return false;
    }
    let offset = u64::from_le_bytes(f.payload[0..8].try_into().unwrap_or([0xff; 8]));
    let region = u32::from_le_bytes(f.payload[8..12].try_into().unwrap_or([0xff; 4]));
    let count = u32::from_le_bytes(f.payload[12..16].try_into().unwrap_or([0; 4]));
    // offset, region, count: 16 bytes, then the 4 bytes read.
    offset == 0 && region == pci_region::CONFIG && count == 4 && f.payload.len() == 16 + 4
}

/// Writes [`POISON`] over `len` bytes at `at` (a window that was just withdrawn) for
/// 600 ms, through `process_vm_writev` on this process, which fails with EFAULT where
/// nothing is mapped any more instead of faulting; logs how many writes landed.
fn write_after_unmap(case: Case, at: usize, len: usize) {
    let poison = vec![POISON; len];
    let (mut landed, mut refused) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_millis(600);
    while Instant::now() < end {
        let local = libc::iovec {
            iov_base: poison.as_ptr() as *mut libc::c_void,
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: at as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: the local iovec names our own buffer; the remote one names addresses
        // of this process that the kernel checks against its mappings (EFAULT where the
        // window is gone). Nothing in this process holds a reference to that memory:
        // it is shared memory, accessed with volatile copies only.
        let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n == len as isize {
            landed += 1;
        } else {
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    warn!(
        "HOSTILE {}: {landed} writes into the window landed, {refused} were refused",
        case.name()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case has a unique name that parses back to it; a spec names one device
    /// and at least one known case.
    #[test]
    fn names_parse() {
        let names: HashSet<&str> = Case::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Case::ALL.len());
        for &c in Case::ALL {
            assert_eq!(c.name().parse::<Case>(), Ok(c));
            assert!(!c.about().is_empty());
        }
        let m = Misbehave::parse("dma0:reply_twice,irq_flood").unwrap();
        assert_eq!(m.device, "dma0");
        assert_eq!(m.cases, vec![Case::ReplyTwice, Case::IrqFlood]);
        assert!(Misbehave::parse("dma0").is_err());
        assert!(Misbehave::parse(":reply_twice").is_err());
        assert!(Misbehave::parse("dma0:reply_thrice").is_err());
    }

    /// Cases of a trigger fire in the order given, once each.
    #[test]
    fn cases_fire_once_in_order() {
        let spec = Misbehave::parse("d:reply_twice,irq_flood,dma_read_outside_maps").unwrap();
        let mut h = Hostile::new(spec, None, None);
        assert_eq!(h.fire(Trigger::IdRead), Some(Case::ReplyTwice));
        assert_eq!(h.fire(Trigger::Irq), None);
        assert_eq!(h.fire(Trigger::IdRead), Some(Case::IrqFlood));
        assert_eq!(h.fire(Trigger::IdRead), None);
        h.channel = Some(3);
        assert_eq!(h.dma_iova(2, 0x1000, 8, false), 0x1000, "another channel");
        assert_eq!(h.dma_iova(3, 0x1000, 8, true), 0x1000, "no write case");
        assert_eq!(h.dma_iova(3, 0x1000, 8, false), FAR_IOVA);
        assert_eq!(h.dma_iova(3, 0x1000, 8, false), 0x1000, "fired already");
    }

    /// The trigger is the reply to a read of 4 bytes at offset 0 of config space, and
    /// nothing else.
    #[test]
    fn id_read_reply_is_recognised() {
        let reply = |offset: u64, region: u32| {
            let mut payload = Vec::new();
            payload.extend_from_slice(&offset.to_le_bytes());
            payload.extend_from_slice(&region.to_le_bytes());
            payload.extend_from_slice(&4u32.to_le_bytes());
            payload.extend_from_slice(&[1, 2, 3, 4]);
            let req = Header::command(5, Command::RegionRead as u16, 16);
            VfioUserFrame {
                header: Header::reply_to(&req, payload.len()),
                payload,
                slots: Vec::new(),
            }
        };
        assert!(is_id_read_reply(&reply(0, pci_region::CONFIG)));
        assert!(!is_id_read_reply(&reply(4, pci_region::CONFIG)));
        assert!(!is_id_read_reply(&reply(0, 0)));
    }
}
