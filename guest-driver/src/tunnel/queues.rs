//! One queue pair of the tunnel device, driver side: `h2g` buffers kept posted and the
//! messages reassembled from them, `g2h` messages cut into buffers from a pool.
//! Framing follows `docs/tunnel.md` section 6.1: a message starts at the beginning of a
//! buffer and continues in the next buffers of the same queue.

use std::collections::VecDeque;

use log::warn;
use vfu_proto::tunnel::{TunnelError, TunnelHeader, TunnelMessage, TUNNEL_HEADER_SIZE};
use vm_memory::{VolatileSlice, WriteVolatile};

use crate::virtqueue::{Allocation, Descriptor, DriverQueue, QueueError, Segment, SharedMemory};

/// Size of each buffer, both directions.
pub const BUFFER_SIZE: usize = 16 << 10;

/// Where a direct request's parts lie in the pair's direct buffer: a DMA_READ's request
/// at 0 and its reply (head and data) at [`DIRECT_READ_REPLY`]; a DMA_WRITE's reply at 0
/// and its request (head and data) at [`DIRECT_WRITE_REQUEST`].
pub const DIRECT_READ_REPLY: usize = 4096;
/// See [`DIRECT_READ_REPLY`].
pub const DIRECT_WRITE_REQUEST: usize = 64;

/// The direct request of a pair (`DIRECT_DATA`, `docs/tunnel.md` section 6.6): at most
/// one at a time, as the engine waits for each.
#[derive(Debug, Default)]
struct Direct {
    /// Head of the chain the device holds.
    in_flight: Option<u16>,
    /// The engine stopped waiting for it (timeout): its answer is dropped, and the
    /// buffer is reused only once the device gave the chain back.
    abandoned: bool,
    /// Bytes the device wrote, once it gave the chain back.
    used: Option<u32>,
}

/// Driver side of a queue pair.
pub struct QueuePair {
    /// Queue index of `h2g`.
    pub h2g_index: u16,
    /// Queue index of `g2h`.
    pub g2h_index: u16,
    h2g: DriverQueue,
    g2h: DriverQueue,
    /// `h2g` buffer of each descriptor head.
    rx_buffers: Vec<Option<Allocation>>,
    /// Free `g2h` buffers, and the one in flight per head.
    tx_free: Vec<Allocation>,
    tx_in_flight: Vec<Option<Allocation>>,
    /// Messages waiting for `g2h` room: bytes and how much is already queued.
    tx_pending: VecDeque<(Vec<u8>, usize)>,
    rx_partial: Vec<u8>,
    rx_expected: usize,
    max_msg: usize,
    /// Buffer of direct requests and their replies, set aside once the relay agreed to
    /// `DIRECT_DATA`.
    direct_buf: Option<Allocation>,
    direct: Direct,
    /// Poll mode: the engine looks at the rings on its own; interrupts stay off.
    polling: bool,
}

/// A queue pair's failure (the device misbehaved, or memory ran out).
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// A ring operation failed.
    #[error("virtqueue: {0}")]
    Queue(#[from] QueueError),
    /// Shared memory ran out.
    #[error("out of shared memory for buffers")]
    NoMemory,
}

impl QueuePair {
    /// Allocates the rings and buffers of pair `pair` with `size` entries per queue.
    pub fn new(
        mem: &SharedMemory,
        pair: u16,
        size: u16,
        event_idx: bool,
        max_msg: usize,
    ) -> Result<Self, PairError> {
        let h2g = DriverQueue::new(mem, size, event_idx)?;
        let g2h = DriverQueue::new(mem, size, event_idx)?;
        let tx_free = (0..size)
            .map(|_| mem.alloc(BUFFER_SIZE, 64).ok_or(PairError::NoMemory))
            .collect::<Result<Vec<_>, _>>()?;
        let mut p = Self {
            h2g_index: pair * 2,
            g2h_index: pair * 2 + 1,
            h2g,
            g2h,
            rx_buffers: vec![None; size as usize],
            tx_free,
            tx_in_flight: vec![None; size as usize],
            tx_pending: VecDeque::new(),
            rx_partial: Vec::new(),
            rx_expected: 0,
            max_msg,
            direct_buf: None,
            direct: Direct::default(),
            polling: false,
        };
        for _ in 0..size {
            let buf = mem.alloc(BUFFER_SIZE, 64).ok_or(PairError::NoMemory)?;
            p.post_rx(buf)?;
        }
        Ok(p)
    }

