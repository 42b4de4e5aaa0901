//! A relay built in-process, as the fuzz targets drive it: its real state
//! ([`vfu_relay::switch::Relay`]), its real vhost-user backend
//! ([`vfu_relay::tunnel::TunnelBackend`]) with vrings set up the way
//! `vhost-user-backend`'s request handler sets them up, guest memory the target lays
//! out, a driver's side of the `h2g` rings, and clients on socket pairs, whose requests
//! the target hands to the relay as the switch thread would.
//!
//! The checks the targets share live here too: what the relay writes into a client's
//! socket (replies only to requests in flight, each once; DMA commands only for memory
//! the client mapped, with the permission) and into the driver's `h2g` buffers (whole
//! messages, one per buffer sequence, each decodable).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use vfu_proto::transport::{Frame, Limits, MessageReader, RawMessage};
use vfu_proto::tunnel::{TunnelHeader, TunnelMessage, TUNNEL_HEADER_SIZE};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, encode_request, CountWidth, DmaReadReply, DmaWriteReply,
    Header, MessageType, Reply, Request, HEADER_SIZE,
};
use vfu_relay::channel::{Channel, SendOutcome};
use vfu_relay::config::{Config, DeviceConfig};
use vfu_relay::switch::Relay;
use vfu_relay::tunnel::gate::Gate;
use vfu_relay::tunnel::{ExitEvents, TunnelBackend};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Largest queue the targets' vrings take (the relay's backend takes 1024; 256 keeps
/// the rings, and the memory a target compares after each step, small).
pub const QUEUE_MAX: u16 = 256;

