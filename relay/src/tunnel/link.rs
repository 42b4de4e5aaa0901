//! The queue-level link to the device VM: writes tunnel messages into the driver's
//! `h2g` buffers and reassembles messages from its `g2h` buffers, following the framing
//! of `docs/tunnel.md` (section 6.1).
//!
//! Fairness: each channel has its own outbound queue and byte budget; buffers are
//! handed out round-robin, a whole message at a time (a message, once started, runs to
//! its end before another begins, as the framing requires). A channel over its budget
//! is refused further requests, and the switch stops reading that client until the
//! device VM has taken its messages: back-pressure instead of unbounded buffering.
//! Control messages (sessions, channel state, replies to the driver) are never refused.
//!
//! Everything here is guarded by one mutex, taken innermost: callers may hold a
//! channel's lock, never the other way round. No call blocks or loops without bound
//! while holding it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use thiserror::Error;
use vfu_proto::tunnel::{
    features, g2h_queue, h2g_queue, pair_of_channel, Body, TunnelError, TunnelHeader,
    TunnelMessage, MIN_H2G_BUFFER, TUNNEL_HEADER_SIZE,
};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, Chain, ChainError};
use super::direct::{BadDirect, DirectRequest, HEAD_MAX};
use crate::version::RelayLimits;
use crate::warn_limited;

/// Bytes of vfio-user messages one channel may have waiting for the device VM. Above
/// it, the switch stops reading that client.
pub const CHANNEL_BUDGET: usize = 4 << 20;

/// Most messages taken from the driver in one [`Link::receive`] call.
pub const RECEIVE_BATCH: usize = 64;

/// Bytes of answers to the driver's own messages (DMA read data, statuses, ERROR
/// reports) that may wait for `h2g` buffers on one queue pair. Beyond it, the relay
/// takes no more `g2h` chains of that pair until the driver takes some of its answers:
/// a driver that sends requests and reads none of the answers is held back, where the
/// relay would otherwise queue the answers without bound.
pub const ANSWER_BUDGET: usize = 4 << 20;

/// What a message toward the driver counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// A client's vfio-user message: its channel's budget.
    Channel,
    /// An answer to the driver's own message: its pair's [`ANSWER_BUDGET`].
    Answer,
    /// The relay's own control message (channels, sessions): bounded by what clients
    /// and the operator do, never refused.
    Control,
}

impl Budget {
    fn of(body: &Body) -> Self {
        match body {
            Body::VfioUser(_) => Budget::Channel,
            Body::HelloReply(_)
            | Body::Status { .. }
            | Body::DmaReadReply { .. }
            | Body::Error { .. } => Budget::Answer,
            _ => Budget::Control,
        }
    }
}

/// Roughly how many bytes of answer the relay sends for `msg` from the driver.
fn answer_size(msg: &Incoming) -> usize {
    match msg {
        Incoming::Message(Ok(TunnelMessage {
            body: Body::DmaRead { segments },
            ..
        })) => segments
            .iter()
            .fold(64usize, |a, s| a.saturating_add(s.len as usize)),
        // Answered in its own chain.
        Incoming::Direct(_) => 0,
        // A status, an ERROR, or nothing.
        _ => 64,
    }
}

/// Why a message could not be sent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    /// No device VM has said HELLO.
    #[error("no device VM connected")]
    NotUp,
    /// Larger than the device VM accepts.
    #[error("message of {0} bytes is larger than the device VM accepts")]
    TooLarge(usize),
    /// The channel's budget is used up.
    #[error("the channel's backlog toward the device VM is full")]
    Full,
}

impl LinkError {
    /// The errno a client gets for this.
    pub fn errno(&self) -> u32 {
        (match self {
            LinkError::NotUp => libc::ENODEV,
            LinkError::TooLarge(_) => libc::E2BIG,
            LinkError::Full => libc::EAGAIN,
        }) as u32
    }
}

/// What HELLO settled.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// Queue pairs in use.
    pub pairs: u16,
    /// Largest message the driver accepts.
    pub guest_max_msg: usize,
    /// Tunnel features in force.
    pub features: u64,
}

/// What the link holds (for the fuzz targets' checks that it stays bounded and goes
/// back to nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounts {
    /// Messages waiting for the driver's `h2g` buffers.
    pub queued: usize,
    /// Their bytes not yet written.
    pub queued_bytes: usize,
    /// Channels with vfio-user bytes counted against their budget.
    pub backlog_channels: usize,
    /// Direct requests waiting for a client's answer.
    pub parked: usize,
}

/// A message from the driver that could not be decoded; the header, when it could be
/// read, lets the relay answer it.
#[derive(Debug)]
pub struct BadMessage {
    /// The header, if it decoded.
    pub header: Option<TunnelHeader>,
    /// Why the message was refused.
    pub error: TunnelError,
}

/// What the driver sent.
#[derive(Debug)]
pub enum Incoming {
    /// A message (or what could not be decoded of one).
    Message(Result<TunnelMessage, BadMessage>),
    /// A DMA request to be answered in its own chain (`DIRECT_DATA`).
    Direct(DirectRequest),
    /// A descriptor chain the relay refused (why): its message, if any, is lost.
    BadChain(String),
}

/// Reassembles one `g2h` queue's messages.
#[derive(Debug, Default)]
struct Reassembly {
    buf: Vec<u8>,
    expected: usize,
}

impl Reassembly {
    /// Adds the bytes of one buffer; returns a complete message or a framing error.
    fn push(&mut self, chunk: Vec<u8>, max: usize) -> Option<Result<Vec<u8>, TunnelError>> {
        if self.expected == 0 {
            let header = match TunnelHeader::decode(&chunk) {
                Ok(h) => h,
                Err(e) => return Some(Err(e)),
            };
            let total = header.message_size();
            if total > max {
                return Some(Err(TunnelError::TooLarge {
                    size: total,
                    limit: max,
                }));
            }
            if chunk.len() == total {
                return Some(Ok(chunk)); // the whole message in one buffer: no copy
            }
            self.expected = total;
            self.buf = Vec::with_capacity(total);
        }
        if self.buf.len() + chunk.len() > self.expected {
            // A buffer carries bytes of one message only.
            let extra = self.buf.len() + chunk.len() - self.expected;
            self.expected = 0;
            self.buf = Vec::new();
            return Some(Err(TunnelError::TrailingBytes { extra }));
        }
        self.buf.extend_from_slice(&chunk);
        if self.buf.len() == self.expected {
            self.expected = 0;
            return Some(Ok(std::mem::take(&mut self.buf)));
        }
        None
    }
}

/// A message on its way to the driver.
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    written: usize,
    /// What it counts against.
    budget: Budget,
}

/// Outbound state of one `h2g` queue.
#[derive(Debug, Default)]
struct PairTx {
    /// Per channel: messages in order.
    queues: BTreeMap<u32, VecDeque<Outgoing>>,
    /// The channel whose message is partly written (it must finish first).
    in_progress: Option<u32>,
    /// Channel served last, for round-robin.
    last: u32,
    /// Bytes of answers waiting (see [`ANSWER_BUDGET`]).
    answers: usize,
    /// The answers went back under the budget: the pair's `g2h` queue is to be read
    /// again.
    resume: bool,
}

