//! The socket bridge: a channel served by an unmodified vfio-user server running in
//! the device VM (libvfio-user based, SPDK's, one on the `vfio_user` crate), which the
//! bridge reaches as a vfio-user client over its UNIX socket (`vfu-guest --bridge
//! NAME=SOCKET`). The bridge relays both directions: the client's commands and their
//! replies, and the server's own DMA_READ / DMA_WRITE and interrupts.
//!
//! File descriptors do not cross the tunnel (`docs/tunnel.md`, section 7), so the
//! bridge stands in for them:
//!
//! | the client sends | the server gets |
//! |---|---|
//! | VERSION | nothing: the bridge said VERSION when it connected, and answers the client from the server's answer ([`version`]) |
//! | DMA_MAP with a `DMA_WINDOW` slot | DMA_MAP with an fd onto the window when the transport gives one ([`crate::transport::WindowFds`]), else without an fd ([`dma`]) |
//! | DMA_MAP without a slot (copy path) | DMA_MAP without an fd: its DMA_READ / DMA_WRITE go through the tunnel's copy path |
//! | DMA_UNMAP | DMA_UNMAP; the client's reply after the server's |
//! | SET_IRQS with `EVENTFD` slots | SET_IRQS with eventfds of the bridge, split to the server's `max_msg_fds`; a signal becomes an IRQ message ([`irqs`]) |
//! | DEVICE_FEATURE for migration or dirty logging, MIG_DATA_* | nothing: `EOPNOTSUPP` (migration is not relayed) |
//! | DEVICE_GET_REGION_IO_FDS | nothing: the bridge answers "no ioeventfds" ([`replies`]) |
//! | anything else | the same message, under a message ID of the bridge's |
//!
//! Replies with fds (mmap-able regions) lose them and what refers to them
//! ([`replies`]). Message IDs toward the server are the bridge's own ([`pending`]);
//! the client's come back in the replies. At most `max_in_flight` requests wait for
//! the server at once (1 by default: libvfio-user and the `vfio_user` crate read the
//! reply to their own DMA_READ / DMA_WRITE as the next message on the socket, so a
//! second request in flight would break their DMA).
//!
//! When the server goes away (its socket closes, or it stays silent for
//! `reply_timeout` with a request in flight) the requests in flight fail with
//! `ENODEV` (or `ETIMEDOUT`), the next request connects again, and the new connection
//! gets the client's DMA maps and interrupt eventfds ([`link`]). While it is not
//! there, requests fail with `ENODEV` after `connect_wait`, never hang. When the
//! client disconnects (SESSION_END) the bridge keeps its connection, so that the
//! server keeps the device state, and does what a client's disconnect means: it
//! unmaps every DMA region and disables every interrupt index it assigned, waiting for
//! the server's replies before it answers the relay (which removes the windows then).

mod dma;
mod irqs;
mod link;
mod pending;
mod replies;
mod version;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vfu_proto::transport::RawMessage;
use vfu_proto::tunnel::{Slot, SlotType, VfioUserFrame};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, DeviceFeature, DmaMap, DmaUnmap, GetInfoRequest, Header,
    IoFdLayout, IrqData, MessageType, RegionIoFds, Reply, Request, SetIrqs, Version,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP,
    FEATURE_MIGRATION, FEATURE_MIG_DEVICE_STATE, IRQ_SET_ACTION_TRIGGER,
};
use vmm_sys_util::epoll::Epoll;

use crate::device::errno::{EINVAL, EIO, EOPNOTSUPP};
use crate::device::{DmaRemote, Errno, NoRemote};
use crate::transport::WindowFds;
use crate::tunnel::{ChannelServer, Outlet};
use dma::Regions;
use irqs::Irqs;
use link::{disable_index, to_client, Link, ENODEV};
use pending::{Fix, Pending, Waiting};

