//! The vhost-user backend of the tunnel device, on `vhost-user-backend`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vfu_proto::transport::fds::is_eventfd;
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use super::drain_g2h;
use super::gate::Gate;
use crate::switch::Relay;

/// Largest queue the backend accepts.
const MAX_QUEUE_SIZE: usize = 1024;

/// Size of the tunnel device's configuration space as seen through GET_CONFIG: the
/// most a vhost-user message carries. Every byte reads as zero.
const CONFIG_SPACE_SIZE: u32 = 256;

/// The bytes of the tunnel device's configuration space at `offset`, `size` long, or
/// `None` when the range is outside it. The tunnel has no configuration (tunnel.md
/// section 4), but generic frontends (QEMU's `vhost-user-device`, Cloud Hypervisor's
/// `--generic-vhost-user`) forward every access to the backend and require
/// VHOST_USER_PROTOCOL_F_CONFIG, so the space exists and reads as zeros.
fn config_bytes(offset: u32, size: u32) -> Option<Vec<u8>> {
    let end = offset.checked_add(size)?;
    (end <= CONFIG_SPACE_SIZE).then(|| vec![0; size as usize])
}

thread_local! {
    /// Whether this queue worker thread was placed on its CPU already.
    static PLACED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Puts the calling queue worker thread on `cpu`, once per thread (the library
/// starts the threads; this is the first code of ours they run).
fn place_worker_thread(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    if PLACED.with(|p| p.replace(true)) {
        return;
    }
    match vfu_proto::poll::pin_current_thread(cpu) {
        Ok(()) => debug!("tunnel queue worker on CPU {cpu}"),
        Err(e) => warn!("tunnel queue worker: cannot run on CPU {cpu}: {e}"),
    }
}

/// The consumer ends of the exit events the backend hands the library's worker threads.
///
/// vhost-user-backend 0.24 registers each one in its worker's epoll with
/// `EventConsumer::into_raw_fd()` and never closes it (`VringEpollHandler::new`,
/// `event_loop.rs`): without this, every device VM connection would cost the relay an
/// eventfd for good. They are closed once the daemon that used them is dropped.
#[derive(Clone, Default)]
pub struct ExitEvents(Arc<Mutex<Vec<RawFd>>>);

impl ExitEvents {
    fn record(&self, fd: RawFd) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(fd);
    }

    /// Closes the consumers recorded so far. Call only after the daemon whose worker
    /// threads used them was dropped (dropping it joins them).
    pub fn close_all(&self) {
        let fds = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for fd in fds {
            // SAFETY: `fd` is the consumer end of an exit event created in
            // `exit_event`; the library took it over with `into_raw_fd`, never closes
            // it, and no longer uses it (the daemon was dropped, its workers joined);
            // nothing else in the relay knows the number, so it is still that eventfd.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            if is_eventfd(owned.as_fd()) != Some(true) {
                // Not ours after all (a library that closes it itself): leave it be.
                warn!("exit event fd {fd} is no longer an eventfd; not closed");
                let _ = owned.into_raw_fd();
            }
        }
    }

    #[cfg(test)]
    fn recorded(&self) -> Vec<RawFd> {
        self.0.lock().unwrap().clone()
    }
}

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
    /// The exit events given to the library, to be closed after it.
    exits: ExitEvents,
    /// Per queue worker thread: an event that makes it hand its vrings to the link
    /// ([`TunnelBackend::announce_vrings`]).
    announce: Arc<Vec<EventFd>>,
}

/// The `device_event` of [`TunnelBackend`]'s own events (the library keeps 0 to
/// `num_queues` for the queues and its exit event).
fn announce_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

impl TunnelBackend {
    /// A backend feeding `relay`; the exit events it creates are recorded in `exits`.
    pub fn new(relay: Arc<Relay>, gate: Arc<Gate>, exits: ExitEvents) -> Self {
        let generation = relay.link.generation();
        let announce = (0..relay.link.offered_pairs)
            .filter_map(|pair| {
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .inspect_err(|e| warn!("tunnel queue pair {pair}: no announce event: {e}"))
                    .ok()
            })
            .collect();
        Self {
            relay,
            event_idx: Arc::new(AtomicBool::new(false)),
            generation,
            gate,
            exits,
            announce: Arc::new(announce),
        }
    }