impl PairTx {
    /// The channel whose message goes next.
    fn next_channel(&self) -> Option<u32> {
        if let Some(c) = self.in_progress {
            return Some(c);
        }
        self.queues
            .range(self.last.wrapping_add(1)..)
            .chain(self.queues.range(..=self.last))
            .find(|(_, q)| !q.is_empty())
            .map(|(&c, _)| c)
    }
}

/// Ends the frontend connection of the device VM.
pub type Dropper = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Inner {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// Every queue's vring, in queue order, once each queue worker thread handed in
    /// its own ([`Link::attach_vrings`]); empty until then.
    vrings: Vec<VringRwLock>,
    /// The vrings handed in so far, by queue index.
    arriving: Vec<Option<VringRwLock>>,
    /// A ring is unusable (its available index out of range): the device VM broke
    /// it, and nothing moves until a new device VM connects (the relay drops this
    /// one: [`Link::attach_dropper`]). Also set when the backend refused the VMM's
    /// memory table ([`Link::refuse_memory`]).
    broken: bool,
    /// Drops the device VM's connection (once).
    dropper: Option<Dropper>,
    up: Option<Negotiated>,
    tx: Vec<PairTx>,
    rx: Vec<Reassembly>,
    /// vfio-user bytes waiting, per channel.
    backlog: BTreeMap<u32, usize>,
    /// Per pair: the driver must be signalled about used `h2g` buffers.
    signal_due: Vec<bool>,
    /// Direct requests whose answer comes from the client, by channel and tag. At most
    /// one per `g2h` descriptor chain the driver has in flight.
    parked: HashMap<(u32, u32), DirectRequest>,
}

/// The link to the device VM.
pub struct Link {
    inner: Mutex<Inner>,
    tag: AtomicU32,
    /// Bumped on every reset: a late call from a previous connection's worker thread
    /// cannot attach that connection's vrings.
    generation: AtomicU64,
    /// Per switch thread: some channel went back under its budget, so its paused
    /// clients may be read again.
    room_made: Vec<AtomicBool>,
    /// Per switch thread: woken when a channel gets room again.
    wakes: Vec<EventFd>,
    /// Per pair: a poller (a switch thread in poll mode) drains its `g2h` queue, which
    /// stays without notifications until it stops ([`Link::set_polling`]).
    polling: Vec<AtomicBool>,
    /// Per `g2h` queue: held while its messages are taken and dispatched, so that the
    /// poller and a queue worker woken by a late notification keep their order.
    draining: Vec<Mutex<()>>,
    /// Queue pairs the relay offers.
    pub offered_pairs: u16,
    /// Largest message the relay accepts from the device VM.
    pub max_msg_size: usize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("up", &self.is_up())
            .field("offered_pairs", &self.offered_pairs)
            .finish()
    }
}

