//! The transport over real socketpairs: partial reads and writes, non-blocking use,
//! fd passing, the fd limit, and rejected messages that leave the stream in sync and
//! leak no fd; each with the unbuffered and the buffered reader, and what only the
//! buffered one does (many messages per read, whose fds go to the right one).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::vfio_user::{Header, MessageType};

/// Every test that reads runs with both readers: unbuffered and buffered.
const READERS: [fn(Limits) -> MessageReader; 2] = [MessageReader::new, |limits| {
    MessageReader::buffered(limits, crate::vfio_user::request_may_carry_fds)
}];

fn message(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    Header::command(id, command, payload.len()).encode(&mut v);
    v.extend_from_slice(payload);
    v
}

fn eventfd() -> OwnedFd {
    let e = EventFd::new(libc::EFD_CLOEXEC).unwrap();
    // SAFETY: into_raw_fd hands over sole ownership of the fd.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}

/// A pipe; the write end is what gets sent, the read end tells whether every copy of
/// the write end is closed (EOF) or one is still open somewhere (EAGAIN).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
        0
    );
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Whether every copy of the pipe's write end has been closed.
fn writers_closed(read_end: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reads at most one byte into a valid buffer.
    let r = unsafe { libc::read(read_end.as_raw_fd(), b.as_mut_ptr() as *mut _, 1) };
    r == 0
}

fn expect_message(frame: Option<Frame>) -> RawMessage {
    match frame {
        Some(Frame::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A message written one byte at a time (many partial reads) arrives whole, and a
/// non-blocking reader returns `None` until then without losing what it has.
#[test]
fn byte_by_byte_on_nonblocking_socket() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut reader = new_reader(Limits::DEFAULT);
        let bytes = message(
            5,
            9,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        );
        for (i, byte) in bytes.iter().enumerate() {
            assert!(
                reader.read(&b).unwrap().is_none(),
                "complete too early at {i}"
            );
            (&a).write_all(&[*byte]).unwrap();
        }
        let m = expect_message(reader.read(&b).unwrap());
        assert_eq!(m.header.msg_id, 5);
        assert_eq!(m.payload.len(), 16);
        assert!(!reader.is_mid_message());
        assert!(reader.read(&b).unwrap().is_none());
    }
}

/// fds sent with a message are received with it, usable, and close-on-exec.
#[test]
fn passes_fds_with_message() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        let mut writer = MessageWriter::new(Limits {
            max_msg_fds: 2,
            ..Limits::DEFAULT
        });
        let (e1, e2) = (eventfd(), eventfd());
        writer
            .send_blocking(&a, message(1, 8, &[0; 20]), vec![e1, e2])
            .unwrap();
        let mut reader = new_reader(Limits {
            max_msg_fds: 2,
            ..Limits::DEFAULT
        });
        let m = expect_message(reader.read(&b).unwrap());
        assert_eq!(m.fds.len(), 2);
        for fd in &m.fds {
            // SAFETY: F_GETFD only queries the descriptor table.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            // Writing to the received eventfd works.
            // SAFETY: writing 8 bytes from a valid u64 to an fd we own.
            let one = 1u64;
            let r = unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const _, 8) };
            assert_eq!(r, 8);
        }
    }
}

/// More fds than max_msg_fds: the message is rejected with E2BIG, its fds are closed,
/// and the next message on the stream is read correctly.
#[test]
fn too_many_fds_rejected_without_leak() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        let mut writer = MessageWriter::new(Limits {
            max_msg_fds: 8,
            ..Limits::DEFAULT
        });
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        let (r3, w3) = pipe();
        writer
            .send_blocking(&a, message(1, 8, &[0; 20]), vec![w1, w2, w3])
            .unwrap();
        writer
            .send_blocking(&a, message(2, 4, &[0; 16]), vec![])
            .unwrap();
        let mut reader = new_reader(Limits {
            max_msg_fds: 2,
            ..Limits::DEFAULT
        });
        match reader.read(&b).unwrap() {
            Some(Frame::Rejected(r)) => {
                assert_eq!(r.header.msg_id, 1);
                assert_eq!(r.error.errno(), libc::E2BIG as u32);
            }
            other => panic!("expected rejection, got {other:?}"),
        }
        for r in [&r1, &r2, &r3] {
            assert!(writers_closed(r), "a rejected fd was leaked");
        }
        let m = expect_message(reader.read(&b).unwrap());
        assert_eq!(m.header.msg_id, 2);
    }
}