/// How the bridge treats its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Requests that may wait for the server at once (at least 1).
    pub max_in_flight: usize,
    /// Silence after which a server with a request in flight is taken for hung.
    pub reply_timeout: Duration,
    /// How long a request waits for an absent server to appear.
    pub connect_wait: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 1,
            reply_timeout: Duration::from_secs(5),
            connect_wait: Duration::from_millis(500),
        }
    }
}

/// A channel served by a vfio-user server on a UNIX socket in the device VM.
pub struct Bridge {
    name: String,
    socket: PathBuf,
    config: BridgeConfig,
    window_fds: Option<Arc<dyn WindowFds>>,
    /// The event fd the engine polls: the server's socket and the interrupt eventfds.
    epoll: Epoll,
    link: Option<Link>,
    pending: Pending,
    /// Replies to the bridge's own requests, until their caller takes them.
    answers: HashMap<u16, Result<RawMessage, Errno>>,
    /// When the server last sent something.
    last_heard: Instant,
    regions: Regions,
    irqs: Irqs,
    /// An absent server was reported (reported again only after it was there).
    absent_logged: bool,
}

impl Bridge {
    /// A bridge for channel `name` to the server listening on `socket`; `window_fds`
    /// gives the server DMA windows as fds where the transport can. Nothing is
    /// connected before the first request.
    pub fn new(
        name: &str,
        socket: &Path,
        window_fds: Option<Arc<dyn WindowFds>>,
        config: BridgeConfig,
    ) -> std::io::Result<Self> {
        let config = BridgeConfig {
            max_in_flight: config.max_in_flight.max(1),
            ..config
        };
        Ok(Self {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            config,
            window_fds,
            epoll: Epoll::new()?,
            link: None,
            pending: Pending::default(),
            answers: HashMap::new(),
            last_heard: Instant::now(),
            regions: Regions::new(
                vfu_proto::vfio_user::DEFAULT_MAX_DMA_MAPS as usize,
                version::MAX_DATA_XFER as usize,
            ),
            irqs: Irqs::default(),
            absent_logged: false,
        })
    }

