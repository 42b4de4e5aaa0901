//! A blocking vfio-user client on the typed codec and the socket transport: for tests,
//! the demo, benchmarks and tools. One request at a time, plus posted (NO_REPLY) writes
//! (one REGION_WRITE per write, or writes coalesced into REGION_WRITE_MULTI as QEMU's
//! client does) and pipelined requests whose replies are taken in order.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::transport::{Frame, Limits, MessageReader, MessageWriter, RawMessage, TransportError};
use crate::vfio_user::{
    encode_request, Capabilities, Command, DecodeError, DeviceFeature, DeviceInfo, DmaReadReply,
    DmaWriteReply, FeatureData, FeatureOp, GetInfoRequest, IrqInfo, LoggingRange, MessageType,
    MigDataRead, MigDataWrite, MigState, MultiWrite, RegionAccess, RegionInfo, RegionWrite, Reply,
    Request, Version, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION,
    FEATURE_MIG_DEVICE_STATE, REGION_INFO_SIZE,
};

/// A failed request.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The server answered with an error reply.
    #[error("server replied errno {0}")]
    Errno(u32),
    /// No reply within the timeout.
    #[error("no reply within the timeout")]
    Timeout,
    /// The reply does not decode, or answers something else.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// The connection failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Connecting or configuring the socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The request needs an option the server did not offer in VERSION (or this client
    /// did not propose); nothing was sent.
    #[error("not negotiated: {0}")]
    NotNegotiated(&'static str),
}

/// Most writes [`Client::region_write_multi_posted`] puts in one REGION_WRITE_MULTI.
/// The spec sets no bound of its own (a message stays within the peer's limits); QEMU's
/// client (10.1) coalesces at most 200 (`VFIO_USER_MULTI_MAX`), and servers written
/// against it may expect no more.
pub const MAX_MULTI_WRITES: usize = 200;

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::BadReply(e.to_string())
    }
}

/// A connected vfio-user client.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    reader: MessageReader,
    writer: MessageWriter,
    next_id: u16,
    /// What the server stated in VERSION (defaults until [`Client::negotiate`]).
    pub server_caps: Capabilities,
    /// Memory the client serves the server's DMA_READ / DMA_WRITE from (regions mapped
    /// without an fd): IOVA of its first byte and the bytes.
    dma_memory: Option<(u64, Arc<Mutex<Vec<u8>>>)>,
}