/// An oversize message is skipped without allocating its size and rejected with E2BIG;
/// its fds are closed and the stream stays in sync.
#[test]
fn oversize_message_is_skipped() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        let limits = Limits {
            max_msg_size: 64,
            max_msg_fds: 1,
        };
        let mut writer = MessageWriter::new(Limits {
            max_msg_size: 1 << 20,
            max_msg_fds: 1,
        });
        let (r1, w1) = pipe();
        let big = message(1, 10, &vec![0xaa; 100_000]);
        let sender = std::thread::spawn(move || {
            writer.send_blocking(&a, big, vec![w1]).unwrap();
            writer
                .send_blocking(&a, message(2, 9, &[0; 16]), vec![])
                .unwrap();
            a
        });
        let mut reader = new_reader(limits);
        match reader.read(&b).unwrap() {
            Some(Frame::Rejected(r)) => {
                assert!(matches!(
                    r.error,
                    crate::vfio_user::DecodeError::TooLarge { .. }
                ));
                assert_eq!(r.error.errno(), libc::E2BIG as u32);
            }
            other => panic!("expected rejection, got {other:?}"),
        }
        let m = expect_message(reader.read(&b).unwrap());
        assert_eq!(m.header.msg_id, 2);
        let _a = sender.join().unwrap();
        assert!(writers_closed(&r1), "the skipped message's fd was leaked");
    }
}

/// A header whose size is below 16 cannot be framed: the connection is reported broken.
#[test]
fn unframeable_header_is_fatal() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        let mut h = Header::command(1, 1, 0).to_bytes();
        h[4] = 8;
        (&a).write_all(&h).unwrap();
        let mut reader = new_reader(Limits::DEFAULT);
        assert!(matches!(reader.read(&b), Err(TransportError::BadHeader(_))));
    }
}

/// EOF between messages is `Closed`; EOF inside one is `ClosedMidMessage`.
#[test]
fn eof_is_reported() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut reader = new_reader(Limits::DEFAULT);
        assert!(matches!(reader.read(&b), Err(TransportError::Closed)));

        let (a, b) = UnixStream::pair().unwrap();
        let bytes = message(1, 9, &[0; 16]);
        (&a).write_all(&bytes[..20]).unwrap();
        drop(a);
        let mut reader = new_reader(Limits::DEFAULT);
        assert!(matches!(
            reader.read(&b),
            Err(TransportError::ClosedMidMessage {
                received: 20,
                expected: 32
            })
        ));
    }
}

/// A writer on a full non-blocking socket keeps the rest of its queue and finishes
/// later; the fds travel once, with the first byte.
#[test]
fn partial_writes_resume() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut writer = MessageWriter::new(Limits::DEFAULT);
        let big = message(1, 10, &vec![0x55; 900_000]);
        writer.push(big.clone(), vec![eventfd()]).unwrap();
        writer.push(message(2, 13, &[]), vec![]).unwrap();
        assert!(!writer.flush(&a).unwrap(), "socket buffer should fill up");
        let reader_thread = std::thread::spawn(move || {
            let mut reader = new_reader(Limits::DEFAULT);
            let m1 = expect_message(reader.read(&b).unwrap());
            let m2 = expect_message(reader.read(&b).unwrap());
            (m1, m2)
        });
        while !writer.flush(&a).unwrap() {
            std::thread::yield_now();
        }
        let (m1, m2) = reader_thread.join().unwrap();
        assert_eq!(m1.payload, big[16..]);
        assert_eq!(m1.fds.len(), 1);
        assert_eq!(m2.header.msg_id, 2);
        assert!(m2.fds.is_empty());
    }
}

