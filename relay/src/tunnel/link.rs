//! The queue-level link to the device VM: writes tunnel messages into the driver's
//! `h2g` buffers and reassembles messages from its `g2h` buffers, following the framing
//! of `docs/tunnel.md` (section 6.1).
//!
//! Everything here is guarded by one mutex, taken innermost: callers may hold a
//! channel's lock, never the other way round.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use log::{debug, warn};
use thiserror::Error;
use vfu_proto::tunnel::{
    g2h_queue, h2g_queue, pair_of_channel, TunnelError, TunnelHeader, TunnelMessage,
    TUNNEL_HEADER_SIZE,
};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::version::RelayLimits;

/// Bytes of messages the relay queues toward a device VM that posts no buffers, before
/// it refuses more (back-pressure instead of unbounded buffering).
const MAX_BACKLOG: usize = 32 << 20;

/// Why a message could not be sent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    /// No device VM has said HELLO.
    #[error("no device VM connected")]
    NotUp,
    /// Larger than the device VM accepts.
    #[error("message of {0} bytes is larger than the device VM accepts")]
    TooLarge(usize),
    /// The device VM does not take messages fast enough.
    #[error("backlog toward the device VM is full")]
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

/// Reassembles one `g2h` queue's messages.
#[derive(Debug, Default)]
struct Reassembly {
    buf: Vec<u8>,
    expected: usize,
}

