//! The I/O half of the engine: the transport, the queue pairs, and the DMA requests in
//! flight. The engine thread drains the queues; the threads of channels that may block
//! ([`super::worker`]) send through the same [`Io`], under its lock, and wait for their
//! answers outside it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;
use vfu_proto::tunnel::{
    encode_dma_write_head, pair_of_channel, Body, DmaSegment, Kind, TunnelHeader, TunnelMessage,
    REPLY_HEAD_SIZE,
};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use super::dma::DmaPort;
use super::queues::{PairError, QueuePair, DIRECT_READ_REPLY, DIRECT_WRITE_REQUEST};
use super::{HANGUP_TOKEN, MAX_MSG_SIZE, MODEL_TOKEN, WAKE_TOKEN};
use crate::device::errno::EFAULT;
use crate::device::Errno;
use crate::hostile::Hostile;
use crate::transport::Transport;

/// How long a model waits for the relay to answer a DMA request.
pub(super) const DMA_TIMEOUT: Duration = Duration::from_secs(10);

const EIO: Errno = libc::EIO as u32;

/// Who uses a pair's direct buffer.
#[derive(Debug, Default)]
enum DirectUse {
    /// Nobody: a request may be posted when the pair is ready.
    #[default]
    Free,
    /// The engine thread posted a request and polls for its answer itself.
    Engine,
    /// A channel thread posted a request and waits for the answer's length.
    Thread(SyncSender<u32>),
    /// The answer came; the channel thread has not read it yet.
    Answered,
}

/// Why the engine thread woke up, counted since it started: the proof that the
/// device's interrupts arrive (a driver whose interrupts are lost still works, on the
/// wait timeouts alone, 200 ms at a time).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wakeups {
    /// Queue interrupts acknowledged, by the queue index the fd is watched with.
    pub interrupts: std::collections::BTreeMap<u16, u64>,
    /// Waits that ended with nothing to do (the timeout).
    pub timeouts: u64,
    /// Poll mode: times the engine stopped polling to sleep (the window passed).
    pub naps: u64,
}

impl Wakeups {
    /// All queue interrupts.
    pub fn total_interrupts(&self) -> u64 {
        self.interrupts.values().sum()
    }
}

impl std::fmt::Display for Wakeups {
    /// `interrupts=N timeouts=M naps=P by-queue=Q:N,...`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by_queue: Vec<String> = self
            .interrupts
            .iter()
            .map(|(q, n)| format!("{q}:{n}"))
            .collect();
        write!(
            f,
            "interrupts={} timeouts={} naps={} by-queue={}",
            self.total_interrupts(),
            self.timeouts,
            self.naps,
            if by_queue.is_empty() {
                "-".to_string()
            } else {
                by_queue.join(",")
            }
        )
    }
}

/// Transport, queue pairs, and the answers channel threads wait for.
pub struct Io<T: Transport> {
    pub(super) transport: T,
    pub(super) pairs: Vec<QueuePair>,
    pub(super) epoll: Arc<Epoll>,
    /// Written by channel threads when the engine thread must look at the queues.
    pub(super) wake: EventFd,
    /// Pairs agreed in HELLO (until then: 1).
    pub(super) active_pairs: u16,
    /// Largest message the relay accepts.
    pub(super) relay_max_msg: usize,
    tag: u32,
    /// Messages taken off the queues while the engine thread waited for a DMA answer.
    pub(super) deferred: VecDeque<TunnelMessage>,
    /// The relay answers DMA requests in their own chain (`DIRECT_DATA`).
    pub(super) direct: bool,
    /// The transport reported that the device is gone.
    pub(super) gone: bool,
    /// Channel threads waiting for the answer to a DMA request message, by tag.
    waiters: HashMap<u32, SyncSender<Body>>,
    direct_use: Vec<DirectUse>,
    /// Answers found for channel threads, handed over once the lock is released (a
    /// thread woken while the lock is held would only block on it again).
    answers: Vec<Answer>,
    /// Why the engine thread woke up.
    pub(super) wakeups: Wakeups,
    /// Poll mode is on: the engine thread polls the rings, interrupts are off.
    polling: bool,
    /// The relay agreed to POSTED_DONE.
    pub(super) posted_done: bool,
    /// Per channel: the last posted request carried out and not reported yet. Sent as
    /// one POSTED_DONE per channel right before the relay is notified.
    done: BTreeMap<u32, u16>,
    /// The misbehaving mode, when it is on (`--misbehave`).
    pub(super) hostile: Option<Box<Hostile>>,
}