    /// Ring addresses of `h2g` and `g2h`.
    pub fn rings(&self) -> [(u16, u16, (u64, u64, u64)); 2] {
        [
            (self.h2g_index, self.h2g.size(), self.h2g.addresses()),
            (self.g2h_index, self.g2h.size(), self.g2h.addresses()),
        ]
    }

    fn post_rx(&mut self, buf: Allocation) -> Result<(), PairError> {
        self.post_rx_with(buf, None::<fn(&mut [Descriptor], &[u16])>)
    }

    /// Posts an `h2g` buffer; `edit`, when given, changes its descriptor first
    /// ([`crate::hostile`]).
    fn post_rx_with(
        &mut self,
        buf: Allocation,
        edit: Option<impl FnOnce(&mut [Descriptor], &[u16])>,
    ) -> Result<(), PairError> {
        let seg = [Segment {
            gpa: buf.gpa,
            len: buf.len as u32,
            device_writable: true,
        }];
        let head = match edit {
            None => self.h2g.add(&seg)?,
            Some(edit) => self.h2g.add_with(&seg, edit)?,
        };
        self.rx_buffers[head as usize] = Some(buf);
        Ok(())
    }

    /// Sends `bytes` (one buffer's worth at most) as a chain of its own, shaped by the
    /// misbehaving driver of [`crate::hostile`]: `shape` turns the buffer that holds the
    /// bytes into the chain's segments (split, with other buffers around it), `edit`
    /// changes the descriptors before they are published. Returns false, having sent
    /// nothing, when the message cannot go in a chain of its own now (messages wait
    /// before it, no buffer or descriptor is free, it is longer than a buffer).
    pub fn send_shaped(
        &mut self,
        bytes: &[u8],
        shape: impl FnOnce(Segment) -> Vec<Segment>,
        edit: impl FnOnce(&mut [Descriptor], &[u16]),
    ) -> Result<bool, PairError> {
        let Some(buf) = self.tx_free.last().copied() else {
            return Ok(false);
        };
        if !self.tx_pending.is_empty() || bytes.len() > buf.len {
            return Ok(false);
        }
        let segments = shape(Segment {
            gpa: buf.gpa,
            len: bytes.len() as u32,
            device_writable: false,
        });
        if segments.is_empty() || segments.len() > self.g2h.num_free() as usize {
            return Ok(false);
        }
        self.tx_free.pop();
        if let Some(s) = buf.slice(0, bytes.len()) {
            s.copy_from(bytes);
        }
        let head = self.g2h.add_with(&segments, edit)?;
        self.tx_in_flight[head as usize] = Some(buf);
        Ok(true)
    }

    /// The `g2h` queue, for the index abuse of [`crate::hostile`].
    pub fn g2h_queue(&mut self) -> &mut DriverQueue {
        &mut self.g2h
    }

    /// The `h2g` queue, for the index abuse of [`crate::hostile`].
    pub fn h2g_queue(&mut self) -> &mut DriverQueue {
        &mut self.h2g
    }

    /// Queues a message toward the device and writes what fits.
    pub fn send(&mut self, msg: &TunnelMessage) -> Result<(), PairError> {
        self.send_bytes(msg.encode())
    }

