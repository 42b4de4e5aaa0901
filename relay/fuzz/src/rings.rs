//! Target `g2h_rings`: what the device VM writes into the tunnel's virtqueues, as the
//! relay's real backend takes it ([`Frontend::kick`] is the backend's `handle_event`:
//! [`vfu_relay::tunnel::Link::receive`], reassembly, direct requests,
//! [`vfu_relay::tunnel::dispatch`], and the `h2g` flush).
//!
//! The input sets the rings up (queue sizes, ring addresses, EVENT_IDX, the features of
//! the HELLO), then is a program of steps: raw descriptors, available-ring entries and
//! index jumps, whole chains holding message bytes (split over readable descriptors,
//! with writable ones after them for direct requests), `h2g` buffers, kicks, and the
//! client's side of DMA to its memory mapped without an fd, timeouts, the client or the
//! device VM going away.
//!
//! Channel 1's client has four DMA regions: read-only and read-write ones in a sealed
//! memfd (the relay maps it), a read-write one in a memfd it serves with
//! pread/pwrite, and one mapped without an fd (the relay asks the client). Channel 2
//! is served and has no client.
//!
//! Checked after every step that runs relay code:
//! - the relay wrote guest memory only inside buffers the driver made device-writable
//!   (at any time) and the used rings;
//! - the client got replies only to its requests in flight, each once, and DMA
//!   commands only for memory it mapped, with the permission.
//!
//! At the end: the read-only region and the memfd bytes outside the maps are as they
//! were; once the client and the device VM are gone, the relay holds nothing
//! ([`vfu_relay::fuzzing::Counts::is_idle`]).

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfu_proto::tunnel::{features, Body, Hello, Kind, TunnelMessage, VfioUserFrame};
use vfu_proto::vfio_user::{Capabilities, DmaMap, Header, Reply, Request, Version};
use vfu_relay::channel::Channel;
use vfu_relay::switch::Relay;
use vfu_relay::tunnel::{dispatch, Incoming};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::env::{
    memfd, memory, relay, Answer, ClientSide, Frontend, Memory, Ring, DESC_INDIRECT, DESC_NEXT,
    DESC_WRITE, QUEUE_MAX,
};
use crate::input::{Input, Script};

/// Guest memory: region 0 from address 0 (the rings of up to four queues, then data),
/// a hole, region 1.
pub const LOW_SIZE: u64 = 0xc000;
/// Where data buffers go in region 0.
pub const DATA: u64 = 0x8000;
/// Bytes of data area.
pub const DATA_SIZE: u64 = LOW_SIZE - DATA;
/// Region 1.
pub const HIGH: u64 = 0x2_0000;
/// Its size.
pub const HIGH_SIZE: u64 = 0x1000;

/// Channel 1's client's regions: read-only, sealed memfd at offset 0.
pub const RO_IOVA: u64 = 0x10_0000;
/// Read-write, the same memfd at offset [`MAP_SIZE`].
pub const RW_IOVA: u64 = 0x20_0000;
/// Read-write, an unsealed memfd (pread/pwrite).
pub const PIO_IOVA: u64 = 0x30_0000;
/// Read-write, no fd (the client answers DMA commands).
pub const REMOTE_IOVA: u64 = 0x40_0000;
/// Size of each region.
pub const MAP_SIZE: u64 = 0x2000;
/// The sealed memfd is larger than its two regions: the rest must stay untouched.
const SEALED_SIZE: u64 = 3 * MAP_SIZE;
const SEALED_FILL: u8 = 0x11;
const PIO_SIZE: u64 = 2 * MAP_SIZE;
const PIO_FILL: u8 = 0x22;

/// Most steps of one input.
const MAX_STEPS: usize = 512;

/// Setup flags (first byte of an input).
pub mod flag {
    /// Two queue pairs (else one).
    pub const TWO_PAIRS: u8 = 1;
    /// The HELLO offers DIRECT_DATA.
    pub const DIRECT: u8 = 2;
    /// EVENT_IDX negotiated.
    pub const EVENT_IDX: u8 = 4;
    /// No setup HELLO: the device VM says HELLO in the rings (no client then).
    pub const HELLO_IN_RING: u8 = 8;
    /// Ring addresses come from the input.
    pub const RING_ADDRESSES: u8 = 16;
    /// The HELLO offers POSTED_DONE.
    pub const POSTED_DONE: u8 = 32;
}