/// An answer a channel thread waits for.
pub(super) enum Answer {
    Direct(SyncSender<u32>, u32),
    Message(SyncSender<Body>, Body),
}

impl Answer {
    /// Wakes the thread that waits for it.
    pub(super) fn deliver(self) {
        match self {
            Answer::Direct(tx, used) => {
                let _ = tx.send(used);
            }
            Answer::Message(tx, body) => {
                let _ = tx.send(body);
            }
        }
    }
}

impl<T: Transport> Io<T> {
    /// The I/O half over `transport` and its set-up `pairs`.
    pub(super) fn new(
        transport: T,
        pairs: Vec<QueuePair>,
        epoll: Arc<Epoll>,
    ) -> std::io::Result<Self> {
        let direct_use = pairs.iter().map(|_| DirectUse::Free).collect();
        Ok(Self {
            transport,
            pairs,
            epoll,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            active_pairs: 1,
            relay_max_msg: vfu_proto::tunnel::MIN_MSG_SIZE as usize,
            tag: 0,
            deferred: VecDeque::new(),
            direct: false,
            gone: false,
            waiters: HashMap::new(),
            direct_use,
            answers: Vec::new(),
            wakeups: Wakeups::default(),
            polling: false,
            posted_done: false,
            done: BTreeMap::new(),
            hostile: None,
        })
    }

    pub(super) fn next_tag(&mut self) -> u32 {
        self.tag = self.tag.wrapping_add(1).max(1);
        self.tag
    }

    fn pair_of(&self, channel: u32) -> usize {
        (pair_of_channel(channel, self.active_pairs) as usize).min(self.pairs.len() - 1)
    }

    pub(super) fn send(&mut self, msg: TunnelMessage) -> Result<(), PairError> {
        if let Body::PostedDone { msg_id } = msg.body {
            // Coalesced: only the latest of a channel matters (they come in order).
            if self.posted_done {
                self.done.insert(msg.channel, msg_id);
            }
            return Ok(());
        }
        let p = self.pair_of(msg.channel);
        if let Some(h) = self.hostile.as_deref_mut() {
            let sent = h.send(msg, p, &mut self.pairs);
            for q in h.take_kicks() {
                self.transport.notify(q);
            }
            return sent;
        }
        self.pairs[p].send(&msg)
    }

    /// Sends the POSTED_DONE of each channel of pair `p` that carried out posted
    /// requests since the last call.
    fn send_done(&mut self, p: usize) {
        let done = std::mem::take(&mut self.done);
        for (channel, msg_id) in done {
            if self.pair_of(channel) != p {
                self.done.insert(channel, msg_id);
                continue;
            }
            let msg = TunnelMessage::new(channel, Body::PostedDone { msg_id });
            if let Err(e) = self.pairs[p].send(&msg) {
                warn!("POSTED_DONE on channel {channel} not sent: {e}");
            }
        }
    }

    /// The IOVA a DMA request of `channel` goes to (the misbehaving mode may send it
    /// elsewhere).
    fn dma_iova(&mut self, channel: u32, iova: u64, len: usize, write: bool) -> u64 {
        match self.hostile.as_deref_mut() {
            Some(h) => h.dma_iova(channel, iova, len, write),
            None => iova,
        }
    }

    pub(super) fn kick(&mut self, p: usize) {
        if !self.done.is_empty() {
            self.send_done(p);
        }
        let (h2g, g2h) = self.pairs[p].kicks_needed();
        if h2g {
            self.transport.notify(self.pairs[p].h2g_index);
        }
        if g2h {
            self.transport.notify(self.pairs[p].g2h_index);
        }
    }

    pub(super) fn kick_all(&mut self) {
        for p in 0..self.pairs.len() {
            self.kick(p);
        }
    }

    /// From a channel thread: notifies the device about pair `p`, and makes sure the
    /// engine thread hears of what comes back (the engine arms `g2h` completions only
    /// while something waits for them).
    fn kick_from_thread(&mut self, p: usize) {
        self.kick(p);
        if self.pairs[p].rearm() {
            let _ = self.wake.write(1);
        }
    }