impl Link {
    /// A link with no device VM. When a channel gets room again, every one of
    /// `wakes` is signalled and its flag set ([`Link::take_room_made`] with its index).
    pub fn new(offered_pairs: u16, limits: RelayLimits, wakes: Vec<EventFd>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            tag: AtomicU32::new(1),
            generation: AtomicU64::new(1),
            room_made: wakes.iter().map(|_| AtomicBool::new(false)).collect(),
            wakes,
            polling: (0..offered_pairs).map(|_| AtomicBool::new(false)).collect(),
            draining: (0..offered_pairs).map(|_| Mutex::new(())).collect(),
            offered_pairs,
            // The largest data transfer, its vfio-user headers and the tunnel header.
            max_msg_size: limits.max_data_xfer_size as usize + 4096,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh request tag.
    pub fn next_tag(&self) -> u32 {
        self.tag.fetch_add(1, Ordering::Relaxed).max(1)
    }

    /// The current connection generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a device VM has completed HELLO.
    pub fn is_up(&self) -> bool {
        self.lock().up.is_some()
    }

    /// Largest message the driver accepts (0 before HELLO).
    pub fn guest_max_msg(&self) -> usize {
        self.lock().up.map_or(0, |u| u.guest_max_msg)
    }

    /// Tunnel features in force (0 before HELLO).
    pub fn features(&self) -> u64 {
        self.lock().up.map_or(0, |u| u.features)
    }

    /// Whether `channel` may queue another vfio-user message.
    pub fn has_room(&self, channel: u32) -> bool {
        self.lock().backlog.get(&channel).copied().unwrap_or(0) < CHANNEL_BUDGET
    }

    /// Forgets what the link counts for channel `id`, which the device VM withdrew
    /// (its messages were taken before it acknowledged).
    pub fn forget_channel(&self, id: u32) {
        self.lock().backlog.remove(&id);
    }

    /// Takes the "some channel got room again" flag of waker `waker` (an index into
    /// the `wakes` given to [`Link::new`]).
    pub fn take_room_made(&self, waker: usize) -> bool {
        self.room_made
            .get(waker)
            .is_some_and(|f| f.swap(false, Ordering::AcqRel))
    }

    /// The guest memory table of connection `generation` changed (vhost-user
    /// SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) and the backend checked `table`
    /// ([`super::TunnelBackend`]'s `update_memory`). The link reads and writes guest
    /// memory only through the tables given here, never through the vrings' own view:
    /// `vhost-user-backend` puts a new table there *before* the backend gets to check
    /// it, and the relay must never touch a table it refuses.
    pub fn attach_memory(&self, generation: u64, table: Arc<GuestMemoryMmap>) {
        if generation == self.generation() {
            self.lock().mem = Some(GuestMemoryAtomic::from(table));
        }
    }

    /// The backend refused the guest memory table of connection `generation`: the link
    /// lets go of that connection's memory and reads or writes nothing of it again
    /// (the memory it had before included). The connection itself ends with the
    /// refused request (`vhost-user-backend` ends a connection whose request failed,
    /// after it has sent the frontend its negative acknowledgement), and the device VM
    /// is gone for the relay as when it disconnects.
    pub fn refuse_memory(&self, generation: u64) {
        if generation != self.generation() {
            return;
        }
        let mut inner = self.lock();
        inner.mem = None;
        inner.broken = true;
    }

    /// The memory table the link uses, if any.
    #[cfg(test)]
    pub(crate) fn memory_table(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.lock().mem.as_ref().map(|m| m.memory().into_inner())
    }

    /// How to drop the device VM of connection `generation`, should it break a ring
    /// (called at once if it has already).
    pub fn attach_dropper(&self, generation: u64, dropper: Dropper) {
        if generation != self.generation() {
            return;
        }
        let mut inner = self.lock();
        inner.dropper = Some(dropper);
        if inner.broken {
            break_link(&mut inner);
        }
    }

    /// Remembers the vrings of connection `generation` that a queue worker thread
    /// serves: `vrings` are queues `first..`. The link uses them once every queue's
    /// vring is known; returns whether this call completed them (the caller then looks
    /// at every queue: notifications that came before were not acted on).
    pub fn attach_vrings(&self, generation: u64, first: usize, vrings: &[VringRwLock]) -> bool {
        if generation != self.generation() {
            return false;
        }
        let mut inner = self.lock();
        if !inner.vrings.is_empty() {
            return false;
        }
        let queues = 2 * usize::from(self.offered_pairs);
        inner.arriving.resize(queues, None);
        for (slot, vring) in inner.arriving.iter_mut().skip(first).zip(vrings) {
            *slot = Some(vring.clone());
        }
        if inner.arriving.iter().any(Option::is_none) {
            return false;
        }
        inner.vrings = std::mem::take(&mut inner.arriving)
            .into_iter()
            .flatten()
            .collect();
        let pairs = queues / 2;
        inner.tx = (0..pairs).map(|_| PairTx::default()).collect();
        inner.rx = (0..pairs).map(|_| Reassembly::default()).collect();
        inner.signal_due = vec![false; pairs];
        true
    }

    /// HELLO settled these parameters: from now on messages flow. Anything queued for a
    /// previous driver instance is dropped, and so are its direct requests waiting for
    /// a client: their chains are not the new instance's to get back.
    pub fn set_up(&self, negotiated: Negotiated) {
        let mut inner = self.lock();
        inner.up = Some(negotiated);
        inner.tx.iter_mut().for_each(|t| *t = PairTx::default());
        inner.rx.iter_mut().for_each(|r| *r = Reassembly::default());
        inner.backlog.clear();
        inner.parked.clear();
        drop(inner);
        self.note_room();
    }

    /// Forgets a negotiation (after refusing a HELLO).
    pub fn reset_negotiation(&self) {
        self.lock().up = None;
    }

    /// The frontend disconnected: forget its memory, queues and negotiation.
    pub fn reset(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        *self.lock() = Inner::default();
        self.note_room();
    }

    fn note_room(&self) {
        for (flag, wake) in self.room_made.iter().zip(&self.wakes) {
            flag.store(true, Ordering::Release);
            let _ = wake.write(1);
        }
    }

    /// Queues `msg` on its channel's queue pair and writes what the driver has room for.
    /// vfio-user messages count against the channel's budget; control messages do not.
    pub fn send(&self, msg: &TunnelMessage) -> Result<(), LinkError> {
        let bytes = msg.encode();
        let budget = Budget::of(&msg.body);
        let mut inner = self.lock();
        let Some(up) = inner.up.filter(|_| !inner.broken) else {
            return Err(LinkError::NotUp);
        };
        if bytes.len() > up.guest_max_msg {
            return Err(LinkError::TooLarge(bytes.len()));
        }
        let pair = pair_of_channel(msg.channel, up.pairs) as usize;
        if pair >= inner.tx.len() {
            return Err(LinkError::NotUp);
        }
        match budget {
            Budget::Channel => {
                let backlog = inner.backlog.entry(msg.channel).or_insert(0);
                // The switch stops reading at the budget; this is the hard stop for
                // anything that slips past (one message beyond the budget at most).
                if *backlog >= 2 * CHANNEL_BUDGET {
                    return Err(LinkError::Full);
                }
                *backlog += bytes.len();
            }
            Budget::Answer => inner.tx[pair].answers += bytes.len(),
            Budget::Control => {}
        }
        inner.tx[pair]
            .queues
            .entry(msg.channel)
            .or_default()
            .push_back(Outgoing {
                bytes,
                written: 0,
                budget,
            });
        let room = flush_pair(&mut inner, pair);
        drop(inner);
        if room {
            self.note_room();
        }
        Ok(())
    }

    /// The driver posted `h2g` buffers on `pair`: write what is waiting.
    pub fn flush(&self, pair: usize) {
        let room = flush_pair(&mut self.lock(), pair);
        if room {
            self.note_room();
        }
    }

    /// Signals the driver about the `h2g` buffers filled since the last call. Sending
    /// only queues and fills; callers signal once per batch, as the last step before
    /// they sleep, so that a woken driver does not preempt them mid-batch.
    pub fn signal_pending(&self) {
        let mut inner = self.lock();
        let mem = inner.mem.as_ref().map(GuestAddressSpace::memory);
        for pair in 0..inner.signal_due.len() {
            if std::mem::take(&mut inner.signal_due[pair]) {
                if let Some(vring) = inner.vrings.get(h2g_queue(pair as u16) as usize) {
                    signal_used(vring, mem.as_deref());
                }
            }
        }
    }

    /// Takes up to [`RECEIVE_BATCH`] messages from the `g2h` queue of `pair`. The
    /// second value says whether more may be waiting (call again).
    pub fn receive(&self, pair: usize) -> (Vec<Incoming>, bool) {
        let mut inner = self.lock();
        let max = self.max_msg_size;
        let mut out = Vec::new();
        if inner.broken {
            return (out, false);
        }
        let Some(mem) = inner.mem.clone() else {
            return (out, false);
        };
        let Some(vring) = inner
            .vrings
            .get(g2h_queue(pair as u16) as usize)
            .filter(|v| is_ready(v))
            .cloned()
        else {
            return (out, false);
        };
        let direct_allowed = inner
            .up
            .is_some_and(|u| u.features & features::DIRECT_DATA != 0);
        let generation = self.generation();
        let guard = mem.memory();
        let Some(avail_rings) = available_rings(&mut inner, "g2h", pair) else {
            return (out, false);
        };
        let mut more = false;
        // Answers waiting on this pair, and those the messages taken now will get.
        let waiting = inner.tx.get(pair).map_or(0, |t| t.answers);
        let mut coming = 0usize;
        'outer: loop {
            disable_notification(&vring, &guard);
            loop {
                if out.len() == RECEIVE_BATCH {
                    more = true;
                    break 'outer;
                }
                if waiting >= ANSWER_BUDGET {
                    // Held back: the chains stay in the ring until the driver takes its
                    // answers (`Link::take_resume`).
                    warn_limited!(
                        "g2h queue {pair}: the device VM does not take its answers ({waiting} bytes wait); its requests wait too"
                    );
                    break 'outer;
                }
                if waiting.saturating_add(coming) >= ANSWER_BUDGET {
                    // The batch ends here: once its answers are made, they count.
                    more = true;
                    break 'outer;
                }
                let popped = match pop_head(&vring, &guard) {
                    Ok(p) => p,
                    Err(e) => {
                        warn!("g2h queue {pair} unusable ({e}); dropping the device VM");
                        break_link(&mut inner);
                        break 'outer;
                    }
                };
                let Some((head, table, size)) = popped else {
                    break;
                };
                let walked = chain::walk(&guard, table, size, head, max).and_then(|c| {
                    if c.readable.buffers() == 0 {
                        Err(ChainError::NoReadable)
                    } else if c.writable.meets(&avail_rings) {
                        Err(ChainError::OverAvailableRing)
                    } else {
                        Ok(c)
                    }
                });
                let Chain { readable, writable } = match walked {
                    Ok(c) => c,
                    Err(e) => {
                        warn_limited!("g2h queue {pair}: descriptor chain refused: {e}");
                        if head < size {
                            add_used(&vring, &guard, head, 0);
                        }
                        // A message the chain may have continued is lost with it.
                        if let Some(rx) = inner.rx.get_mut(pair) {
                            *rx = Reassembly::default();
                        }
                        let msg = Incoming::BadChain(format!("descriptor chain refused: {e}"));
                        coming += answer_size(&msg);
                        out.push(msg);
                        continue;
                    }
                };
                if !writable.is_empty() {
                    let parsed = if !direct_allowed {
                        Err(BadDirect {
                            header: None,
                            error: TunnelError::InvalidField {
                                field: "device-writable g2h buffer without DIRECT_DATA",
                                value: writable.len() as u64,
                            },
                        })
                    } else if inner.rx.get(pair).is_some_and(|rx| rx.expected != 0) {
                        Err(BadDirect {
                            header: None,
                            error: TunnelError::TrailingBytes {
                                extra: readable.len(),
                            },
                        })
                    } else {
                        match readable.read_prefix(&guard, HEAD_MAX) {
                            Some(prefix) => DirectRequest::parse(
                                &prefix,
                                readable,
                                writable,
                                mem.clone(),
                                pair,
                                head,
                                generation,
                            ),
                            None => Err(BadDirect {
                                header: None,
                                error: TunnelError::InvalidField {
                                    field: "buffer outside guest memory",
                                    value: readable.len() as u64,
                                },
                            }),
                        }
                    };
                    match parsed {
                        Ok(req) => out.push(Incoming::Direct(req)),
                        Err(BadDirect { header, error }) => {
                            add_used(&vring, &guard, head, 0);
                            let msg = Incoming::Message(Err(BadMessage { header, error }));
                            coming += answer_size(&msg);
                            out.push(msg);
                        }
                    }
                    continue;
                }
                // Read before the buffer goes back: the driver reuses it at once.
                let data = readable.read_prefix(&guard, readable.len());
                add_used(&vring, &guard, head, 0);
                let Some(data) = data else {
                    // The walk checked the buffers against guest memory.
                    warn_limited!("g2h queue {pair}: buffer outside guest memory");
                    continue;
                };
                if let Some(done) = inner.rx.get_mut(pair).and_then(|rx| rx.push(data, max)) {
                    let msg = Incoming::Message(decode(done));
                    coming += answer_size(&msg);
                    out.push(msg);
                }
            }
            if self.is_polled(pair) {
                // Notifications stay off: the poller looks at this queue again soon.
                break;
            }
            if !enable_notification(&vring, &guard).unwrap_or(false) {
                break;
            }
        }
        signal_used(&vring, Some(&guard));
        (out, more)
    }