/// The writer refuses messages over the peer's limits before sending anything.
#[test]
fn writer_enforces_peer_limits() {
    let mut writer = MessageWriter::new(Limits {
        max_msg_size: 32,
        max_msg_fds: 0,
    });
    assert!(matches!(
        writer.push(message(1, 10, &[0; 17]), vec![]),
        Err(TransportError::SendTooLarge { .. })
    ));
    assert!(matches!(
        writer.push(message(1, 2, &[0; 16]), vec![eventfd()]),
        Err(TransportError::SendTooManyFds { .. })
    ));
    assert!(writer.is_empty());
}

/// A header with invalid flags is rejected (EINVAL) and skipped, keeping the stream.
#[test]
fn bad_flags_rejected_in_sync() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        let mut bad = message(1, 9, &[0; 16]);
        bad[8] = 0x7; // type 7
        (&a).write_all(&bad).unwrap();
        (&a).write_all(&message(2, 9, &[0; 16])).unwrap();
        let mut reader = new_reader(Limits::DEFAULT);
        match reader.read(&b).unwrap() {
            Some(Frame::Rejected(r)) => {
                assert_eq!(r.header.msg_id, 1);
                assert_eq!(r.header.msg_type, MessageType::Command);
                assert_eq!(r.error.errno(), libc::EINVAL as u32);
            }
            other => panic!("expected rejection, got {other:?}"),
        }
        assert_eq!(expect_message(reader.read(&b).unwrap()).header.msg_id, 2);
    }
}

/// fds spread over the pieces of one message (a hostile peer sending a byte at a time,
/// each with fds) are closed as they arrive beyond the limit, and the message is rejected
/// with E2BIG; the stream stays in sync.
#[test]
fn fds_spread_over_a_message_are_bounded() {
    for new_reader in READERS {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = message(7, 9, &[0; 16]);
        let mut read_ends = Vec::new();
        a.send_with_fds(&[&bytes[..16]], &[]).unwrap();
        for byte in &bytes[16..] {
            let pipes: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| pipe()).collect();
            let raw: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
            a.send_with_fds(&[&[*byte][..]], &raw).unwrap();
            read_ends.extend(pipes.into_iter().map(|(r, _w)| r)); // write ends closed here
        }
        (&a).write_all(&message(8, 9, &[0; 16])).unwrap();
        let mut reader = new_reader(Limits {
            max_msg_fds: 1,
            ..Limits::DEFAULT
        });
        match reader.read(&b).unwrap() {
            Some(Frame::Rejected(r)) => {
                assert_eq!(r.header.msg_id, 7);
                assert_eq!(r.error.errno(), libc::E2BIG as u32);
            }
            other => panic!("expected rejection, got {other:?}"),
        }
        for r in &read_ends {
            assert!(writers_closed(r), "an fd beyond the limit was kept");
        }
        assert_eq!(expect_message(reader.read(&b).unwrap()).header.msg_id, 8);
    }
}

/// A buffered reader takes many queued messages with one read and hands them out in
/// order; it says when it holds a whole message, and after the short read that emptied
/// the socket, that the socket is drained (no `recvmsg` needed to learn it).
#[test]
fn buffered_reader_hands_out_queued_messages() {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let mut all = Vec::new();
    for id in 0..100u16 {
        all.extend(message(id, 9, &id.to_le_bytes().repeat(8)));
    }
    (&a).write_all(&all).unwrap();
    let mut reader = MessageReader::buffered(Limits::DEFAULT, |_| true);
    assert!(!reader.has_buffered_message() && !reader.drained());
    for id in 0..100u16 {
        let m = expect_message(reader.read(&b).unwrap());
        assert_eq!(m.header.msg_id, id);
        assert_eq!(m.payload, id.to_le_bytes().repeat(8));
        assert_eq!(reader.has_buffered_message(), id < 99, "after {id}");
    }
    assert!(reader.drained(), "the one read came back short");
    assert!(!reader.is_mid_message());
    assert!(reader.read(&b).unwrap().is_none());
    // Half a message: not drained until the socket says so, mid-message then.
    (&a).write_all(&message(100, 9, &[0; 16])[..20]).unwrap();
    assert!(reader.read(&b).unwrap().is_none());
    assert!(reader.is_mid_message() && reader.drained());
}