    /// Makes each queue worker thread of `daemon` hand its vrings to the link at once,
    /// so that a pair works before its own queues were ever notified: each thread
    /// serves one queue pair and sees only that pair's vrings, and the link needs
    /// them all (a message for a channel goes to the pair of that channel).
    pub fn announce_vrings(&self, handlers: &[Arc<VringEpollHandler<Self>>]) {
        let event = announce_event(self.num_queues());
        for (thread, handler) in handlers.iter().enumerate() {
            let Some(fd) = self.announce.get(thread) else {
                continue;
            };
            let done = handler
                .register_listener(fd.as_raw_fd(), EventSet::IN, u64::from(event))
                .and_then(|()| fd.write(1));
            if let Err(e) = done {
                // Its vrings come with its queues' first notification instead.
                warn!("tunnel queue worker {thread}: cannot announce its vrings: {e}");
            }
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

    /// One worker thread per queue pair: a channel's messages stay on its pair, so on
    /// one thread, in order, and pairs are served in parallel.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.relay.link.offered_pairs)
            .map(|pair| 0b11 << (2 * pair))
            .collect()
    }

    /// The event that stops a worker thread. Without one the library cannot stop the
    /// worker when the frontend disconnects, and waits for it forever: the relay would
    /// never serve the next device VM.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.exits.record(pair.0.as_raw_fd());
                Some(pair)
            }
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
        let mut f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        if self.relay.windows().size() > 0 {
            // DMA windows: the frontend maps client memory into shared memory region 0
            // on the relay's request.
            f |= VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHMEM;
        }
        f
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An empty answer is the protocol's error reply.
        config_bytes(offset, size).unwrap_or_else(|| {
            debug!("frontend read config bytes {offset}+{size}: outside the {CONFIG_SPACE_SIZE} bytes of configuration space");
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Read-only, as read-only fields of a virtio configuration space are: a write
        // is ignored. It does not fail, since Cloud Hypervisor stops the whole device
        // VM when a configuration access fails.
        debug!(
            "frontend wrote {} config bytes at {offset}: ignored, the tunnel device has no writable configuration",
            buf.len()
        );
        Ok(())
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
        thread_id: usize,
    ) -> std::io::Result<()> {
        // Thread `thread_id` serves queue pair `thread_id` ([`Self::queues_per_thread`]):
        // its vrings are that pair's h2g and g2h queues, `device_event` 0 and 1.
        let announced = device_event == announce_event(self.num_queues());
        if announced {
            if let Some(fd) = self.announce.get(thread_id) {
                let _ = fd.read();
            }
        }
        if !self.gate.passes() {
            return Ok(()); // a refused peer's queues reach nothing
        }
        let cpus = &self.relay.config.tunnel_cpu;
        place_worker_thread((!cpus.is_empty()).then(|| cpus[thread_id % cpus.len()]));
        if evset != EventSet::IN {
            warn!("tunnel queue pair {thread_id}: unexpected event {evset:?}");
            return Ok(());
        }
        if self.generation != self.relay.link.generation() {
            return Ok(()); // a late event of a connection that is gone
        }
        let link = &self.relay.link;
        if link.attach_vrings(self.generation, 2 * thread_id, vrings) {
            // Every pair works from now on: look at what came before.
            for pair in 0..usize::from(link.offered_pairs) {
                drain_g2h(&self.relay, pair);
                link.flush(pair);
            }
        }
        let pair = thread_id;
        if announced {
            // Nothing to do but the above.
        } else if device_event == 1 {
            drain_g2h(&self.relay, pair);
        } else {
            link.flush(pair);
        }
        // A g2h queue held back for unread answers goes on once the driver took them.
        for pair in self.relay.link.take_resume() {
            drain_g2h(&self.relay, pair);
        }
        self.relay.link.signal_pending();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DeviceConfig};
    use vhost_user_backend::VhostUserDaemon;

    /// vhost-user-backend leaves the exit event of each worker open when its daemon is
    /// dropped (if this fails, a newer library closes it itself: drop
    /// [`ExitEvents`]); the relay closes it afterwards.
    #[test]
    fn exit_events_outlive_the_daemon_until_closed() {
        let relay = Arc::new(
            Relay::new(Config {
                frontend_socket: "/tmp/exit-events-f.sock".into(),
                control_socket: None,
                devices: vec![DeviceConfig::parse("d=/tmp/exit-events-d.sock").unwrap()],
                shm_size_mib: 0,
                ..Config::default()
            })
            .unwrap(),
        );
        let exits = ExitEvents::default();
        let backend = TunnelBackend::new(relay, Arc::new(Gate::default()), exits.clone());
        let daemon = VhostUserDaemon::new(
            "exit-events".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        drop(daemon);
        let fds = exits.recorded();
        assert_eq!(fds.len(), 1, "one worker thread, one exit event");
        for &fd in &fds {
            // SAFETY: borrows a descriptor this test checks is open; not closed here.
            let still = is_eventfd(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
            assert_eq!(
                still,
                Some(true),
                "the library closed the exit event itself"
            );
        }
        exits.close_all();
        assert!(exits.recorded().is_empty());
    }

    /// The configuration space is 256 zero bytes; reads past its end (or whose end
    /// overflows) get the empty error answer instead of bytes.
    #[test]
    fn config_space_reads_as_zeros_within_its_size() {
        assert_eq!(config_bytes(0, 16), Some(vec![0; 16]));
        assert_eq!(config_bytes(240, 16), Some(vec![0; 16]));
        assert_eq!(config_bytes(0, 256), Some(vec![0; 256]));
        assert_eq!(config_bytes(0, 0), Some(vec![]));
        assert_eq!(config_bytes(241, 16), None);
        assert_eq!(config_bytes(u32::MAX, 2), None);
    }
}