    /// Handles a client request: `Some` answer now, or `None` when it went to the
    /// server (its reply comes from there) or wants no reply.
    fn request(
        &mut self,
        h: Header,
        payload: Vec<u8>,
        slots: &[Slot],
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Option<Result<Reply, Errno>> {
        let req = match Request::decode(h.command, &payload, slots.len()) {
            Ok(r) => r,
            Err(e) => {
                debug!("{}: bad request from the client: {e}", self.name);
                return Some(Err(e.errno()));
            }
        };
        let connected = self.ensure_connected(dma, out);
        match &req {
            // DMA_UNMAP needs no server: one that went away has nothing mapped.
            Request::DmaUnmap(u) => return Some(self.dma_unmap(u, dma, out)),
            _ if connected.is_err() => return Some(Err(ENODEV)),
            _ => {}
        }
        match req {
            Request::Version(v) => Some(self.version(&v, out)),
            Request::DmaMap(m) => Some(self.dma_map(&m, slots, dma, out)),
            Request::DeviceSetIrqs(s)
                if matches!(s.data, IrqData::EventFd { .. }) || s.count == 0 =>
            {
                Some(self.set_irqs(&s, slots, dma, out))
            }
            Request::DmaRead(_) | Request::DmaWrite(_) => Some(Err(EINVAL)),
            Request::DeviceFeature(DeviceFeature { feature, .. })
                if [
                    FEATURE_MIGRATION,
                    FEATURE_MIG_DEVICE_STATE,
                    FEATURE_DMA_LOGGING_START,
                    FEATURE_DMA_LOGGING_STOP,
                    FEATURE_DMA_LOGGING_REPORT,
                ]
                .contains(&feature) =>
            {
                Some(Err(EOPNOTSUPP))
            }
            Request::MigDataRead(_) | Request::MigDataWrite(_) => Some(Err(EOPNOTSUPP)),
            Request::DeviceGetRegionInfo(g) => {
                let mut p = Vec::new();
                Request::DeviceGetRegionInfo(GetInfoRequest {
                    argsz: replies::REGION_INFO_ARGSZ,
                    index: g.index,
                })
                .encode(&mut p);
                self.forward(h, &p, Fix::RegionInfo { argsz: g.argsz }, dma, out)
            }
            // Ioeventfds cannot cross the tunnel: the answer is "none" whatever the
            // server has, so the server is not asked (the `vfio_user` crate's server
            // does not know the command and would lose sync on its payload).
            Request::DeviceGetRegionIoFds(g) => {
                Some(Ok(Reply::DeviceGetRegionIoFds(RegionIoFds {
                    argsz: RegionIoFds::FIXED,
                    index: g.index,
                    count: 0,
                    sub_regions: Vec::new(),
                    layout: IoFdLayout::Spec40,
                })))
            }
            _ => self.forward(h, &payload, Fix::None, dma, out),
        }
    }

    /// Sends the client's request on to the server; its reply goes to the client when
    /// it comes.
    fn forward(
        &mut self,
        h: Header,
        payload: &[u8],
        fix: Fix,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Option<Result<Reply, Errno>> {
        if let Err(e) = self.wait_until(dma, out, |b| b.pending.len() < b.config.max_in_flight) {
            return Some(Err(e));
        }
        let waiting = Waiting::Client { header: h, fix };
        match self.send(
            h.command,
            payload,
            Vec::new(),
            h.no_reply,
            Some(waiting),
            dma,
            out,
        ) {
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// VERSION: the server's answer (from when the bridge connected), merged with the
    /// client's proposal and what the tunnel carries.
    fn version(&mut self, proposal: &Version, out: &Outlet) -> Result<Reply, Errno> {
        let server = &self.link.as_ref().ok_or(ENODEV)?.server;
        let tunnel_xfer = out.max_vfio_user_msg().saturating_sub(64);
        let answer = version::answer(
            proposal,
            server,
            u32::try_from(tunnel_xfer).unwrap_or(u32::MAX),
        );
        debug!("{}: VERSION for the client: {answer:?}", self.name);
        Ok(Reply::Version(answer))
    }

    fn dma_map(
        &mut self,
        m: &DmaMap,
        slots: &[Slot],
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<Reply, Errno> {
        let placement = self.regions.map(m, slots)?;
        if let Err(e) = self.map_on_server(m, placement, dma, out) {
            let _ = self.regions.unmap(&DmaUnmap::region(m.address, m.size));
            return Err(e);
        }
        Ok(Reply::DmaMap)
    }

    /// DMA_UNMAP: the server's unmap first, then the bridge's (after which the window
    /// is not touched), then the reply.
    fn dma_unmap(
        &mut self,
        u: &DmaUnmap,
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<Reply, Errno> {
        if self.link.is_some() {
            match self.exchange_request(&Request::DmaUnmap(*u), Vec::new(), dma, out) {
                Ok(_) => {}
                // Gone meanwhile: nothing is mapped there any more.
                Err(_) if self.link.is_none() => {}
                Err(e) => return Err(e),
            }
        }
        self.regions.unmap(u)?;
        Ok(Reply::DmaUnmap(*u))
    }

    /// SET_IRQS that assigns or de-assigns eventfds, or disables an index.
    fn set_irqs(
        &mut self,
        s: &SetIrqs,
        slots: &[Slot],
        dma: &mut dyn DmaRemote,
        out: &mut Outlet,
    ) -> Result<Reply, Errno> {
        match s.data {
            IrqData::EventFd { assign: true } => {
                if slots.iter().any(|x| x.slot_type != SlotType::EventFd) {
                    return Err(EINVAL);
                }
                if s.action != IRQ_SET_ACTION_TRIGGER {
                    // An eventfd for MASK / UNMASK is one the client signals; the tunnel
                    // carries interrupts only toward the client.
                    return Err(EOPNOTSUPP);
                }
                let fds = Irqs::create(s.count).map_err(|e| {
                    warn!("{}: no eventfds for interrupts: {e}", self.name);
                    EIO
                })?;
                let dups = Irqs::dup_all(&fds).map_err(|_| EIO)?;
                let (taken, done) = self.assign_on_server(s.index, s.start, dups, dma, out);
                // What the server took before a refusal stays assigned there: watch it.
                let fds: Vec<_> = fds.into_iter().take(taken).collect();
                self.irqs.assign(&self.epoll, s.index, s.start, fds);
                done.map(|()| Reply::DeviceSetIrqs)
            }
            IrqData::EventFd { assign: false } => {
                self.exchange_request(&Request::DeviceSetIrqs(s.clone()), Vec::new(), dma, out)?;
                self.irqs.unassign(&self.epoll, s.index, s.start, s.count);
                Ok(Reply::DeviceSetIrqs)
            }
            _ => {
                // DATA_NONE | TRIGGER with count 0: the index is disabled.
                self.exchange_request(&Request::DeviceSetIrqs(s.clone()), Vec::new(), dma, out)?;
                self.irqs.unassign_index(&self.epoll, s.index);
                Ok(Reply::DeviceSetIrqs)
            }
        }
    }
}

impl ChannelServer for Bridge {
    fn vfio_user(&mut self, frame: VfioUserFrame, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        let h = frame.header;
        if h.msg_type != MessageType::Command {
            debug!(
                "{}: reply from the client ignored (the bridge asks it nothing)",
                self.name
            );
            return;
        }
        let answer = self.request(h, frame.payload, &frame.slots, dma, out);
        if let Some(answer) = answer {
            let bytes = match answer {
                Ok(reply) => encode_reply(h.msg_id, &reply),
                Err(errno) => encode_error_reply(&h, errno),
            };
            to_client(&self.name, &h, &bytes, out);
        }
    }

    fn client_disconnected(&mut self) {
        // Replies, interrupts and DMA from here on have no client to go to.
        let mut sink = Outlet::new(0, usize::MAX);
        let mut none = NoRemote;
        if self.link.is_some() {
            let _ = self.wait_until(&mut none, &mut sink, |b| b.pending.is_empty());
            for (m, _) in self.regions.maps() {
                let u = Request::DmaUnmap(DmaUnmap::region(m.address, m.size));
                if let Err(e) = self.exchange_request(&u, Vec::new(), &mut none, &mut sink) {
                    warn!(
                        "{}: unmap of {:#x} at disconnect: errno {e}",
                        self.name, m.address
                    );
                }
            }
            for index in self.irqs.indexes() {
                if let Err(e) =
                    self.exchange_request(&disable_index(index), Vec::new(), &mut none, &mut sink)
                {
                    warn!(
                        "{}: disabling interrupt index {index} at disconnect: errno {e}",
                        self.name
                    );
                }
            }
        }
        info!(
            "{}: client gone: {} DMA map(s) and the interrupt eventfds dropped, device state kept",
            self.name,
            self.regions.len()
        );
        self.regions.clear();
        self.irqs.clear(&self.epoll);
        self.answers.clear();
    }

    unsafe fn set_windows(&mut self, base: NonNull<u8>, len: usize) {
        // SAFETY: the caller keeps the memory mapped for as long as the server lives;
        // the bridge accesses it with volatile copies only.
        unsafe { self.regions.set_windows(base, len) };
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the epoll fd is owned by `self.epoll` and stays open while the
        // returned borrow (tied to `&self`) lives.
        Some(unsafe { BorrowedFd::borrow_raw(self.epoll.as_raw_fd()) })
    }

    fn service(&mut self, dma: &mut dyn DmaRemote, out: &mut Outlet) {
        self.pump(Duration::ZERO, dma, out);
    }

    fn may_block(&self) -> bool {
        // It waits for another process.
        true
    }
}

#[cfg(test)]
mod tests;