impl Reassembly {
    /// Adds the bytes of one buffer; returns a complete message or a framing error.
    fn push(&mut self, chunk: &[u8], max: usize) -> Option<Result<Vec<u8>, TunnelError>> {
        if self.expected == 0 {
            let header = match TunnelHeader::decode(chunk) {
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
        self.buf.extend_from_slice(chunk);
        if self.buf.len() == self.expected {
            self.expected = 0;
            return Some(Ok(std::mem::take(&mut self.buf)));
        }
        None
    }
}

#[derive(Default)]
struct Inner {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    vrings: Vec<VringRwLock>,
    up: Option<Negotiated>,
    /// Per pair: messages (bytes, bytes already written) waiting for h2g buffers.
    tx: Vec<VecDeque<(Vec<u8>, usize)>>,
    rx: Vec<Reassembly>,
    backlog: usize,
    /// Per pair: the driver must be signalled about used `h2g` buffers.
    signal_due: Vec<bool>,
}

/// The link to the device VM.
pub struct Link {
    inner: Mutex<Inner>,
    tag: AtomicU32,
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
    /// A link with no device VM.
    pub fn new(offered_pairs: u16, limits: RelayLimits) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            tag: AtomicU32::new(1),
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

    /// Whether a device VM has completed HELLO.
    pub fn is_up(&self) -> bool {
        self.lock().up.is_some()
    }

    /// The guest memory table changed (vhost-user SET_MEM_TABLE).
    pub fn attach_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.lock().mem = Some(mem);
    }

    /// Remembers the vrings of the current frontend connection.
    pub fn attach_vrings(&self, vrings: &[VringRwLock]) {
        let mut inner = self.lock();
        if inner.vrings.is_empty() {
            inner.vrings = vrings.to_vec();
            let pairs = vrings.len() / 2;
            inner.tx = (0..pairs).map(|_| VecDeque::new()).collect();
            inner.rx = (0..pairs).map(|_| Reassembly::default()).collect();
            inner.signal_due = vec![false; pairs];
        }
    }

    /// HELLO settled these parameters: from now on messages flow. Anything queued for a
    /// previous driver instance is dropped.
    pub fn set_up(&self, negotiated: Negotiated) {
        let mut inner = self.lock();
        inner.up = Some(negotiated);
        inner.tx.iter_mut().for_each(VecDeque::clear);
        inner.rx.iter_mut().for_each(|r| *r = Reassembly::default());
        inner.backlog = 0;
    }

    /// Forgets a negotiation (after refusing a HELLO).
    pub fn reset_negotiation(&self) {
        self.lock().up = None;
    }

    /// The frontend disconnected: forget its memory, queues and negotiation.
    pub fn reset(&self) {
        *self.lock() = Inner::default();
    }

    /// Queues `msg` on its channel's queue pair and writes what the driver has room for.
    pub fn send(&self, msg: &TunnelMessage) -> Result<(), LinkError> {
        let bytes = msg.encode();
        let mut inner = self.lock();
        let Some(up) = inner.up else {
            return Err(LinkError::NotUp);
        };
        if bytes.len() > up.guest_max_msg {
            return Err(LinkError::TooLarge(bytes.len()));
        }
        if inner.backlog + bytes.len() > MAX_BACKLOG {
            return Err(LinkError::Full);
        }
        let pair = pair_of_channel(msg.channel, up.pairs) as usize;
        if pair >= inner.tx.len() {
            return Err(LinkError::NotUp);
        }
        inner.backlog += bytes.len();
        inner.tx[pair].push_back((bytes, 0));
        flush_pair(&mut inner, pair);
        Ok(())
    }

    /// The driver posted `h2g` buffers on `pair`: write what is waiting.
    pub fn flush(&self, pair: usize) {
        let mut inner = self.lock();
        flush_pair(&mut inner, pair);
    }

    /// Signals the driver about the `h2g` buffers filled since the last call. Sending
    /// only queues and fills; callers signal once per batch, as the last step before
    /// they sleep, so that a woken driver does not preempt them mid-batch.
    pub fn signal_pending(&self) {
        let mut inner = self.lock();
        for pair in 0..inner.signal_due.len() {
            if std::mem::take(&mut inner.signal_due[pair]) {
                if let Some(vring) = inner.vrings.get(h2g_queue(pair as u16) as usize) {
                    if vring.needs_notification().unwrap_or(true) {
                        let _ = vring.signal_used_queue();
                    }
                }
            }
        }
    }

    /// Drains the `g2h` queue of `pair`: every complete message, or a framing error.
    pub fn receive(&self, pair: usize) -> Vec<Result<TunnelMessage, TunnelError>> {
        let mut inner = self.lock();
        let max = self.max_msg_size;
        let mut out = Vec::new();
        let Some(mem) = inner.mem.clone() else {
            return out;
        };
        let Some(vring) = inner.vrings.get(g2h_queue(pair as u16) as usize).cloned() else {
            return out;
        };
        let guard = mem.memory();
        loop {
            let _ = vring.disable_notification();
            loop {
                let chain = {
                    let mut state = vring.get_mut();
                    match state.get_queue_mut().iter(&*guard) {
                        Ok(mut it) => it.next(),
                        Err(e) => {
                            warn!("g2h queue {pair}: {e}");
                            None
                        }
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut data = Vec::new();
                let read = chain
                    .clone()
                    .reader(&*guard)
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        if r.available_bytes() > max {
                            Err(format!("buffer of {} bytes", r.available_bytes()))
                        } else {
                            let mut r = r;
                            r.read_to_end(&mut data)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        }
                    });
                let _ = vring.add_used(head, 0);
                if let Err(e) = read {
                    warn!("g2h queue {pair}: bad buffer: {e}");
                    continue;
                }
                if let Some(rx) = inner.rx.get_mut(pair) {
                    if let Some(done) = rx.push(&data, max) {
                        out.push(done.and_then(|bytes| {
                            let h = TunnelHeader::decode(&bytes)?;
                            TunnelMessage::decode_body(&h, &bytes[TUNNEL_HEADER_SIZE..])
                        }));
                    }
                }
            }
            if !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        if vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
        out
    }
}

/// Writes waiting messages of `pair` into the driver's `h2g` buffers.
fn flush_pair(inner: &mut Inner, pair: usize) {
    let Some(mem) = inner.mem.clone() else {
        return;
    };
    let Some(vring) = inner.vrings.get(h2g_queue(pair as u16) as usize).cloned() else {
        return;
    };
    let guard = mem.memory();
    let mut used_any = false;
    let Some(mut queue) = inner.tx.get_mut(pair).map(std::mem::take) else {
        return;
    };
    while let Some((bytes, written)) = queue.front_mut() {
        let chain = {
            let mut state = vring.get_mut();
            match state.get_queue_mut().iter(&*guard) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    warn!("h2g queue {pair}: {e}");
                    None
                }
            }
        };
        let Some(chain) = chain else {
            // Out of buffers: ask the driver to kick when it posts more (with
            // EVENT_IDX this arms one notification), then look once more in case it
            // posted some meanwhile.
            if vring.enable_notification().unwrap_or(false) {
                continue;
            }
            debug!("h2g queue {pair}: no buffer; message waits");
            break;
        };
        let head = chain.head_index();
        let n = match chain.clone().writer(&*guard) {
            Ok(mut w) => w.write(&bytes[*written..]).unwrap_or(0),
            Err(e) => {
                warn!("h2g queue {pair}: bad buffer: {e}");
                0
            }
        };
        let _ = vring.add_used(head, n as u32);
        used_any = true;
        *written += n;
        if *written == bytes.len() {
            inner.backlog = inner.backlog.saturating_sub(bytes.len());
            queue.pop_front();
        }
    }
    inner.tx[pair] = queue;
    if used_any {
        if let Some(due) = inner.signal_due.get_mut(pair) {
            *due = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_proto::tunnel::Body;

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
        assert!(r.push(&msg[..16], 4096).is_none());
        assert!(r.push(&msg[16..50], 4096).is_none());
        assert_eq!(r.push(&msg[50..], 4096).unwrap().unwrap(), msg);
        let mut two = msg.clone();
        two.extend_from_slice(&msg);
        assert!(r.push(&two, 4096).unwrap().is_err());
        assert!(r.push(&msg, 64).unwrap().is_err());
        assert_eq!(r.push(&msg, 4096).unwrap().unwrap(), msg);
        assert!(r.push(&[1, 2, 3], 4096).unwrap().is_err());
    }
}
