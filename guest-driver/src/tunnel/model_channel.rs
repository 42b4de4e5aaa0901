//! A channel served by a device model through the device API ([`DeviceServer`]).

use std::collections::HashSet;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vfu_proto::tunnel::VfioUserFrame;
use vfu_proto::vfio_user::{encode_error_reply, encode_reply, MessageType, Request};

use super::channel_server::{ChannelServer, Outlet};
use crate::device::{DeviceModel, DeviceServer, DmaRemote, IrqSink, Response};

/// Interrupts raised by the model: vectors the client assigned (slots, as no eventfd
/// exists inside the device VM), as `(index, vector)` to send once the call returns.
#[derive(Default)]
struct TunnelIrqs {
    assigned: HashSet<(u32, u32)>,
    raised: Arc<Mutex<Vec<(u32, u32)>>>,
}

impl IrqSink for TunnelIrqs {
    fn set_eventfds(&mut self, index: u32, start: u32, count: u32, fds: Option<Vec<OwnedFd>>) {
        self.assign_slots(index, start, count, fds.is_some());
    }

    fn assign_slots(&mut self, index: u32, start: u32, count: u32, assigned: bool) {
        for v in start..start.saturating_add(count) {
            if assigned {
                self.assigned.insert((index, v));
            } else {
                self.assigned.remove(&(index, v));
            }
        }
    }

    fn trigger(&mut self, index: u32, vector: u32) {
        if self.assigned.contains(&(index, vector)) {
            self.raised
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, vector));
        }
    }

    fn clear(&mut self) {
        self.assigned.clear();
    }
}

/// A device model serving one channel.
pub struct ModelChannel {
    name: String,
    server: DeviceServer,
    raised: Arc<Mutex<Vec<(u32, u32)>>>,
}

impl ModelChannel {
    /// Serves `model` as device `name`.
    pub fn new(name: &str, model: Box<dyn DeviceModel>) -> Self {
        let irqs = TunnelIrqs::default();
        let raised = irqs.raised.clone();
        Self {
            name: name.to_string(),
            server: DeviceServer::new(model, Box::new(irqs)),
            raised,
        }
    }

    /// Moves the interrupts raised during the last call into `out`.
    fn flush_irqs(&self, out: &mut Outlet) {
        let raised = std::mem::take(&mut *self.raised.lock().unwrap_or_else(|p| p.into_inner()));
        for (index, vector) in raised {
            out.irq(index, vector, 1);
        }
    }

    fn answer(&mut self, frame: VfioUserFrame, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        let header = frame.header;
        let name = &self.name;
        if header.msg_type != MessageType::Command {
            debug!("{name}: reply from the relay ignored (this server sends no requests)");
            return;
        }
        let send = |out: &mut Outlet, bytes: Vec<u8>| {
            if let Err(e) = out.vfio_user(&bytes) {
                warn!("{name}: reply to message {}: {e}; E2BIG", header.msg_id);
                let _ = out.vfio_user(&encode_error_reply(&header, libc::E2BIG as u32));
            }
        };
        let request = match Request::decode(header.command, &frame.payload, frame.slots.len()) {
            Ok(r) => r,
            Err(e) => {
                debug!("{name}: bad request: {e}");
                if !header.no_reply {
                    send(out, encode_error_reply(&header, e.errno()));
                }
                return;
            }
        };
        match self
            .server
            .handle_tunnel(&header, request, &frame.slots, dma)
        {
            Response::Reply { reply, fds } => {
                if fds.is_empty() {
                    send(out, encode_reply(header.msg_id, &reply));
                } else {
                    warn!("{name}: a reply with fds cannot cross the tunnel; EIO");
                    send(out, encode_error_reply(&header, libc::EIO as u32));
                }
            }
            Response::Error(errno) => send(out, encode_error_reply(&header, errno)),
            Response::NoReply => {}
        }
    }
}

impl ChannelServer for ModelChannel {
    fn vfio_user(&mut self, frame: VfioUserFrame, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        self.answer(frame, dma, out);
        self.flush_irqs(out);
    }

    fn client_disconnected(&mut self) {
        debug!("{}: client disconnected", self.name);
        self.server.client_disconnected();
    }

    unsafe fn set_windows(&mut self, base: NonNull<u8>, len: usize) {
        // SAFETY: the caller keeps the memory mapped for as long as the server lives.
        unsafe { self.server.set_windows(base.as_ptr(), len) };
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.server.event_fd()
    }

    fn service(&mut self, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        self.server.service(dma);
        self.flush_irqs(out);
    }

    fn may_block(&self) -> bool {
        // Local memory (windows) never waits; anything else goes through the relay,
        // which may have to ask the client.
        self.server.dma_regions().any(|r| !r.is_local())
    }
}