/// Step codes.
pub mod op {
    /// `at: u16, blob`: bytes into the data area.
    pub const MEM: u8 = 0;
    /// `q: u8, i: u16, mode: u8, a: u32, len: u32, flags: u16, next: u16`.
    pub const DESC: u8 = 1;
    /// `q: u8, slot: u16, head: u16`: an available-ring entry.
    pub const AVAIL: u8 = 2;
    /// `q: u8, n: u8`: the available index moves by n.
    pub const PUBLISH: u8 = 3;
    /// `q: u8, parts: u8, writable: u8, wlen: u16, blob`: a chain holding the bytes.
    pub const CHAIN: u8 = 4;
    /// `q: u8, n: u8, size: u16`: one-descriptor writable buffers.
    pub const POST: u8 = 5;
    /// `q: u8`: the driver kicks queue q.
    pub const KICK: u8 = 6;
    /// `how: u8`: the client answers the relay's oldest DMA command.
    pub const ANSWER: u8 = 7;
    /// The request timeout passes.
    pub const EXPIRE: u8 = 8;
    /// The client disconnects.
    pub const CLIENT_GONE: u8 = 9;
    /// The device VM's VMM reconnects (the relay drops the device VM's state).
    pub const RESTART: u8 = 10;
    /// Every queue is kicked.
    pub const KICK_ALL: u8 = 11;
    /// Number of codes.
    pub const COUNT: u8 = 12;
}

struct Target {
    relay: Arc<Relay>,
    mem: Memory,
    rings: Vec<Ring>,
    event_idx: bool,
    fe: Frontend,
    ch1: Arc<Channel>,
    client: Option<ClientSide>,
    sealed: Option<OwnedFd>,
    pio: Option<OwnedFd>,
    next_desc: Vec<u16>,
    bump: u64,
    /// Bytes the relay may write: every device-writable buffer the driver ever posted,
    /// and the used rings.
    allowed: Vec<bool>,
}

/// Index of guest address `a` in the targets' flat view of memory.
fn flat(a: u64) -> Option<usize> {
    if a < LOW_SIZE {
        Some(a as usize)
    } else if (HIGH..HIGH + HIGH_SIZE).contains(&a) {
        Some((LOW_SIZE + a - HIGH) as usize)
    } else {
        None
    }
}

const FLAT_SIZE: usize = (LOW_SIZE + HIGH_SIZE) as usize;

fn snapshot(mem: &Memory) -> Vec<u8> {
    let mut out = vec![0u8; FLAT_SIZE];
    let m = mem.memory();
    m.read_slice(&mut out[..LOW_SIZE as usize], GuestAddress(0))
        .expect("region 0");
    m.read_slice(&mut out[LOW_SIZE as usize..], GuestAddress(HIGH))
        .expect("region 1");
    out
}

/// The descriptors (address, length, flags) of the table of `len` bytes at `addr`, as
/// far as it lies in memory, from a [`snapshot`].
fn descriptors(snap: &[u8], addr: u64, len: u64) -> Vec<(u64, u32, u16)> {
    let Some(start) = flat(addr) else {
        return Vec::new();
    };
    let region_end = if addr < LOW_SIZE {
        LOW_SIZE as usize
    } else {
        FLAT_SIZE
    };
    let end = (start as u64).saturating_add(len).min(region_end as u64) as usize;
    snap[start..end]
        .chunks_exact(16)
        .map(|d| {
            (
                u64::from_le_bytes(d[..8].try_into().expect("8 bytes")),
                u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")),
                u16::from_le_bytes([d[12], d[13]]),
            )
        })
        .collect()
}

/// A device reply to the relay's request `relay_id` of `command` with `reply`.
fn device_reply(channel: u32, relay_id: u16, reply: &Reply) -> TunnelMessage {
    let mut payload = Vec::new();
    reply.encode(&mut payload);
    let request = Header::command(relay_id, reply.command() as u16, 0);
    TunnelMessage::new(
        channel,
        Body::VfioUser(VfioUserFrame {
            header: Header::reply_to(&request, payload.len()),
            payload,
            slots: Vec::new(),
        }),
    )
}