/// `VRING_DESC_F_NEXT`.
pub const DESC_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT` (not offered by the relay).
pub const DESC_INDIRECT: u16 = 4;

/// The device VM's memory, as the targets use it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Guest memory made of `ranges` (address, size).
pub fn memory(ranges: &[(u64, usize)]) -> Memory {
    let ranges: Vec<_> = ranges.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&ranges).expect("guest memory"))
}

/// Where a split virtqueue lies in guest memory, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Queue size as the driver set it (SET_VRING_NUM).
    pub size: u16,
}

impl Ring {
    /// The ring of queue `q` in the targets' usual layout: every queue's structures in
    /// a 0x2000-byte slot from address 0 (descriptors, then the available ring at
    /// 0x1000, the used ring at 0x1400).
    pub fn standard(q: usize, size: u16) -> Self {
        let base = q as u64 * 0x2000;
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x1400,
            size,
        }
    }

    /// Size as the driver reads it (the ring index arithmetic uses at least 1).
    fn n(&self) -> u16 {
        self.size.max(1)
    }

    /// Writes descriptor `i`.
    pub fn write_desc(&self, mem: &Memory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        let _ = mem
            .memory()
            .write_slice(&d, GuestAddress(self.desc.wrapping_add(16 * u64::from(i))));
    }

    fn read_u16(mem: &Memory, at: u64) -> u16 {
        mem.memory()
            .read_obj::<u16>(GuestAddress(at))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    fn write_u16(mem: &Memory, at: u64, v: u16) {
        let _ = mem.memory().write_obj(v.to_le(), GuestAddress(at));
    }

    /// The available ring's index.
    pub fn avail_idx(&self, mem: &Memory) -> u16 {
        Self::read_u16(mem, self.avail.wrapping_add(2))
    }

    /// Sets the available ring's index.
    pub fn set_avail_idx(&self, mem: &Memory, idx: u16) {
        Self::write_u16(mem, self.avail.wrapping_add(2), idx);
    }

    /// Puts `head` in slot `slot` (modulo the size) of the available ring.
    pub fn set_avail_slot(&self, mem: &Memory, slot: u16, head: u16) {
        let at = self.avail.wrapping_add(4 + 2 * u64::from(slot % self.n()));
        Self::write_u16(mem, at, head);
    }

    /// Makes `head` available: next slot, index + 1.
    pub fn publish(&self, mem: &Memory, head: u16) {
        let idx = self.avail_idx(mem);
        self.set_avail_slot(mem, idx, head);
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &Memory) -> u16 {
        Self::read_u16(mem, self.used.wrapping_add(2))
    }

    /// Used element `i` (modulo the size): descriptor id and length.
    pub fn used_elem(&self, mem: &Memory, i: u16) -> (u32, u32) {
        let at = self.used.wrapping_add(4 + 8 * u64::from(i % self.n()));
        let m = mem.memory();
        let id = m.read_obj::<u32>(GuestAddress(at)).unwrap_or(0);
        let len = m
            .read_obj::<u32>(GuestAddress(at.wrapping_add(4)))
            .unwrap_or(0);
        (u32::from_le(id), u32::from_le(len))
    }
}

/// A relay with `devices` devices (`dev1` ... on channels 1 ...), `pairs` queue pairs
/// offered and no shared memory, none of whose sockets exist: the target is its
/// switch thread and its frontend loop.
pub fn relay(devices: usize, pairs: u16) -> Arc<Relay> {
    let dir = PathBuf::from("/nonexistent/vfu-relay-fuzz");
    let config = Config {
        frontend_socket: dir.join("frontend.sock"),
        devices: (1..=devices)
            .map(|i| DeviceConfig {
                name: format!("dev{i}"),
                socket: dir.join(format!("dev{i}.sock")),
                access: Default::default(),
            })
            .collect(),
        queue_pairs: pairs,
        shm_size_mib: 0,
        request_timeout_ms: 3000,
        ..Config::default()
    };
    Arc::new(Relay::new(config).expect("relay state"))
}

/// A device to add at run time.
pub fn device(n: usize) -> DeviceConfig {
    DeviceConfig {
        name: format!("added{n}"),
        socket: PathBuf::from(format!("/nonexistent/vfu-relay-fuzz/added{n}.sock")),
        access: Default::default(),
    }
}

/// One connection of the device VM's VMM: the relay's backend and the vrings, set up
/// as `vhost-user-backend` sets them up from SET_MEM_TABLE, SET_VRING_NUM,
/// SET_VRING_ADDR, SET_VRING_BASE and SET_VRING_KICK.
pub struct Frontend {
    /// The relay's backend of this connection.
    pub backend: TunnelBackend,
    /// One vring per queue.
    pub vrings: Vec<VringRwLock>,
}

impl Frontend {
    /// Connects: memory `mem`, one vring per ring of `rings`.
    pub fn connect(relay: &Arc<Relay>, mem: &Memory, rings: &[Ring], event_idx: bool) -> Self {
        let gate = Arc::new(Gate::default());
        gate.decide(true);
        let backend = TunnelBackend::new(relay.clone(), gate, ExitEvents::default());
        backend.set_event_idx(event_idx);
        // Anonymous memory passes the relay's check of the VMM's memory as a memfd
        // sealed against shrinking would: nobody can take it away.
        backend
            .update_memory(mem.clone())
            .expect("the gate and the memory check let the memory through");
        // The library makes a vring for every queue the relay offers; the VMM sets up
        // those of `rings`, the others stay as made (not ready).
        let offered = 2 * usize::from(relay.link.offered_pairs);
        let mut vrings: Vec<VringRwLock> = rings
            .iter()
            .map(|r| {
                let v = VringRwLock::new(mem.clone(), QUEUE_MAX).expect("vring");
                // SET_VRING_NUM refuses 0 and sizes above the maximum; the queue
                // ignores a size that is not a power of two.
                if r.size != 0 && r.size <= QUEUE_MAX {
                    v.set_queue_size(r.size);
                }
                // SET_VRING_ADDR: the used index is taken from the ring. Misaligned
                // addresses are refused, and the VMM then does not start the device:
                // such a queue is never made ready.
                let addressed = v.set_queue_info(r.desc, r.avail, r.used).is_ok();
                if addressed {
                    if let Ok(idx) = v.queue_used_idx() {
                        v.set_queue_next_used(idx);
                    }
                }
                v.set_queue_next_avail(0);
                v.set_queue_event_idx(event_idx);
                v.set_queue_ready(addressed);
                v.set_enabled(addressed);
                v
            })
            .collect();
        while vrings.len() < offered {
            vrings.push(VringRwLock::new(mem.clone(), QUEUE_MAX).expect("vring"));
        }
        Self { backend, vrings }
    }

    /// The driver kicked queue `q`: what the backend's worker thread does (pair
    /// `q / 2`'s worker, which sees that pair's two vrings).
    pub fn kick(&self, q: usize) {
        let pair = q / 2;
        let Some(vrings) = self.vrings.get(2 * pair..2 * pair + 2) else {
            return;
        };
        let _ = self
            .backend
            .handle_event((q % 2) as u16, EventSet::IN, vrings, pair);
    }
}

/// A memfd of `len` bytes filled with `fill`, sealed against shrinking if `sealed` (the
/// relay then maps it; otherwise it uses pread/pwrite).
pub fn memfd(len: u64, sealed: bool, fill: u8) -> OwnedFd {
    // SAFETY: memfd_create with a valid C string; the result is checked and owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"vfu-relay-fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).expect("memfd size");
    use std::os::unix::fs::FileExt;
    file.write_all_at(&vec![fill; len as usize], 0)
        .expect("memfd contents");
    if sealed {
        use std::os::fd::AsRawFd;
        // SAFETY: F_ADD_SEALS on a memfd we own.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0, "seal");
    }
    OwnedFd::from(file)
}

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd(2); the result is checked and owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Memory a client mapped without an fd: the relay asks the client for it.
#[derive(Debug, Clone)]
pub struct RemoteRegion {
    /// IOVA.
    pub iova: u64,
    /// Whether the client mapped it writable.
    pub write: bool,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl RemoteRegion {
    fn covers(&self, address: u64, len: u64) -> Option<usize> {
        let at = address.checked_sub(self.iova)?;
        let end = at.checked_add(len)?;
        (end <= self.data.len() as u64).then_some(at as usize)
    }
}

/// How a client answers the relay's DMA commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// As asked.
    Right,
    /// With an error reply.
    Error,
    /// For another address.
    Elsewhere,
    /// With fewer bytes than asked.
    Short,
    /// Twice.
    Twice,
    /// Not at all (the command is dropped).
    Never,
}

impl Answer {
    /// From a fuzz byte.
    pub fn from_u8(b: u8) -> Self {
        match b % 8 {
            0..=2 => Answer::Right,
            3 => Answer::Error,
            4 => Answer::Elsewhere,
            5 => Answer::Short,
            6 => Answer::Twice,
            _ => Answer::Never,
        }
    }
}

/// The client's end of a connection to a device socket.
pub struct ClientSide {
    /// The channel it is connected to.
    pub channel: u32,
    peer: UnixStream,
    reader: MessageReader,
    next_id: u16,
    /// Requests that wait for a reply: message ID -> command.
    pub awaiting: BTreeMap<u16, u16>,
    /// DMA commands of the relay not answered yet.
    pub commands: VecDeque<RawMessage>,
    /// Memory mapped without an fd (requested; the relay may use it from its map
    /// until the reply to its unmap): the client serves it.
    pub remote: Vec<RemoteRegion>,
    /// Every DMA map requested, with or without an fd: IOVA, size, read, write.
    pub maps: Vec<(u64, u64, bool, bool)>,
    /// Replies received, successful or not.
    pub replies: usize,
    /// Error replies among them.
    pub errors: usize,
}

impl ClientSide {
    /// Connects a client to channel `ch` (what the switch does on accept).
    pub fn connect(relay: &Relay, ch: &Channel) -> Self {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("non-blocking");
        peer.set_nonblocking(true).expect("non-blocking");
        ch.on_client_connected(relay, Arc::new(ours));
        Self {
            channel: ch.id,
            peer,
            reader: MessageReader::new(Limits {
                max_msg_size: 64 << 20,
                max_msg_fds: 4,
            }),
            next_id: 1,
            awaiting: BTreeMap::new(),
            commands: VecDeque::new(),
            remote: Vec::new(),
            maps: Vec::new(),
            replies: 0,
            errors: 0,
        }
    }

    /// Whether the switch would read another message from this client now; pauses it
    /// as the switch does when not.
    pub fn may_send(relay: &Relay, ch: &Channel) -> bool {
        let mut st = ch.lock();
        let Some(client) = st.client.as_mut() else {
            return false;
        };
        if !client.may_read() || !relay.link.has_room(ch.id) {
            client.paused = true;
            return false;
        }
        true
    }

    /// Sends `req` (with `fds`); returns false when the relay broke the connection
    /// (the switch then drops the client).
    pub fn request(
        &mut self,
        relay: &Relay,
        ch: &Channel,
        req: &Request,
        fds: Vec<OwnedFd>,
        posted: bool,
    ) -> bool {
        let id = self.take_id();
        let bytes = encode_request(id, req, posted);
        let header = Header::decode(&bytes[..HEADER_SIZE]).expect("encoded header");
        self.deliver(relay, ch, header, bytes[HEADER_SIZE..].to_vec(), fds)
    }

    /// Sends a command with any payload (decoded by the relay, maybe refused); returns
    /// as [`ClientSide::request`].
    pub fn raw(
        &mut self,
        relay: &Relay,
        ch: &Channel,
        command: u16,
        payload: Vec<u8>,
        posted: bool,
    ) -> bool {
        let id = self.take_id();
        let mut header = Header::command(id, command, payload.len());
        header.no_reply = posted;
        self.deliver(relay, ch, header, payload, Vec::new())
    }

    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn deliver(
        &mut self,
        relay: &Relay,
        ch: &Channel,
        header: Header,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> bool {
        if header.msg_type == MessageType::Command && !header.no_reply {
            self.awaiting.insert(header.msg_id, header.command);
        }
        if header.msg_type == MessageType::Command {
            self.note_map(&header, &payload, fds.is_empty());
        }
        let outcome = ch.on_client_message(
            relay,
            RawMessage {
                header,
                payload,
                fds,
            },
        );
        let alive = outcome != SendOutcome::Broken;
        relay.after_send(ch, outcome);
        alive
    }

    /// Keeps track of the memory the client maps: the relay may ask for any of it (all
    /// of a request goes to the client when one of its segments has no fd), and the
    /// client serves what it mapped without an fd.
    fn note_map(&mut self, header: &Header, payload: &[u8], no_fd: bool) {
        if let Ok(Request::DmaMap(m)) =
            Request::decode(header.command, payload, usize::from(!no_fd))
        {
            self.maps.push((m.address, m.size, m.read, m.write));
            if no_fd && m.size <= 1 << 20 {
                self.remote.push(RemoteRegion {
                    iova: m.address,
                    write: m.write,
                    data: vec![0x5a; m.size as usize],
                });
            }
        }
    }

    /// Takes what the relay wrote to this client (flushing the relay's queue for it
    /// first, as the switch does when the socket is writable), checking it: replies
    /// only to requests in flight, each once; DMA commands only for memory the client
    /// mapped, with the permission. Returns false when the relay broke the
    /// connection.
    pub fn pump(&mut self, ch: &Channel) -> Result<bool, String> {
        // Each round drains the socket, so each flush makes progress; a reply of 1 MiB
        // takes a few rounds.
        for _ in 0..4096 {
            let flushed = {
                let mut st = ch.lock();
                match st.client.as_mut() {
                    Some(c) if c.is_broken() => return Ok(false),
                    Some(c) => c.flush(),
                    None => SendOutcome::Done,
                }
            };
            let mut got = false;
            loop {
                match self.reader.read(&self.peer) {
                    Ok(Some(Frame::Message(m))) => {
                        got = true;
                        self.take(m)?;
                    }
                    Ok(Some(Frame::Rejected(r))) => {
                        return Err(format!("the relay sent a client a bad message: {r:?}"))
                    }
                    Ok(None) => break,
                    Err(_) => return Ok(false),
                }
            }
            match flushed {
                SendOutcome::Broken => return Ok(false),
                SendOutcome::Done if !got => return Ok(true),
                _ => {}
            }
        }
        Err("the relay's queue toward a client never drains".into())
    }

    fn take(&mut self, m: RawMessage) -> Result<(), String> {
        let h = m.header;
        if !m.fds.is_empty() {
            return Err(format!("the relay sent a client fds with {h:?}"));
        }
        if h.msg_type == MessageType::Reply {
            return match self.awaiting.remove(&h.msg_id) {
                Some(command) if command == h.command => {
                    self.replies += 1;
                    self.errors += usize::from(h.error.is_some());
                    Ok(())
                }
                Some(command) => Err(format!(
                    "reply for command {} to the client's request {} of command {command}",
                    h.command, h.msg_id
                )),
                None => Err(format!(
                    "reply {h:?} to no request of the client in flight (a second reply?)"
                )),
            };
        }
        let (address, len, write) = match Request::decode(h.command, &m.payload, 0) {
            Ok(Request::DmaRead(a)) => (a.address, a.count, false),
            Ok(Request::DmaWrite(w)) => (w.address, w.data.len() as u64, true),
            other => return Err(format!("the relay sent a client {h:?}: {other:?}")),
        };
        // (A request with a segment mapped without an fd goes to the client whole, its
        // segments mapped with one included.)
        let allowed = self.maps.iter().any(|&(iova, size, r, w)| {
            address >= iova
                && address
                    .checked_add(len)
                    .is_some_and(|end| end <= iova + size)
                && if write { w } else { r }
        });
        if !allowed {
            return Err(format!(
                "the relay asked the client to {} {len} bytes at {address:#x}, which it did not map{}",
                if write { "write" } else { "read" },
                if write { " writable" } else { " readable" }
            ));
        }
        self.commands.push_back(m);
        Ok(())
    }

    /// Answers the oldest DMA command of the relay as `how` says.
    pub fn answer(&mut self, relay: &Relay, ch: &Channel, how: Answer) {
        let Some(m) = self.commands.pop_front() else {
            return;
        };
        let h = m.header;
        let reply = match Request::decode(h.command, &m.payload, 0) {
            Ok(Request::DmaRead(a)) => {
                let mut data = self
                    .remote
                    .iter()
                    .find_map(|r| {
                        let at = r.covers(a.address, a.count)?;
                        Some(r.data[at..at + a.count as usize].to_vec())
                    })
                    .unwrap_or_default();
                let mut address = a.address;
                match how {
                    Answer::Short => {
                        data.pop();
                    }
                    Answer::Elsewhere => address = address.wrapping_add(4096),
                    _ => {}
                }
                Reply::DmaRead(DmaReadReply {
                    address,
                    data,
                    width: CountWidth::U64,
                })
            }
            Ok(Request::DmaWrite(w)) => {
                if how == Answer::Right || how == Answer::Twice {
                    for r in &mut self.remote {
                        if let Some(at) = r.covers(w.address, w.data.len() as u64) {
                            r.data[at..at + w.data.len()].copy_from_slice(&w.data);
                        }
                    }
                }
                let count = w.data.len() as u64 - u64::from(how == Answer::Short);
                let address = match how {
                    Answer::Elsewhere => w.address.wrapping_add(4096),
                    _ => w.address,
                };
                Reply::DmaWrite(DmaWriteReply::Echo {
                    address,
                    count,
                    width: CountWidth::U64,
                })
            }
            _ => return,
        };
        let bytes = match how {
            Answer::Never => return,
            Answer::Error => encode_error_reply(&h, libc::EFAULT as u32),
            _ => encode_reply(h.msg_id, &reply),
        };
        let times = if how == Answer::Twice { 2 } else { 1 };
        for _ in 0..times {
            let header = Header::decode(&bytes[..HEADER_SIZE]).expect("encoded reply");
            let outcome = ch.on_client_message(
                relay,
                RawMessage {
                    header,
                    payload: bytes[HEADER_SIZE..].to_vec(),
                    fds: Vec::new(),
                },
            );
            relay.after_send(ch, outcome);
        }
    }
}

/// A well-behaved driver's side of one `h2g` queue: every descriptor a buffer of
/// `buf_size` bytes at `base`, posted again as soon as the relay has used it; the bytes
/// put back together into messages as the tunnel's framing says (`docs/tunnel.md`
/// 6.1), each checked to decode.
pub struct H2gDriver {
    /// The ring.
    pub ring: Ring,
    base: u64,
    buf_size: u32,
    last_used: u16,
    partial: Option<(Vec<u8>, usize)>,
    /// Whether used buffers are posted again (off: the driver falls behind).
    pub repost: bool,
    held: Vec<u16>,
}

impl H2gDriver {
    /// Posts every descriptor of `ring` as a buffer.
    pub fn new(mem: &Memory, ring: Ring, base: u64, buf_size: u32) -> Self {
        for i in 0..ring.size {
            ring.write_desc(
                mem,
                i,
                base + u64::from(i) * u64::from(buf_size),
                buf_size,
                DESC_WRITE,
                0,
            );
            ring.set_avail_slot(mem, i, i);
        }
        ring.set_avail_idx(mem, ring.size);
        Self {
            ring,
            base,
            buf_size,
            last_used: 0,
            partial: None,
            repost: true,
            held: Vec::new(),
        }
    }

    /// Takes the buffers the relay used: the complete messages in them, in order.
    /// `max_msg` is the largest message the driver said it takes.
    pub fn harvest(&mut self, mem: &Memory, max_msg: usize) -> Result<Vec<TunnelMessage>, String> {
        let mut out = Vec::new();
        let used = self.ring.used_idx(mem);
        while self.last_used != used {
            let (id, len) = self.ring.used_elem(mem, self.last_used);
            self.last_used = self.last_used.wrapping_add(1);
            if id >= u32::from(self.ring.size) || len > self.buf_size {
                return Err(format!(
                    "h2g used element id {id} len {len} (queue size {}, buffers of {})",
                    self.ring.size, self.buf_size
                ));
            }
            let id = id as u16;
            let mut chunk = vec![0u8; len as usize];
            mem.memory()
                .read_slice(
                    &mut chunk,
                    GuestAddress(self.base + u64::from(id) * u64::from(self.buf_size)),
                )
                .map_err(|e| e.to_string())?;
            if self.repost {
                self.ring.publish(mem, id);
            } else {
                self.held.push(id);
            }
            if let Some(msg) = self.feed(chunk, max_msg)? {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// Posts again the buffers kept back while `repost` was off.
    pub fn release(&mut self, mem: &Memory) {
        for id in std::mem::take(&mut self.held) {
            self.ring.publish(mem, id);
        }
    }

    fn feed(&mut self, chunk: Vec<u8>, max_msg: usize) -> Result<Option<TunnelMessage>, String> {
        let (mut buf, total) = match self.partial.take() {
            Some(p) => p,
            None => {
                let h = TunnelHeader::decode(&chunk)
                    .map_err(|e| format!("h2g buffer does not start with a header: {e}"))?;
                let total = h.message_size();
                if total > max_msg {
                    return Err(format!(
                        "h2g message of {total} bytes, the driver takes {max_msg}"
                    ));
                }
                (Vec::with_capacity(total), total)
            }
        };
        if buf.len() + chunk.len() > total {
            return Err(format!(
                "an h2g buffer holds bytes past its message ({} of {total})",
                buf.len() + chunk.len()
            ));
        }
        if chunk.is_empty() {
            return Err("an empty h2g buffer in the middle of a message".into());
        }
        buf.extend_from_slice(&chunk);
        if buf.len() < total {
            self.partial = Some((buf, total));
            return Ok(None);
        }
        debug_assert!(buf.len() >= TUNNEL_HEADER_SIZE);
        TunnelMessage::decode(&buf, max_msg)
            .map(Some)
            .map_err(|e| format!("the relay sent an h2g message that does not decode: {e}"))
    }

    /// The driver restarted: a message it was receiving is forgotten (the relay drops
    /// what it had queued for the old driver).
    pub fn forget_partial(&mut self) {
        self.partial = None;
    }
}

/// The reply a device model would give to a forwarded request (what the target's
/// device VM says when it answers as it should).
pub fn good_reply(command: u16, payload: &[u8], nfds: usize) -> Option<Reply> {
    let req = Request::decode(command, payload, nfds).ok()?;
    Some(match req {
        Request::Version(v) => Reply::Version(v),
        Request::DmaMap(_) => Reply::DmaMap,
        Request::DmaUnmap(u) => Reply::DmaUnmap(u),
        Request::DeviceSetIrqs(_) => Reply::DeviceSetIrqs,
        Request::RegionRead(a) => Reply::RegionRead(vfu_proto::vfio_user::RegionReadReply {
            offset: a.offset,
            region: a.region,
            data: vec![0xa5; a.count as usize],
        }),
        Request::RegionWrite(w) => Reply::RegionWrite(vfu_proto::vfio_user::RegionAccess {
            offset: w.offset,
            region: w.region,
            count: w.data.len() as u32,
        }),
        Request::DeviceReset => Reply::DeviceReset,
        Request::RegionWriteMulti(w) => Reply::RegionWriteMulti {
            wr_cnt: w.len() as u64,
        },
        Request::DeviceGetInfo(_) => Reply::DeviceGetInfo(vfu_proto::vfio_user::DeviceInfo {
            argsz: 16,
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        }),
        _ => return None,
    })
}