    /// Holds `g2h` queue `pair` for one taker: what it receives it dispatches before
    /// another thread receives more, so the messages of a channel keep their order.
    pub fn draining(&self, pair: usize) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.draining
            .get(pair)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether a poller drains `g2h` queue `pair`.
    fn is_polled(&self, pair: usize) -> bool {
        self.polling
            .get(pair)
            .is_some_and(|p| p.load(Ordering::Acquire))
    }

    /// Starts or stops polling queue pair `pair`. Started: the driver's `g2h`
    /// notifications (kicks) are left off after each drain, at most one more comes.
    /// Stopped: they are asked for again; returns whether the queue has buffers
    /// waiting already (the caller must drain it before it sleeps, as no notification
    /// will come for those).
    pub fn set_polling(&self, pair: usize, on: bool) -> bool {
        let Some(flag) = self.polling.get(pair) else {
            return false;
        };
        flag.store(on, Ordering::Release);
        let inner = self.lock();
        let Some(mem) = inner.mem.as_ref().filter(|_| !inner.broken) else {
            return false;
        };
        // (A queue the VMM did not set up has no rings to write the flag in.)
        let Some(vring) = inner
            .vrings
            .get(g2h_queue(pair as u16) as usize)
            .filter(|v| is_ready(v))
        else {
            return false;
        };
        let guard = mem.memory();
        if on {
            disable_notification(vring, &guard);
            false
        } else {
            enable_notification(vring, &guard).unwrap_or(false)
        }
    }