    /// Takes every message pair `p` has; re-arms its interrupts when there is nothing
    /// left. Answers that channel threads wait for are handed to them on the way.
    pub(super) fn drain(&mut self, p: usize) -> Result<Vec<TunnelMessage>, PairError> {
        let mut out = Vec::new();
        loop {
            self.pairs[p].reclaim_tx()?;
            if let DirectUse::Thread(tx) = &self.direct_use[p] {
                if let Some(used) = self.pairs[p].take_direct_answer() {
                    self.answers.push(Answer::Direct(tx.clone(), used));
                    self.direct_use[p] = DirectUse::Answered;
                }
            }
            let received = match self.hostile.as_deref_mut() {
                None => self.pairs[p].receive()?,
                Some(h) if !h.reads_h2g(p) => {
                    // Misbehaving: the relay's messages on this pair stay unread.
                    self.pairs[p].flush_tx()?;
                    return Ok(out);
                }
                Some(h) => {
                    let edit = h.take_rx_edit(p);
                    self.pairs[p].receive_with(edit)?
                }
            };
            for msg in received {
                match msg {
                    Ok(m) => {
                        if self.hostile.as_deref_mut().is_some_and(|h| h.incoming(&m)) {
                            continue;
                        }
                        if let Some(m) = self.deliver(m) {
                            out.push(m);
                        }
                    }
                    Err(e) => warn!("malformed message from the relay: {e}"),
                }
            }
            self.pairs[p].flush_tx()?;
            if !self.pairs[p].rearm() {
                return Ok(out);
            }
        }
    }

