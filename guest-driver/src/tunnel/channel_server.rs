//! What serves one channel: the interface between the engine and a device server (a
//! device model behind the device API, [`super::ModelChannel`], or a bridge to a
//! vfio-user server running in the device VM).

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use log::warn;
use vfu_proto::tunnel::{Body, IrqTrigger, TunnelMessage, VfioUserFrame, TUNNEL_HEADER_SIZE};
use vfu_proto::vfio_user::{Header, MessageType, HEADER_SIZE};

use crate::device::DmaRemote;

/// One channel's device server, as the engine drives it.
///
/// The engine calls a server from one thread at a time, in the order the relay sent
/// the channel's messages. A server whose calls may wait for something outside the
/// engine says so with [`may_block`](Self::may_block); the engine then runs it on a
/// thread of its own, so that the wait holds up no other channel.
pub trait ChannelServer: Send {
    /// A vfio-user message from the client (through the relay). `dma` reaches client
    /// memory that has no window (the tunnel's copy path); what goes back to the client
    /// (replies, interrupts) goes into `out`.
    fn vfio_user(&mut self, frame: VfioUserFrame, dma: &mut dyn DmaRemote, out: &mut Outlet);

    /// The client went away (SESSION_END): its DMA maps and interrupt assignments are
    /// gone; the device state stays.
    fn client_disconnected(&mut self);

    /// DMA windows are mapped at `base` (`len` bytes, shared memory region 0).
    ///
    /// # Safety
    /// The memory stays mapped for as long as the server lives.
    unsafe fn set_windows(&mut self, base: NonNull<u8>, len: usize);

    /// An fd that becomes readable when the server has work to do outside a request;
    /// the engine then calls [`service`](Self::service).
    fn event_fd(&self) -> Option<BorrowedFd<'_>>;

    /// Does the work announced by [`event_fd`](Self::event_fd).
    fn service(&mut self, dma: &mut dyn DmaRemote, out: &mut Outlet);

    /// Whether a call may wait for something outside the engine: copy-path DMA (which
    /// the relay may have to ask the client for), or another process.
    fn may_block(&self) -> bool;
}

/// Where a server puts the messages for its client; the engine sends them, in order.
#[derive(Debug)]
pub struct Outlet {
    channel: u32,
    peer_max_msg: usize,
    messages: Vec<TunnelMessage>,
}

/// A vfio-user message that cannot be sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutletError {
    /// Shorter than a vfio-user header, or the header does not decode.
    #[error("not a vfio-user message")]
    Malformed,
    /// Longer than the relay accepts.
    #[error("{len} bytes exceed the {max} bytes the relay accepts")]
    TooBig {
        /// The message's length.
        len: usize,
        /// The most the relay takes, vfio-user header included.
        max: usize,
    },
}

impl Outlet {
    /// An empty outlet for `channel`; the relay accepts tunnel messages of up to
    /// `peer_max_msg` bytes.
    pub fn new(channel: u32, peer_max_msg: usize) -> Self {
        Self {
            channel,
            peer_max_msg,
            messages: Vec::new(),
        }
    }

    /// The channel this outlet sends on.
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// Largest vfio-user message (header and payload) the relay accepts.
    pub fn max_vfio_user_msg(&self) -> usize {
        self.peer_max_msg.saturating_sub(TUNNEL_HEADER_SIZE)
    }

    /// Queues a vfio-user message (header and payload, no fds) for the client.
    pub fn vfio_user(&mut self, bytes: &[u8]) -> Result<(), OutletError> {
        if bytes.len() > self.max_vfio_user_msg() {
            return Err(OutletError::TooBig {
                len: bytes.len(),
                max: self.max_vfio_user_msg(),
            });
        }
        let header = Header::decode(bytes).map_err(|_| OutletError::Malformed)?;
        self.messages.push(TunnelMessage::new(
            self.channel,
            Body::VfioUser(VfioUserFrame {
                header,
                payload: bytes[HEADER_SIZE..].to_vec(),
                slots: Vec::new(),
            }),
        ));
        Ok(())
    }

    /// Reports a request as carried out if it was posted (NO_REPLY): the relay counts
    /// such requests in flight until it hears so (tunnel feature `POSTED_DONE`; the
    /// driver coalesces these into one message per channel and batch).
    pub fn carried_out(&mut self, request: &Header) {
        if request.msg_type == MessageType::Command && request.no_reply {
            self.messages.push(TunnelMessage::new(
                self.channel,
                Body::PostedDone {
                    msg_id: request.msg_id,
                },
            ));
        }
    }

    /// Queues an interrupt: vectors `start..start + count` of IRQ index `index`.
    pub fn irq(&mut self, index: u32, start: u32, count: u32) {
        self.messages.push(TunnelMessage::new(
            self.channel,
            Body::Irq(IrqTrigger {
                index,
                start,
                count,
            }),
        ));
    }

    /// Queues a tunnel message of this channel as it is (a status answer).
    pub fn push(&mut self, msg: TunnelMessage) {
        if msg.channel != self.channel {
            warn!(
                "message for channel {} dropped from channel {}'s outlet",
                msg.channel, self.channel
            );
            return;
        }
        self.messages.push(msg);
    }

    /// Takes the queued messages.
    pub fn take(&mut self) -> Vec<TunnelMessage> {
        std::mem::take(&mut self.messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfu_proto::vfio_user::encode_error_reply;

    /// A reply that fits goes out as one VFIO_USER message of the outlet's channel;
    /// one that does not is refused, never cut.
    #[test]
    fn outlet_checks_size_and_shape() {
        let mut out = Outlet::new(3, 100);
        let bytes = encode_error_reply(&Header::command(7, 9, 0), 5);
        out.vfio_user(&bytes).unwrap();
        let msgs = out.take();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].channel, 3);
        assert!(matches!(&msgs[0].body, Body::VfioUser(f) if f.header.msg_id == 7));
        assert_eq!(out.vfio_user(&bytes[..4]), Err(OutletError::Malformed));
        let big = vec![0u8; 100];
        assert!(matches!(
            out.vfio_user(&big),
            Err(OutletError::TooBig { .. })
        ));
        assert!(out.take().is_empty());
    }
}