impl Target {
    fn new(inp: &mut Input<'_>) -> Self {
        let flags = inp.u8();
        let pairs = 1 + u16::from(flags & flag::TWO_PAIRS);
        let max_msg = 4096u32 << (inp.u8() % 10);
        let event_idx = flags & flag::EVENT_IDX != 0;
        let rings: Vec<Ring> = (0..2 * pairs as usize)
            .map(|q| {
                let mut r = Ring::standard(q, inp.u16() % (QUEUE_MAX + 1));
                if flags & flag::RING_ADDRESSES != 0 {
                    r.desc = u64::from(inp.u32() & 0x3_ffff);
                    r.avail = u64::from(inp.u32() & 0x3_ffff);
                    r.used = u64::from(inp.u32() & 0x3_ffff);
                }
                r
            })
            .collect();
        let relay = relay(2, 2);
        let mem = memory(&[(0, LOW_SIZE as usize), (HIGH, HIGH_SIZE as usize)]);
        let fe = Frontend::connect(&relay, &mem, &rings, event_idx);
        // What the backend does on the first kick, before the driver's HELLO.
        relay
            .link
            .attach_vrings(relay.link.generation(), 0, &fe.vrings);
        let ch1 = relay.channel(1).expect("channel 1");
        let mut t = Self {
            relay,
            mem,
            next_desc: vec![0; rings.len()],
            rings,
            event_idx,
            fe,
            ch1,
            client: None,
            sealed: None,
            pio: None,
            bump: 0,
            allowed: vec![false; FLAT_SIZE],
        };
        if flags & flag::HELLO_IN_RING == 0 {
            let mut offered = 0;
            if flags & flag::DIRECT != 0 {
                offered |= features::DIRECT_DATA;
            }
            if flags & flag::POSTED_DONE != 0 {
                offered |= features::POSTED_DONE;
            }
            t.set_up(pairs, max_msg, offered, flags & flag::RING_ADDRESSES == 0);
        }
        t
    }

    fn dispatch(&self, msg: TunnelMessage) {
        dispatch(&self.relay, Incoming::Message(Ok(msg)));
    }

    /// HELLO, both channels served, and channel 1's client with its regions: every
    /// message of the device VM handed to the relay as the backend would.
    fn set_up(&mut self, pairs: u16, max_msg: u32, features: u64, usual_layout: bool) {
        self.dispatch(TunnelMessage {
            channel: 0,
            tag: 1,
            body: Body::Hello(Hello {
                version_major: 1,
                version_minor: 0,
                queue_pairs: pairs,
                max_msg_size: max_msg,
                features,
            }),
        });
        for channel in [1, 2] {
            let Some(tag) = vfu_relay::fuzzing::channel_up_tag(&self.relay, channel) else {
                continue; // the HELLO did not bring the channel up
            };
            self.dispatch(TunnelMessage {
                channel,
                tag,
                body: Body::Status {
                    kind: Kind::ChannelUp as u16,
                    status: 0,
                },
            });
        }
        let mut c = ClientSide::connect(&self.relay, &self.ch1);
        let version = Version {
            major: 0,
            minor: 0,
            capabilities: Some(Capabilities {
                max_msg_fds: Some(16),
                max_data_xfer_size: Some(4096),
                ..Capabilities::default()
            }),
        };
        c.request(
            &self.relay,
            &self.ch1,
            &Request::Version(version.clone()),
            vec![],
            false,
        );
        // The relay numbers the requests it forwards on a channel from 0.
        self.dispatch(device_reply(1, 0, &Reply::Version(version)));
        let sealed = memfd(SEALED_SIZE, true, SEALED_FILL);
        let pio = memfd(PIO_SIZE, false, PIO_FILL);
        let maps: [(u64, bool, u64, Option<&OwnedFd>); 4] = [
            (RO_IOVA, false, 0, Some(&sealed)),
            (RW_IOVA, true, MAP_SIZE, Some(&sealed)),
            (PIO_IOVA, true, 0, Some(&pio)),
            (REMOTE_IOVA, true, 0, None),
        ];
        for (i, (iova, write, offset, fd)) in maps.into_iter().enumerate() {
            let map = Request::DmaMap(DmaMap {
                read: true,
                write,
                offset,
                address: iova,
                size: MAP_SIZE,
            });
            let fds = fd
                .map(|f| vec![f.try_clone().expect("dup")])
                .unwrap_or_default();
            c.request(&self.relay, &self.ch1, &map, fds, false);
            self.dispatch(device_reply(1, 1 + i as u16, &Reply::DmaMap));
        }
        c.pump(&self.ch1).expect("setup replies");
        // Rings the input placed over each other make the relay drop the device VM
        // at its first write (the requests then fail); in the usual layout they work.
        assert!(
            c.awaiting.is_empty() && c.replies == 5 && (c.errors == 0 || !usual_layout),
            "setup: the client's VERSION and maps are answered, and succeed in the usual layout ({} replies, {} errors)",
            c.replies,
            c.errors
        );
        self.client = Some(c);
        self.sealed = Some(sealed);
        self.pio = Some(pio);
    }

    fn ring(&self, q: u8) -> (usize, Ring) {
        let q = usize::from(q) % self.rings.len();
        (q, self.rings[q])
    }

