//! The vhost-user backend of the tunnel device, on `vhost-user-backend`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, error, warn};
use thiserror::Error;
use vfu_proto::transport::fds::is_eventfd;
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
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

/// Why the relay does not map a memory table the device VM's VMM offers.
#[derive(Debug, Error)]
pub enum VmmMemoryError {
    /// The region's file could shrink under the relay's mapping.
    #[error(
        "region {index} (guest address {gpa:#x}, {size} bytes) is not a memfd sealed against shrinking (F_SEAL_SHRINK)"
    )]
    Unsealed {
        /// Index of the region in the table.
        index: usize,
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// The region reaches past the end of its file, or its file cannot be examined.
    #[error(
        "region {index} (guest address {gpa:#x}, {size} bytes at offset {offset:#x} of its file) does not lie in its file: {source}"
    )]
    OutsideFile {
        /// Index of the region in the table.
        index: usize,
        /// Its guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// Its offset in the file.
        offset: u64,
        /// What the check of the file said.
        source: std::io::Error,
    },
}

/// Checks a memory table of the device VM's VMM before the relay uses it: every
/// region's file must hold the whole region, and, unless `unsealed` (the operator's
/// `unsealed_vmm_memory`), be a memfd sealed with `F_SEAL_SHRINK`, so that no access
/// of the relay's to it can ever raise SIGBUS (QEMU's `memory-backend-memfd` seals so
/// by default). A region without a file is anonymous memory of the relay's own (never
/// the case over vhost-user), which nobody else can take away.
pub fn check_vmm_memory(table: &GuestMemoryMmap, unsealed: bool) -> Result<(), VmmMemoryError> {
    for (index, region) in table.iter().enumerate() {
        let Some(file) = region.file_offset() else {
            continue;
        };
        let (gpa, size) = (region.start_addr().0, region.len());
        if !unsealed && !vfu_proto::mem::cannot_shrink(file.file().as_fd()) {
            return Err(VmmMemoryError::Unsealed { index, gpa, size });
        }
        vfu_proto::mem::check_range(file.file().as_fd(), file.start(), size).map_err(|source| {
            VmmMemoryError::OutsideFile {
                index,
                gpa,
                size,
                offset: file.start(),
                source,
            }
        })?;
    }
    Ok(())
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

    /// A new memory table (SET_MEM_TABLE, or ADD_MEM_REG / REM_MEM_REG, which the relay
    /// does not offer). The library has mapped it already, and put it where the vrings
    /// see it; the relay uses it only once it is checked ([`check_vmm_memory`]). A
    /// refused table is never touched: the link lets go of this connection's memory
    /// ([`Link::refuse_memory`](super::Link::refuse_memory)), and the error makes the
    /// library answer the request with a negative acknowledgement and end the
    /// connection (`a_refused_memory_table_ends_the_vmm_connection`).
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        if !self.gate.passes() {
            return Err(std::io::Error::from_raw_os_error(libc::EACCES));
        }
        let table = mem.memory().into_inner();
        if let Err(e) = check_vmm_memory(&table, self.relay.config.unsealed_vmm_memory) {
            match e {
                VmmMemoryError::Unsealed { .. } => error!(
                    "refused the device VM's VMM: its guest memory {e}; by shrinking the file the VMM could make the relay die of SIGBUS. Give the device VM sealed memory (QEMU: memory-backend-memfd, sealed by default), or set unsealed_vmm_memory (--unsealed-vmm-memory) to trust its VMM"
                ),
                VmmMemoryError::OutsideFile { .. } => error!(
                    "refused the device VM's VMM: its guest memory {e}; the relay would die of SIGBUS reading it"
                ),
            }
            self.relay.link.refuse_memory(self.generation);
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e));
        }
        self.relay.link.attach_memory(self.generation, table);
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

    /// A relay without devices or windows, with `unsealed_vmm_memory` as given.
    fn relay_trusting_vmm_memory(unsealed_vmm_memory: bool) -> Arc<Relay> {
        Arc::new(
            Relay::new(Config {
                frontend_socket: "/tmp/vmm-memory-f.sock".into(),
                control_socket: None,
                shm_size_mib: 0,
                unsealed_vmm_memory,
                ..Config::default()
            })
            .unwrap(),
        )
    }

    /// A backend of the relay's current connection whose peer passed the gate.
    fn allowed_backend(relay: &Arc<Relay>) -> TunnelBackend {
        let gate = Arc::new(Gate::default());
        gate.decide(true);
        TunnelBackend::new(relay.clone(), gate, ExitEvents::default())
    }

    /// A memfd of `len` bytes; sealing allowed only if `seals` is `Some`, which it then
    /// gets (Cloud Hypervisor's memory is a memfd that cannot be sealed; QEMU's
    /// `memory-backend-memfd` seals `F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`).
    fn memfd(len: u64, seals: Option<i32>) -> std::fs::File {
        let flags = libc::MFD_CLOEXEC | seals.map_or(0, |_| libc::MFD_ALLOW_SEALING);
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vmm-memory".as_ptr(), flags) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        if let Some(seals) = seals.filter(|&s| s != 0) {
            // SAFETY: F_ADD_SEALS on a memfd this function owns.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        }
        file
    }

    /// A memory table of one region of `len` bytes at guest address 0, mapped from
    /// `file` as `vhost-user-backend` maps a SET_MEM_TABLE region.
    fn table_of(file: std::fs::File, len: usize) -> GuestMemoryAtomic<GuestMemoryMmap> {
        use vm_memory::{FileOffset, GuestAddress};
        let region = (GuestAddress(0), len, Some(FileOffset::new(file, 0)));
        GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges_with_files([region]).unwrap())
    }

    /// The device VM's memory is used only if no access to it can raise SIGBUS: a
    /// region whose memfd is sealed against shrinking is accepted and becomes the
    /// link's memory; one of a memfd that is not sealed, or cannot be (Cloud
    /// Hypervisor's), is refused, and the link then has no memory at all (not even
    /// the table it had); a region longer than its (sealed) file is refused. With
    /// `unsealed_vmm_memory` an unsealed memfd is accepted, a region past its file's
    /// end still is not. Anonymous memory (no file; never over vhost-user) passes.
    #[test]
    fn update_memory_takes_only_memory_that_cannot_shrink() {
        const SEALED: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        let len = 1 << 20;
        let relay = relay_trusting_vmm_memory(false);
        let backend = allowed_backend(&relay);

        let sealed = table_of(memfd(len as u64, Some(SEALED)), len);
        backend.update_memory(sealed.clone()).unwrap();
        let used = relay.link.memory_table().expect("the sealed table is used");
        assert!(Arc::ptr_eq(&used, &sealed.memory().into_inner()));
        let shrink_only = table_of(memfd(len as u64, Some(libc::F_SEAL_SHRINK)), len);
        backend.update_memory(shrink_only).unwrap();

        for (what, table) in [
            ("not sealed", table_of(memfd(len as u64, Some(0)), len)),
            ("cannot be sealed", table_of(memfd(len as u64, None), len)),
            (
                "grow-sealed only",
                table_of(memfd(len as u64, Some(libc::F_SEAL_GROW)), len),
            ),
        ] {
            let relay = relay_trusting_vmm_memory(false);
            let backend = allowed_backend(&relay);
            backend
                .update_memory(table_of(memfd(len as u64, Some(SEALED)), len))
                .unwrap();
            let e = backend.update_memory(table).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{what}");
            assert!(e.to_string().contains("F_SEAL_SHRINK"), "{what}: {e}");
            assert!(
                relay.link.memory_table().is_none(),
                "{what}: the link let go of the connection's memory"
            );
        }

        let short = table_of(memfd(len as u64 / 2, Some(SEALED)), len);
        let e = backend.update_memory(short).unwrap_err();
        assert!(e.to_string().contains("does not lie in its file"), "{e}");

        let relay = relay_trusting_vmm_memory(true);
        let backend = allowed_backend(&relay);
        let unsealed = table_of(memfd(len as u64, None), len);
        backend.update_memory(unsealed.clone()).unwrap();
        let used = relay
            .link
            .memory_table()
            .expect("trusted: the table is used");
        assert!(Arc::ptr_eq(&used, &unsealed.memory().into_inner()));
        let short = table_of(memfd(len as u64 / 2, None), len);
        assert!(backend.update_memory(short).is_err(), "past its file's end");

        let relay = relay_trusting_vmm_memory(false);
        let backend = allowed_backend(&relay);
        let anonymous =
            vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), len)]);
        backend
            .update_memory(GuestMemoryAtomic::new(anonymous.unwrap()))
            .unwrap();
        assert!(relay.link.memory_table().is_some());
    }

    /// Stops the worker threads of `daemon`, whose connection ended, as the relay does.
    fn stop(daemon: VhostUserDaemon<TunnelBackend>, exits: &ExitEvents) {
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        exits.close_all();
    }

    /// What `vhost-user-backend` does with a refused memory table, with a real daemon
    /// and a vhost-user frontend: the frontend's SET_MEM_TABLE fails (its negative
    /// acknowledgement), the library ends the connection, and the relay used none of
    /// that memory; the next VMM, with sealed memory, is served. (If this fails, a
    /// newer library keeps a connection whose request failed: the refusal would then
    /// have to drop the connection itself.)
    #[test]
    fn a_refused_memory_table_ends_the_vmm_connection() {
        use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
        use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
        use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

        let relay = relay_trusting_vmm_memory(false);
        let dir = std::env::temp_dir().join(format!("vfu-vmm-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("frontend.sock");
        let mut listener = Listener::new(&path, true).unwrap();
        let len = 1u64 << 20;
        for (file, refused) in [
            (memfd(len, Some(0)), true),
            (memfd(len, Some(libc::F_SEAL_SHRINK)), false),
        ] {
            let exits = ExitEvents::default();
            let gate = Arc::new(Gate::default());
            gate.decide(true);
            let backend = TunnelBackend::new(relay.clone(), gate, exits.clone());
            let mut daemon = VhostUserDaemon::new(
                "vmm-memory".into(),
                backend,
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .unwrap();
            // The listener queues the connection until the daemon accepts it.
            let mut frontend = Frontend::connect(&path, 2).unwrap();
            daemon.start(&mut listener).unwrap();
            frontend.set_owner().unwrap();
            frontend.get_features().unwrap();
            let pf = frontend.get_protocol_features().unwrap();
            frontend
                .set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
                .unwrap();
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: len,
                userspace_addr: 0x7000_0000_0000,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            };
            // As QEMU does: SET_MEM_TABLE asks for an acknowledgement.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            let result = frontend.set_mem_table(&[region]);
            frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
            if !refused {
                result.unwrap();
                assert!(relay.link.memory_table().is_some());
                assert!(frontend.get_features().is_ok(), "still connected");
                drop(frontend);
                let _ = daemon.wait(); // disconnected
                stop(daemon, &exits);
                break;
            }
            assert!(result.is_err(), "the VMM hears of the refusal");
            assert!(relay.link.memory_table().is_none());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let ended = daemon.wait();
                let _ = tx.send((ended.map_err(|e| e.to_string()), daemon));
            });
            let (ended, daemon) = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the library ended the connection");
            let e = ended.expect_err("on the refused request");
            assert!(e.contains("F_SEAL_SHRINK"), "{e}");
            assert!(frontend.get_features().is_err(), "the connection is closed");
            stop(daemon, &exits);
            super::super::device_vm_gone(&relay);
        }
        let _ = std::fs::remove_dir_all(&dir);
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