    /// Queues bytes toward the device as if they were a message (they need not be one:
    /// the misbehaving driver of [`crate::hostile`] sends garbled ones this way) and
    /// writes what fits.
    pub fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), PairError> {
        self.tx_pending.push_back((bytes, 0));
        self.flush_tx()
    }

    /// Moves waiting messages into free `g2h` buffers.
    pub fn flush_tx(&mut self) -> Result<(), PairError> {
        while let Some((bytes, done)) = self.tx_pending.front_mut() {
            if self.tx_free.is_empty() || self.g2h.num_free() == 0 {
                break;
            }
            let buf = self.tx_free.pop().expect("checked non-empty");
            let n = (bytes.len() - *done).min(buf.len);
            if let Some(s) = buf.slice(0, n) {
                s.copy_from(&bytes[*done..*done + n]);
            }
            let head = self.g2h.add(&[Segment {
                gpa: buf.gpa,
                len: n as u32,
                device_writable: false,
            }])?;
            self.tx_in_flight[head as usize] = Some(buf);
            *done += n;
            if *done == bytes.len() {
                self.tx_pending.pop_front();
            }
        }
        Ok(())
    }

    /// Whether a direct request may be posted: none holds the buffer, and the `g2h`
    /// stream is between messages (a chain in the middle of a message would break its framing).
    pub fn direct_ready(&self) -> bool {
        self.direct_buf.is_some()
            && self.direct.in_flight.is_none()
            && self.tx_pending.is_empty()
            && self.g2h.num_free() >= 2
    }

    /// Sets the direct buffer aside (once the relay agreed to `DIRECT_DATA`): room for
    /// the largest message and a request before it.
    pub fn enable_direct(&mut self, mem: &SharedMemory) -> Result<(), PairError> {
        if self.direct_buf.is_none() {
            let buf = mem.alloc(DIRECT_READ_REPLY + self.max_msg, 4096);
            self.direct_buf = Some(buf.ok_or(PairError::NoMemory)?);
        }
        Ok(())
    }

    /// The direct buffer, once enabled (write a request into it only when
    /// [`QueuePair::direct_ready`]; read a reply from it only after
    /// [`QueuePair::take_direct_answer`]).
    pub fn direct_area(&self) -> Option<&Allocation> {
        self.direct_buf.as_ref()
    }

    /// Posts a direct request: `request` bytes of the direct buffer at `request_at`
    /// (device-readable), then `reply_len` bytes at `reply_at` for the answer
    /// (device-writable). Call only when [`QueuePair::direct_ready`].
    pub fn post_direct(
        &mut self,
        request_at: usize,
        request: usize,
        reply_at: usize,
        reply_len: usize,
    ) -> Result<(), PairError> {
        let gpa = self.direct_buf.as_ref().ok_or(PairError::NoMemory)?.gpa;
        let head = self.g2h.add(&[
            Segment {
                gpa: gpa + request_at as u64,
                len: request as u32,
                device_writable: false,
            },
            Segment {
                gpa: gpa + reply_at as u64,
                len: reply_len as u32,
                device_writable: true,
            },
        ])?;
        self.direct = Direct {
            in_flight: Some(head),
            abandoned: false,
            used: None,
        };
        Ok(())
    }

    /// Bytes of answer the device wrote, once it gave the direct chain back.
    pub fn take_direct_answer(&mut self) -> Option<u32> {
        self.direct.used.take()
    }

    /// Stops waiting for the direct request in flight.
    pub fn abandon_direct(&mut self) {
        self.direct.abandoned = true;
    }

    /// Takes back `g2h` buffers the device has read.
    pub fn reclaim_tx(&mut self) -> Result<(), PairError> {
        while let Some(used) = self.g2h.pop_used()? {
            if self.direct.in_flight == Some(used.head) {
                self.direct.in_flight = None;
                if !std::mem::take(&mut self.direct.abandoned) {
                    // The ring checked `len` against the chain's writable bytes.
                    self.direct.used = Some(used.len);
                }
                continue;
            }
            if let Some(buf) = self.tx_in_flight[used.head as usize].take() {
                self.tx_free.push(buf);
            }
        }
        Ok(())
    }

    /// Collects complete messages from `h2g` and re-posts the buffers. Each buffer's
    /// bytes are copied once, straight into the message being reassembled.
    pub fn receive(&mut self) -> Result<Vec<Result<TunnelMessage, TunnelError>>, PairError> {
        self.receive_with(None::<fn(&mut [Descriptor], &[u16])>)
    }

    /// [`QueuePair::receive`]; `edit`, when given, changes the descriptor of the first
    /// buffer posted again ([`crate::hostile`]).
    pub fn receive_with(
        &mut self,
        mut edit: Option<impl FnOnce(&mut [Descriptor], &[u16])>,
    ) -> Result<Vec<Result<TunnelMessage, TunnelError>>, PairError> {
        let mut out = Vec::new();
        while let Some(used) = self.h2g.pop_used()? {
            let Some(buf) = self.rx_buffers[used.head as usize].take() else {
                continue;
            };
            // The ring checked `used.len` against the descriptor; clamp all the same.
            let len = (used.len as usize).min(buf.len);
            let done = buf.slice(0, len).and_then(|s| self.reassemble(&s));
            self.post_rx_with(buf, edit.take())?;
            if let Some(done) = done {
                out.push(done);
            }
        }
        Ok(out)
    }

    fn reassemble(
        &mut self,
        chunk: &VolatileSlice<'_>,
    ) -> Option<Result<TunnelMessage, TunnelError>> {
        if self.rx_expected == 0 {
            let mut head = [0u8; TUNNEL_HEADER_SIZE];
            let n = chunk.len().min(TUNNEL_HEADER_SIZE);
            if let Ok(h) = chunk.subslice(0, n) {
                h.copy_to(&mut head[..n]);
            }
            let header = match TunnelHeader::decode(&head[..n]) {
                Ok(h) => h,
                Err(e) => return Some(Err(e)),
            };
            let total = header.message_size();
            if total > self.max_msg {
                return Some(Err(TunnelError::TooLarge {
                    size: total,
                    limit: self.max_msg,
                }));
            }
            self.rx_expected = total;
            self.rx_partial = Vec::with_capacity(total);
        }
        if self.rx_partial.len() + chunk.len() > self.rx_expected {
            warn!("h2g: a buffer holds bytes of two messages; dropped");
            let extra = self.rx_partial.len() + chunk.len() - self.rx_expected;
            self.rx_expected = 0;
            return Some(Err(TunnelError::TrailingBytes { extra }));
        }
        // Appends without zero-filling first (the Vec has room for the whole message).
        // (Appending to a Vec cannot fail; were it to, the message is short.)
        if self.rx_partial.write_all_volatile(chunk).is_err() {
            let len = u32::try_from(self.rx_expected).unwrap_or(u32::MAX);
            self.rx_expected = 0;
            return Some(Err(TunnelError::LengthMismatch {
                len,
                actual: self.rx_partial.len(),
            }));
        }
        if self.rx_partial.len() < self.rx_expected {
            return None;
        }
        self.rx_expected = 0;
        let bytes = std::mem::take(&mut self.rx_partial);
        Some(
            TunnelHeader::decode(&bytes)
                .and_then(|h| TunnelMessage::decode_body(&h, &bytes[TUNNEL_HEADER_SIZE..])),
        )
    }

    /// Whether the device must be notified about new `h2g` / `g2h` buffers.
    pub fn kicks_needed(&mut self) -> (bool, bool) {
        (self.h2g.kick_needed(), self.g2h.kick_needed())
    }

    /// Turns poll mode on or off; [`QueuePair::rearm`] then leaves interrupts off, or
    /// asks for them again.
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
    }

    /// Re-arms interrupts; true if work arrived meanwhile. Incoming messages always
    /// interrupt; `g2h` completions only while messages wait for room or a direct
    /// request waits for its answer (otherwise the buffers are reclaimed on the next
    /// pass, without a wake-up per message). In poll mode interrupts stay off, and the
    /// answer is whether there is work to take now.
    pub fn rearm(&mut self) -> bool {
        if self.polling {
            // Poll mode: interrupts stay off; say whether there is work to take now.
            self.h2g.disable_interrupts();
            self.g2h.disable_interrupts();
            let waiting = self.direct.in_flight.is_some() && !self.direct.abandoned;
            return self.h2g.has_used()
                || ((waiting || !self.tx_pending.is_empty()) && self.g2h.has_used());
        }
        let incoming = self.h2g.enable_interrupts();
        let waiting = self.direct.in_flight.is_some() && !self.direct.abandoned;
        let reclaimable = if self.tx_pending.is_empty() && !waiting {
            self.g2h.disable_interrupts();
            false
        } else {
            self.g2h.enable_interrupts()
        };
        incoming || reclaimable
    }
}