    /// Turns poll mode on (interrupts off) or off (interrupts on again); returns
    /// whether messages are waiting already, which no interrupt will announce.
    pub(super) fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        let mut waiting = false;
        for pair in &mut self.pairs {
            pair.set_polling(on);
            waiting |= pair.rearm();
        }
        waiting && !on
    }

    /// Takes the answers found for channel threads: deliver them after releasing the
    /// lock.
    pub(super) fn take_answers(&mut self) -> Vec<Answer> {
        std::mem::take(&mut self.answers)
    }

    /// Keeps a DMA answer for the channel thread waiting for it; returns other messages.
    fn deliver(&mut self, m: TunnelMessage) -> Option<TunnelMessage> {
        let answer = match &m.body {
            Body::DmaReadReply { .. } => true,
            Body::Status { kind, .. } => *kind == Kind::DmaWrite as u16,
            _ => false,
        };
        if !answer {
            return Some(m);
        }
        match self.waiters.remove(&m.tag) {
            Some(tx) => {
                self.answers.push(Answer::Message(tx, m.body));
                None
            }
            None => Some(m),
        }
    }

    /// Waits up to `ms` for an interrupt (or a model event) and acknowledges it; returns
    /// the tokens that are not queue interrupts.
    pub(super) fn wait(&mut self, ms: i32, events: &mut [EpollEvent]) -> std::io::Result<Vec<u64>> {
        let n = match self.epoll.wait(ms, events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        if n == 0 && ms > 0 {
            self.wakeups.timeouts += 1;
        }
        Ok(self.acknowledge(&events[..n]))
    }

    /// Acknowledges the queue interrupts among `events`; returns the other tokens.
    pub(super) fn acknowledge(&mut self, events: &[EpollEvent]) -> Vec<u64> {
        let mut others = Vec::new();
        for ev in events {
            let data = ev.data();
            if data == HANGUP_TOKEN {
                self.gone = true;
            } else if data == WAKE_TOKEN {
                let _ = self.wake.read();
            } else if data & MODEL_TOKEN != 0 {
                others.push(data);
            } else {
                // The token is the queue index.
                self.transport.ack_interrupt(data as u16);
                *self.wakeups.interrupts.entry(data as u16).or_default() += 1;
            }
        }
        others
    }

    /// Sets each pair's direct buffer aside.
    pub(super) fn enable_direct(&mut self) -> Result<(), PairError> {
        let mem = self.transport.memory();
        self.pairs.iter_mut().try_for_each(|p| p.enable_direct(mem))
    }

    /// The pair of `channel`, if its direct buffer is free and the relay takes direct
    /// requests.
    fn direct_pair(&self, channel: u32) -> Option<usize> {
        if !self.direct {
            return None;
        }
        let p = self.pair_of(channel);
        (matches!(self.direct_use[p], DirectUse::Free) && self.pairs[p].direct_ready()).then_some(p)
    }

    /// Writes `bytes` at `at` of pair `p`'s direct buffer.
    fn put_direct(&self, p: usize, at: usize, bytes: &[&[u8]]) -> Result<(), Errno> {
        let area = self.pairs[p].direct_area().ok_or(EIO)?;
        let mut at = at;
        for b in bytes {
            area.slice(at, b.len()).ok_or(EIO)?.copy_from(b);
            at += b.len();
        }
        Ok(())
    }

    /// Reads a direct reply head at `at` of pair `p`'s direct buffer.
    fn direct_head(&self, p: usize, at: usize, used: u32) -> Result<[u8; REPLY_HEAD_SIZE], Errno> {
        let mut head = [0u8; REPLY_HEAD_SIZE];
        match self.pairs[p]
            .direct_area()
            .and_then(|a| a.slice(at, REPLY_HEAD_SIZE))
        {
            Some(s) if used as usize >= REPLY_HEAD_SIZE => s.copy_to(&mut head),
            _ => return Err(EIO),
        };
        Ok(head)
    }

    /// Copies the data of a direct DMA read reply out of pair `p`'s direct buffer.
    fn direct_read_data(&self, p: usize, buf: &mut [u8]) -> Result<(), Errno> {
        let area = self.pairs[p].direct_area().ok_or(EIO)?;
        area.slice(DIRECT_READ_REPLY + REPLY_HEAD_SIZE, buf.len())
            .ok_or(EIO)?
            .copy_to(buf);
        Ok(())
    }

    /// Serves the queues (keeping the messages for later) until `done` says so, or the
    /// relay took too long. The engine thread's own wait for a DMA answer.
    fn wait_for(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> Result<(), Errno> {
        let deadline = Instant::now() + DMA_TIMEOUT;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            self.kick_all();
            for p in 0..self.pairs.len() {
                let messages = self.drain(p).map_err(|_| EIO)?;
                self.deferred.extend(messages);
            }
            self.take_answers().into_iter().for_each(Answer::deliver);
            if done(self) {
                return Ok(());
            }
            if self.gone {
                return Err(EIO);
            }
            if Instant::now() > deadline {
                warn!("the relay did not answer a DMA request in time");
                return Err(EIO);
            }
            // Model events seen meanwhile are picked up by the main loop (level-triggered).
            if self.polling {
                // No interrupt comes in poll mode: look again soon.
                self.wait(0, &mut events).map_err(|_| EIO)?;
                std::thread::yield_now();
            } else {
                self.wait(100, &mut events).map_err(|_| EIO)?;
            }
        }
    }

    /// Sends a DMA request as a message and waits for the reply message (engine thread).
    fn exchange(&mut self, channel: u32, body: Body) -> Result<Body, Errno> {
        let tag = self.next_tag();
        let expected = body.kind().0;
        self.send(TunnelMessage { channel, tag, body })
            .map_err(|_| EIO)?;
        let mut found = None;
        self.wait_for(|io| {
            if let Some(i) = io.deferred.iter().position(|m| {
                let (kind, reply) = m.body.kind();
                reply && kind == expected && m.channel == channel && m.tag == tag
            }) {
                found = io.deferred.remove(i).map(|m| m.body);
            }
            found.is_some()
        })?;
        found.ok_or(EIO)
    }

    /// Posts a direct request and waits for the relay to give its chain back (engine
    /// thread); returns the number of bytes of answer.
    fn direct_exchange(
        &mut self,
        p: usize,
        request: (usize, usize),
        reply: (usize, usize),
    ) -> Result<u32, Errno> {
        self.pairs[p]
            .post_direct(request.0, request.1, reply.0, reply.1)
            .map_err(|_| EIO)?;
        self.direct_use[p] = DirectUse::Engine;
        let mut used = None;
        let waited = self.wait_for(|io| {
            used = io.pairs[p].take_direct_answer();
            used.is_some()
        });
        self.direct_use[p] = DirectUse::Free;
        if waited.is_err() {
            self.pairs[p].abandon_direct();
        }
        waited?;
        used.ok_or(EIO)
    }
}

/// Part of a pair's direct buffer: offset and length.
type Range = (usize, usize);

/// A DMA request, prepared for either way of sending it.
struct DmaRequest<'a> {
    channel: u32,
    tag: u32,
    segments: Vec<DmaSegment>,
    op: DmaOp<'a>,
}

enum DmaOp<'a> {
    Read(usize),
    Write(&'a [u8]),
}

impl DmaOp<'_> {
    /// Bytes of data the request moves.
    fn len(&self) -> usize {
        match self {
            DmaOp::Read(n) => *n,
            DmaOp::Write(d) => d.len(),
        }
    }
}