    fn alloc(&mut self, n: u64) -> u64 {
        let n = n.min(DATA_SIZE);
        if self.bump + n > DATA_SIZE {
            self.bump = 0;
        }
        let at = DATA + self.bump;
        self.bump += n;
        at
    }

    fn desc_index(&mut self, q: usize) -> u16 {
        let n = self.rings[q].size.max(1);
        let i = self.next_desc[q] % n;
        self.next_desc[q] = self.next_desc[q].wrapping_add(1);
        i
    }

    fn mark(&mut self, addr: u64, len: u64) {
        for (start, size) in [(0, LOW_SIZE), (HIGH, HIGH_SIZE)] {
            let lo = addr.max(start);
            let hi = addr.saturating_add(len).min(start + size);
            if lo < hi {
                let (a, b) = (flat(lo).expect("inside"), flat(hi - 1).expect("inside"));
                self.allowed[a..=b].fill(true);
            }
        }
    }

    /// Marks what the relay may write now: the used rings, and the device-writable
    /// descriptors of every table (indirect tables included).
    fn mark_writable(&mut self) {
        let snap = snapshot(&self.mem);
        let mut ranges = Vec::new();
        for q in 0..self.rings.len() {
            // Where the relay's queue has its rings (what SET_VRING_ADDR took).
            let (desc, used, size) = {
                let v = self.fe.vrings[q].get_ref();
                let queue = v.get_queue();
                (queue.desc_table(), queue.used_ring(), queue.size())
            };
            ranges.push((used, 4 + 8 * u64::from(size) + 2));
            for (addr, len, flags) in descriptors(&snap, desc, u64::from(size) * 16) {
                if flags & DESC_WRITE != 0 {
                    ranges.push((addr, u64::from(len)));
                }
                if flags & DESC_INDIRECT != 0 {
                    for (a, l, f) in descriptors(&snap, addr, u64::from(len)) {
                        if f & DESC_WRITE != 0 {
                            ranges.push((a, u64::from(l)));
                        }
                    }
                }
            }
        }
        for (addr, len) in ranges {
            self.mark(addr, len);
        }
    }

    /// Runs relay code (`f`), then checks what it wrote to guest memory and to the
    /// client.
    fn relay_step(&mut self, f: impl FnOnce(&mut Self)) {
        self.mark_writable();
        let before = snapshot(&self.mem);
        f(self);
        let after = snapshot(&self.mem);
        // Compared a block at a time (memcmp), byte by byte only where a block changed:
        // the target's own loops are instrumented too, and byte loops over all of
        // memory would make it crawl.
        let changed = before
            .chunks(64)
            .zip(after.chunks(64))
            .enumerate()
            .filter(|(_, (b, a))| b != a)
            .flat_map(|(k, _)| 64 * k..(64 * k + 64).min(FLAT_SIZE));
        let mut changed = changed.filter(|&i| before[i] != after[i] && !self.allowed[i]);
        if let Some(i) = changed.next() {
            let addr = if i < LOW_SIZE as usize {
                i as u64
            } else {
                HIGH + (i as u64 - LOW_SIZE)
            };
            panic!(
                "the relay wrote guest memory at {addr:#x} ({:#04x} -> {:#04x}), outside every device-writable buffer and used ring",
                before[i], after[i]
            );
        }
        self.pump_client();
    }

