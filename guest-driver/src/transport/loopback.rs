//! The loopback VMM: vfu-guest plays the device VM's VMM itself. It connects to the
//! relay's vhost-user socket as the frontend (`vhost::vhost_user::Frontend`), owns
//! memfd-backed "guest memory" and the kick and call eventfds, and the driver runs in
//! this process over that memory. To the relay it is a vhost-user frontend like QEMU.
//!
//! Guest-physical address 0 is the start of the memfd; vring addresses are sent as this
//! process's virtual addresses, as vhost-user requires. The memfd is sealed against
//! growing and shrinking, as QEMU's `memory-backend-memfd` seals it: the relay maps only
//! memory that cannot shrink under it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, FrontendReqHandler, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::shm::ShmArea;
use super::{Transport, TransportError};
use crate::virtqueue::SharedMemory;

/// The loopback transport.
pub struct Loopback {
    frontend: Frontend,
    file: File,
    map: *mut u8,
    size: usize,
    memory: SharedMemory,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    queues: u16,
    max_queue_size: u16,
    features: u64,
    configured: Vec<u16>,
    /// Shared memory region 0, when the relay offers windows and they are wanted.
    shm: Option<Arc<ShmArea>>,
}

// SAFETY: `map` is a private mapping owned by this value; nothing else refers to it
// except through `memory`, which is itself Send.
unsafe impl Send for Loopback {}

impl Drop for Loopback {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping created in `connect`; allocations handed out from
        // `memory` must not outlive the transport (the engine owns both together).
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.size) };
    }
}

fn setup_err(step: &'static str) -> impl FnOnce(vhost::Error) -> TransportError {
    move |e| TransportError::Setup {
        step,
        reason: e.to_string(),
    }
}

impl Loopback {
    /// Connects to the relay's frontend socket at `path`, retrying for up to `wait`
    /// while the relay is not there yet, with `memory_size` bytes of guest memory,
    /// sealed against shrinking unless `unsealed` (for testing the relay, which refuses
    /// such memory by default).
    pub fn connect(
        path: &Path,
        memory_size: usize,
        wait: Duration,
        shmem: bool,
        unsealed: bool,
    ) -> Result<Self, TransportError> {
        let deadline = Instant::now() + wait;
        let mut logged = false;
        let mut frontend = loop {
            match Frontend::connect(path, 64) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline => {
                    if !logged {
                        info!("waiting for the relay at {} ({e})", path.display());
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(TransportError::Connect {
                        what: path.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    })
                }
            }
        };
        frontend.set_owner().map_err(setup_err("SET_OWNER"))?;
        let device_features = frontend.get_features().map_err(setup_err("GET_FEATURES"))?;
        if device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(TransportError::Setup {
                step: "GET_FEATURES",
                reason: "backend lacks VHOST_USER_F_PROTOCOL_FEATURES".into(),
            });
        }
        let pf = frontend
            .get_protocol_features()
            .map_err(setup_err("GET_PROTOCOL_FEATURES"))?;
        let mut wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if shmem {
            wanted |= VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHMEM;
        }
        let acked = pf & wanted;
        frontend
            .set_protocol_features(acked)
            .map_err(setup_err("SET_PROTOCOL_FEATURES"))?;
        let shm = if acked
            .contains(VhostUserProtocolFeatures::SHMEM | VhostUserProtocolFeatures::BACKEND_REQ)
        {
            start_shm(
                &mut frontend,
                acked.contains(VhostUserProtocolFeatures::REPLY_ACK),
            )?
        } else {
            None
        };
        let queues = if pf.contains(VhostUserProtocolFeatures::MQ) {
            frontend
                .get_queue_num()
                .map_err(setup_err("GET_QUEUE_NUM"))? as u16
        } else {
            2
        };

        let (file, map) = memfd(memory_size, !unsealed).map_err(TransportError::Memory)?;
        // SAFETY: `map` is a fresh read-write mapping of `memory_size` bytes, unmapped
        // only in Drop, after `memory` is dropped with the rest of the struct.
        let memory = unsafe { SharedMemory::new(&[(map, memory_size, 0)]) };
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: memory_size as u64,
            userspace_addr: map as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        // As QEMU does, SET_MEM_TABLE asks for an acknowledgement when it can: a backend
        // that refuses the memory says so here.
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let mem_table = frontend.set_mem_table(&[region]);
        frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        mem_table.map_err(setup_err("SET_MEM_TABLE"))?;

        let mk = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        let kicks = (0..queues)
            .map(|_| mk())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::Memory)?;
        let calls = (0..queues)
            .map(|_| mk())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::Memory)?;
        info!(
            "connected to the relay at {}: {queues} queues, {} MiB of guest memory",
            path.display(),
            memory_size >> 20
        );
        Ok(Self {
            frontend,
            file,
            map,
            size: memory_size,
            memory,
            kicks,
            calls,
            queues,
            max_queue_size: 1024,
            features: device_features,
            configured: Vec::new(),
            shm,
        })
    }

    /// The memfd backing guest memory (the relay maps it too).
    pub fn memory_file(&self) -> &File {
        &self.file
    }
}