impl DmaRequest<'_> {
    fn kind(&self) -> Kind {
        match self.op {
            DmaOp::Read(_) => Kind::DmaRead,
            DmaOp::Write(_) => Kind::DmaWrite,
        }
    }

    /// As a message (data inside).
    fn message(&self) -> TunnelMessage {
        let segments = self.segments.clone();
        let body = match self.op {
            DmaOp::Read(_) => Body::DmaRead { segments },
            DmaOp::Write(data) => Body::DmaWrite {
                segments,
                data: data.to_vec(),
            },
        };
        TunnelMessage {
            channel: self.channel,
            tag: self.tag,
            body,
        }
    }

    /// Writes the request into pair `p`'s direct buffer; returns the request and reply
    /// ranges to post.
    fn place<T: Transport>(&self, io: &Io<T>, p: usize) -> Result<(Range, Range), Errno> {
        match self.op {
            DmaOp::Read(len) => {
                let request = self.message().encode();
                io.put_direct(p, 0, &[&request])?;
                Ok((
                    (0, request.len()),
                    (DIRECT_READ_REPLY, REPLY_HEAD_SIZE + len),
                ))
            }
            DmaOp::Write(data) => {
                let head =
                    encode_dma_write_head(self.channel, self.tag, &self.segments, data.len());
                io.put_direct(p, DIRECT_WRITE_REQUEST, &[&head, data])?;
                Ok((
                    (DIRECT_WRITE_REQUEST, head.len() + data.len()),
                    (0, REPLY_HEAD_SIZE),
                ))
            }
        }
    }

    /// Checks a direct answer of `used` bytes and, for a read, copies its data to `buf`.
    fn finish_direct<T: Transport>(
        &self,
        io: &Io<T>,
        p: usize,
        used: u32,
        buf: Option<&mut [u8]>,
    ) -> Result<(), Errno> {
        let reply_at = match self.op {
            DmaOp::Read(_) => DIRECT_READ_REPLY,
            DmaOp::Write(_) => 0,
        };
        let head = io.direct_head(p, reply_at, used)?;
        let h = TunnelHeader::decode(&head).map_err(|_| EIO)?;
        if h.channel != self.channel
            || h.tag != self.tag
            || h.kind != self.kind() as u16
            || !h.reply
        {
            warn!("the relay answered a direct DMA request with a foreign head: {h:?}");
            return Err(EIO);
        }
        let status = u32::from_le_bytes([head[16], head[17], head[18], head[19]]);
        if status != 0 {
            return Err(EFAULT);
        }
        if let (DmaOp::Read(len), Some(buf)) = (&self.op, buf) {
            let want = REPLY_HEAD_SIZE + len;
            if used as usize != want || h.len as usize != 8 + len {
                warn!("the relay's direct DMA read reply has {used} bytes, not {want}");
                return Err(EIO);
            }
            io.direct_read_data(p, buf)?;
        }
        Ok(())
    }

    /// Checks a message answer and, for a read, copies its data to `buf`.
    fn finish_message(&self, body: Body, buf: Option<&mut [u8]>) -> Result<(), Errno> {
        match (body, buf) {
            (Body::DmaReadReply { status: 0, data }, Some(buf)) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            (Body::Status { status: 0, kind }, None) if kind == Kind::DmaWrite as u16 => Ok(()),
            _ => Err(EFAULT),
        }
    }
}

fn one_segment(iova: u64, len: usize) -> Vec<DmaSegment> {
    vec![DmaSegment {
        iova,
        len: len as u64,
    }]
}

impl<T: Transport> Io<T> {
    /// One DMA request from the engine thread: direct when the pair's buffer is free,
    /// else as messages.
    fn engine_dma(
        &mut self,
        channel: u32,
        iova: u64,
        op: DmaOp<'_>,
        buf: Option<&mut [u8]>,
    ) -> Result<(), Errno> {
        let len = op.len();
        let iova = self.dma_iova(channel, iova, len, matches!(op, DmaOp::Write(_)));
        let request = DmaRequest {
            channel,
            tag: self.next_tag(),
            segments: one_segment(iova, len),
            op,
        };
        if let Some(p) = self.direct_pair(channel) {
            let (req, reply) = request.place(self, p)?;
            let used = self.direct_exchange(p, req, reply)?;
            return request.finish_direct(self, p, used, buf);
        }
        let body = self.exchange(channel, request.message().body)?;
        request.finish_message(body, buf)
    }
}

impl<T: Transport> DmaPort for Io<T> {
    fn read(&mut self, channel: u32, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.engine_dma(channel, iova, DmaOp::Read(buf.len()), Some(buf))
    }