/// fds go with the message they were sent with when a buffered read takes several
/// messages at once (the kernel glues the data before the fds' `sendmsg` to it): a
/// DMA_MAP without fds then one with, each its own `sendmsg`; a DMA_MAP with its fd
/// and a DMA_UNMAP in one `sendmsg`; a REGION_READ and a large DMA_MAP with an fd (read
/// past the buffer), then a small message. The unbuffered reader agrees.
#[test]
fn buffered_reader_gives_fds_to_their_message() {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let limits = Limits {
        max_msg_fds: 2,
        ..Limits::DEFAULT
    };
    let big = message(5, 2, &vec![0x5a; 3 * READ_BUFFER]);
    let mut map_unmap = message(2, 2, &[2; 16]);
    map_unmap.extend(message(3, 3, &[3; 8]));
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| pipe()).collect();
        let sends: [(&[u8], Option<usize>); 6] = [
            (&message(0, 2, &[0; 16]), None),
            (&message(1, 2, &[1; 32]), Some(0)),
            (&map_unmap, Some(1)),
            (&message(4, 9, &[4; 16]), None),
            (&big, Some(2)),
            (&message(6, 9, &[6; 16]), None),
        ];
        // All of it is queued before the first read (the socket buffer holds it).
        for (bytes, pipe) in sends {
            let fds: Vec<RawFd> = pipe.iter().map(|&p| pipes[p].1.as_raw_fd()).collect();
            let sent = a.send_with_fds(&[bytes], &fds).unwrap();
            (&a).write_all(&bytes[sent..]).unwrap();
        }
        let read_ends: Vec<OwnedFd> = pipes.into_iter().map(|(r, _w)| r).collect();
        let mut reader = new_reader(limits);
        let mut got = Vec::new();
        for _ in 0..7 {
            let m = expect_message(reader.read(&b).unwrap());
            got.push((m.header.msg_id, m.fds.len(), m.payload.len()));
            if m.header.msg_id == 5 {
                assert_eq!(m.payload, big[16..]);
            }
        }
        assert_eq!(
            got,
            [
                (0, 0, 16),
                (1, 1, 32),
                (2, 1, 16),
                (3, 0, 8),
                (4, 0, 16),
                (5, 1, 3 * READ_BUFFER),
                (6, 0, 16)
            ]
        );
        for r in &read_ends {
            assert!(writers_closed(r), "no copy kept");
        }
    }
}

/// A writer with many messages queued sends them together, a message with fds
/// starting a `sendmsg` of its own: both readers get every message in order, the fds
/// with theirs, also when the socket fills part-way and the rest goes later.
#[test]
fn queued_messages_go_out_together_fds_with_theirs() {
    for new_reader in READERS {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut writer = MessageWriter::new(Limits::DEFAULT);
        let (r, w) = pipe();
        for id in 0..300u16 {
            let fds = if id == 150 {
                vec![w.try_clone().unwrap()]
            } else {
                vec![]
            };
            let command = if id == 150 { 2 } else { 9 };
            let payload = vec![id as u8; 16 + usize::from(id) * 7];
            writer.push(message(id, command, &payload), fds).unwrap();
        }
        drop(w);
        let reader = std::thread::spawn(move || {
            let mut reader = new_reader(Limits::DEFAULT);
            (0..300u16)
                .map(|_| expect_message(reader.read(&b).unwrap()))
                .map(|m| (m.header.msg_id, m.fds.len(), m.payload))
                .collect::<Vec<_>>()
        });
        while !writer.flush(&a).unwrap() {
            std::thread::yield_now();
        }
        let got = reader.join().unwrap();
        for (i, (id, fds, payload)) in got.into_iter().enumerate() {
            assert_eq!(usize::from(id), i);
            assert_eq!(fds, usize::from(id == 150), "message {id}");
            assert_eq!(payload, vec![id as u8; 16 + usize::from(id) * 7]);
        }
        assert!(writers_closed(&r), "the fd was handed over once");
    }
}