    /// One look at queue pair `pair` for the poller: writes what waits for `h2g`
    /// buffers the driver has posted since, and says whether the driver has put
    /// buffers on `g2h` that are not taken yet (then call [`Link::receive`]).
    pub fn poll(&self, pair: usize) -> bool {
        let mut inner = self.lock();
        if inner.broken {
            return false;
        }
        let pending = inner
            .tx
            .get(pair)
            .is_some_and(|t| t.queues.values().any(|q| !q.is_empty()));
        if pending && flush_pair(&mut inner, pair) {
            drop(inner);
            self.note_room();
            inner = self.lock();
        }
        if inner
            .tx
            .get(pair)
            .is_some_and(|t| t.answers >= ANSWER_BUDGET)
        {
            return false; // held back until the driver takes its answers
        }
        let (Some(mem), Some(vring)) = (
            inner.mem.as_ref(),
            inner.vrings.get(g2h_queue(pair as u16) as usize),
        ) else {
            return false;
        };
        let guard = mem.memory();
        let state = vring.get_ref();
        let queue = state.get_queue();
        queue.ready()
            && queue
                .avail_idx(&*guard, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// Queue pairs set up by the frontend (0 before it set up any).
    pub fn pairs(&self) -> usize {
        self.lock().tx.len()
    }

    /// The pairs whose `g2h` queue was held back for unread answers and may be read
    /// again (the driver took enough of them).
    pub fn take_resume(&self) -> Vec<usize> {
        let mut inner = self.lock();
        inner
            .tx
            .iter_mut()
            .enumerate()
            .filter_map(|(p, t)| std::mem::take(&mut t.resume).then_some(p))
            .collect()
    }

    /// What the link holds now.
    pub fn counts(&self) -> LinkCounts {
        let inner = self.lock();
        let queued = inner.tx.iter().flat_map(|t| t.queues.values()).flatten();
        LinkCounts {
            queued: queued.clone().count(),
            queued_bytes: queued.map(|o| o.bytes.len() - o.written).sum(),
            backlog_channels: inner.backlog.len(),
            parked: inner.parked.len(),
        }
    }

    /// Keeps a direct request until its answer comes (from the client). Gives it back
    /// when one with the same channel and tag is already waiting, or when the device VM
    /// it came from is gone.
    pub fn park_direct(&self, req: DirectRequest) -> Option<DirectRequest> {
        let mut inner = self.lock();
        let key = (req.header.channel, req.header.tag);
        if req.generation != self.generation() || inner.parked.contains_key(&key) {
            return Some(req);
        }
        inner.parked.insert(key, req);
        None
    }

    /// Answers the driver's request `tag` on `channel`: in its chain if it is a parked
    /// direct request, else as a message on `h2g`.
    pub fn reply(&self, channel: u32, tag: u32, body: Body) {
        let parked = self.lock().parked.remove(&(channel, tag));
        match parked {
            Some(req) => req.answer(self, body),
            None => {
                if let Err(e) = self.send(&TunnelMessage { channel, tag, body }) {
                    debug!("reply on channel {channel} not sent: {e}");
                }
            }
        }
    }

    /// Returns a direct request's chain with `written` bytes of reply in it, and
    /// interrupts the driver (which waits for it) unless it asked not to be.
    pub fn complete_direct(&self, req: &DirectRequest, written: u32) {
        let inner = self.lock();
        if req.generation != self.generation() || inner.broken {
            return; // the chain belongs to a device VM that is gone
        }
        let (Some(mem), Some(vring)) = (
            inner.mem.as_ref(),
            inner.vrings.get(g2h_queue(req.pair as u16) as usize),
        ) else {
            return;
        };
        let guard = mem.memory();
        if add_used(vring, &guard, req.head, written) {
            signal_used(vring, Some(&guard));
        }
    }
}

// The queue operations the link does, on the guest memory the link was given
// ([`Link::attach_memory`]), never on the vring's own view of it (the
// `VringRwLock` methods of the same names), which may already be a table the
// backend has not checked, or refused.

/// Returns buffer `head` to the driver with `len` bytes written; whether it went.
fn add_used(vring: &VringRwLock, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    vring
        .get_mut()
        .get_queue_mut()
        .add_used(mem, head, len)
        .is_ok()
}

/// Asks the driver to notify when it makes buffers available; `true` when some came
/// meanwhile (look again).
fn enable_notification(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    vring.get_mut().get_queue_mut().enable_notification(mem)
}

/// Asks the driver not to notify when it makes buffers available.
fn disable_notification(vring: &VringRwLock, mem: &GuestMemoryMmap) {
    let _ = vring.get_mut().get_queue_mut().disable_notification(mem);
}

/// Interrupts the driver about used buffers of `vring`, unless EVENT_IDX says it need
/// not be (without memory to look at, it is).
fn signal_used(vring: &VringRwLock, mem: Option<&GuestMemoryMmap>) {
    let needed = mem.is_none_or(|m| {
        vring
            .get_mut()
            .get_queue_mut()
            .needs_notification(m)
            .unwrap_or(true)
    });
    if needed {
        let _ = vring.signal_used_queue();
    }
}

/// A ring is unusable: nothing more is read or written, and the device VM's
/// connection is dropped (its clients' requests fail at once, not at their timeouts;
/// a new device VM serves them again).
fn break_link(inner: &mut Inner) {
    inner.broken = true;
    if let Some(drop_device_vm) = inner.dropper.take() {
        drop_device_vm();
    }
}

/// Where the available rings of the queues the driver set up lie (address, bytes),
/// which the relay must never write: a used ring or a device-writable buffer over one
/// would make each of the relay's own writes look like a buffer the driver posted (a
/// used ring at the address of its available ring: every buffer returned "posts" the
/// next), and the relay would feed itself for ever, at no cost to the device VM.
/// `None` when a used ring lies over one: the rings are unusable, the device VM is
/// dropped.
fn available_rings(inner: &mut Inner, which: &str, pair: usize) -> Option<Vec<(u64, u64)>> {
    // (Queues the driver did not set up are not ready, and lie nowhere.)
    let rings: Vec<_> = inner
        .vrings
        .iter()
        .filter_map(|v| {
            let state = v.get_ref();
            let q = state.get_queue();
            let n = u64::from(q.size());
            q.ready()
                .then(|| ((q.avail_ring(), 6 + 2 * n), (q.used_ring(), 6 + 8 * n)))
        })
        .collect();
    let avail: Vec<(u64, u64)> = rings.iter().map(|r| r.0).collect();
    if rings
        .iter()
        .any(|&(_, (at, len))| overlaps_any(&avail, at, len))
    {
        warn!(
            "{which} queue {pair}: a used ring lies over an available ring; dropping the device VM"
        );
        break_link(inner);
        return None;
    }
    Some(avail)
}

/// Whether `[at, at + len)` meets one of `areas` (address, bytes).
pub(crate) fn overlaps_any(areas: &[(u64, u64)], at: u64, len: u64) -> bool {
    let end = at.saturating_add(len);
    len > 0
        && areas
            .iter()
            .any(|&(a, n)| n > 0 && at < a.saturating_add(n) && a < end)
}

/// Whether the VMM set `vring` up (SET_VRING_ADDR, enabled): before, its ring
/// addresses mean nothing, and the relay must neither read nor write them.
fn is_ready(vring: &VringRwLock) -> bool {
    vring.get_ref().get_queue().ready()
}

/// Takes the next chain's head from the available ring of `vring`, with the queue's
/// descriptor table and size for walking it ([`chain::walk`]); `None` when the ring is
/// empty or the queue not ready, an error when the ring itself is unusable (its index out of range, or the
/// entry naming the next buffer outside guest memory).
fn pop_head(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, GuestAddress, u16)>, virtio_queue::Error> {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if !queue.ready() {
        // Not set up yet (or reset): nothing to take. Its worker looks when the VMM
        // sets it up and the driver notifies.
        return Ok(None);
    }
    let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
    let head = queue.iter(mem)?.next().map(|c| c.head_index());
    if head.is_none() {
        // `virtio-queue` reports an entry it cannot read as an empty ring. But the
        // index says a buffer is there, and re-enabling notifications says so again:
        // the callers would look for ever (a device VM holding a queue worker and the
        // link's lock for good). The entry's place does not depend on the index, so a
        // buffer the driver posts meanwhile is not taken for this.
        let next = queue.next_avail();
        let posted = queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != next);
        let entry = queue
            .avail_ring()
            .checked_add(4 + 2 * u64::from(next % size.max(1)));
        if posted && !entry.is_some_and(|a| mem.check_range(GuestAddress(a), 2)) {
            return Err(virtio_queue::Error::FindMemoryRegion);
        }
    }
    Ok(head.map(|h| (h, table, size)))
}

pub(crate) fn decode(bytes: Result<Vec<u8>, TunnelError>) -> Result<TunnelMessage, BadMessage> {
    let bytes = bytes.map_err(|error| BadMessage {
        header: None,
        error,
    })?;
    let header = TunnelHeader::decode(&bytes).map_err(|error| BadMessage {
        header: None,
        error,
    })?;
    TunnelMessage::decode_body(&header, &bytes[TUNNEL_HEADER_SIZE..]).map_err(|error| BadMessage {
        header: Some(header),
        error,
    })
}

/// Writes waiting messages of `pair` into the driver's `h2g` buffers, round-robin over
/// channels. Returns whether a channel went back under its budget.
fn flush_pair(inner: &mut Inner, pair: usize) -> bool {
    if inner.broken {
        return false;
    }
    let Some(mem) = inner.mem.clone() else {
        return false;
    };
    let Some(vring) = inner
        .vrings
        .get(h2g_queue(pair as u16) as usize)
        .filter(|v| is_ready(v))
        .cloned()
    else {
        return false;
    };
    let guard = mem.memory();
    let Some(avail_rings) = available_rings(inner, "h2g", pair) else {
        return false;
    };
    let mut used_any = false;
    let mut room = false;
    let Some(mut tx) = inner.tx.get_mut(pair).map(std::mem::take) else {
        return false;
    };
    while let Some(channel) = tx.next_channel() {
        if tx.queues.get(&channel).is_none_or(VecDeque::is_empty) {
            tx.in_progress = None;
            tx.queues.remove(&channel);
            continue;
        }
        let popped = match pop_head(&vring, &guard) {
            Ok(p) => p,
            Err(e) => {
                warn!("h2g queue {pair} unusable ({e}); dropping the device VM");
                break_link(inner);
                break;
            }
        };
        let Some((head, table, size)) = popped else {
            // Out of buffers: ask the driver to kick when it posts more (with EVENT_IDX
            // this arms one notification), then look once more in case it posted some
            // meanwhile.
            match enable_notification(&vring, &guard) {
                Ok(true) => continue,
                _ => {
                    debug!("h2g queue {pair}: no buffer; messages wait");
                    break;
                }
            }
        };
        let buffer = chain::walk(&guard, table, size, head, u32::MAX as usize).and_then(|c| {
            if c.readable.buffers() > 0 {
                Err(ChainError::NotDeviceWritable)
            } else if c.writable.meets(&avail_rings) {
                Err(ChainError::OverAvailableRing)
            } else if c.writable.len() < MIN_H2G_BUFFER as usize {
                Err(ChainError::TooSmall(c.writable.len()))
            } else {
                Ok(c.writable)
            }
        });
        let buffer = match buffer {
            Ok(b) => b,
            Err(e) => {
                // Passed by: the message goes into the next buffer.
                warn_limited!("h2g queue {pair}: buffer refused: {e}");
                if head < size {
                    add_used(&vring, &guard, head, 0);
                    used_any = true;
                }
                continue;
            }
        };
        let Some(out) = tx.queues.get_mut(&channel).and_then(|q| q.front_mut()) else {
            continue; // checked above
        };
        let n = buffer.write_prefix(&guard, &out.bytes[out.written..]);
        add_used(&vring, &guard, head, n as u32);
        used_any = true;
        out.written += n;
        let (total, budget) = (out.bytes.len(), out.budget);
        if out.written == total {
            tx.queues.get_mut(&channel).map(VecDeque::pop_front);
            tx.in_progress = None;
            tx.last = channel;
            match budget {
                Budget::Channel => {
                    if let Some(b) = inner.backlog.get_mut(&channel) {
                        let before = *b;
                        *b = b.saturating_sub(total);
                        if before >= CHANNEL_BUDGET && *b < CHANNEL_BUDGET {
                            room = true;
                        }
                    }
                }
                Budget::Answer => {
                    let before = tx.answers;
                    tx.answers = tx.answers.saturating_sub(total);
                    if before >= ANSWER_BUDGET && tx.answers < ANSWER_BUDGET {
                        tx.resume = true;
                    }
                }
                Budget::Control => {}
            }
        } else {
            tx.in_progress = Some(channel);
        }
    }
    tx.queues.retain(|_, q| !q.is_empty());
    inner.tx[pair] = tx;
    if used_any {
        if let Some(due) = inner.signal_due.get_mut(pair) {
            *due = true;
        }
    }
    room
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::RelayLimits;
    use std::sync::Arc;

    /// A message split over several buffers is put back together; a buffer holding bytes
    /// of two messages, or a header over the limit, is a framing error after which the
    /// next buffer starts a new message.
    #[test]
    fn reassembly() {
        let msg = TunnelMessage::new(
            3,
            Body::Error {
                errno: 5,
                text: "x".repeat(100),
            },
        )
        .encode();
        let mut r = Reassembly::default();
        assert!(r.push(msg[..16].to_vec(), 4096).is_none());
        assert!(r.push(msg[16..50].to_vec(), 4096).is_none());
        assert_eq!(r.push(msg[50..].to_vec(), 4096).unwrap().unwrap(), msg);
        let mut two = msg.clone();
        two.extend_from_slice(&msg);
        assert!(r.push(two.to_vec(), 4096).unwrap().is_err());
        assert!(r.push(msg.to_vec(), 64).unwrap().is_err());
        assert_eq!(r.push(msg.to_vec(), 4096).unwrap().unwrap(), msg);
        assert!(r.push([1, 2, 3].to_vec(), 4096).unwrap().is_err());
    }

    /// A link over two queues of 16 entries in 1 MiB of guest memory (the g2h ring's
    /// available ring at 0x2000 + 0x1000 = 0x3000), negotiated, with a dropper that
    /// records being called.
    fn link_over_rings() -> (Link, GuestMemoryAtomic<GuestMemoryMmap>, Arc<AtomicBool>) {
        link_over_rings_in(1 << 20)
    }

    fn link_over_rings_in(
        mem_size: usize,
    ) -> (Link, GuestMemoryAtomic<GuestMemoryMmap>, Arc<AtomicBool>) {
        let link = Link::new(1, RelayLimits::DEFAULT, Vec::new());
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap(),
        );
        let vrings: Vec<VringRwLock> = (0..2u64)
            .map(|q| {
                let v = VringRwLock::new(mem.clone(), 256).unwrap();
                let base = 0x10000 * (q + 1);
                v.set_queue_size(16);
                v.set_queue_info(base, base + 0x1000, base + 0x2000)
                    .unwrap();
                v.set_queue_ready(true);
                v
            })
            .collect();
        let dropped = connect(&link, &mem, &vrings, 2 << 20);
        (link, mem, dropped)
    }

