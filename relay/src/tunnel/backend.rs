//! The vhost-user backend of the tunnel device, on `vhost-user-backend`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::dispatch;
use super::gate::Gate;
use crate::switch::Relay;

/// Largest queue the backend accepts.
const MAX_QUEUE_SIZE: usize = 1024;

/// The backend of one frontend connection.
#[derive(Clone)]
pub struct TunnelBackend {
    relay: Arc<Relay>,
    event_idx: Arc<AtomicBool>,
    /// The link generation of this frontend connection.
    generation: u64,
    /// Whether this connection's peer may be the device VM's VMM: the callbacks that
    /// reach the relay wait for it.
    gate: Arc<Gate>,
}

impl TunnelBackend {
    /// A backend feeding `relay`.
    pub fn new(relay: Arc<Relay>, gate: Arc<Gate>) -> Self {
        let generation = relay.link.generation();
        Self {
            relay,
            event_idx: Arc::new(AtomicBool::new(false)),
            generation,
            gate,
        }
    }
}

impl VhostUserBackend for TunnelBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.relay.link.offered_pairs as usize
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    /// The event that stops a worker thread. Without one the library cannot stop the
    /// worker when the frontend disconnects, and waits for it forever: the relay would
    /// never serve the next device VM.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("worker thread {thread_index}: no exit event ({e}); it cannot be stopped");
                None
            }
        }
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut f = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if self.relay.windows().size() > 0 {
            // DMA windows: the frontend maps client memory into shared memory region 0
            // on the relay's request.
            f |= VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHMEM;
        }
        f
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        if !self.gate.passes() {
            return;
        }
        if self.generation == self.relay.link.generation() {
            self.relay.windows().attach(backend);
        }
    }

    fn get_shmem_config(&self) -> std::io::Result<VhostUserShMemConfig> {
        let size = self.relay.windows().size();
        Ok(VhostUserShMemConfig::new(1, &[size]))
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        if !self.gate.passes() {
            return Err(std::io::Error::from_raw_os_error(libc::EACCES));
        }
        self.relay.link.attach_memory(self.generation, mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if !self.gate.passes() {
            return Ok(()); // a refused peer's queues reach nothing
        }
        if evset != EventSet::IN {
            warn!("tunnel queue {device_event}: unexpected event {evset:?}");
            return Ok(());
        }
        if self.generation != self.relay.link.generation() {
            return Ok(()); // a late event of a connection that is gone
        }
        self.relay.link.attach_vrings(self.generation, vrings);
        let pair = device_event as usize / 2;
        if device_event % 2 == 1 {
            loop {
                // Bounded batches: the link lock is released between them, so the
                // switch keeps forwarding requests while a busy driver talks.
                let (messages, more) = self.relay.link.receive(pair);
                for msg in messages {
                    dispatch(&self.relay, msg);
                }
                self.relay.link.signal_pending();
                if !more {
                    break;
                }
            }
        } else {
            self.relay.link.flush(pair);
        }
        self.relay.link.signal_pending();
        Ok(())
    }
}
