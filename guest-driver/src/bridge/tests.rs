//! The bridge against a scripted vfio-user server on a real UNIX socket.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vfu_proto::transport::{Frame, Limits, MessageReader, MessageWriter};
use vfu_proto::tunnel::{Body, TunnelMessage};
use vfu_proto::vfio_user::{
    encode_request, Capabilities, CountWidth, DmaAccess, RegionAccess, RegionReadReply, RegionWrite,
};

use super::*;
use crate::device::errno::EFAULT;

/// What the scripted server saw.
#[derive(Debug, Default)]
struct Seen {
    log: Vec<String>,
    irq_fds: Vec<OwnedFd>,
}

/// A server taking one fd a message. REGION_READ at 0x100 first reads 4 bytes of
/// client memory at 0x1000 with DMA_READ and answers them; REGION_WRITE answers an
/// error with errno 0 (as the `vfio_user` crate does); at 0x200 it first signals the
/// eventfd it got for vector 1; anything else at offset 0xdead closes the connection.
fn serve(listener: UnixListener, seen: Arc<Mutex<Seen>>) {
    let Ok((sock, _)) = listener.accept() else {
        return;
    };
    let limits = Limits {
        max_msg_fds: 1,
        ..Limits::DEFAULT
    };
    let mut reader = MessageReader::new(limits);
    let mut writer = MessageWriter::new(Limits::DEFAULT);
    let mut next_id = 100;
    loop {
        let m = match reader.read(&sock) {
            Ok(Some(Frame::Message(m))) => m,
            _ => return,
        };
        let h = m.header;
        let req = Request::decode(h.command, &m.payload, m.fds.len()).unwrap();
        seen.lock()
            .unwrap()
            .log
            .push(format!("{:?}", req.command()));
        let reply = match req {
            Request::Version(_) => Reply::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Some(Capabilities {
                    max_msg_fds: Some(1),
                    ..Default::default()
                }),
            }),
            Request::RegionRead(a) if a.offset == 0x100 => {
                let dma = Request::DmaRead(DmaAccess {
                    address: 0x1000,
                    count: 4,
                    width: CountWidth::U64,
                });
                next_id += 1;
                writer
                    .send_blocking(&sock, encode_request(next_id, &dma, false), vec![])
                    .unwrap();
                let Ok(Some(Frame::Message(r))) = reader.read(&sock) else {
                    return;
                };
                let data = match Reply::decode(r.header.command, &r.payload, 0) {
                    Ok(Reply::DmaRead(d)) if r.header.msg_id == next_id => d.data,
                    _ => vec![0xee; 4],
                };
                Reply::RegionRead(RegionReadReply {
                    offset: a.offset,
                    region: a.region,
                    data,
                })
            }
            Request::RegionRead(a) if a.offset == 0xdead => return,
            Request::RegionWrite(w) => {
                if w.offset == 0x200 {
                    let s = seen.lock().unwrap();
                    vfu_proto::transport::fds::signal_eventfd(&s.irq_fds[1]).unwrap();
                }
                writer
                    .send_blocking(&sock, encode_error_reply(&h, 0), vec![])
                    .unwrap();
                continue;
            }
            Request::DmaMap(_) => Reply::DmaMap,
            Request::DmaUnmap(u) => Reply::DmaUnmap(u),
            Request::DeviceSetIrqs(s) => {
                let mut seen = seen.lock().unwrap();
                seen.log
                    .push(format!("irqs {} {} {}", s.index, s.start, s.count));
                seen.irq_fds.extend(m.fds);
                Reply::DeviceSetIrqs
            }
            other => panic!("unexpected {other:?}"),
        };
        writer
            .send_blocking(&sock, encode_reply(h.msg_id, &reply), vec![])
            .unwrap();
    }
}

struct Fixture {
    bridge: Bridge,
    seen: Arc<Mutex<Seen>>,
    server: Option<JoinHandle<()>>,
    _dir: std::path::PathBuf,
}

fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("vfu-bridge-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("inner.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let server = std::thread::spawn(move || serve(listener, s));
    let config = BridgeConfig {
        reply_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    Fixture {
        bridge: Bridge::new("dev0", &path, None, config).unwrap(),
        seen,
        server: Some(server),
        _dir: dir,
    }
}

/// The client's memory at IOVA 0x1000 (copy path).
struct Memory(Vec<u8>);

impl DmaRemote for Memory {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let off = (iova - 0x1000) as usize;
        buf.copy_from_slice(self.0.get(off..off + buf.len()).ok_or(EFAULT)?);
        Ok(())
    }
    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), Errno> {
        let off = (iova - 0x1000) as usize;
        self.0[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Sends `req` as the client's message `id` and collects what the bridge sends back
/// until a reply to `id` arrives (or `tries` pumps pass).
fn call(
    f: &mut Fixture,
    id: u16,
    req: &Request,
    slots: Vec<Slot>,
    mem: &mut Memory,
) -> (Header, Vec<u8>, Vec<TunnelMessage>) {
    let bytes = encode_request(id, req, false);
    let header = Header::decode(&bytes).unwrap();
    let frame = VfioUserFrame {
        header,
        payload: bytes[16..].to_vec(),
        slots,
    };
    let mut out = Outlet::new(5, 1 << 21);
    f.bridge.vfio_user(frame, mem, &mut out);
    let mut all = Vec::new();
    for _ in 0..50 {
        all.extend(out.take());
        if let Some((h, p)) = all.iter().find_map(|m| match &m.body {
            Body::VfioUser(v) if v.header.msg_id == id => Some((v.header, v.payload.clone())),
            _ => None,
        }) {
            return (h, p, all);
        }
        f.bridge.pump(Duration::from_millis(50), mem, &mut out);
    }
    panic!("no reply to {id}: {all:?}");
}

/// VERSION is answered from the server's; replies come back under the client's IDs;
/// the server's DMA_READ during a request is served from client memory; an error
/// reply with errno 0 reaches the client as EIO; SET_IRQS with three eventfd slots
/// reaches a one-fd server as three messages, and its signal on vector 1 becomes an
/// IRQ message; at SESSION_END the server sees the unmap and the index disabled.
#[test]
fn relays_requests_dma_and_interrupts() {
    let mut f = fixture("relay");
    let mut mem = Memory(vec![1, 2, 3, 4, 5, 6, 7, 8]);
    let v = Request::Version(Version {
        major: 0,
        minor: 0,
        capabilities: Some(Capabilities::default()),
    });
    let (h, p, _) = call(&mut f, 7, &v, vec![], &mut mem);
    assert_eq!(h.error, None);
    let Ok(Reply::Version(v)) = Reply::decode(h.command, &p, 0) else {
        panic!("version");
    };
    let caps = v.capabilities.unwrap();
    assert_eq!(
        (caps.max_msg_fds, caps.migration),
        (Some(version::CLIENT_MAX_FDS), None)
    );

    let map = Request::DmaMap(DmaMap {
        read: true,
        write: true,
        offset: 0,
        address: 0x1000,
        size: 0x1000,
    });
    assert_eq!(call(&mut f, 8, &map, vec![], &mut mem).0.error, None);

    let read = Request::RegionRead(RegionAccess {
        offset: 0x100,
        region: 0,
        count: 4,
    });
    let (h, p, _) = call(&mut f, 9, &read, vec![], &mut mem);
    assert_eq!((h.msg_id, h.error), (9, None));
    let Ok(Reply::RegionRead(r)) = Reply::decode(h.command, &p, 0) else {
        panic!("region read");
    };
    assert_eq!(r.data, vec![1, 2, 3, 4], "the server's DMA_READ was served");

    let irqs = Request::DeviceSetIrqs(SetIrqs {
        action: IRQ_SET_ACTION_TRIGGER,
        index: 2,
        start: 0,
        count: 3,
        data: IrqData::EventFd { assign: true },
    });
    let (h, _, _) = call(&mut f, 10, &irqs, vec![Slot::eventfd(); 3], &mut mem);
    assert_eq!(h.error, None);

    let write = Request::RegionWrite(RegionWrite {
        offset: 0x200,
        region: 0,
        data: vec![1],
    });
    let (h, _, msgs) = call(&mut f, 11, &write, vec![], &mut mem);
    assert_eq!(h.error, Some(EIO), "errno 0 from the server is EIO");
    let mut out = Outlet::new(5, 1 << 21);
    let mut irq = msgs
        .iter()
        .any(|m| matches!(m.body, Body::Irq(t) if (t.index, t.start) == (2, 1)));
    for _ in 0..20 {
        if irq {
            break;
        }
        f.bridge.service(&mut mem, &mut out);
        irq = out
            .take()
            .iter()
            .any(|m| matches!(m.body, Body::Irq(t) if (t.index, t.start) == (2, 1)));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(irq, "vector 1's signal became an IRQ message");

    f.bridge.client_disconnected();
    let log = f.seen.lock().unwrap().log.join(",");
    assert!(
        log.ends_with("irqs 2 0 1,DeviceSetIrqs,irqs 2 1 1,DeviceSetIrqs,irqs 2 2 1,RegionWrite,DmaUnmap,DeviceSetIrqs,irqs 2 0 0"),
        "{log}"
    );
    assert_eq!(f.bridge.regions.len(), 0);
}

/// A server that closes its socket with a request in flight: the client gets ENODEV
/// for it; with no server at the path, requests fail with ENODEV after
/// `connect_wait`, without hanging.
#[test]
fn a_server_that_goes_away_gives_errors() {
    let mut f = fixture("gone");
    f.bridge.config.connect_wait = Duration::from_millis(100);
    let mut mem = Memory(vec![0; 8]);
    let dead = Request::RegionRead(RegionAccess {
        offset: 0xdead,
        region: 0,
        count: 4,
    });
    let (h, _, _) = call(&mut f, 1, &dead, vec![], &mut mem);
    assert_eq!(h.error, Some(ENODEV));
    f.server.take().unwrap().join().unwrap();
    let _ = std::fs::remove_file(&f.bridge.socket);
    let start = Instant::now();
    let (h, _, _) = call(&mut f, 2, &dead, vec![], &mut mem);
    assert_eq!(h.error, Some(ENODEV));
    assert!(start.elapsed() < Duration::from_secs(2));
}