    /// Gives `link` the memory and vrings of a new device VM connection, negotiates
    /// one pair with `guest_max_msg`, and attaches a dropper; returns the flag the
    /// dropper sets.
    fn connect(
        link: &Link,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        vrings: &[VringRwLock],
        guest_max_msg: usize,
    ) -> Arc<AtomicBool> {
        let generation = link.generation();
        link.attach_memory(generation, mem.memory().into_inner());
        link.attach_vrings(generation, 0, vrings);
        link.set_up(Negotiated {
            pairs: 1,
            guest_max_msg,
            features: 0,
        });
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        link.attach_dropper(
            generation,
            Box::new(move || flag.store(true, Ordering::Release)),
        );
        dropped
    }

    /// A device VM that moves its g2h available index out of range (here 100 ahead of a
    /// ring of 16) is dropped, and the link takes no more messages for it: clients get
    /// an error at once instead of their requests waiting in a queue nobody reads.
    #[test]
    fn a_broken_ring_drops_the_device_vm() {
        let (link, mem, dropped) = link_over_rings();
        let msg = TunnelMessage::new(1, Body::SessionStart);
        // The driver posted no h2g buffer: the message waits, as it should.
        assert_eq!(link.send(&msg), Ok(()));
        use vm_memory::Bytes;
        let g2h_avail = 0x20000 + 0x1000;
        mem.memory()
            .write_obj(100u16, GuestAddress(g2h_avail + 2))
            .unwrap();
        let (got, more) = link.receive(0);
        assert!(got.is_empty() && !more);
        assert!(dropped.load(Ordering::Acquire), "the device VM is dropped");
        assert_eq!(link.send(&msg), Err(LinkError::NotUp));
        // The next device VM starts from a clean link.
        link.reset();
        assert!(!link.lock().broken);
    }

