//! The cheapest vfio-user server there is, as a reference: a thread of the benchmark
//! that reads each message, keeps the bytes written to a 256-byte register file and
//! answers, with no device model, no relay and no other process. What it achieves is
//! what the client and the socket allow: a ceiling for every other path.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use vfu_proto::client::Client;
use vfu_proto::transport::{Frame, Limits, MessageReader, MessageWriter, TransportError};
use vfu_proto::vfio_user::{
    encode_error_reply, encode_reply, Capabilities, RegionReadReply, Reply, Request, Version,
};
use vfu_tests::{pin_to, Scratch};

use crate::common::connect_within;

/// Registers of the null server.
const REGS: usize = 256;

/// A null server on a socket, for one client; its thread ends when the client leaves.
pub struct NullServer {
    socket: PathBuf,
    thread: Option<JoinHandle<Result<(), String>>>,
    _scratch: Scratch,
}

fn serve(listener: UnixListener, cpu: usize) -> Result<(), String> {
    let _ = pin_to(cpu);
    let (sock, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    // The relay's way of reading (many messages per recvmsg), so that this stays the
    // ceiling of what the client and the socket allow.
    let mut reader =
        MessageReader::buffered(Limits::DEFAULT, vfu_proto::vfio_user::request_may_carry_fds);
    let mut writer = MessageWriter::new(Limits::DEFAULT);
    let mut regs = [0u8; REGS];
    let range = |offset: u64, len: usize| {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= REGS).then_some(start..end)
    };
    loop {
        let m = match reader.read(&sock) {
            Ok(Some(Frame::Message(m))) => m,
            Ok(Some(Frame::Rejected(r))) => {
                writer
                    .send_blocking(
                        &sock,
                        encode_error_reply(&r.header, r.error.errno()),
                        Vec::new(),
                    )
                    .map_err(|e| e.to_string())?;
                continue;
            }
            Ok(None) | Err(TransportError::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let h = m.header;
        let reply = match Request::decode(h.command, &m.payload, m.fds.len()) {
            Ok(Request::Version(_)) => Some(Reply::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Some(Capabilities {
                    write_multiple: Some(true),
                    ..Default::default()
                }),
            })),
            Ok(Request::RegionRead(a)) => range(a.offset, a.count as usize).map(|r| {
                Reply::RegionRead(RegionReadReply {
                    offset: a.offset,
                    region: a.region,
                    data: regs[r].to_vec(),
                })
            }),
            Ok(Request::RegionWrite(w)) => range(w.offset, w.data.len()).map(|r| {
                regs[r].copy_from_slice(&w.data);
                Reply::RegionWrite(w.access())
            }),
            Ok(Request::RegionWriteMulti(ws)) => {
                let mut ok = true;
                for w in &ws {
                    match range(w.offset, w.bytes().len()) {
                        Some(r) => regs[r].copy_from_slice(w.bytes()),
                        None => ok = false,
                    }
                }
                ok.then_some(Reply::RegionWriteMulti {
                    wr_cnt: ws.len() as u64,
                })
            }
            _ => None,
        };
        if h.no_reply && reply.is_some() {
            continue;
        }
        let bytes = match reply {
            Some(r) => encode_reply(h.msg_id, &r),
            None => encode_error_reply(&h, libc::EINVAL as u32),
        };
        writer
            .send_blocking(&sock, bytes, Vec::new())
            .map_err(|e| e.to_string())?;
    }
}

impl NullServer {
    /// Starts it, its thread on `cpu`.
    pub fn start(cpu: usize) -> Result<Self, String> {
        let scratch =
            Scratch::try_new("bench-null").map_err(|e| format!("scratch directory: {e}"))?;
        let socket = scratch.join("null.sock");
        let listener =
            UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        let thread = std::thread::spawn(move || serve(listener, cpu));
        Ok(Self {
            socket,
            thread: Some(thread),
            _scratch: scratch,
        })
    }

    /// Its client (one only).
    pub fn connect(&mut self) -> Result<Client, String> {
        connect_within(&self.socket, crate::common::START_TIMEOUT, &mut [])
    }

    /// Waits for the thread (after the client left): what went wrong, if anything.
    pub fn finish(mut self) -> Result<(), String> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(|e| format!("null server: {e}")),
            Some(Err(_)) => Err("the null server's thread panicked".into()),
            None => Ok(()),
        }
    }
}