impl Client {
    /// Connects to the server socket at `path`; replies are awaited for `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(timeout))?;
        let limits = Limits {
            max_msg_fds: 16,
            ..Limits::DEFAULT
        };
        // The server enforces its limits on what it receives; the client sends whatever
        // it is asked to (tests send oversize messages on purpose).
        let unlimited = Limits {
            max_msg_size: usize::MAX,
            max_msg_fds: crate::transport::SCM_MAX_FD,
        };
        Ok(Self {
            sock,
            reader: MessageReader::new(limits),
            writer: MessageWriter::new(unlimited),
            next_id: 0,
            server_caps: Capabilities::default(),
            dma_memory: None,
        })
    }

    /// Waits up to `timeout` for each reply from now on.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.sock.set_read_timeout(Some(timeout))?;
        Ok(())
    }

    /// VERSION with `caps` (QEMU's version 0.0); keeps the server's capabilities.
    pub fn negotiate(&mut self, caps: Capabilities) -> Result<Version, ClientError> {
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Some(caps),
        };
        match self.request(&Request::Version(v), Vec::new())?.0 {
            Reply::Version(v) => {
                self.server_caps = v.capabilities.unwrap_or_default();
                Ok(v)
            }
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// Sends `req` with `fds` and waits for its reply.
    pub fn request(
        &mut self,
        req: &Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
        let id = self.send(req, fds, false)?;
        let msg = self.receive(id)?;
        if let Some(errno) = msg.header.error {
            return Err(ClientError::Errno(errno));
        }
        let reply = Reply::decode(msg.header.command, &msg.payload, msg.fds.len())?;
        if reply.command() != req.command() {
            return Err(ClientError::BadReply("reply to another command".into()));
        }
        Ok((reply, msg.fds))
    }

    /// Serves the server's DMA_READ / DMA_WRITE commands from `memory`, which holds the
    /// client memory at IOVA `base` (for regions mapped without an fd). Commands are
    /// answered while the client waits for its own replies.
    pub fn serve_dma(&mut self, base: u64, memory: Arc<Mutex<Vec<u8>>>) {
        self.dma_memory = Some((base, memory));
    }

    /// Whether the server has sent something this client has not read yet (a
    /// server-to-client command, or a reply): waits up to `timeout` for it, reading
    /// nothing.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, ClientError> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: polls one valid pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// Answers a server-to-client command (DMA_READ / DMA_WRITE).
    fn answer_server(&mut self, msg: &RawMessage) -> Result<(), ClientError> {
        let h = msg.header;
        let reply = match (
            Request::decode(h.command, &msg.payload, 0),
            &self.dma_memory,
        ) {
            (Ok(Request::DmaRead(a)), Some((base, mem))) => {
                let mem = mem.lock().unwrap_or_else(|p| p.into_inner());
                a.address
                    .checked_sub(*base)
                    .and_then(|off| {
                        let off = usize::try_from(off).ok()?;
                        mem.get(off..off.checked_add(usize::try_from(a.count).ok()?)?)
                    })
                    .map(|data| {
                        Reply::DmaRead(DmaReadReply {
                            address: a.address,
                            data: data.to_vec(),
                            width: a.width,
                        })
                    })
            }
            (Ok(Request::DmaWrite(w)), Some((base, mem))) => {
                let mut mem = mem.lock().unwrap_or_else(|p| p.into_inner());
                let range = w.address.checked_sub(*base).and_then(|off| {
                    let off = usize::try_from(off).ok()?;
                    Some(off..off.checked_add(w.data.len())?)
                });
                match range.and_then(|r| mem.get_mut(r)) {
                    Some(dst) => {
                        dst.copy_from_slice(&w.data);
                        Some(Reply::DmaWrite(DmaWriteReply::Echo {
                            address: w.address,
                            count: w.data.len() as u64,
                            width: w.width,
                        }))
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let bytes = match reply {
            Some(r) => crate::vfio_user::encode_reply(h.msg_id, &r),
            None => crate::vfio_user::encode_error_reply(&h, libc::EFAULT as u32),
        };
        self.writer.send_blocking(&self.sock, bytes, Vec::new())?;
        Ok(())
    }

    /// Waits for the reply with message ID `id`, answering the server's DMA commands
    /// and skipping anything else (a stale reply).
    fn receive(&mut self, id: u16) -> Result<RawMessage, ClientError> {
        loop {
            let msg = match self.reader.read(&self.sock) {
                Ok(Some(Frame::Message(m))) => m,
                Ok(Some(Frame::Rejected(r))) => {
                    return Err(ClientError::BadReply(r.error.to_string()))
                }
                Ok(None) => return Err(ClientError::Timeout),
                Err(TransportError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(ClientError::Timeout)
                }
                Err(e) => return Err(e.into()),
            };
            if msg.header.msg_type == MessageType::Command {
                self.answer_server(&msg)?;
                continue;
            }
            if msg.header.msg_id == id {
                return Ok(msg);
            }
        }
    }

    /// Sends a command with a raw payload (possibly malformed) and returns the raw
    /// payload of its reply, or the errno of an error reply.
    pub fn call_raw(&mut self, command: u16, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut bytes = Vec::with_capacity(16 + payload.len());
        crate::vfio_user::Header::command(id, command, payload.len()).encode(&mut bytes);
        bytes.extend_from_slice(payload);
        self.writer.send_blocking(&self.sock, bytes, Vec::new())?;
        let msg = self.receive(id)?;
        match msg.header.error {
            Some(errno) => Err(ClientError::Errno(errno)),
            None => Ok(msg.payload),
        }
    }

    /// Sends `req` without waiting for its reply (pipelining); returns its message ID
    /// for [`Client::wait_reply`]. The server answers in the order it received the
    /// requests: take the replies in the order the requests were sent, as waiting for
    /// one drops any other reply that comes before it.
    pub fn send_request(&mut self, req: &Request) -> Result<u16, ClientError> {
        self.send(req, Vec::new(), false)
    }

    /// Waits for the reply to the request [`Client::send_request`] sent as `id`, which
    /// was a `command`; an error reply is [`ClientError::Errno`].
    pub fn wait_reply(&mut self, id: u16, command: Command) -> Result<Reply, ClientError> {
        let msg = self.receive(id)?;
        if let Some(errno) = msg.header.error {
            return Err(ClientError::Errno(errno));
        }
        let reply = Reply::decode(msg.header.command, &msg.payload, msg.fds.len())?;
        if reply.command() != command {
            return Err(ClientError::BadReply("reply to another command".into()));
        }
        Ok(reply)
    }

    /// Sends `req` with NO_REPLY (a posted write): returns once it is written.
    pub fn post(&mut self, req: &Request) -> Result<(), ClientError> {
        self.send(req, Vec::new(), true).map(|_| ())
    }

    fn send(
        &mut self,
        req: &Request,
        fds: Vec<OwnedFd>,
        no_reply: bool,
    ) -> Result<u16, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.writer
            .send_blocking(&self.sock, encode_request(id, req, no_reply), fds)?;
        Ok(id)
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<DeviceInfo, ClientError> {
        let req = Request::DeviceGetInfo(GetInfoRequest {
            argsz: DeviceInfo::SIZE,
            index: 0,
        });
        match self.request(&req, Vec::new())?.0 {
            Reply::DeviceGetInfo(i) => Ok(i),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// DEVICE_GET_REGION_INFO, asking again with a larger argsz when the first reply
    /// says the full one does not fit. Returns the info and the region's fd, if any.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> Result<(RegionInfo, Option<OwnedFd>), ClientError> {
        let mut argsz = REGION_INFO_SIZE;
        for _ in 0..2 {
            let req = Request::DeviceGetRegionInfo(GetInfoRequest { argsz, index });
            let (reply, mut fds) = self.request(&req, Vec::new())?;
            let Reply::DeviceGetRegionInfo(info) = reply else {
                return Err(ClientError::BadReply("not a region info".into()));
            };
            if info.argsz <= argsz {
                return Ok((info, fds.pop()));
            }
            argsz = info.argsz;
        }
        Err(ClientError::BadReply("region info keeps growing".into()))
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, ClientError> {
        let req = Request::DeviceGetIrqInfo(GetInfoRequest {
            argsz: IrqInfo::SIZE,
            index,
        });
        match self.request(&req, Vec::new())?.0 {
            Reply::DeviceGetIrqInfo(i) => Ok(i),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// REGION_READ of `count` bytes.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let req = Request::RegionRead(RegionAccess {
            offset,
            region,
            count,
        });
        match self.request(&req, Vec::new())?.0 {
            Reply::RegionRead(r) if r.data.len() == count as usize => Ok(r.data),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// REGION_WRITE, waiting for the reply.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = Request::RegionWrite(RegionWrite {
            offset,
            region,
            data: data.to_vec(),
        });
        match self.request(&req, Vec::new())?.0 {
            Reply::RegionWrite(_) => Ok(()),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// REGION_WRITE posted with NO_REPLY.
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.post(&Request::RegionWrite(RegionWrite {
            offset,
            region,
            data: data.to_vec(),
        }))
    }

    /// Posts `writes` (each of 1 to 8 bytes) with NO_REPLY, coalesced into
    /// REGION_WRITE_MULTI messages of at most [`MAX_MULTI_WRITES`] writes, in order, as
    /// QEMU's client does; returns the number of messages sent. The server applies them
    /// in order before answering any later request. The server must have offered
    /// `write_multiple` in VERSION (which it does only when this client proposed it):
    /// otherwise nothing is sent and the answer is [`ClientError::NotNegotiated`].
    pub fn region_write_multi_posted(
        &mut self,
        writes: &[MultiWrite],
    ) -> Result<usize, ClientError> {
        if !self.server_caps.write_multiple() {
            return Err(ClientError::NotNegotiated("write_multiple"));
        }
        let mut messages = 0;
        for chunk in writes.chunks(MAX_MULTI_WRITES) {
            self.post(&Request::RegionWriteMulti(chunk.to_vec()))?;
            messages += 1;
        }
        Ok(messages)
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.request(&Request::DeviceReset, Vec::new()).map(|_| ())
    }

    /// DEVICE_FEATURE: sends `feature` and returns the reply's feature data.
    pub fn feature(&mut self, feature: DeviceFeature) -> Result<DeviceFeature, ClientError> {
        match self
            .request(&Request::DeviceFeature(feature), Vec::new())?
            .0
        {
            Reply::DeviceFeature(f) => Ok(f),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// DEVICE_FEATURE PROBE of `feature` for GET and/or SET: whether the server
    /// supports it (`Ok(false)` for an error reply).
    pub fn probe_feature(
        &mut self,
        feature: u16,
        get: bool,
        set: bool,
    ) -> Result<bool, ClientError> {
        let req = DeviceFeature::request(feature, FeatureOp::Probe { get, set }, FeatureData::None);
        match self.feature(req) {
            Ok(_) => Ok(true),
            Err(ClientError::Errno(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// DEVICE_FEATURE MIGRATION GET: the `MIGRATION_*` flags.
    pub fn migration_flags(&mut self) -> Result<u64, ClientError> {
        let req = DeviceFeature::request(FEATURE_MIGRATION, FeatureOp::Get, FeatureData::None);
        match self.feature(req)?.data {
            FeatureData::Migration { flags } => Ok(flags),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// DEVICE_FEATURE MIG_DEVICE_STATE GET: the device's migration state.
    pub fn mig_state(&mut self) -> Result<MigState, ClientError> {
        let mut req =
            DeviceFeature::request(FEATURE_MIG_DEVICE_STATE, FeatureOp::Get, FeatureData::None);
        req.argsz = DeviceFeature::FIXED + 8;
        match self.feature(req)?.data {
            FeatureData::MigState { state, .. } => Ok(state),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// DEVICE_FEATURE MIG_DEVICE_STATE SET: moves the device to `state`; returns the
    /// state the reply states.
    pub fn set_mig_state(&mut self, state: MigState) -> Result<MigState, ClientError> {
        let req = DeviceFeature::request(
            FEATURE_MIG_DEVICE_STATE,
            FeatureOp::Set,
            FeatureData::MigState { state, data_fd: -1 },
        );
        match self.feature(req)?.data {
            FeatureData::MigState { state, .. } => Ok(state),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// MIG_DATA_READ of up to `size` bytes (fewer: the stream has no more).
    pub fn mig_data_read(&mut self, size: u32) -> Result<Vec<u8>, ClientError> {
        match self
            .request(&Request::MigDataRead(MigDataRead::new(size)), Vec::new())?
            .0
        {
            Reply::MigDataRead(r) if r.data.len() <= size as usize => Ok(r.data),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// Reads the whole migration stream in MIG_DATA_READs of `chunk` bytes, until one
    /// returns fewer bytes than asked for.
    pub fn mig_data_read_all(&mut self, chunk: u32) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let data = self.mig_data_read(chunk)?;
            let last = data.len() < chunk as usize;
            out.extend_from_slice(&data);
            if last || chunk == 0 {
                return Ok(out);
            }
        }
    }

    /// MIG_DATA_WRITE of `data`.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let req = Request::MigDataWrite(MigDataWrite::new(data.to_vec()));
        match self.request(&req, Vec::new())?.0 {
            Reply::MigDataWrite => Ok(()),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// DEVICE_FEATURE DMA_LOGGING_START for `ranges` (empty: everything) with the
    /// `page_size` hint; returns the page size the server chose.
    pub fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[LoggingRange],
    ) -> Result<u64, ClientError> {
        let req = DeviceFeature::request(
            FEATURE_DMA_LOGGING_START,
            FeatureOp::Set,
            FeatureData::LoggingStart {
                page_size,
                ranges: ranges.to_vec(),
            },
        );
        match self.feature(req)?.data {
            FeatureData::LoggingStart { page_size, .. } => Ok(page_size),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }

    /// DEVICE_FEATURE DMA_LOGGING_STOP.
    pub fn dma_logging_stop(&mut self) -> Result<(), ClientError> {
        let req =
            DeviceFeature::request(FEATURE_DMA_LOGGING_STOP, FeatureOp::Set, FeatureData::None);
        self.feature(req).map(|_| ())
    }

    /// DEVICE_FEATURE DMA_LOGGING_REPORT: the dirty bitmap of `length` bytes at `iova`
    /// at `page_size` granularity, as u64 words (bit `k % 64` of word `k / 64` is page
    /// `k`). The server clears what it reports.
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let req = DeviceFeature::logging_report(iova, length, page_size);
        match self.feature(req)?.data {
            FeatureData::LoggingReport { bitmap, .. } => Ok(bitmap
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8-byte chunk")))
                .collect()),
            other => Err(ClientError::BadReply(format!("{other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::mpsc;

    use super::*;
    use crate::vfio_user::{encode_reply, Header, RegionReadReply};

    /// A socket path unique to this test process and `name`.
    fn socket_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "vfu-proto-client-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A server on `path` for one client: answers VERSION offering `write_multiple` as
    /// given, answers REGION_READ with `count` bytes of the offset's low byte, and sends
    /// every other request it received, with its header, on the channel (in order)
    /// until the client leaves.
    fn serve(
        path: &Path,
        write_multiple: bool,
    ) -> (
        std::thread::JoinHandle<()>,
        mpsc::Receiver<(Header, Request)>,
    ) {
        let listener = UnixListener::bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut reader = MessageReader::new(Limits::DEFAULT);
            let mut writer = MessageWriter::new(Limits::DEFAULT);
            while let Ok(Some(Frame::Message(m))) = reader.read(&sock) {
                let req = Request::decode(m.header.command, &m.payload, m.fds.len()).unwrap();
                let reply = match &req {
                    Request::Version(_) => Some(Reply::Version(Version {
                        major: 0,
                        minor: 0,
                        capabilities: Some(Capabilities {
                            write_multiple: Some(write_multiple),
                            ..Default::default()
                        }),
                    })),
                    Request::RegionRead(a) => Some(Reply::RegionRead(RegionReadReply {
                        offset: a.offset,
                        region: a.region,
                        data: vec![a.offset as u8; a.count as usize],
                    })),
                    _ => None,
                };
                match reply {
                    Some(r) => writer
                        .send_blocking(&sock, encode_reply(m.header.msg_id, &r), Vec::new())
                        .unwrap(),
                    None => tx.send((m.header, req)).unwrap(),
                }
            }
        });
        (server, rx)
    }

    fn proposal() -> Capabilities {
        Capabilities {
            write_multiple: Some(true),
            ..Default::default()
        }
    }

    /// 450 one-byte writes go out as three posted REGION_WRITE_MULTI messages of 200,
    /// 200 and 50 writes, NO_REPLY, in order, with distinct message IDs.
    #[test]
    fn multi_writes_are_coalesced_by_200_and_posted() {
        let path = socket_path("multi");
        let (server, rx) = serve(&path, true);
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        c.negotiate(proposal()).unwrap();
        let writes: Vec<MultiWrite> = (0..450u32)
            .map(|i| MultiWrite::new(2, u64::from(i % 8), &[i as u8]).unwrap())
            .collect();
        assert_eq!(c.region_write_multi_posted(&writes).unwrap(), 3);
        drop(c);
        server.join().unwrap();
        let got: Vec<(Header, Request)> = rx.iter().collect();
        let sizes: Vec<usize> = got
            .iter()
            .map(|(_, r)| match r {
                Request::RegionWriteMulti(w) => w.len(),
                other => panic!("not a REGION_WRITE_MULTI: {other:?}"),
            })
            .collect();
        assert_eq!(sizes, [200, 200, 50]);
        assert!(got.iter().all(|(h, _)| h.no_reply), "all posted");
        let ids: std::collections::HashSet<u16> = got.iter().map(|(h, _)| h.msg_id).collect();
        assert_eq!(ids.len(), 3);
        let sent: Vec<MultiWrite> = got
            .into_iter()
            .flat_map(|(_, r)| match r {
                Request::RegionWriteMulti(w) => w,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(sent, writes);
        let _ = std::fs::remove_file(&path);
    }

    /// A server that did not offer write_multiple gets nothing: the call fails before
    /// sending.
    #[test]
    fn multi_writes_need_write_multiple() {
        let path = socket_path("no-multi");
        let (server, rx) = serve(&path, false);
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        c.negotiate(proposal()).unwrap();
        let w = [MultiWrite::new(2, 0, &[1]).unwrap()];
        assert!(matches!(
            c.region_write_multi_posted(&w),
            Err(ClientError::NotNegotiated("write_multiple"))
        ));
        // The connection is still in sync.
        assert_eq!(c.region_read(2, 5, 1).unwrap(), [5]);
        drop(c);
        server.join().unwrap();
        assert_eq!(rx.iter().count(), 0);
        let _ = std::fs::remove_file(&path);
    }

    /// Pipelined requests: three REGION_READs sent before any reply is read; each
    /// reply is taken by its ID, in order.
    #[test]
    fn pipelined_requests_take_their_replies_in_order() {
        let path = socket_path("pipeline");
        let (server, _rx) = serve(&path, false);
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        c.negotiate(Capabilities::default()).unwrap();
        let ids: Vec<u16> = (1..=3u64)
            .map(|off| {
                c.send_request(&Request::RegionRead(RegionAccess {
                    offset: off,
                    region: 2,
                    count: 2,
                }))
                .unwrap()
            })
            .collect();
        for (off, id) in (1..=3u8).zip(ids) {
            match c.wait_reply(id, Command::RegionRead).unwrap() {
                Reply::RegionRead(r) => assert_eq!(r.data, [off, off]),
                other => panic!("not a REGION_READ reply: {other:?}"),
            }
        }
        drop(c);
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