    fn pump_client(&mut self) {
        if let Some(c) = self.client.as_mut() {
            match c.pump(&self.ch1) {
                Ok(true) => {}
                Ok(false) => {
                    self.ch1.on_client_disconnected(&self.relay);
                    self.client = None;
                }
                Err(e) => panic!("client of channel 1: {e}"),
            }
        }
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        let code = inp.u8() % op::COUNT;
        if crate::tracing() {
            eprintln!("step {code}: {:?}", vfu_relay::fuzzing::counts(&self.relay));
        }
        match code {
            op::MEM => {
                let at = u64::from(inp.u16()) % DATA_SIZE;
                let bytes = inp.blob();
                let n = bytes.len().min((DATA_SIZE - at) as usize);
                let _ = self
                    .mem
                    .memory()
                    .write_slice(&bytes[..n], GuestAddress(DATA + at));
            }
            op::DESC => {
                let (_, ring) = self.ring(inp.u8());
                let i = inp.u16();
                let mode = inp.u8();
                let a = inp.u32();
                let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
                let addr = match mode % 4 {
                    0 => DATA + u64::from(a) % DATA_SIZE,
                    1 => u64::from(a) | u64::from(mode >> 2) << 32,
                    2 => HIGH + u64::from(a) % HIGH_SIZE,
                    _ => LOW_SIZE - u64::from(a % 512),
                };
                ring.write_desc(&self.mem, i % QUEUE_MAX, addr, len, flags, next);
            }
            op::AVAIL => {
                let (_, ring) = self.ring(inp.u8());
                let (slot, head) = (inp.u16(), inp.u16());
                ring.set_avail_slot(&self.mem, slot, head);
            }
            op::PUBLISH => {
                let (_, ring) = self.ring(inp.u8());
                let n = u16::from(inp.u8());
                let idx = ring.avail_idx(&self.mem);
                ring.set_avail_idx(&self.mem, idx.wrapping_add(n));
            }
            op::CHAIN => {
                let (q, ring) = self.ring(inp.u8());
                let parts = 1 + usize::from(inp.u8() % 4);
                let writable = usize::from(inp.u8() % 4);
                let wlen = u32::from(inp.u16());
                let bytes = inp.blob().to_vec();
                let mut descs = Vec::new();
                let step = bytes.len().div_ceil(parts).max(1);
                let mut chunks: Vec<&[u8]> = bytes.chunks(step).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                for c in chunks {
                    let at = self.alloc(c.len() as u64);
                    let n = c.len().min(DATA_SIZE as usize);
                    let _ = self.mem.memory().write_slice(&c[..n], GuestAddress(at));
                    descs.push((at, c.len() as u32, 0));
                }
                for _ in 0..writable {
                    let at = self.alloc(u64::from(wlen));
                    descs.push((at, wlen, DESC_WRITE));
                }
                let ids: Vec<u16> = (0..descs.len()).map(|_| self.desc_index(q)).collect();
                for (k, &(at, len, flags)) in descs.iter().enumerate() {
                    let next = ids.get(k + 1).copied();
                    let flags = flags | if next.is_some() { DESC_NEXT } else { 0 };
                    ring.write_desc(&self.mem, ids[k], at, len, flags, next.unwrap_or(0));
                }
                ring.publish(&self.mem, ids[0]);
            }
            op::POST => {
                let (q, ring) = self.ring(inp.u8());
                let n = 1 + inp.u8() % 16;
                let size = u32::from(inp.u16() % 4096) + 1;
                for _ in 0..n {
                    let at = self.alloc(u64::from(size));
                    let i = self.desc_index(q);
                    ring.write_desc(&self.mem, i, at, size, DESC_WRITE, 0);
                    ring.publish(&self.mem, i);
                }
            }
            op::KICK => {
                let (q, _) = self.ring(inp.u8());
                self.relay_step(|t| t.fe.kick(q));
            }
            op::ANSWER => {
                let how = Answer::from_u8(inp.u8());
                self.relay_step(|t| {
                    if let Some(c) = t.client.as_mut() {
                        c.answer(&t.relay, &t.ch1, how);
                    }
                });
            }
            op::EXPIRE => self.relay_step(|t| {
                let later = Instant::now() + Duration::from_secs(3600);
                for ch in t.relay.channels() {
                    let outcome = ch.expire(&t.relay, later);
                    t.relay.after_send(&ch, outcome);
                }
            }),
            op::CLIENT_GONE => self.relay_step(|t| {
                if t.client.take().is_some() {
                    t.ch1.on_client_disconnected(&t.relay);
                }
            }),
            op::RESTART => self.relay_step(|t| {
                vfu_relay::fuzzing::device_vm_gone(&t.relay);
                t.fe = Frontend::connect(&t.relay, &t.mem, &t.rings, t.event_idx);
            }),
            _ => self.relay_step(|t| {
                for q in 0..t.rings.len() {
                    t.fe.kick(q);
                }
            }),
        }
    }