    fn write(&mut self, channel: u32, iova: u64, data: &[u8]) -> Result<(), Errno> {
        self.engine_dma(channel, iova, DmaOp::Write(data), None)
    }

    fn max_chunk(&self) -> usize {
        max_chunk(self.relay_max_msg)
    }
}

/// Largest data payload of one DMA request: room for the tunnel and DMA headers of one
/// segment.
fn max_chunk(relay_max_msg: usize) -> usize {
    relay_max_msg.min(MAX_MSG_SIZE).saturating_sub(64).max(1)
}

/// What a channel thread sends through: its messages, and DMA requests whose answers
/// it waits for without holding up the engine.
pub trait ThreadPort: DmaPort + Send + 'static {
    /// Sends `messages` toward the relay, in order.
    fn send(&mut self, messages: Vec<TunnelMessage>);
}

/// [`ThreadPort`] over the engine's shared [`Io`].
pub struct SharedIo<T: Transport> {
    io: Arc<Mutex<Io<T>>>,
}

impl<T: Transport> SharedIo<T> {
    /// A port onto `io`.
    pub fn new(io: Arc<Mutex<Io<T>>>) -> Self {
        Self { io }
    }

    fn lock(&self) -> MutexGuard<'_, Io<T>> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for an answer; on timeout runs `give_up` under the lock.
    fn wait<A>(&self, rx: Receiver<A>, give_up: impl FnOnce(&mut Io<T>)) -> Result<A, Errno> {
        match rx.recv_timeout(DMA_TIMEOUT) {
            Ok(a) => Ok(a),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                warn!("the relay did not answer a DMA request in time");
                give_up(&mut self.lock());
                Err(EIO)
            }
        }
    }

    fn dma(
        &mut self,
        channel: u32,
        iova: u64,
        op: DmaOp<'_>,
        buf: Option<&mut [u8]>,
    ) -> Result<(), Errno> {
        let len = op.len();
        let mut io = self.lock();
        if io.gone {
            return Err(EIO);
        }
        let iova = io.dma_iova(channel, iova, len, matches!(op, DmaOp::Write(_)));
        let request = DmaRequest {
            channel,
            tag: io.next_tag(),
            segments: one_segment(iova, len),
            op,
        };
        if let Some(p) = io.direct_pair(channel) {
            let (req, reply) = request.place(&io, p)?;
            io.pairs[p]
                .post_direct(req.0, req.1, reply.0, reply.1)
                .map_err(|_| EIO)?;
            let (tx, rx) = sync_channel(1);
            io.direct_use[p] = DirectUse::Thread(tx);
            io.kick_from_thread(p);
            drop(io);
            let used = self.wait(rx, |io| {
                io.pairs[p].abandon_direct();
                io.direct_use[p] = DirectUse::Free;
            })?;
            let mut io = self.lock();
            let result = request.finish_direct(&io, p, used, buf);
            io.direct_use[p] = DirectUse::Free;
            return result;
        }
        let (tx, rx) = sync_channel(1);
        io.waiters.insert(request.tag, tx);
        let p = io.pair_of(channel);
        if io.send(request.message()).is_err() {
            io.waiters.remove(&request.tag);
            return Err(EIO);
        }
        io.kick_from_thread(p);
        drop(io);
        let tag = request.tag;
        let body = self.wait(rx, |io| {
            io.waiters.remove(&tag);
        })?;
        request.finish_message(body, buf)
    }
}

impl<T: Transport> DmaPort for SharedIo<T> {
    fn read(&mut self, channel: u32, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.dma(channel, iova, DmaOp::Read(buf.len()), Some(buf))
    }

    fn write(&mut self, channel: u32, iova: u64, data: &[u8]) -> Result<(), Errno> {
        self.dma(channel, iova, DmaOp::Write(data), None)
    }

    fn max_chunk(&self) -> usize {
        max_chunk(self.lock().relay_max_msg)
    }
}

impl<T: Transport + 'static> ThreadPort for SharedIo<T> {
    fn send(&mut self, messages: Vec<TunnelMessage>) {
        if messages.is_empty() {
            return;
        }
        let mut io = self.lock();
        let mut pairs = Vec::new();
        for m in messages {
            let p = io.pair_of(m.channel);
            if let Err(e) = io.send(m) {
                warn!("a message toward the relay was lost: {e}");
            }
            if !pairs.contains(&p) {
                pairs.push(p);
            }
        }
        for p in pairs {
            io.kick_from_thread(p);
        }
    }
}