/// Learns the size of shared memory region 0, reserves it, and serves the relay's map
/// and unmap requests on the backend channel from a thread of its own.
fn start_shm(
    frontend: &mut Frontend,
    reply_ack: bool,
) -> Result<Option<Arc<ShmArea>>, TransportError> {
    let config = frontend
        .get_shmem_config()
        .map_err(setup_err("GET_SHMEM_CONFIG"))?;
    let size = if config.nregions >= 1 {
        config.memory_sizes[0]
    } else {
        0
    };
    if size == 0 {
        return Ok(None);
    }
    let area = Arc::new(ShmArea::reserve(size).map_err(TransportError::Memory)?);
    let mut handler = FrontendReqHandler::new(area.clone()).map_err(|e| TransportError::Setup {
        step: "backend channel",
        reason: e.to_string(),
    })?;
    handler.set_reply_ack_flag(reply_ack);
    frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .map_err(setup_err("SET_BACKEND_REQ_FD"))?;
    std::thread::Builder::new()
        .name("vfu-shm".into())
        .spawn(move || {
            loop {
                match handler.handle_request() {
                    Ok(_) => {}
                    // A refused request was answered with the error; keep serving.
                    Err(vhost::vhost_user::Error::ReqHandlerError(e)) => {
                        warn!("backend request refused: {e}")
                    }
                    Err(e) => {
                        debug!("backend channel closed: {e}");
                        break;
                    }
                }
            }
        })
        .map_err(TransportError::Memory)?;
    info!(
        "shared memory region 0: {} MiB reserved for DMA windows",
        size >> 20
    );
    Ok(Some(area))
}

/// A memfd of `size` bytes, mapped shared, read-write; if `sealed`, sealed against
/// growing, shrinking and further sealing (as QEMU's `memory-backend-memfd` with its
/// default `seal=on`).
fn memfd(size: usize, sealed: bool) -> std::io::Result<(File, *mut u8)> {
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"vfu-guest-memory".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    if sealed {
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS only changes the seals of the memfd this function owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: a new shared mapping of the whole file; checked for failure below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok((file, ptr as *mut u8))
}

impl Transport for Loopback {
    fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    fn max_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn negotiate(&mut self, wanted: u64) -> Result<u64, TransportError> {
        let features = (self.features & wanted) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(setup_err("SET_FEATURES"))?;
        Ok(features & wanted)
    }

    fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        (desc, avail, used): (u64, u64, u64),
    ) -> Result<(), TransportError> {
        let q = index as usize;
        let base = self.map as u64;
        let config = VringConfigData {
            queue_max_size: self.max_queue_size,
            queue_size: size,
            flags: 0,
            desc_table_addr: base + desc,
            used_ring_addr: base + used,
            avail_ring_addr: base + avail,
            log_addr: None,
        };
        self.frontend
            .set_vring_num(q, size)
            .map_err(setup_err("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_base(q, 0)
            .map_err(setup_err("SET_VRING_BASE"))?;
        self.frontend
            .set_vring_addr(q, &config)
            .map_err(setup_err("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_call(q, &self.calls[q])
            .map_err(setup_err("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_kick(q, &self.kicks[q])
            .map_err(setup_err("SET_VRING_KICK"))?;
        self.configured.push(index);
        Ok(())
    }

    fn start(&mut self) -> Result<(), TransportError> {
        for &q in &self.configured {
            self.frontend
                .set_vring_enable(q as usize, true)
                .map_err(setup_err("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    fn notify(&self, index: u16) {
        if let Some(k) = self.kicks.get(index as usize) {
            if let Err(e) = k.write(1) {
                warn!("kick of queue {index}: {e}");
            }
        }
    }

    fn interrupt_fd(&self, index: u16) -> RawFd {
        self.calls[index as usize].as_raw_fd()
    }

    fn ack_interrupt(&self, index: u16) {
        if let Some(c) = self.calls.get(index as usize) {
            let _ = c.read();
        }
    }

    fn hangup_fd(&self) -> Option<RawFd> {
        Some(self.frontend.as_raw_fd())
    }

    fn shared_memory(&self) -> Option<(*mut u8, usize)> {
        self.shm.as_ref().map(|a| a.region())
    }

    fn window_fds(&self) -> Option<Arc<dyn super::WindowFds>> {
        self.shm.clone().map(|a| a as Arc<dyn super::WindowFds>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loopback VMM's guest memory is sealed as QEMU's `memory-backend-memfd`
    /// seals it (the relay maps only memory that cannot shrink under it): it can
    /// neither shrink nor grow, nor lose its seals. Without sealing (a test of the
    /// relay's refusal) it is a memfd that cannot be sealed.
    #[test]
    fn guest_memory_is_a_sealed_memfd() {
        let size = 1 << 20;
        let seals = |f: &File| {
            // SAFETY: F_GET_SEALS only reads the seals of an open fd.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) }
        };
        let (file, map) = memfd(size, true).unwrap();
        let want = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        assert_eq!(seals(&file) & want, want);
        assert!(file.set_len(size as u64 / 2).is_err(), "cannot shrink");
        assert!(file.set_len(size as u64 * 2).is_err(), "cannot grow");
        assert!(vfu_proto::mem::cannot_shrink(std::os::fd::AsFd::as_fd(
            &file
        )));
        // SAFETY: the mapping `memfd` made, used by nothing else.
        unsafe { libc::munmap(map.cast(), size) };

        let (file, map) = memfd(size, false).unwrap();
        assert!(!vfu_proto::mem::cannot_shrink(std::os::fd::AsFd::as_fd(
            &file
        )));
        // SAFETY: the mapping `memfd` made, used by nothing else.
        unsafe { libc::munmap(map.cast(), size) };
    }
}