    /// The client's memory outside what it let the device VM write is untouched; once
    /// the client and the device VM are gone, the relay holds nothing.
    fn finish(mut self) {
        if let Some(sealed) = &self.sealed {
            let mut got = vec![0u8; SEALED_SIZE as usize];
            std::fs::File::from(sealed.try_clone().expect("dup"))
                .read_exact_at(&mut got, 0)
                .expect("read the sealed memfd");
            let untouched = got[..MAP_SIZE as usize]
                .iter()
                .chain(&got[2 * MAP_SIZE as usize..])
                .all(|&b| b == SEALED_FILL);
            assert!(
                untouched,
                "client memory the device VM may not write (read-only region, or past the maps) changed"
            );
        }
        if let Some(pio) = &self.pio {
            let mut got = vec![0u8; (PIO_SIZE - MAP_SIZE) as usize];
            std::fs::File::from(pio.try_clone().expect("dup"))
                .read_exact_at(&mut got, MAP_SIZE)
                .expect("read the unsealed memfd");
            assert!(
                got.iter().all(|&b| b == PIO_FILL),
                "client memory past the map changed"
            );
        }
        self.relay_step(|t| {
            vfu_relay::fuzzing::device_vm_gone(&t.relay);
        });
        self.relay_step(|t| {
            if t.client.take().is_some() {
                t.ch1.on_client_disconnected(&t.relay);
            }
        });
        let counts = vfu_relay::fuzzing::counts(&self.relay);
        assert!(
            counts.is_idle(),
            "the relay holds state after its client and the device VM left: {counts:?}"
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
    let mut t = Target::new(&mut inp);
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
    /// Setup with `flags`, messages up to 4096 << `max_msg_shift`, queues of `sizes`.
    pub fn new(flags: u8, max_msg_shift: u8, sizes: &[u16]) -> Self {
        let mut s = Script::default();
        s.u8(flags).u8(max_msg_shift);
        for &n in sizes {
            s.u16(n);
        }
        Self { s }
    }

    /// A chain on queue `q` holding `bytes` in `parts` readable descriptors, then
    /// `writable` writable ones of `wlen` bytes.
    pub fn chain(mut self, q: u8, parts: u8, writable: u8, wlen: u16, bytes: &[u8]) -> Self {
        self.s
            .u8(op::CHAIN)
            .u8(q)
            .u8(parts - 1)
            .u8(writable)
            .u16(wlen)
            .blob(bytes);
        self
    }

    /// `n` writable buffers of `size` bytes on queue `q`.
    pub fn post(mut self, q: u8, n: u8, size: u16) -> Self {
        self.s.u8(op::POST).u8(q).u8(n - 1).u16(size - 1);
        self
    }

    /// A kick of queue `q`.
    pub fn kick(mut self, q: u8) -> Self {
        self.s.u8(op::KICK).u8(q);
        self
    }

    /// A raw descriptor.
    #[allow(clippy::too_many_arguments)]
    pub fn desc(
        mut self,
        q: u8,
        i: u16,
        mode: u8,
        a: u32,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Self {
        self.s
            .u8(op::DESC)
            .u8(q)
            .u16(i)
            .u8(mode)
            .u32(a)
            .u32(len)
            .u16(flags)
            .u16(next);
        self
    }

    /// An available-ring entry.
    pub fn avail(mut self, q: u8, slot: u16, head: u16) -> Self {
        self.s.u8(op::AVAIL).u8(q).u16(slot).u16(head);
        self
    }

    /// The available index moves by `n`.
    pub fn publish(mut self, q: u8, n: u8) -> Self {
        self.s.u8(op::PUBLISH).u8(q).u8(n);
        self
    }

    /// Any other step without arguments but `how`.
    pub fn op(mut self, code: u8, arg: Option<u8>) -> Self {
        self.s.u8(code);
        if let Some(a) = arg {
            self.s.u8(a);
        }
        self
    }

    /// The input.
    pub fn build(self) -> Vec<u8> {
        self.s.0
    }
}

fn dma_read(channel: u32, tag: u32, segs: &[(u64, u64)]) -> Vec<u8> {
    TunnelMessage {
        channel,
        tag,
        body: Body::DmaRead {
            segments: segs
                .iter()
                .map(|&(iova, len)| vfu_proto::tunnel::DmaSegment { iova, len })
                .collect(),
        },
    }
    .encode()
}

fn dma_write(channel: u32, tag: u32, segs: &[(u64, u64)], fill: u8) -> Vec<u8> {
    let total: u64 = segs.iter().map(|s| s.1).sum();
    TunnelMessage {
        channel,
        tag,
        body: Body::DmaWrite {
            segments: segs
                .iter()
                .map(|&(iova, len)| vfu_proto::tunnel::DmaSegment { iova, len })
                .collect(),
            data: vec![fill; total as usize],
        },
    }
    .encode()
}

/// Seed inputs: the traffic of a device VM as vfu-guest produces it (HELLO, replies to
/// the relay's requests, IRQs, DMA on every path, direct and in messages, messages
/// split over descriptors and over buffers), and a few broken rings.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use vfu_proto::tunnel::IrqTrigger;
    let std = [64u16, 64, 64, 64];
    let hello = TunnelMessage {
        channel: 0,
        tag: 7,
        body: Body::Hello(Hello {
            version_major: 1,
            version_minor: 0,
            queue_pairs: 1,
            max_msg_size: 1 << 20,
            features: features::DIRECT_DATA,
        }),
    }
    .encode();
    let status = |channel, kind: Kind, tag| {
        TunnelMessage {
            channel,
            tag,
            body: Body::Status {
                kind: kind as u16,
                status: 0,
            },
        }
        .encode()
    };
    let irq = TunnelMessage::new(
        1,
        Body::Irq(IrqTrigger {
            index: 2,
            start: 0,
            count: 1,
        }),
    )
    .encode();
    let region_read_reply = {
        let reply = Reply::RegionRead(vfu_proto::vfio_user::RegionReadReply {
            offset: 0,
            region: 7,
            data: vec![0x4f, 0x49, 0xc8, 0x0d],
        });
        device_reply(1, 9, &reply).encode()
    };
    let direct = flag::DIRECT;
    let mut out = Vec::new();
    let mut add = |name: &str, b: Builder| out.push((name.to_string(), b.build()));
    add(
        "hello_in_ring",
        Builder::new(flag::HELLO_IN_RING | direct, 8, &std[..2])
            .post(0, 8, 4096)
            .kick(0)
            .chain(1, 1, 0, 0, &hello)
            .kick(1)
            .chain(1, 1, 0, 0, &status(1, Kind::ChannelUp, 1))
            .chain(1, 2, 0, 0, &status(2, Kind::ChannelUp, 2))
            .kick(1)
            .kick(0),
    );
    add(
        "irq_and_replies",
        Builder::new(direct, 8, &std[..2])
            .post(0, 16, 4096)
            .kick(0)
            .chain(1, 1, 0, 0, &irq)
            .chain(1, 3, 0, 0, &region_read_reply)
            .chain(1, 1, 0, 0, &status(1, Kind::SessionStart, 3))
            .kick(1),
    );
    for (name, iova, len) in [
        ("direct_read_sealed", RO_IOVA, 256u64),
        ("direct_read_pio", PIO_IOVA, 100),
        ("direct_read_remote", REMOTE_IOVA, 5000),
        ("direct_read_outside", 0x90_0000, 16),
    ] {
        let req = dma_read(1, 11, &[(iova, len)]);
        add(
            name,
            Builder::new(direct, 8, &std[..2])
                .post(0, 4, 4096)
                .chain(1, 1, 1, 24 + len as u16, &req)
                .kick(1)
                .op(op::ANSWER, Some(0))
                .op(op::ANSWER, Some(0))
                .kick(0),
        );
    }
    for (name, iova) in [
        ("direct_write_sealed", RW_IOVA),
        ("direct_write_readonly", RO_IOVA),
        ("direct_write_remote", REMOTE_IOVA),
    ] {
        let req = dma_write(1, 12, &[(iova, 64), (iova + 4096, 32)], 0x77);
        add(
            name,
            Builder::new(direct, 8, &std[..2])
                .chain(1, 2, 1, 24, &req)
                .kick(1)
                .op(op::ANSWER, Some(0))
                .op(op::ANSWER, Some(0)),
        );
    }
    for (name, iova) in [
        ("copy_read_pio", PIO_IOVA),
        ("copy_read_remote", REMOTE_IOVA),
    ] {
        add(
            name,
            Builder::new(0, 8, &std[..2])
                .post(0, 16, 4096)
                .chain(
                    1,
                    1,
                    0,
                    0,
                    &dma_read(1, 13, &[(iova, 300), (iova + 1000, 10)]),
                )
                .kick(1)
                .op(op::ANSWER, Some(0))
                .op(op::ANSWER, Some(0))
                .kick(0),
        );
    }
    add(
        "copy_write_split",
        Builder::new(0, 8, &std[..2])
            .post(0, 4, 4096)
            .chain(1, 4, 0, 0, &dma_write(2, 14, &[(RW_IOVA, 900)], 0x33))
            .chain(1, 1, 0, 0, &dma_write(1, 15, &[(RW_IOVA + 8, 900)], 0x44))
            .kick(1)
            .kick(0),
    );
    // One message over three chains (the framing lets a message continue in the next
    // buffer).
    let big = dma_write(1, 16, &[(PIO_IOVA, 3000)], 0x55);
    add(
        "message_over_chains",
        Builder::new(0, 8, &std[..2])
            .post(0, 4, 4096)
            .chain(1, 1, 0, 0, &big[..16])
            .chain(1, 2, 0, 0, &big[16..1000])
            .chain(1, 1, 0, 0, &big[1000..])
            .kick(1)
            .kick(0),
    );
    add(
        "direct_remote_then_client_gone",
        Builder::new(direct | flag::EVENT_IDX, 8, &std[..2])
            .chain(1, 1, 1, 24 + 4096, &dma_read(1, 17, &[(REMOTE_IOVA, 4096)]))
            .kick(1)
            .op(op::CLIENT_GONE, None)
            .op(op::EXPIRE, None),
    );
    add(
        "two_pairs",
        Builder::new(direct | flag::TWO_PAIRS, 8, &std)
            .post(0, 4, 4096)
            .post(2, 4, 4096)
            .chain(3, 1, 0, 0, &irq)
            .chain(3, 1, 1, 24 + 64, &dma_read(1, 18, &[(RW_IOVA, 64)]))
            .op(op::KICK_ALL, None),
    );
    // Broken rings: a descriptor loop, a buffer outside memory, an index jump.
    add(
        "descriptor_loop",
        Builder::new(direct, 8, &std[..2])
            .desc(1, 0, 0, 0, 16, DESC_NEXT, 1)
            .desc(1, 1, 0, 16, 16, DESC_NEXT, 0)
            .avail(1, 0, 0)
            .publish(1, 1)
            .kick(1),
    );
    add(
        "buffer_outside_memory",
        Builder::new(direct, 8, &std[..2])
            .desc(1, 0, 1, 0x1_0000, 64, 0, 0)
            .desc(1, 1, 3, 8, 64, 0, 0)
            .avail(1, 0, 0)
            .avail(1, 1, 1)
            .publish(1, 2)
            .kick(1),
    );
    add(
        "index_jump",
        Builder::new(direct, 8, &std[..2])
            .chain(1, 1, 0, 0, &irq)
            .publish(1, 200)
            .kick(1)
            .chain(1, 1, 0, 0, &irq)
            .kick(1),
    );
    add(
        "writable_before_readable",
        Builder::new(direct, 8, &std[..2])
            .desc(1, 0, 0, 0, 64, DESC_WRITE | DESC_NEXT, 1)
            .desc(1, 1, 0, 64, 64, 0, 0)
            .avail(1, 0, 0)
            .publish(1, 1)
            .kick(1),
    );
    add("odd_ring_addresses", {
        let mut b = Builder::new(flag::RING_ADDRESSES, 8, &[]);
        for (q, (d, a, u)) in [(0x0, 0x1000, 0x1400), (0xa001, 0x1_0000, 0x2_0ffc)]
            .into_iter()
            .enumerate()
        {
            b.s.u16(if q == 0 { 64 } else { 3 }).u32(d).u32(a).u32(u);
        }
        b.chain(1, 1, 0, 0, &irq).op(op::KICK_ALL, None)
    });
    add(
        "restart",
        Builder::new(direct, 8, &std[..2])
            .chain(1, 1, 1, 24 + 16, &dma_read(1, 19, &[(REMOTE_IOVA, 16)]))
            .kick(1)
            .op(op::RESTART, None)
            .chain(1, 1, 0, 0, &hello)
            .kick(1),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The used elements of queue `q` so far.
    fn used(t: &Target, q: usize) -> Vec<(u32, u32)> {
        let r = t.rings[q];
        (0..r.used_idx(&t.mem))
            .map(|i| r.used_elem(&t.mem, i))
            .collect()
    }

    fn seed(name: &str) -> Vec<u8> {
        crate::seed(seeds(), name)
    }

    /// Every seed runs through the target without a finding.
    #[test]
    fn seeds_pass() {
        crate::run_seeds(seeds(), run);
    }

    /// The seeds reach what they are named for: direct reads answered in their chain
    /// with the data (from the relay's mapping, pread, or the client), refusals with a
    /// reply head only, replies on h2g for requests in messages.
    #[test]
    fn seeds_reach_their_paths() {
        for (name, len) in [
            ("direct_read_sealed", 24 + 256),
            ("direct_read_pio", 24 + 100),
            ("direct_read_remote", 24 + 5000),
            ("direct_read_outside", 24),
            ("direct_write_sealed", 24),
            ("direct_write_readonly", 24),
            ("direct_write_remote", 24),
        ] {
            let t = execute(&seed(name));
            assert_eq!(used(&t, 1), vec![(0, len)], "{name}");
            t.finish();
        }
        let t = execute(&seed("copy_read_remote"));
        let h2g = used(&t, 0);
        assert!(
            h2g.iter().any(|&(_, len)| len == 24 + 310),
            "copy_read_remote: the DMA_READ reply on h2g: {h2g:?}"
        );
        t.finish();
    }
}