    /// A link over a queue pair in 4 KiB of guest memory: descriptor tables at 0
    /// (h2g) and 0x200 (g2h), used rings at 0x400 and 0x600 unless given, the available
    /// rings at `h2g_avail` and `g2h_avail`; queues of 8, each available index saying
    /// one buffer is there (the used index the driver leaves is where the relay starts
    /// counting, as vhost-user-backend's SET_VRING_ADDR takes it). With the vrings (to
    /// keep) and a dropper that records being called.
    fn link_in_4k(
        h2g_avail: u64,
        g2h_avail: u64,
        g2h_used: u64,
    ) -> (
        Link,
        GuestMemoryAtomic<GuestMemoryMmap>,
        Vec<VringRwLock>,
        Arc<AtomicBool>,
    ) {
        use vm_memory::Bytes;
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
        );
        let vrings: Vec<VringRwLock> = [(0, h2g_avail, 0x400), (0x200, g2h_avail, g2h_used)]
            .into_iter()
            .map(|(desc, avail, used)| {
                mem.memory()
                    .write_obj(1u16, GuestAddress(avail + 2))
                    .unwrap();
                let v = VringRwLock::new(mem.clone(), 8).unwrap();
                v.set_queue_size(8);
                v.set_queue_info(desc, avail, used).unwrap();
                v.set_queue_next_used(v.queue_used_idx().unwrap());
                v.set_queue_ready(true);
                v
            })
            .collect();
        let link = Link::new(1, RelayLimits::DEFAULT, Vec::new());
        let dropped = connect(&link, &mem, &vrings, 1 << 20);
        (link, mem, vrings, dropped)
    }

    /// Runs `f` on its own thread; whether it returned within a generous bound (a
    /// loop that never ends would otherwise hang the test).
    fn returns(f: impl FnOnce() + Send + 'static) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(30)).is_ok()
    }

    /// An available ring whose index says a buffer came but whose entry naming it lies
    /// outside guest memory is unusable: the device VM is dropped. Found by the
    /// g2h_rings fuzz target: receive and the h2g flush looked again for ever (the
    /// index kept saying a buffer was there), holding a queue worker and the link's
    /// lock.
    #[test]
    fn an_unreadable_available_ring_drops_the_device_vm_instead_of_spinning() {
        let (link, _mem, vrings, dropped) = link_in_4k(0x800, 0xffc, 0x600);
        let link = Arc::new(link);
        let l = link.clone();
        assert!(returns(move || {
            let (got, more) = l.receive(0);
            assert!(got.is_empty() && !more);
        }));
        assert!(
            dropped.load(Ordering::Acquire),
            "g2h: the device VM is dropped"
        );
        assert!(!link.poll(0));
        drop(vrings);

        let (link, _mem, vrings, dropped) = link_in_4k(0xffc, 0x800, 0x600);
        assert!(returns(move || {
            // The flush finds the h2g ring unusable while it sends.
            let _ = link.send(&TunnelMessage::new(1, Body::SessionStart));
        }));
        assert!(
            dropped.load(Ordering::Acquire),
            "h2g: the device VM is dropped"
        );
        drop(vrings);
    }

    /// A queue the VMM has not set up (or reset) is neither read nor written: taking,
    /// flushing and switching notifications for polling leave its rings' memory as it
    /// is, and do not take it for a broken ring. (Queue workers now look at every pair
    /// once all vrings are known, which may be before the VMM set the queues up; and a
    /// driver may use fewer pairs than offered.)
    #[test]
    fn queues_not_set_up_are_left_alone() {
        use vm_memory::Bytes;
        let (link, mem, vrings, dropped) = link_in_4k(0x800, 0x900, 0x600);
        for v in &vrings {
            v.set_queue_event_idx(true);
            v.set_queue_ready(false);
        }
        let snapshot = || {
            let mut b = vec![0u8; 0x1000];
            mem.memory().read_slice(&mut b, GuestAddress(0)).unwrap();
            b
        };
        let before = snapshot();
        let link = Arc::new(link);
        let l = link.clone();
        assert!(returns(move || {
            let _ = l.set_polling(0, true);
            let (got, more) = l.receive(0);
            assert!(got.is_empty() && !more);
            assert!(!l.poll(0));
            assert_eq!(l.send(&TunnelMessage::new(1, Body::SessionStart)), Ok(()));
            l.flush(0);
            let _ = l.set_polling(0, false);
        }));
        assert_eq!(before, snapshot(), "guest memory untouched");
        assert!(!dropped.load(Ordering::Acquire), "not a broken ring");
        assert_eq!(link.counts().queued, 1, "the message waits for the queue");
        drop(vrings);
    }

    /// The relay never writes over an available ring, where its own writes would look
    /// like buffers the driver posted. Found by the g2h_rings fuzz target: with the
    /// g2h used ring at the address of its available ring, every buffer returned
    /// "posted" the next, and the queue worker took buffers for ever.
    #[test]
    fn the_relay_never_writes_over_an_available_ring() {
        use vm_memory::Bytes;
        // A used ring over an available ring: the device VM is dropped at once.
        let (link, _mem, vrings, dropped) = link_in_4k(0x800, 0x900, 0x900);
        let link = Arc::new(link);
        let l = link.clone();
        assert!(returns(move || {
            let (got, more) = l.receive(0);
            assert!(got.is_empty() && !more);
        }));
        assert!(dropped.load(Ordering::Acquire));
        drop(vrings);

        // An h2g buffer over the g2h available ring is returned unwritten.
        let (link, mem, vrings, dropped) = link_in_4k(0x800, 0x900, 0x600);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&0x900u64.to_le_bytes());
        d[8..12].copy_from_slice(&256u32.to_le_bytes());
        d[12..14].copy_from_slice(&2u16.to_le_bytes()); // WRITE
        mem.memory().write_slice(&d, GuestAddress(0)).unwrap();
        let mut before = [0u8; 256];
        mem.memory()
            .read_slice(&mut before, GuestAddress(0x900))
            .unwrap();
        assert_eq!(
            link.send(&TunnelMessage::new(1, Body::SessionStart)),
            Ok(())
        );
        let mut after = [0u8; 256];
        mem.memory()
            .read_slice(&mut after, GuestAddress(0x900))
            .unwrap();
        assert_eq!(
            before, after,
            "the g2h available ring is as the driver left it"
        );
        let used_len: u32 = mem.memory().read_obj(GuestAddress(0x400 + 8)).unwrap();
        assert_eq!(used_len, 0, "the buffer is returned with nothing in it");
        assert_eq!(
            link.counts().queued,
            1,
            "the message waits for a good buffer"
        );
        assert!(!dropped.load(Ordering::Acquire));
        drop(vrings);
    }

    /// Makes a one-descriptor chain of `len` bytes at `addr` available in queue `q` of
    /// [`link_over_rings`] (descriptor and ring slot `n`).
    fn post(mem: &GuestMemoryMmap, q: u64, n: u16, addr: u64, len: u32, writable: bool) {
        use vm_memory::Bytes;
        let base = 0x10000 * (q + 1);
        let mut desc = Vec::new();
        desc.extend_from_slice(&addr.to_le_bytes());
        desc.extend_from_slice(&len.to_le_bytes());
        desc.extend_from_slice(&(if writable { 2u16 } else { 0 }).to_le_bytes());
        desc.extend_from_slice(&0u16.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(base + 16 * u64::from(n)))
            .unwrap();
        let avail = base + 0x1000;
        mem.write_obj(n, GuestAddress(avail + 4 + 2 * u64::from(n)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
    }

    /// The link reads and writes only the memory table it was given, never the vrings'
    /// own view of guest memory: `vhost-user-backend` puts a new table there before
    /// the backend checks it, and a table the relay refuses must never be touched.
    /// Here the library's view changes to another table (zeros) after the link was
    /// given one; the message, its used-ring entry and the g2h queue's reading all
    /// happen in the given table, and the other stays zero. Refusing a table then
    /// leaves the link nothing to read or write.
    #[test]
    fn the_link_uses_only_the_memory_it_was_given() {
        use vm_memory::Bytes;
        let (link, mem, dropped) = link_over_rings();
        let given = mem.memory().into_inner();
        // An h2g buffer for the message, and a g2h message from the driver.
        post(&given, 0, 0, 0x8000, 4096, true);
        let request = TunnelMessage::new(1, Body::SessionStart).encode();
        given.write_slice(&request, GuestAddress(0x9000)).unwrap();
        post(&given, 1, 0, 0x9000, request.len() as u32, false);
        // The library maps a new table where the vrings see it.
        mem.lock()
            .unwrap()
            .replace(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let other = mem.memory().into_inner();
        assert!(!Arc::ptr_eq(&given, &other));

        let (got, _) = link.receive(0);
        assert_eq!(
            got.len(),
            1,
            "the driver's message, read from the given table"
        );
        let msg = TunnelMessage::new(1, Body::SessionEnd);
        assert_eq!(link.send(&msg), Ok(()));
        assert_eq!(link.counts().queued, 0, "written into the h2g buffer");
        let mut written = vec![0u8; msg.encode().len()];
        given
            .read_slice(&mut written, GuestAddress(0x8000))
            .unwrap();
        assert_eq!(written, msg.encode());
        let used_idx = |m: &GuestMemoryMmap, q: u64| -> u16 {
            m.read_obj(GuestAddress(0x10000 * (q + 1) + 0x2000 + 2))
                .unwrap()
        };
        assert_eq!((used_idx(&given, 0), used_idx(&given, 1)), (1, 1));
        let mut all = vec![0u8; 1 << 20];
        other.read_slice(&mut all, GuestAddress(0)).unwrap();
        assert!(
            all.iter().all(|&b| b == 0),
            "the table the link was not given is untouched"
        );

        link.refuse_memory(link.generation());
        post(&given, 0, 1, 0x8000, 4096, true);
        assert_eq!(link.send(&msg), Err(LinkError::NotUp));
        assert!(!link.poll(0) && !link.set_polling(0, false));
        assert_eq!(used_idx(&given, 0), 1, "nothing more is written");
        assert!(
            !dropped.load(Ordering::Acquire),
            "the library ends the connection, after its negative acknowledgement"
        );
        // The next device VM starts from a clean link.
        link.reset();
        assert!(!link.lock().broken && link.lock().mem.is_none());
    }

    /// A driver that sends requests and takes none of the answers: once the answers
    /// waiting on its pair reach the budget, the relay leaves its next g2h chains in
    /// the ring (no more answers are made, none dropped); when the driver posts h2g
    /// buffers and the answers go out, the pair is read again and the chain taken.
    #[test]
    fn unread_answers_hold_the_driver_back() {
        let (link, mem, _) = link_over_rings_in(16 << 20);
        let answer = TunnelMessage {
            channel: 1,
            tag: 7,
            body: Body::DmaReadReply {
                status: 0,
                data: vec![0; 1 << 20],
            },
        };
        for _ in 0..4 {
            link.send(&answer).unwrap(); // no h2g buffer: all four wait
        }
        let request = TunnelMessage::new(1, Body::SessionStart).encode();
        use vm_memory::Bytes;
        mem.memory()
            .write_slice(&request, GuestAddress(0x8000))
            .unwrap();
        post(&mem.memory(), 1, 0, 0x8000, request.len() as u32, false);
        let (got, _) = link.receive(0);
        assert!(got.is_empty(), "held back");
        assert_eq!(link.take_resume(), Vec::<usize>::new());
        for n in 0..6u16 {
            let at = (1 << 20) * (u64::from(n) + 1);
            post(&mem.memory(), 0, n, at, 1 << 20, true);
        }
        link.flush(0);
        assert_eq!(link.take_resume(), vec![0], "the answers went out");
        let (got, _) = link.receive(0);
        assert_eq!(got.len(), 1, "the chain left in the ring is taken now");
    }

    /// Requests whose answers would pass the budget together end a batch (the caller
    /// makes their answers, then asks again) without holding the pair: answers made
    /// later (by the client, for memory mapped without an fd) never count against it.
    #[test]
    fn answers_to_come_end_a_batch() {
        let (link, mem, _) = link_over_rings_in(16 << 20);
        use vm_memory::Bytes;
        for n in 0..6u16 {
            let request = TunnelMessage {
                channel: 1,
                tag: u32::from(n) + 1,
                body: Body::DmaRead {
                    segments: vec![vfu_proto::tunnel::DmaSegment {
                        iova: 0,
                        len: 1 << 20,
                    }],
                },
            }
            .encode();
            let at = 0x8000 + 0x100 * u64::from(n);
            mem.memory()
                .write_slice(&request, GuestAddress(at))
                .unwrap();
            post(&mem.memory(), 1, n, at, request.len() as u32, false);
        }
        let (got, more) = link.receive(0);
        assert_eq!((got.len(), more), (4, true), "4 MiB of answers to come");
        let (got, more) = link.receive(0);
        assert_eq!((got.len(), more), (2, false));
    }

    /// Round-robin starts after the channel served last and finishes a message in
    /// progress first.
    #[test]
    fn round_robin_order() {
        let mut tx = PairTx::default();
        for c in [1, 2, 3] {
            tx.queues.entry(c).or_default().push_back(Outgoing {
                bytes: vec![0],
                written: 0,
                budget: Budget::Channel,
            });
        }
        tx.last = 1;
        assert_eq!(tx.next_channel(), Some(2));
        tx.last = 3;
        assert_eq!(tx.next_channel(), Some(1));
        tx.in_progress = Some(3);
        assert_eq!(tx.next_channel(), Some(3));
    }
}
