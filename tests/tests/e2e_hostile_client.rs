//! Hostile clients (issue 8): a real vfu-relay and a real loopback device VM serving
//! `gpio0` (gpio), `dma0` and `dma1` (dma-engine), and raw UNIX-socket clients that
//! write hand-crafted bytes and fds.
//!
//! One table of cases ([`cases`]) is driven by one runner ([`hostile_clients`]). Each
//! case is a list of [`Step`]s: what to send (bytes and fds, in one `sendmsg`) and the
//! outcome the relay documents for it (an error reply with its errno, silence, or the
//! connection closed), every wait bounded. After each case the runner checks, and
//! names the case when one fails, that
//!
//! - the relay is alive,
//! - the same device serves a fresh, well-behaved client (VERSION, config space, a DMA
//!   map and unmap),
//! - the relay holds exactly the fds it held before the case (nothing the case sent
//!   or opened leaked),
//! - the long-lived client of `dma1` (a [`vfu_tests::neighbour::Neighbour`]), which
//!   runs real DMA copies (data and CRC checked, MSI-X interrupt fired) on a thread for
//!   the whole suite, kept getting correct answers during the case.
//!
//! The resource tests at the end count the relay's fds and resident memory
//! (`/proc/<pid>/fd`, `VmRSS`) after a warm-up, half way and at the end of 100k DMA
//! map/unmap cycles and of 10k client reconnects; the last test floods posted writes
//! at a slow device and checks that the relay holds the client back.
//!
//! `VFU_HOSTILE_CASE=name` runs one case of the table; `VFU_TEST_LOG=debug` shows the
//! relay's and the device VM's logs.

use std::fs::File;
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfu_proto::client::Client;
use vfu_proto::vfio_user::{
    encode_request, pci_irq, pci_region, Command, DmaMap, DmaUnmap, Request,
};
use vfu_tests::case_table::{self, run_cases};
use vfu_tests::dma_engine::{eventfd, memfd, unsealed_memfd};
use vfu_tests::neighbour::Neighbour;
use vfu_tests::procfs::{self, fd_count, map_count, rss_kib, status_kib, steady_fd_count};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use vfu_tests::{
    start_loopback_guest, start_relay, try_connect_served, wait_for_socket, Proc, Scratch,
};

/// The bound on every wait for an answer (or for the relay to close a connection).
const WAIT: Duration = Duration::from_secs(5);
/// How long "no answer" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// Setup bound.
const SETUP: Duration = Duration::from_secs(20);

const EINVAL: u32 = libc::EINVAL as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;
const E2BIG: u32 = libc::E2BIG as u32;
const EEXIST: u32 = libc::EEXIST as u32;
const ENOENT: u32 = libc::ENOENT as u32;
const ENOSPC: u32 = libc::ENOSPC as u32;
const EMFILE: u32 = libc::EMFILE as u32;

/// Header flags.
const F_REPLY: u32 = 1;
const F_NO_REPLY: u32 = 1 << 4;
const F_ERROR: u32 = 1 << 5;

/// The relay's largest message (`max_data_xfer_size` 1 MiB plus 4 KiB of headers).
const MAX_MSG: u32 = (1 << 20) + 4096;

// ---------------------------------------------------------------------------------
// Building messages by hand.

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// A header with every field as given (the size need not match anything).
fn header(id: u16, command: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    put16(&mut v, id);
    put16(&mut v, command);
    put32(&mut v, size);
    put32(&mut v, flags);
    put32(&mut v, 0);
    v
}

/// A message whose size is that of `payload`, with `flags`.
fn framed(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = header(id, command, 16 + payload.len() as u32, flags);
    v.extend_from_slice(payload);
    v
}

/// A command (flags 0) around any payload.
fn cmd(id: u16, command: Command, payload: &[u8]) -> Vec<u8> {
    framed(id, command as u16, 0, payload)
}

fn map_payload(argsz: u32, flags: u32, offset: u64, address: u64, size: u64) -> Vec<u8> {
    let mut v = Vec::new();
    put32(&mut v, argsz);
    put32(&mut v, flags);
    put64(&mut v, offset);
    put64(&mut v, address);
    put64(&mut v, size);
    v
}

fn unmap_payload(argsz: u32, flags: u32, address: u64, size: u64) -> Vec<u8> {
    let mut v = Vec::new();
    put32(&mut v, argsz);
    put32(&mut v, flags);
    put64(&mut v, address);
    put64(&mut v, size);
    v
}

/// DMA_MAP of `size` bytes at `address`, read-write, at `offset` of the fd that comes
/// with it (if any).
fn map(id: u16, address: u64, size: u64, offset: u64) -> Vec<u8> {
    cmd(
        id,
        Command::DmaMap,
        &map_payload(32, 3, offset, address, size),
    )
}

fn unmap(id: u16, address: u64, size: u64) -> Vec<u8> {
    cmd(id, Command::DmaUnmap, &unmap_payload(24, 0, address, size))
}

fn unmap_all(id: u16) -> Vec<u8> {
    cmd(id, Command::DmaUnmap, &unmap_payload(24, 2, 0, 0))
}

fn access_payload(offset: u64, region: u32, count: u32) -> Vec<u8> {
    let mut v = Vec::new();
    put64(&mut v, offset);
    put32(&mut v, region);
    put32(&mut v, count);
    v
}

fn region_read(id: u16, region: u32, offset: u64, count: u32) -> Vec<u8> {
    cmd(
        id,
        Command::RegionRead,
        &access_payload(offset, region, count),
    )
}

/// REGION_WRITE whose `count` field says `count`, followed by `data`.
fn region_write_raw(id: u16, region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = access_payload(offset, region, count);
    p.extend_from_slice(data);
    cmd(id, Command::RegionWrite, &p)
}

fn info_payload(argsz: u32, index: u32, len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    put32(&mut v, argsz);
    put32(&mut v, 0);
    put32(&mut v, index);
    v.resize(len, 0);
    v
}

fn region_info(id: u16, argsz: u32, index: u32) -> Vec<u8> {
    cmd(
        id,
        Command::DeviceGetRegionInfo,
        &info_payload(argsz, index, 32),
    )
}

fn irq_info(id: u16, index: u32) -> Vec<u8> {
    cmd(id, Command::DeviceGetIrqInfo, &info_payload(16, index, 16))
}

const DATA_NONE: u32 = 1;
const DATA_BOOL: u32 = 2;
const DATA_EVENTFD: u32 = 4;
const ACTION_MASK: u32 = 8;
const ACTION_UNMASK: u32 = 16;
const ACTION_TRIGGER: u32 = 32;

fn set_irqs(id: u16, flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    put32(&mut v, 20 + data.len() as u32);
    put32(&mut v, flags);
    put32(&mut v, index);
    put32(&mut v, start);
    put32(&mut v, count);
    v.extend_from_slice(data);
    cmd(id, Command::DeviceSetIrqs, &v)
}

/// VERSION 0.0 with `json` (a NUL is appended) as its version data.
fn version_json(id: u16, major: u16, json: &str) -> Vec<u8> {
    let mut p = Vec::new();
    put16(&mut p, major);
    put16(&mut p, 0);
    p.extend_from_slice(json.as_bytes());
    p.push(0);
    cmd(id, Command::Version, &p)
}

/// The usual VERSION of the runner.
fn version(id: u16) -> Vec<u8> {
    version_json(id, 0, r#"{"capabilities":{"max_msg_fds":16}}"#)
}

fn device_get_info(id: u16, argsz: u32) -> Vec<u8> {
    cmd(id, Command::DeviceGetInfo, &info_payload(argsz, 0, 16))
}

/// A sealed memfd of `len` bytes, as QEMU's memory backend makes it.
fn sealed(len: u64) -> OwnedFd {
    OwnedFd::from(memfd(len))
}

/// A memfd that is not sealed: the relay serves it with pread/pwrite, no window.
fn unsealed(len: u64) -> OwnedFd {
    OwnedFd::from(unsealed_memfd(len))
}

fn eventfds(n: usize) -> Vec<OwnedFd> {
    (0..n).map(|_| eventfd()).collect()
}

// ---------------------------------------------------------------------------------
// The steps of a case.

/// Checks the payload of a successful reply.
type PayloadCheck = fn(&[u8]) -> Result<(), String>;

/// One step of a case.
enum Step {
    /// One `sendmsg` of these bytes with these fds.
    Send(Vec<u8>, Vec<OwnedFd>),
    /// The bytes one at a time, 1 ms apart (a message in pieces).
    Trickle(Vec<u8>),
    /// The next message is the reply to message `id`: with ERROR and this errno, or
    /// (0) a success.
    Reply(u16, u32),
    /// The next message is a successful reply to `id` whose payload passes the check.
    ReplyWith(u16, PayloadCheck),
    /// Nothing arrives for [`QUIET`], and the connection stays open.
    Quiet,
    /// The relay closes the connection within [`WAIT`] (a reply before the EOF is
    /// allowed only if it is an error reply).
    Closed,
    /// A config-space read of the device IDs on this connection is answered right:
    /// the stream is still in sync.
    Sane(u16),
    /// While this connection is in its current state, the other devices serve: the
    /// long-lived client makes progress and a fresh client of the other device under
    /// attack is served.
    OthersServed,
    /// The next message is a DMA_READ or DMA_WRITE command from the relay (the device
    /// reaching memory mapped without an fd); the answer is sent back (`None`: no
    /// answer at all).
    AnswerDma(Answer),
    /// As [`Step::Reply`] (with an optional check of a successful reply's payload),
    /// answering DMA commands that come first with [`Answer`].
    ReplyAnswering(u16, u32, Answer, Option<PayloadCheck>),
    /// Something to do between two steps (e.g. shrink the memory mapped).
    Do(Box<dyn FnOnce() -> Result<(), String>>),
    /// As [`Step::Send`], the bytes and fds made when the step runs (floods of fds
    /// that the test process could not hold all at once).
    SendLazy(Box<dyn FnOnce() -> (Vec<u8>, Vec<OwnedFd>)>),
    /// The relay holds at most this many fds more than before the case.
    RelayFdsAtMost(usize),
    /// The relay has at most this many memory mappings more than before the case.
    RelayMapsAtMost(usize),
    /// The relay's address space (VmSize) is at most this many bytes.
    RelayVmSizeAtMost(u64),
}

/// Builds the answer to a server-to-client command (message ID, command, payload).
type Answer = fn(u16, u16, &[u8]) -> Result<Option<Vec<u8>>, String>;

use Step::*;

fn send(bytes: Vec<u8>) -> Step {
    Send(bytes, Vec::new())
}

fn send_fds(bytes: Vec<u8>, fds: Vec<OwnedFd>) -> Step {
    Send(bytes, fds)
}

/// Which device a case attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `gpio0`: the gpio model (BAR 2 of 256 bytes, INTx only).
    Gpio,
    /// `dma0`: the dma-engine model (BAR 0 of 4 KiB, MSI-X with 2 vectors).
    Dma,
}

impl Target {
    /// The first 4 bytes of config space: vendor and device ID.
    fn ids(self) -> [u8; 4] {
        match self {
            Target::Gpio => [0x4f, 0x49, 0xc8, 0x0d],
            Target::Dma => [0x34, 0x12, 0xf0, 0x11],
        }
    }
}

/// One hostile client.
struct Case {
    name: &'static str,
    target: Target,
    /// The runner does VERSION first (message ID 0).
    versioned: bool,
    steps: fn() -> Vec<Step>,
}

fn case(name: &'static str, target: Target, steps: fn() -> Vec<Step>) -> Case {
    Case {
        name,
        target,
        versioned: true,
        steps,
    }
}

fn unversioned(name: &'static str, target: Target, steps: fn() -> Vec<Step>) -> Case {
    Case {
        name,
        target,
        versioned: false,
        steps,
    }
}

use Target::{Dma, Gpio};

/// An IOVA well away from anything the runner maps.
const IOVA: u64 = 0x4000_0000;
const PAGE: u64 = 4096;

/// The cases. Each one's comment says what it proves.
fn cases() -> Vec<Case> {
    vec![
        // ---- Header and framing --------------------------------------------------
        // A size below the header cannot be framed: the relay closes the connection
        // (it cannot know where the next message starts) and nothing else notices.
        case("header_size_below_16", Gpio, || {
            vec![send(header(1, Command::DeviceGetInfo as u16, 8, 0)), Closed]
        }),
        // Size 0 likewise: no zero-length loop, no division, just a close.
        case("header_size_zero", Gpio, || {
            vec![send(header(1, 0, 0, 0)), Closed]
        }),
        // A message larger than the relay's limit is skipped without allocating its
        // size: E2BIG, and the stream stays in sync (the next request is answered).
        case("message_larger_than_max_msg_size", Gpio, || {
            let mut m = header(1, Command::RegionWrite as u16, MAX_MSG + 1, 0);
            m.resize(MAX_MSG as usize + 1, 0xaa);
            vec![send(m), Reply(1, E2BIG), Sane(2)]
        }),
        // A size no vfio-user message can have (4 GiB) is not skipped byte by byte:
        // the connection is closed at once.
        case("message_size_4gib", Gpio, || {
            vec![
                send(header(1, Command::RegionWrite as u16, u32::MAX, 0)),
                Closed,
            ]
        }),
        // A payload shorter than its command's fixed fields (the size is consistent
        // with what is sent, but the fields are cut): EINVAL, in sync.
        case("payload_shorter_than_its_fields", Gpio, || {
            vec![
                send(cmd(1, Command::RegionRead, &[0u8; 10])),
                Reply(1, EINVAL),
                Sane(2),
            ]
        }),
        // Bytes after the last field of a fixed-size command: EINVAL, in sync.
        case("payload_with_trailing_bytes", Gpio, || {
            let mut p = access_payload(0, pci_region::CONFIG, 4);
            p.extend_from_slice(&[0; 8]);
            vec![
                send(cmd(1, Command::RegionRead, &p)),
                Reply(1, EINVAL),
                Sane(2),
            ]
        }),
        // A header whose size announces more than the command's payload, followed by
        // the next message: the relay takes the announced bytes as this message's
        // (trailing bytes: EINVAL) and the swallowed message never gets an answer;
        // the one after it does. (The size field is the only framing there is.)
        case("size_larger_than_payload_swallows_next", Gpio, || {
            let mut m = header(1, Command::RegionRead as u16, 16 + 16 + 32, 0);
            m.extend_from_slice(&access_payload(0, pci_region::CONFIG, 4));
            m.extend_from_slice(&region_read(2, pci_region::CONFIG, 0, 4));
            vec![send(m), Reply(1, EINVAL), Sane(3)]
        }),
        // ERROR set on a command: EINVAL, in sync.
        case("error_flag_on_a_command", Gpio, || {
            vec![
                send(framed(
                    1,
                    Command::RegionRead as u16,
                    F_ERROR,
                    &access_payload(0, pci_region::CONFIG, 4),
                )),
                Reply(1, EINVAL),
                Sane(2),
            ]
        }),
        // NO_REPLY on a reply is contradictory: refused (EINVAL), in sync.
        case("no_reply_flag_on_a_reply", Gpio, || {
            vec![
                send(framed(
                    1,
                    Command::DmaRead as u16,
                    F_REPLY | F_NO_REPLY,
                    &[0; 16],
                )),
                Reply(1, EINVAL),
                Sane(2),
            ]
        }),
        // Message type 2 (neither command nor reply) and unknown flag bits: EINVAL.
        case("unknown_type_and_flag_bits", Gpio, || {
            let p = access_payload(0, pci_region::CONFIG, 4);
            vec![
                send(framed(1, Command::RegionRead as u16, 2, &p)),
                Reply(1, EINVAL),
                send(framed(2, Command::RegionRead as u16, 1 << 9, &p)),
                Reply(2, EINVAL),
                Sane(3),
            ]
        }),
        // Unknown commands (0, 14 between known ones, 0xffff): ENOSYS, in sync.
        case("unknown_commands", Gpio, || {
            vec![
                send(framed(1, 0, 0, &[0; 8])),
                Reply(1, ENOSYS),
                send(framed(2, 14, 0, &[])),
                Reply(2, ENOSYS),
                send(framed(3, 0xffff, 0, &[0; 64])),
                Reply(3, ENOSYS),
                Sane(4),
            ]
        }),
        // A request with NO_REPLY that is refused gets no answer (as asked) and
        // leaves the stream in sync.
        case("refused_no_reply_request_is_silent", Gpio, || {
            vec![
                send(framed(1, 0x7777, F_NO_REPLY, &[0; 4])),
                send(framed(2, Command::RegionRead as u16, F_NO_REPLY, &[0; 3])),
                Sane(3),
            ]
        }),
        // ---- VERSION -------------------------------------------------------------
        // Any request before VERSION: EINVAL; VERSION afterwards still works.
        unversioned("request_before_version", Gpio, || {
            vec![
                send(region_read(1, pci_region::CONFIG, 0, 4)),
                Reply(1, EINVAL),
                send(device_get_info(2, 16)),
                Reply(2, EINVAL),
                send(version(3)),
                Reply(3, 0),
                Sane(4),
            ]
        }),
        // Capabilities that are not JSON, JSON of the wrong shape or types, or with
        // a NUL inside: EINVAL, and the client may try again.
        unversioned("version_malformed_json", Gpio, || {
            vec![
                send(version_json(1, 0, "{\"capabilities\":")),
                Reply(1, EINVAL),
                send(version_json(2, 0, "[1,2,3]")),
                Reply(2, EINVAL),
                send(version_json(
                    3,
                    0,
                    r#"{"capabilities":{"max_msg_fds":"many"}}"#,
                )),
                Reply(3, EINVAL),
                send(version_json(4, 0, r#"{"capabilities":{"max_msg_fds":-1}}"#)),
                Reply(4, EINVAL),
                send(version_json(
                    5,
                    0,
                    r#"{"capabilities":{"max_data_xfer_size":1e40}}"#,
                )),
                Reply(5, EINVAL),
                send(version_json(6, 0, "{}\0{}")),
                Reply(6, EINVAL),
                send(version_json(7, 0, r#"{"capabilities":{"migration":5}}"#)),
                Reply(7, EINVAL),
                send(version(8)),
                Reply(8, 0),
                Sane(9),
            ]
        }),
        // A payload too short for major and minor: EINVAL.
        unversioned("version_truncated", Gpio, || {
            vec![
                send(cmd(1, Command::Version, &[0, 0])),
                Reply(1, EINVAL),
                send(version(2)),
                Reply(2, 0),
            ]
        }),
        // Major version 1 (only 0 exists): EINVAL; the client is not versioned by it
        // (its next request is refused), and a proper VERSION then works.
        unversioned("version_wrong_major", Gpio, || {
            vec![
                send(version_json(1, 1, "{}")),
                Reply(1, EINVAL),
                send(region_read(2, pci_region::CONFIG, 0, 4)),
                Reply(2, EINVAL),
                send(version(3)),
                Reply(3, 0),
                Sane(4),
            ]
        }),
        // Absurd but well-typed capabilities the relay can honour: accepted, and the
        // reply states the relay's own limits (16 fds, at most 1 MiB transfers, at
        // most 65535 maps, no twin socket), whatever the client claimed.
        unversioned("version_absurd_capabilities_are_bounded", Dma, || {
            vec![
                send(version_json(
                    1,
                    0,
                    r#"{"capabilities":{"max_msg_fds":4294967295,"max_data_xfer_size":4294967295,
                        "pgsizes":18446744073709551615,"max_dma_maps":4294967295,
                        "twin_socket":{"supported":true,"fd_index":7},"write_multiple":true,
                        "migration":{"pgsize":1,"max_bitmap_size":18446744073709551615},
                        "unknown_key":[1,{"x":null}]}}"#,
                )),
                ReplyWith(1, check_bounded_caps),
                Sane(2),
            ]
        }),
        // Zero where a count of things is expected: max_msg_fds 0 and pgsizes 0 are
        // accepted (the relay never sends the client fds; it states its own page
        // size); a max_data_xfer_size below a page is refused (EINVAL): the relay
        // would otherwise cut the device's DMA into that many one-byte messages.
        unversioned("version_zero_capabilities", Gpio, || {
            vec![
                send(version_json(
                    1,
                    0,
                    r#"{"capabilities":{"max_data_xfer_size":0}}"#,
                )),
                Reply(1, EINVAL),
                send(version_json(
                    2,
                    0,
                    r#"{"capabilities":{"max_data_xfer_size":4095}}"#,
                )),
                Reply(2, EINVAL),
                send(version_json(
                    3,
                    0,
                    r#"{"capabilities":{"max_msg_fds":0,"pgsizes":0,"max_dma_maps":0}}"#,
                )),
                ReplyWith(3, check_bounded_caps),
                Sane(4),
            ]
        }),
        // VERSION with an fd: EINVAL, the fd is closed (the runner's fd count).
        unversioned("version_with_an_fd", Gpio, || {
            vec![
                send_fds(version(1), vec![eventfd()]),
                Reply(1, EINVAL),
                send(version(2)),
                Reply(2, 0),
            ]
        }),
        // A second VERSION once negotiated: EINVAL (the limits in force stay), in
        // sync.
        case("version_twice", Gpio, || {
            vec![send(version(1)), Reply(1, EINVAL), Sane(2)]
        }),
        // ---- DMA_MAP / DMA_UNMAP -------------------------------------------------
        // argsz below the 32-byte structure: EINVAL.
        case("dma_map_bad_argsz", Dma, || {
            vec![
                send_fds(
                    cmd(1, Command::DmaMap, &map_payload(31, 3, 0, IOVA, PAGE)),
                    vec![sealed(PAGE)],
                ),
                Reply(1, EINVAL),
                send(cmd(2, Command::DmaUnmap, &unmap_payload(8, 0, IOVA, PAGE))),
                Reply(2, EINVAL),
                Sane(3),
            ]
        }),
        // Size 0: EINVAL (map and unmap).
        case("dma_map_zero_size", Dma, || {
            vec![
                send_fds(map(1, IOVA, 0, 0), vec![sealed(PAGE)]),
                Reply(1, EINVAL),
                send(unmap(2, IOVA, 0)),
                Reply(2, EINVAL),
                Sane(3),
            ]
        }),
        // iova + size past 2^64: EINVAL, however it is aligned.
        case("dma_map_iova_plus_size_overflows", Dma, || {
            let top = u64::MAX - PAGE + 1;
            vec![
                send(map(1, top, 2 * PAGE, 0)),
                Reply(1, EINVAL),
                send(map(2, top, PAGE, 0)),
                Reply(2, EINVAL),
                send(unmap(3, top, 2 * PAGE)),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // Address, size or file offset not page-aligned: EINVAL.
        case("dma_map_unaligned", Dma, || {
            vec![
                send(map(1, IOVA + 1, PAGE, 0)),
                Reply(1, EINVAL),
                send(map(2, IOVA, PAGE + 1, 0)),
                Reply(2, EINVAL),
                send_fds(map(3, IOVA, PAGE, 1), vec![sealed(4 * PAGE)]),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // A map overlapping a mapped region, from below, inside or exactly: EEXIST;
        // the first region stays mapped (its unmap succeeds).
        case("dma_map_overlapping", Dma, || {
            vec![
                send_fds(map(1, IOVA, 4 * PAGE, 0), vec![sealed(4 * PAGE)]),
                Reply(1, 0),
                send(map(2, IOVA - PAGE, 2 * PAGE, 0)),
                Reply(2, EEXIST),
                send(map(3, IOVA + PAGE, PAGE, 0)),
                Reply(3, EEXIST),
                send_fds(map(4, IOVA, 4 * PAGE, 0), vec![sealed(4 * PAGE)]),
                Reply(4, EEXIST),
                send(unmap(5, IOVA, 4 * PAGE)),
                Reply(5, 0),
                Sane(6),
            ]
        }),
        // Unmap of what is not mapped, of part of a region, twice: ENOENT.
        case("dma_unmap_not_mapped", Dma, || {
            vec![
                send(unmap(1, IOVA, PAGE)),
                Reply(1, ENOENT),
                send(map(2, IOVA, 2 * PAGE, 0)),
                Reply(2, 0),
                send(unmap(3, IOVA, PAGE)),
                Reply(3, ENOENT),
                send(unmap(4, IOVA, 2 * PAGE)),
                Reply(4, 0),
                send(unmap(5, IOVA, 2 * PAGE)),
                Reply(5, ENOENT),
                Sane(6),
            ]
        }),
        // Unknown DMA_MAP flags, the legacy dirty-bitmap DMA_UNMAP flag, and
        // UNMAP_ALL with an address: EINVAL.
        case("dma_map_and_unmap_bad_flags", Dma, || {
            vec![
                send(cmd(
                    1,
                    Command::DmaMap,
                    &map_payload(32, 4 | 3, 0, IOVA, PAGE),
                )),
                Reply(1, EINVAL),
                send(cmd(2, Command::DmaUnmap, &unmap_payload(24, 1, IOVA, PAGE))),
                Reply(2, EINVAL),
                send(cmd(3, Command::DmaUnmap, &unmap_payload(24, 2, IOVA, PAGE))),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // A file offset or range beyond the end of the fd's file: EINVAL (the device
        // VM would fault on the part that is not there).
        case("dma_map_beyond_the_fd", Dma, || {
            vec![
                send_fds(map(1, IOVA, PAGE, 2 * PAGE), vec![sealed(2 * PAGE)]),
                Reply(1, EINVAL),
                send_fds(map(2, IOVA, 4 * PAGE, 0), vec![unsealed(2 * PAGE)]),
                Reply(2, EINVAL),
                send_fds(map(3, IOVA, PAGE, u64::MAX - PAGE + 1), vec![sealed(PAGE)]),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // fds that cannot back DMA: an eventfd, a pipe, an O_APPEND file: EINVAL.
        case("dma_map_fd_not_memory", Dma, || {
            let (r, w) = pipe();
            vec![
                send_fds(map(1, IOVA, PAGE, 0), vec![eventfd()]),
                Reply(1, EINVAL),
                send_fds(map(2, IOVA, PAGE, 0), vec![r]),
                Reply(2, EINVAL),
                send_fds(map(3, IOVA, PAGE, 0), vec![w]),
                Reply(3, EINVAL),
                send_fds(map(4, IOVA, PAGE, 0), vec![append_file()]),
                Reply(4, EINVAL),
                Sane(5),
            ]
        }),
        // A regular file on a disk file system (where pread could wait on a device,
        // as on FUSE or a network mount): EINVAL; the same in /dev/shm is served.
        case("dma_map_fd_not_on_a_memory_file_system", Dma, || {
            let mut steps = Vec::new();
            if let Some(disk) = disk_file() {
                steps.extend([
                    send_fds(map(1, IOVA, PAGE, 0), vec![disk]),
                    Reply(1, EINVAL),
                ]);
            }
            steps.extend([
                send_fds(map(2, IOVA, PAGE, 0), vec![shm_file()]),
                Reply(2, 0),
                Sane(3),
            ]);
            steps
        }),
        // Two fds on a DMA_MAP (one at most): EINVAL, both closed.
        case("dma_map_two_fds", Dma, || {
            vec![
                send_fds(map(1, IOVA, PAGE, 0), vec![sealed(PAGE), sealed(PAGE)]),
                Reply(1, EINVAL),
                Sane(2),
            ]
        }),
        // A map without fd is legal (the copy path through DMA_READ / DMA_WRITE): it
        // succeeds and can be unmapped; an fd on DMA_UNMAP is refused.
        case("dma_map_without_fd_and_unmap_with_fd", Dma, || {
            vec![
                send(map(1, IOVA, PAGE, 0)),
                Reply(1, 0),
                send_fds(unmap(2, IOVA, PAGE), vec![sealed(PAGE)]),
                Reply(2, EINVAL),
                send(unmap(3, IOVA, PAGE)),
                Reply(3, 0),
                Sane(4),
            ]
        }),
        // Maps and unmaps sent with NO_REPLY: no answers, but the relay's table
        // follows them (a later overlapping map is EEXIST, the region unmaps).
        case("dma_map_and_unmap_posted", Dma, || {
            vec![
                send_fds(
                    framed(
                        1,
                        Command::DmaMap as u16,
                        F_NO_REPLY,
                        &map_payload(32, 3, 0, IOVA, PAGE),
                    ),
                    vec![sealed(PAGE)],
                ),
                send(map(2, IOVA, PAGE, 0)),
                Reply(2, EEXIST),
                send(framed(
                    3,
                    Command::DmaUnmap as u16,
                    F_NO_REPLY,
                    &unmap_payload(24, 0, IOVA, PAGE),
                )),
                send(unmap(4, IOVA, PAGE)),
                Reply(4, ENOENT),
                Sane(5),
            ]
        }),
        // 65535 maps pipelined (the limit the relay states), then one more: ENOSPC;
        // UNMAP_ALL empties the table and a map works again.
        case("dma_map_flood_to_the_limit", Gpio, || {
            let n = 65535u32;
            let mut bytes = Vec::with_capacity(n as usize * 48);
            for i in 0..n {
                bytes.extend(map(id(i), IOVA + u64::from(i) * PAGE, PAGE, 0));
            }
            let mut steps = vec![send(bytes)];
            steps.extend((0..n).map(|i| Reply(id(i), 0)));
            steps.extend([
                send(map(7, IOVA - PAGE, PAGE, 0)),
                Reply(7, ENOSPC),
                send(unmap_all(8)),
                Reply(8, 0),
                send(map(9, IOVA, PAGE, 0)),
                Reply(9, 0),
                Sane(10),
            ]);
            steps
        }),
        // 3000 map/unmap pairs with a sealed memfd each (windows mapped and unmapped
        // in the device VM), pipelined: all answered in order; no fd kept.
        case("dma_map_unmap_flood_with_fds", Dma, || {
            let n = 3000u32;
            let fd = File::from(sealed(PAGE));
            let mut steps = Vec::new();
            for i in 0..n {
                let mut b = map(id(2 * i), IOVA, PAGE, 0);
                b.extend(unmap(id(2 * i + 1), IOVA, PAGE));
                steps.push(send_fds(b, vec![OwnedFd::from(fd.try_clone().unwrap())]));
            }
            steps.extend((0..2 * n).map(|i| Reply(id(i), 0)));
            steps.push(RelayVmSizeAtMost(33 << 40));
            let big = vec![0u8; 1 << 20];
            steps.push(send(region_write_raw(98, 0, 0, big.len() as u32, &big)));
            steps.push(Reply(98, EINVAL));
            steps.push(Sane(99));
            steps
        }),
        // 2000 maps with fds, then the client goes without unmapping: the relay
        // releases every region and fd (the runner's fd count).
        case("dma_maps_with_fds_left_at_disconnect", Dma, || {
            let n = 2000u32;
            let fd = File::from(sealed(PAGE));
            let mut steps = Vec::new();
            for i in 0..n {
                steps.push(send_fds(
                    map(id(i), IOVA + u64::from(i) * PAGE, PAGE, 0),
                    vec![OwnedFd::from(fd.try_clone().unwrap())],
                ));
            }
            steps.extend((0..n).map(|i| Reply(id(i), 0)));
            steps
        }),
        // Huge regions (sparse sealed memfds of 64 TiB down to 1 GiB, two of each):
        // the relay must not map them all into its own address space (they would
        // fill the 128 TiB a process has, and the relay's next large allocation would
        // abort): it maps at most 32 TiB of client memory and serves the rest with
        // pread/pwrite. The maps succeed; a 1 MiB request is still served.
        case("dma_map_huge_regions", Dma, || {
            let mut steps = Vec::new();
            let mut at = 1u64 << 47;
            let mut id = 1u16;
            for shift in (30..=46).rev() {
                for _ in 0..2 {
                    let size = 1u64 << shift;
                    let f = memfd(size);
                    steps.push(send_fds(map(id, at, size, 0), vec![OwnedFd::from(f)]));
                    steps.push(Reply(id, 0));
                    at += size;
                    id += 1;
                }
            }
            steps.push(RelayVmSizeAtMost(33 << 40));
            let big = vec![0u8; 1 << 20];
            steps.push(send(region_write_raw(98, 0, 0, big.len() as u32, &big)));
            steps.push(Reply(98, EINVAL));
            steps.push(Sane(99));
            steps
        }),
        // Maps of one file, each with its own descriptor (as QEMU sends them, one
        // per map; with a vIOMMU, thousands): the relay keeps one descriptor and one
        // mapping per file, however many maps share it.
        case("dma_map_flood_of_one_file", Dma, || {
            let plain = Arc::new(File::from(unsealed(PAGE)));
            let sealed = Arc::new(File::from(sealed(PAGE)));
            let mut steps = Vec::new();
            let n = 20_000u32;
            let m = 1000u32;
            for chunk in (0..n + m).collect::<Vec<_>>().chunks(500) {
                for &i in chunk {
                    let f = if i < n { plain.clone() } else { sealed.clone() };
                    steps.push(SendLazy(Box::new(move || {
                        (
                            map(id(i), IOVA + u64::from(i) * PAGE, PAGE, 0),
                            vec![OwnedFd::from(f.try_clone().unwrap())],
                        )
                    })));
                }
                steps.extend(chunk.iter().map(|&i| Reply(id(i), 0)));
            }
            steps.extend([
                RelayFdsAtMost(3),
                RelayMapsAtMost(64),
                send(unmap_all(9)),
                Reply(9, 0),
                Sane(10),
            ]);
            steps
        }),
        // Maps of ever new files: the client may make the relay hold 4096 descriptors
        // (MAX_CLIENT_FDS); the maps beyond, and an interrupt eventfd beyond, are
        // refused with EMFILE. Meanwhile the other devices' clients are served (the
        // relay still has descriptors for them); UNMAP_ALL gives every file back.
        case("dma_map_flood_of_distinct_files", Dma, || {
            let max = 4096u32;
            let n = max + 200;
            let mut steps = Vec::new();
            for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
                for &i in chunk {
                    steps.push(SendLazy(Box::new(move || {
                        (
                            map(id(i), IOVA + u64::from(i) * PAGE, PAGE, 0),
                            vec![unsealed(PAGE)],
                        )
                    })));
                }
                steps.extend(
                    chunk
                        .iter()
                        .map(|&i| Reply(id(i), if i < max { 0 } else { EMFILE })),
                );
            }
            steps.extend([
                RelayFdsAtMost(max as usize + 3),
                send_fds(
                    set_irqs(9, DATA_EVENTFD | ACTION_TRIGGER, pci_irq::MSIX, 0, 1, &[]),
                    eventfds(1),
                ),
                Reply(9, EMFILE),
                OthersServed,
                send(unmap_all(10)),
                Reply(10, 0),
                RelayFdsAtMost(3),
                send_fds(map(11, IOVA, PAGE, 0), vec![unsealed(PAGE)]),
                Reply(11, 0),
                Sane(12),
            ]);
            steps
        }),
        // ---- Region info, read, write --------------------------------------------
        // Region indexes past the 9 PCI regions: EINVAL; argsz below the structure:
        // EINVAL.
        case("region_info_bad_index_and_argsz", Gpio, || {
            vec![
                send(region_info(1, 32, 9)),
                Reply(1, EINVAL),
                send(region_info(2, 32, u32::MAX)),
                Reply(2, EINVAL),
                send(region_info(3, 8, 2)),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // REGION_READ / WRITE of a region that does not exist: EINVAL.
        case("region_access_bad_index", Gpio, || {
            vec![
                send(region_read(1, 9, 0, 4)),
                Reply(1, EINVAL),
                send(region_read(2, u32::MAX, 0, 4)),
                Reply(2, EINVAL),
                send(region_write_raw(3, 42, 0, 1, &[1])),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // offset + count past 2^64: EINVAL (no wrap-around into the region).
        case("region_access_offset_plus_count_overflows", Gpio, || {
            vec![
                send(region_read(1, 2, u64::MAX - 1, 4)),
                Reply(1, EINVAL),
                send(region_write_raw(2, 2, u64::MAX, 2, &[1, 2])),
                Reply(2, EINVAL),
                Sane(3),
            ]
        }),
        // An access running past the end of the region (BAR 2 is 256 bytes): EINVAL.
        case("region_access_beyond_the_region", Gpio, || {
            vec![
                send(region_read(1, 2, 0xff, 2)),
                Reply(1, EINVAL),
                send(region_read(2, pci_region::CONFIG, 0x100, 4)),
                Reply(2, EINVAL),
                send(region_write_raw(3, 2, 0x100, 1, &[1])),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // A read above max_data_xfer_size (1 MiB) is refused by the relay (its reply
        // would not fit the tunnel): EINVAL. A write of more than that: EINVAL.
        case("region_access_above_max_data_xfer_size", Gpio, || {
            let big = vec![0u8; (1 << 20) + 1];
            vec![
                send(region_read(1, 2, 0, (1 << 20) + 1)),
                Reply(1, EINVAL),
                send(region_read(2, 2, 0, u32::MAX)),
                Reply(2, EINVAL),
                send(region_write_raw(3, 2, 0, big.len() as u32, &big)),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // REGION_WRITE whose count disagrees with the data that follows: EINVAL.
        case("region_write_count_mismatch", Gpio, || {
            vec![
                send(region_write_raw(1, 2, 0, 8, &[1, 2, 3, 4])),
                Reply(1, EINVAL),
                send(region_write_raw(2, 2, 0, 1, &[1, 2])),
                Reply(2, EINVAL),
                send(region_write_raw(3, 2, 0, u32::MAX, &[1])),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // DEVICE_GET_INFO with a short argsz: EINVAL.
        case("device_get_info_bad_argsz", Gpio, || {
            vec![send(device_get_info(1, 4)), Reply(1, EINVAL), Sane(2)]
        }),
        // ---- Interrupts ----------------------------------------------------------
        // IRQ indexes past the 5 PCI ones, for GET_IRQ_INFO and SET_IRQS, and
        // GET_IRQ_INFO with a short argsz: EINVAL.
        case("irq_bad_index", Dma, || {
            vec![
                send(irq_info(1, 5)),
                Reply(1, EINVAL),
                send(irq_info(2, u32::MAX)),
                Reply(2, EINVAL),
                send(cmd(
                    20,
                    Command::DeviceGetIrqInfo,
                    &info_payload(8, pci_irq::MSIX, 16),
                )),
                Reply(20, EINVAL),
                send(set_irqs(3, DATA_NONE | ACTION_TRIGGER, 9, 0, 1, &[])),
                Reply(3, EINVAL),
                send_fds(
                    set_irqs(4, DATA_EVENTFD | ACTION_TRIGGER, 77, 0, 1, &[]),
                    eventfds(1),
                ),
                Reply(4, EINVAL),
                Sane(5),
            ]
        }),
        // start + count past 2^32, or past the vectors the index has (MSI-X has 2):
        // EINVAL; the eventfds that came along are closed.
        case("set_irqs_start_plus_count_out_of_range", Dma, || {
            vec![
                send(set_irqs(
                    1,
                    DATA_NONE | ACTION_TRIGGER,
                    pci_irq::MSIX,
                    u32::MAX,
                    2,
                    &[],
                )),
                Reply(1, EINVAL),
                send_fds(
                    set_irqs(2, DATA_EVENTFD | ACTION_TRIGGER, pci_irq::MSIX, 1, 2, &[]),
                    eventfds(2),
                ),
                Reply(2, EINVAL),
                send_fds(
                    set_irqs(3, DATA_EVENTFD | ACTION_TRIGGER, pci_irq::MSIX, 0, 3, &[]),
                    eventfds(3),
                ),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // Two actions, two data types, no data type, unknown flag bits, count 0
        // other than "disable all": EINVAL.
        case("set_irqs_bad_action_and_data_flags", Dma, || {
            let x = pci_irq::MSIX;
            vec![
                send(set_irqs(
                    1,
                    DATA_NONE | ACTION_MASK | ACTION_TRIGGER,
                    x,
                    0,
                    1,
                    &[],
                )),
                Reply(1, EINVAL),
                send(set_irqs(
                    2,
                    DATA_NONE | DATA_BOOL | ACTION_TRIGGER,
                    x,
                    0,
                    1,
                    &[1],
                )),
                Reply(2, EINVAL),
                send(set_irqs(3, ACTION_UNMASK, x, 0, 1, &[])),
                Reply(3, EINVAL),
                send(set_irqs(4, DATA_NONE, x, 0, 1, &[])),
                Reply(4, EINVAL),
                send(set_irqs(
                    5,
                    DATA_NONE | ACTION_TRIGGER | 1 << 6,
                    x,
                    0,
                    1,
                    &[],
                )),
                Reply(5, EINVAL),
                send(set_irqs(6, DATA_BOOL | ACTION_TRIGGER, x, 0, 0, &[])),
                Reply(6, EINVAL),
                Sane(7),
            ]
        }),
        // DATA_BOOL with fewer bytes than count, or more: EINVAL.
        case("set_irqs_bool_length_mismatch", Dma, || {
            let x = pci_irq::MSIX;
            vec![
                send(set_irqs(1, DATA_BOOL | ACTION_TRIGGER, x, 0, 2, &[1])),
                Reply(1, EINVAL),
                send(set_irqs(2, DATA_BOOL | ACTION_TRIGGER, x, 0, 1, &[1, 1, 1])),
                Reply(2, EINVAL),
                send(set_irqs(
                    3,
                    DATA_BOOL | ACTION_TRIGGER,
                    x,
                    0,
                    u32::MAX,
                    &[1],
                )),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // DATA_EVENTFD with more fds than count, fewer, or fds with DATA_NONE:
        // EINVAL; every fd closed.
        case("set_irqs_fd_count_mismatch", Dma, || {
            let x = pci_irq::MSIX;
            vec![
                send_fds(
                    set_irqs(1, DATA_EVENTFD | ACTION_TRIGGER, x, 0, 1, &[]),
                    eventfds(2),
                ),
                Reply(1, EINVAL),
                send_fds(
                    set_irqs(2, DATA_EVENTFD | ACTION_TRIGGER, x, 0, 2, &[]),
                    eventfds(1),
                ),
                Reply(2, EINVAL),
                send_fds(
                    set_irqs(3, DATA_NONE | ACTION_TRIGGER, x, 0, 1, &[]),
                    eventfds(1),
                ),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // Interrupt fds that are not eventfds (a memfd, a pipe, a socket): EINVAL.
        case("set_irqs_non_eventfd", Dma, || {
            let x = pci_irq::MSIX;
            let (r, _w) = pipe();
            let (s, _t) = UnixStream::pair().unwrap();
            let flags = DATA_EVENTFD | ACTION_TRIGGER;
            vec![
                send_fds(set_irqs(1, flags, x, 0, 1, &[]), vec![sealed(PAGE)]),
                Reply(1, EINVAL),
                send_fds(set_irqs(2, flags, x, 0, 1, &[]), vec![r]),
                Reply(2, EINVAL),
                send_fds(
                    set_irqs(3, flags, x, 0, 2, &[]),
                    vec![eventfd(), OwnedFd::from(s)],
                ),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // More fds than max_msg_fds (16) on one message: E2BIG, all closed, and the
        // same when the 20 fds are spread over the header and the payload.
        case("more_fds_than_max_msg_fds", Dma, || {
            let m = set_irqs(1, DATA_EVENTFD | ACTION_TRIGGER, pci_irq::MSIX, 0, 20, &[]);
            let m2 = set_irqs(2, DATA_EVENTFD | ACTION_TRIGGER, pci_irq::MSIX, 0, 20, &[]);
            vec![
                send_fds(m, eventfds(20)),
                Reply(1, E2BIG),
                send_fds(m2[..16].to_vec(), eventfds(10)),
                send_fds(m2[16..].to_vec(), eventfds(10)),
                Reply(2, E2BIG),
                Sane(3),
            ]
        }),
        // ---- fds where none belong -----------------------------------------------
        // fds on REGION_READ, DEVICE_GET_INFO, DEVICE_RESET: EINVAL, fds closed.
        case("fds_on_messages_that_take_none", Gpio, || {
            vec![
                send_fds(region_read(1, pci_region::CONFIG, 0, 4), vec![eventfd()]),
                Reply(1, EINVAL),
                send_fds(device_get_info(2, 16), vec![sealed(PAGE), eventfd()]),
                Reply(2, EINVAL),
                send_fds(cmd(3, Command::DeviceReset, &[]), vec![sealed(PAGE)]),
                Reply(3, EINVAL),
                Sane(4),
            ]
        }),
        // fds on a message the relay skips for its size: E2BIG, the fds closed.
        case("fds_on_an_oversized_message", Gpio, || {
            let mut m = header(1, Command::DmaMap as u16, MAX_MSG + 4096, 0);
            m.resize(MAX_MSG as usize + 4096, 0);
            vec![send_fds(m, eventfds(3)), Reply(1, E2BIG), Sane(2)]
        }),
        // DEVICE_RESET with a payload: EINVAL (it has none), in sync.
        case("device_reset_with_payload", Gpio, || {
            vec![
                send(cmd(1, Command::DeviceReset, &[0; 8])),
                Reply(1, EINVAL),
                Sane(2),
            ]
        }),
        // ---- Server-to-client messages -------------------------------------------
        // DMA_READ / DMA_WRITE replies nobody asked for (plain, with ERROR, for a
        // client command): a reply cannot be answered, so they are dropped without
        // an answer, and the stream stays in sync.
        case("dma_replies_never_asked_for", Dma, || {
            let mut read_reply = Vec::new();
            put64(&mut read_reply, IOVA);
            put64(&mut read_reply, 4);
            read_reply.extend_from_slice(&[1, 2, 3, 4]);
            vec![
                send(framed(1, Command::DmaRead as u16, F_REPLY, &read_reply)),
                send(framed(2, Command::DmaWrite as u16, F_REPLY | F_ERROR, &[])),
                send(framed(3, Command::RegionRead as u16, F_REPLY, &[0; 20])),
                send(framed(4, Command::DmaRead as u16, F_REPLY, &[0; 3])),
                Quiet,
                Sane(5),
            ]
        }),
        // The client sending DMA_READ / DMA_WRITE as commands (server to client
        // only): EINVAL.
        case("server_to_client_commands_from_the_client", Dma, || {
            let mut p = Vec::new();
            put64(&mut p, IOVA);
            put64(&mut p, 4);
            let mut w = p.clone();
            w.extend_from_slice(&[0; 4]);
            vec![
                send(cmd(1, Command::DmaRead, &p)),
                Reply(1, EINVAL),
                send(cmd(2, Command::DmaWrite, &w)),
                Reply(2, EINVAL),
                Sane(3),
            ]
        }),
        // ---- Partial messages ----------------------------------------------------
        // Half a header, then silence: nothing is answered, the other devices are
        // served meanwhile, and the relay drops the connection when it goes (the
        // runner's fresh client and fd count).
        case("half_a_header_then_silence", Gpio, || {
            vec![
                send(region_read(1, pci_region::CONFIG, 0, 4)[..7].to_vec()),
                Quiet,
                OthersServed,
            ]
        }),
        // A header announcing a payload that never comes.
        case("header_only_then_silence", Gpio, || {
            vec![
                send(region_read(1, pci_region::CONFIG, 0, 4)[..16].to_vec()),
                Quiet,
                OthersServed,
            ]
        }),
        // Half a payload (of a 1 MiB write the relay allocated for), then silence.
        case("half_a_payload_then_silence", Gpio, || {
            let m = region_write_raw(1, 2, 0, 1 << 20, &vec![0; 1 << 20]);
            vec![send(m[..(1 << 19)].to_vec()), Quiet, OthersServed]
        }),
        // Half a DMA_MAP with its fd, then silence: the fd is held only until the
        // connection goes (the runner's fd count).
        case("half_a_dma_map_with_its_fd_then_silence", Dma, || {
            vec![
                send_fds(map(1, IOVA, PAGE, 0)[..20].to_vec(), vec![sealed(PAGE)]),
                Quiet,
                OthersServed,
            ]
        }),
        // A request delivered one byte at a time is reassembled and answered.
        case("request_one_byte_at_a_time", Gpio, || {
            vec![
                Trickle(region_read(1, pci_region::CONFIG, 0, 4)),
                ReplyWith(1, |p| expect_bytes(p, 16, &Target::Gpio.ids())),
            ]
        }),
        // ---- Pipelining ----------------------------------------------------------
        // 3000 posted BAR writes each followed by a read, all sent before reading a
        // reply (beyond the 1024 requests the relay keeps in flight): the 3000 reads
        // are answered in order, each with the value written just before it.
        case("pipelined_faster_than_the_device_answers", Gpio, || {
            let n = 3000u32;
            let mut bytes = Vec::new();
            for i in 0..n {
                let v = (i % 251) as u8;
                bytes.extend(framed(0xffff, Command::RegionWrite as u16, F_NO_REPLY, &{
                    let mut p = access_payload(0, 2, 1);
                    p.push(v);
                    p
                }));
                bytes.extend(region_read(id(i), 2, 0, 1));
            }
            let mut steps = vec![send(bytes)];
            steps.extend((0..n).map(|i| Reply(id(i), 0)));
            steps.push(Sane(7));
            steps
        }),
        // 400 copies of 256 KiB each (DMA through windows onto the client's memfd),
        // pipelined to a device that takes far longer to run them than the client to
        // send them: while they run, the other devices are served; then every START
        // is answered, in order, and the last copy is right.
        case("pipelined_behind_slow_device_operations", Dma, || {
            let mem = File::from(sealed(2 << 20));
            mem.write_all_at(&[0xc3; 256 << 10], 0).unwrap();
            let n = 400u32;
            let mut steps = vec![
                send_fds(
                    map(1, SRC, 1 << 20, 0),
                    vec![OwnedFd::from(mem.try_clone().unwrap())],
                ),
                Reply(1, 0),
                send_fds(
                    map(2, DST, 1 << 20, 1 << 20),
                    vec![OwnedFd::from(mem.try_clone().unwrap())],
                ),
                Reply(2, 0),
            ];
            steps.extend(start_copy(10, SRC, DST, DST + (512 << 10), 256 << 10));
            let mut bytes = Vec::new();
            for i in 0..n {
                bytes.extend(reg_write(id(100 + i), 0x24, 1, 4));
            }
            steps.extend([send(bytes), OthersServed, Reply(14, 0)]);
            steps.extend((0..n).map(|i| Reply(id(100 + i), 0)));
            steps.extend([
                send(read_status(15)),
                ReplyWith(15, |p| expect_bytes(p, 16, &[1, 0, 0, 0])),
                Do(Box::new(move || {
                    let mut got = vec![0u8; 256 << 10];
                    mem.read_exact_at(&mut got, 1 << 20).unwrap();
                    if got.iter().all(|&b| b == 0xc3) {
                        Ok(())
                    } else {
                        Err("the destination does not hold the source".into())
                    }
                })),
                Sane(16),
            ]);
            steps
        }),
        // Requests pipelined and then the client hangs up without reading a single
        // reply: the relay drops what was in flight (the runner's checks).
        case("pipelined_then_gone", Gpio, || {
            let mut bytes = Vec::new();
            for i in 0..2000u32 {
                bytes.extend(region_read(id(i), pci_region::CONFIG, 0, 256));
            }
            vec![send(bytes)]
        }),
        // ---- More commands -------------------------------------------------------
        // REGION_WRITE_MULTI with no writes, a count that disagrees with the entries,
        // an entry wider than 8 bytes, or 2^61 writes announced: EINVAL.
        case("region_write_multi_malformed", Gpio, || {
            let entry = |count: u32| {
                let mut e = access_payload(0, 2, count);
                e.extend_from_slice(&[0; 8]);
                e
            };
            let multi = |id, wr_cnt: u64, entries: &[Vec<u8>]| {
                let mut p = Vec::new();
                put64(&mut p, wr_cnt);
                for e in entries {
                    p.extend_from_slice(e);
                }
                cmd(id, Command::RegionWriteMulti, &p)
            };
            vec![
                send(multi(1, 0, &[])),
                Reply(1, EINVAL),
                send(multi(2, 2, &[entry(1)])),
                Reply(2, EINVAL),
                send(multi(3, 1, &[entry(9)])),
                Reply(3, EINVAL),
                send(multi(4, 1 << 61, &[entry(1)])),
                Reply(4, EINVAL),
                Sane(5),
            ]
        }),
        // DEVICE_FEATURE with GET and SET but not PROBE, unknown flag bits, a short
        // argsz; a DMA_LOGGING_REPORT whose bitmap could not cross the tunnel (E2BIG,
        // refused by the relay); MIG_DATA_READ above max_data_xfer_size or with an
        // argsz too small for its size, and a MIG_DATA_WRITE whose size disagrees with
        // its data: EINVAL.
        case("device_feature_and_migration_malformed", Dma, || {
            let feature = |id, argsz: u32, flags: u32, data: &[u8]| {
                let mut p = Vec::new();
                put32(&mut p, argsz);
                put32(&mut p, flags);
                p.extend_from_slice(data);
                cmd(id, Command::DeviceFeature, &p)
            };
            let report = vfu_proto::vfio_user::DeviceFeature::logging_report(0, 1 << 40, 4096);
            let mut mig_read = Vec::new();
            put32(&mut mig_read, 8 + (2 << 20));
            put32(&mut mig_read, 2 << 20);
            let mut mig_write = Vec::new();
            put32(&mut mig_write, 8 + 16);
            put32(&mut mig_write, 16);
            mig_write.extend_from_slice(&[0; 8]);
            vec![
                send(feature(1, 8, 1 | 3 << 16, &[])),
                Reply(1, EINVAL),
                send(feature(2, 8, 1 | 1 << 20, &[])),
                Reply(2, EINVAL),
                send(feature(3, 4, 1 | 1 << 16, &[])),
                Reply(3, EINVAL),
                send(encode_request(4, &Request::DeviceFeature(report), false)),
                Reply(4, E2BIG),
                send(cmd(5, Command::MigDataRead, &mig_read)),
                Reply(5, EINVAL),
                send(cmd(6, Command::MigDataWrite, &mig_write)),
                Reply(6, EINVAL),
                send(cmd(60, Command::MigDataRead, &{
                    let mut p = Vec::new();
                    put32(&mut p, 8);
                    put32(&mut p, 16);
                    p
                })),
                Reply(60, EINVAL),
                Sane(7),
            ]
        }),
        // GET_REGION_IO_FDS of a region that does not exist, or with a short argsz:
        // EINVAL.
        case("region_io_fds_bad_index_and_argsz", Gpio, || {
            vec![
                send(cmd(
                    1,
                    Command::DeviceGetRegionIoFds,
                    &info_payload(16, 9, 16),
                )),
                Reply(1, EINVAL),
                send(cmd(
                    2,
                    Command::DeviceGetRegionIoFds,
                    &info_payload(4, 2, 16),
                )),
                Reply(2, EINVAL),
                Sane(3),
            ]
        }),
        // 300 requests pipelined under one message ID (IDs are the client's, reuse is
        // legal): 300 answers, in order, each right.
        case("one_message_id_reused_by_pipelined_requests", Gpio, || {
            let mut bytes = Vec::new();
            for _ in 0..300 {
                bytes.extend(region_read(5, pci_region::CONFIG, 0, 4));
            }
            let mut steps = vec![send(bytes)];
            steps.extend((0..300).map(|_| ReplyWith(5, |p| expect_bytes(p, 16, &Gpio.ids()))));
            steps
        }),
        // A memfd sealed against writes mapped writable: the relay cannot map it
        // writable; the map is either refused or served without a writable mapping,
        // never a crash (the runner's checks), and the region unmaps.
        case("dma_map_write_sealed_memfd", Dma, || {
            let f = memfd(PAGE);
            // SAFETY: F_ADD_SEALS on a memfd we own.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
            assert_eq!(r, 0);
            vec![
                send_fds(map(1, IOVA, PAGE, 0), vec![OwnedFd::from(f)]),
                ReplyWith(1, |_| Ok(())),
                send(unmap(2, IOVA, PAGE)),
                Reply(2, 0),
                Sane(3),
            ]
        }),
        // Memory the client truncates after mapping it (an unsealed memfd): the
        // device's DMA fails with EFAULT (STATUS: ERROR, errno 14), the relay does not
        // fault.
        case("dma_memory_truncated_after_map", Dma, || {
            let f = File::from(unsealed(4 * PAGE));
            let g = f.try_clone().unwrap();
            let mut steps = vec![
                send_fds(
                    map(1, SRC, 2 * PAGE, 0),
                    vec![OwnedFd::from(f.try_clone().unwrap())],
                ),
                Reply(1, 0),
                send_fds(map(2, DST, 2 * PAGE, 2 * PAGE), vec![OwnedFd::from(f)]),
                Reply(2, 0),
                Do(Box::new(move || g.set_len(0).map_err(|e| e.to_string()))),
            ];
            steps.extend(start_copy(10, SRC, DST, DST + PAGE, 64));
            steps.extend([
                Reply(14, 0),
                send(read_status(15)),
                ReplyWith(15, status_efault),
                Sane(16),
            ]);
            steps
        }),
        // ---- The device's DMA to a client that mapped without fds ----------------
        // The client answers the relay's DMA_READ with fewer bytes than asked: the
        // device's read fails (EFAULT), the destination is not written, only the
        // completion record is; the relay and the client's connection carry on.
        case("remote_dma_read_answered_short", Dma, || {
            remote_dma_case(
                answer_read_short,
                vec![AnswerDma(answer_completion_only), Reply(14, 0)],
                status_efault,
            )
        }),
        // ... with data for another address: EFAULT likewise.
        case("remote_dma_read_answered_for_another_address", Dma, || {
            remote_dma_case(
                answer_read_elsewhere,
                vec![AnswerDma(answer_completion_only), Reply(14, 0)],
                status_efault,
            )
        }),
        // ... with an error reply: EFAULT.
        case("remote_dma_read_answered_with_an_error", Dma, || {
            remote_dma_case(
                answer_error,
                vec![AnswerDma(answer_completion_only), Reply(14, 0)],
                status_efault,
            )
        }),
        // The read is answered right but the write of the destination is refused:
        // EFAULT.
        case("remote_dma_write_answered_with_an_error", Dma, || {
            remote_dma_case(
                answer_read_ok,
                vec![
                    AnswerDma(answer_error),
                    AnswerDma(answer_write_ok),
                    Reply(14, 0),
                ],
                status_efault,
            )
        }),
        // The read is answered twice (and a stray reply follows): the duplicate is
        // dropped, the operation succeeds (STATUS: DONE).
        case("remote_dma_read_answered_twice", Dma, || {
            remote_dma_case(
                answer_read_twice,
                vec![
                    AnswerDma(answer_write_ok),
                    AnswerDma(answer_write_ok),
                    Reply(14, 0),
                ],
                |p| expect_bytes(p, 16, &[1, 0, 0, 0]),
            )
        }),
        // The read is never answered: the relay gives up after its request timeout
        // (3 s) and fails the device's read; the client's START write, which waited
        // for the device, gets ETIMEDOUT itself; STATUS then says ERROR.
        case("remote_dma_read_never_answered", Dma, || {
            remote_dma_case(
                |_, _, _| Ok(None),
                vec![ReplyAnswering(
                    14,
                    libc::ETIMEDOUT as u32,
                    answer_completion_only,
                    None,
                )],
                status_error,
            )
        }),
        // The client goes away while the device waits for its DMA_READ answer: the
        // relay fails the device's read and drops the client (the runner's checks).
        case("remote_dma_client_gone_mid_read", Dma, || {
            let mut steps = remote_dma_setup();
            steps.extend(start_copy(10, SRC, DST, DST + PAGE, 64));
            steps.push(AnswerDma(|_, _, _| Ok(None)));
            steps
        }),
    ]
}

/// Client memory for the remote-DMA cases (mapped without fds): the source and the
/// destination (the completion record in its second page).
const SRC: u64 = 0x10_0000;
const DST: u64 = 0x20_0000;
const COMPLETION: u64 = DST + PAGE;

fn reg_write(id: u16, off: u64, value: u64, width: usize) -> Vec<u8> {
    region_write_raw(id, 0, off, width as u32, &value.to_le_bytes()[..width])
}

fn read_status(id: u16) -> Vec<u8> {
    region_read(id, 0, 0x28, 4)
}

/// Programs a dma-engine copy with messages `first ..= first + 3` (answered) and
/// sends START as `first + 4` (its reply is the caller's to await).
fn start_copy(first: u16, src: u64, dst: u64, completion: u64, len: u64) -> Vec<Step> {
    let mut steps = Vec::new();
    for (i, (off, v, w)) in [
        (0x08, src, 8),
        (0x10, dst, 8),
        (0x18, completion, 8),
        (0x20, len, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let id = first + i as u16;
        steps.push(send(reg_write(id, off, v, w)));
        steps.push(Reply(id, 0));
    }
    steps.push(send(reg_write(first + 4, 0x24, 1, 4)));
    steps
}

/// Maps SRC (read-only) and DST (read-write) without fds.
fn remote_dma_setup() -> Vec<Step> {
    vec![
        send(cmd(1, Command::DmaMap, &map_payload(32, 1, 0, SRC, PAGE))),
        Reply(1, 0),
        send(cmd(
            2,
            Command::DmaMap,
            &map_payload(32, 3, 0, DST, 2 * PAGE),
        )),
        Reply(2, 0),
    ]
}

/// A 16-byte copy from SRC to DST whose DMA_READ is answered with `read`, then
/// `then` (the rest of the DMA and START's reply, message 14), then STATUS checked.
fn remote_dma_case(read: Answer, then: Vec<Step>, status: PayloadCheck) -> Vec<Step> {
    let mut steps = remote_dma_setup();
    steps.extend(start_copy(10, SRC, DST, COMPLETION, 16));
    steps.push(AnswerDma(read));
    steps.extend(then);
    steps.push(send(read_status(15)));
    steps.push(ReplyAnswering(15, 0, answer_completion_only, Some(status)));
    steps.push(Sane(16));
    steps
}

/// STATUS: ERROR, whatever the errno.
fn status_error(p: &[u8]) -> Result<(), String> {
    match p.get(16) {
        Some(2) => Ok(()),
        _ => Err(format!("STATUS {p:02x?}: expected ERROR")),
    }
}

/// STATUS: ERROR with errno EFAULT.
fn status_efault(p: &[u8]) -> Result<(), String> {
    expect_bytes(p, 16, &[2, 0, libc::EFAULT as u8, 0])
}

/// The address and count of a DMA_READ / DMA_WRITE the relay sent (u64 count).
fn dma_args(command: u16, want: Command, p: &[u8]) -> Result<(u64, u64), String> {
    if command != want as u16 || p.len() < 16 {
        return Err(format!(
            "expected {}, got command {command} ({} bytes)",
            want.name(),
            p.len()
        ));
    }
    let a = u64::from_le_bytes(p[..8].try_into().unwrap());
    let n = u64::from_le_bytes(p[8..16].try_into().unwrap());
    Ok((a, n))
}

fn dma_read_reply(id: u16, address: u64, count: u64, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    put64(&mut p, address);
    put64(&mut p, count);
    p.extend_from_slice(data);
    framed(id, Command::DmaRead as u16, F_REPLY, &p)
}

fn answer_read_ok(id: u16, command: u16, p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let (a, n) = dma_args(command, Command::DmaRead, p)?;
    Ok(Some(dma_read_reply(id, a, n, &vec![0x5a; n as usize])))
}

fn answer_read_twice(id: u16, command: u16, p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut once = answer_read_ok(id, command, p)?.unwrap();
    let again = once.clone();
    once.extend(again);
    once.extend(dma_read_reply(id.wrapping_add(100), SRC, 4, &[0; 4]));
    Ok(Some(once))
}

fn answer_read_short(id: u16, command: u16, p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let (a, n) = dma_args(command, Command::DmaRead, p)?;
    Ok(Some(dma_read_reply(id, a, n, &vec![0x5a; n as usize - 1])))
}

fn answer_read_elsewhere(id: u16, command: u16, p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let (a, n) = dma_args(command, Command::DmaRead, p)?;
    Ok(Some(dma_read_reply(
        id,
        a + PAGE,
        n,
        &vec![0x5a; n as usize],
    )))
}

fn answer_error(id: u16, command: u16, _p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut h = header(id, command, 16, F_REPLY | F_ERROR);
    h[12..16].copy_from_slice(&(libc::EIO as u32).to_le_bytes());
    Ok(Some(h))
}

fn answer_write_ok(id: u16, command: u16, p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let (a, n) = dma_args(command, Command::DmaWrite, p)?;
    let mut r = Vec::new();
    put64(&mut r, a);
    put64(&mut r, n);
    Ok(Some(framed(id, command, F_REPLY, &r)))
}

/// Only the completion record may be written after a failed read.
fn answer_completion_only(id: u16, command: u16, p: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let (a, n) = dma_args(command, Command::DmaWrite, p)?;
    if a != COMPLETION || n != 16 {
        return Err(format!(
            "the device wrote {n} bytes at {a:#x} after its read failed"
        ));
    }
    answer_write_ok(id, command, p)
}

/// Message IDs for floods: 1, 2, ... wrapping, 0 skipped (the runner's VERSION).
fn id(i: u32) -> u16 {
    (i % 65535 + 1) as u16
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe(2) writes two new fds.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new and owned here.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// A read-write regular file of 4 KiB in `dir`, unlinked.
fn file_in(dir: &std::path::Path, what: &str) -> OwnedFd {
    let path = dir.join(format!("vfu-hostile-{what}-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; PAGE as usize]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    OwnedFd::from(f)
}

/// A file of the build directory's file system, if that is not tmpfs (`None` then:
/// there is no disk file system at hand).
fn disk_file() -> Option<OwnedFd> {
    let fd = file_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), "disk");
    (!vfu_proto::mem::is_memory_file(std::os::fd::AsFd::as_fd(&fd))).then_some(fd)
}

/// A file in /dev/shm (tmpfs).
fn shm_file() -> OwnedFd {
    file_in(std::path::Path::new("/dev/shm"), "shm")
}

/// A regular file of 4 KiB opened O_APPEND (pwrite would ignore the offset).
fn append_file() -> OwnedFd {
    let path = std::env::temp_dir().join(format!("vfu-hostile-append-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; PAGE as usize]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    OwnedFd::from(f)
}

fn expect_bytes(p: &[u8], at: usize, want: &[u8]) -> Result<(), String> {
    match p.get(at..at + want.len()) {
        Some(got) if got == want && p.len() == at + want.len() => Ok(()),
        _ => Err(format!("payload {p:02x?}, expected {want:02x?} at {at}")),
    }
}

/// A VERSION reply within the relay's limits: 16 fds, at most 1 MiB transfers, 4 KiB
/// pages, at most 65535 maps, no twin socket, migration bitmaps at most 1 MiB.
fn check_bounded_caps(p: &[u8]) -> Result<(), String> {
    if p.len() < 4 || p[..4] != [0, 0, 0, 0] {
        return Err(format!("version {:02x?}", &p[..p.len().min(4)]));
    }
    let text = p[4..].strip_suffix(&[0]).unwrap_or(&p[4..]);
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let c = &v["capabilities"];
    let ok = c["max_msg_fds"] == 16
        && c["max_data_xfer_size"]
            .as_u64()
            .is_some_and(|m| (4096..=1 << 20).contains(&m))
        && c["pgsizes"] == 4096
        && c["max_dma_maps"].as_u64().is_some_and(|m| m <= 65535)
        && c.get("twin_socket").is_none()
        && c["migration"]["max_bitmap_size"]
            .as_u64()
            .is_none_or(|m| m <= 1 << 20);
    if ok {
        Ok(())
    } else {
        Err(format!("capabilities not bounded: {c}"))
    }
}

// ---------------------------------------------------------------------------------
// A raw connection.

struct Conn {
    sock: UnixStream,
    buf: Vec<u8>,
}

/// What came next on a connection.
#[derive(Debug)]
enum Next {
    /// A message: id, command, flags, error, payload.
    Msg {
        id: u16,
        command: u16,
        flags: u32,
        error: u32,
        payload: Vec<u8>,
    },
    /// EOF or reset.
    Closed,
    /// Nothing within the wait.
    Nothing,
}

impl Conn {
    fn connect(path: &Path) -> std::io::Result<Self> {
        let sock = UnixStream::connect(path)?;
        Ok(Self {
            sock,
            buf: Vec::new(),
        })
    }

    /// One sendmsg of `bytes` with `fds`; the rest of the bytes (if the kernel took
    /// fewer) without fds.
    fn send(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), String> {
        let mut at = 0;
        let mut first = true;
        while at < bytes.len() || first {
            let fd_part: &[RawFd] = if first { fds } else { &[] };
            let n = self
                .sock
                .send_with_fds(&[&bytes[at..]], fd_part)
                .map_err(|e| format!("sendmsg: {e}"))?;
            at += n;
            first = false;
        }
        Ok(())
    }

    /// Reads until `n` bytes are buffered; false on EOF (Err on reset counts as EOF),
    /// `None` on timeout.
    fn fill(&mut self, n: usize, deadline: Instant) -> Option<bool> {
        let mut chunk = [0u8; 65536];
        while self.buf.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.sock.read(&mut chunk) {
                Ok(0) => return Some(false),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Some(false),
            }
        }
        Some(true)
    }

    fn next(&mut self, wait: Duration) -> Next {
        let deadline = Instant::now() + wait;
        match self.fill(16, deadline) {
            None => return Next::Nothing,
            Some(false) => return Next::Closed,
            Some(true) => {}
        }
        let b = &self.buf;
        let id = u16::from_le_bytes([b[0], b[1]]);
        let command = u16::from_le_bytes([b[2], b[3]]);
        let size = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let flags = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let error = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let size = size.max(16);
        match self.fill(size, deadline) {
            None => return Next::Nothing,
            Some(false) => return Next::Closed,
            Some(true) => {}
        }
        let payload = self.buf[16..size].to_vec();
        self.buf.drain(..size);
        Next::Msg {
            id,
            command,
            flags,
            error,
            payload,
        }
    }

    /// The next message must be the reply to `id`; returns its payload.
    fn reply(&mut self, id: u16, errno: u32) -> Result<Vec<u8>, String> {
        match self.next(WAIT) {
            Next::Msg {
                id: got,
                command,
                flags,
                error,
                payload,
            } => {
                let is_reply = flags & 0xf == F_REPLY;
                let got_errno = if flags & F_ERROR != 0 { error } else { 0 };
                if !is_reply || got != id || got_errno != errno {
                    return Err(format!(
                        "expected the reply to message {id} with errno {errno}; got message {got} (command {command}, flags {flags:#x}, errno {got_errno})"
                    ));
                }
                Ok(payload)
            }
            Next::Closed => Err(format!(
                "expected the reply to message {id} (errno {errno}); the relay closed the connection"
            )),
            Next::Nothing => Err(format!(
                "expected the reply to message {id} (errno {errno}); nothing within {WAIT:?}"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------
// The relay and the long-lived client.

/// Waits until the relay holds `want` fds, those it held before the case.
fn settle_fds(pid: u32, want: usize, wait: Duration) -> Result<(), String> {
    procfs::settle_fds(pid, want, wait)
        .map_err(|n| format!("the relay holds {n} fds, {want} before the case"))
}

/// A vfu-proto client that negotiated VERSION, retrying until the device serves it.
fn served(socket: &Path, wait: Duration) -> Result<Client, String> {
    try_connect_served(socket, WAIT, wait)
}

/// A fresh, well-behaved client of `target`: config space IDs, a DMA map and unmap.
fn fresh_client(socket: &Path, target: Target) -> Result<(), String> {
    let mut c = served(socket, Duration::from_secs(10))?;
    let ids = c
        .region_read(pci_region::CONFIG, 0, 4)
        .map_err(|e| format!("fresh client, config read: {e}"))?;
    if ids != target.ids() {
        return Err(format!("fresh client read IDs {ids:02x?}"));
    }
    let fd = sealed(2 * PAGE);
    c.request(
        &Request::DmaMap(DmaMap {
            read: true,
            write: true,
            offset: 0,
            address: IOVA,
            size: 2 * PAGE,
        }),
        vec![fd],
    )
    .map_err(|e| format!("fresh client, DMA_MAP: {e}"))?;
    c.request(&Request::DmaUnmap(DmaUnmap::region(IOVA, 2 * PAGE)), vec![])
        .map_err(|e| format!("fresh client, DMA_UNMAP: {e}"))?;
    Ok(())
}

struct Env {
    relay: Proc,
    _guest: Proc,
    gpio0: PathBuf,
    dma0: PathBuf,
    live: Neighbour,
    baseline: usize,
    baseline_maps: usize,
    _scratch: Scratch,
}

impl Env {
    fn start(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let frontend = scratch.join("frontend.sock");
        let gpio0 = scratch.join("gpio0.sock");
        let dma0 = scratch.join("dma0.sock");
        let dma1 = scratch.join("dma1.sock");
        let relay = start_relay(
            &frontend,
            &[("gpio0", &gpio0), ("dma0", &dma0), ("dma1", &dma1)],
        );
        assert!(wait_for_socket(&dma1, SETUP), "relay sockets");
        let guest = start_loopback_guest(
            &frontend,
            &[
                ("gpio0", "gpio"),
                ("dma0", "dma-engine"),
                ("dma1", "dma-engine"),
            ],
        );
        for p in [&gpio0, &dma0] {
            drop(served(p, SETUP).expect("device served"));
        }
        let live = Neighbour::start(&dma1).expect("long-lived client");
        live.progress(3, SETUP).expect("long-lived client runs");
        let pid = relay.pid();
        // The fds of the relay with only the long-lived client connected.
        std::thread::sleep(Duration::from_millis(200));
        let baseline = fd_count(pid);
        let baseline_maps = map_count(pid);
        Self {
            relay,
            _guest: guest,
            gpio0,
            dma0,
            live,
            baseline,
            baseline_maps,
            _scratch: scratch,
        }
    }

    fn socket(&self, t: Target) -> &Path {
        match t {
            Target::Gpio => &self.gpio0,
            Target::Dma => &self.dma0,
        }
    }

    fn other(t: Target) -> Target {
        match t {
            Target::Gpio => Target::Dma,
            Target::Dma => Target::Gpio,
        }
    }

    /// The shared check after (and during) a case.
    fn check(&mut self, target: Target) -> Result<(), String> {
        if let Some(status) = self.relay.exited() {
            return Err(format!("the relay exited ({status:?})"));
        }
        self.live.progress(1, WAIT)?;
        fresh_client(self.socket(target), target)?;
        settle_fds(self.relay.pid(), self.baseline, WAIT)?;
        self.live.progress(1, WAIT)
    }

    fn run(&mut self, case: &Case) -> Result<(), String> {
        self.live.set_phase(case.name);
        let mut conn =
            Conn::connect(self.socket(case.target)).map_err(|e| format!("connect: {e}"))?;
        if case.versioned {
            conn.send(&version(0), &[])?;
            conn.reply(0, 0).map_err(|e| format!("VERSION: {e}"))?;
        }
        let start_ops = self.live.ops();
        for (n, step) in (case.steps)().into_iter().enumerate() {
            self.step(&mut conn, case, step)
                .map_err(|e| format!("step {n}: {e}"))?;
        }
        drop(conn);
        self.check(case.target)?;
        if self.live.ops() <= start_ops {
            return Err("the long-lived client made no progress during the case".into());
        }
        Ok(())
    }

    fn step(&mut self, conn: &mut Conn, case: &Case, step: Step) -> Result<(), String> {
        match step {
            Send(bytes, fds) => {
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                conn.send(&bytes, &raw)
            }
            Trickle(bytes) => {
                for b in bytes.chunks(1) {
                    conn.send(b, &[])?;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            }
            Reply(id, errno) => conn.reply(id, errno).map(|_| ()),
            ReplyWith(id, check) => check(&conn.reply(id, 0)?),
            Quiet => match conn.next(QUIET) {
                Next::Nothing => Ok(()),
                Next::Closed => Err("expected silence; the connection was closed".into()),
                Next::Msg { id, command, .. } => Err(format!(
                    "expected silence; got message {id} (command {command})"
                )),
            },
            Closed => loop {
                match conn.next(WAIT) {
                    Next::Closed => return Ok(()),
                    Next::Nothing => {
                        return Err(format!("expected the relay to close; open after {WAIT:?}"))
                    }
                    Next::Msg { flags, .. } if flags & F_ERROR != 0 => continue,
                    Next::Msg { id, command, .. } => {
                        return Err(format!(
                            "expected the relay to close; got message {id} (command {command})"
                        ))
                    }
                }
            },
            Sane(id) => {
                conn.send(&region_read(id, pci_region::CONFIG, 0, 4), &[])?;
                let p = conn.reply(id, 0)?;
                expect_bytes(&p, 16, &case.target.ids())
            }
            OthersServed => {
                self.live.progress(2, WAIT)?;
                let other = Self::other(case.target);
                fresh_client(self.socket(other), other)
            }
            AnswerDma(answer) => match conn.next(WAIT) {
                Next::Msg {
                    id,
                    command,
                    flags: 0,
                    payload,
                    ..
                } if command == Command::DmaRead as u16 || command == Command::DmaWrite as u16 => {
                    match answer(id, command, &payload)? {
                        Some(bytes) => conn.send(&bytes, &[]),
                        None => Ok(()),
                    }
                }
                other => Err(format!(
                    "expected a DMA command from the relay; got {other:?}"
                )),
            },
            ReplyAnswering(want, errno, answer, check) => loop {
                match conn.next(WAIT) {
                    Next::Msg {
                        id,
                        command,
                        flags: 0,
                        payload,
                        ..
                    } if command == Command::DmaRead as u16
                        || command == Command::DmaWrite as u16 =>
                    {
                        if let Some(bytes) = answer(id, command, &payload)? {
                            conn.send(&bytes, &[])?;
                        }
                    }
                    Next::Msg {
                        id,
                        flags,
                        error,
                        payload,
                        ..
                    } if flags & 0xf == F_REPLY && id == want => {
                        let got = if flags & F_ERROR != 0 { error } else { 0 };
                        if got != errno {
                            return Err(format!("reply to {want}: errno {got}, expected {errno}"));
                        }
                        return check.map_or(Ok(()), |check| check(&payload));
                    }
                    other => {
                        return Err(format!(
                            "expected the reply to {want} (errno {errno}); got {other:?}"
                        ))
                    }
                }
            },
            Do(f) => f(),
            SendLazy(make) => {
                let (bytes, fds) = make();
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                conn.send(&bytes, &raw)
            }
            RelayFdsAtMost(extra) => {
                let n = fd_count(self.relay.pid());
                if n > self.baseline + extra {
                    return Err(format!(
                        "the relay holds {n} fds, {} before the case (at most {extra} more expected)",
                        self.baseline
                    ));
                }
                Ok(())
            }
            RelayMapsAtMost(extra) => {
                let n = map_count(self.relay.pid());
                if n > self.baseline_maps + extra {
                    return Err(format!(
                        "the relay has {n} mappings, {} before the case (at most {extra} more expected)",
                        self.baseline_maps
                    ));
                }
                Ok(())
            }
            RelayVmSizeAtMost(max) => {
                let kib = status_kib(self.relay.pid(), "VmSize:");
                if kib * 1024 > max {
                    return Err(format!(
                        "the relay's address space is {} GiB (at most {} GiB expected)",
                        kib >> 20,
                        max >> 30
                    ));
                }
                Ok(())
            }
        }
    }
}

impl case_table::Case for Case {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// Every case of [`cases`], one after the other against one relay, each followed by
/// the shared check. Set `VFU_HOSTILE_CASE=name` to run one case.
#[test]
fn hostile_clients() {
    let mut env = Env::start("hostile");
    run_cases(
        "hostile-client",
        &cases(),
        30,
        &mut env,
        |env, case| env.run(case),
        |env| {
            if env.relay.exited().is_some() {
                return ControlFlow::Break(());
            }
            // Leave the next case a clean relay: wait for this one's leftovers.
            let _ = settle_fds(env.relay.pid(), env.baseline, WAIT);
            ControlFlow::Continue(())
        },
    );
}

// ---------------------------------------------------------------------------------
// Resources: no fd or memory growth.

/// How much the relay's resident memory may grow over a resource run, after a
/// warm-up of the same work: the allocator's caches and arenas settle (over the first
/// ~50k DMA cycles here: about 1 MiB), they do not grow with the work. A leak of 48
/// bytes per DMA cycle would be 4.6 MiB over 100k cycles.
const RSS_TOLERANCE_KIB: u64 = 4096;
/// How much it may grow over the second half of a run, once settled: a leak of 24
/// bytes per DMA cycle (or 200 per reconnect) would be more.
const RSS_SECOND_HALF_TOLERANCE_KIB: u64 = 1024;

/// Checks the three measurements of a resource run (after the warm-up, half way,
/// at the end): fds equal, resident memory within the tolerances.
fn check_growth(what: &str, m: [(usize, u64); 3]) {
    let [(f0, r0), (f1, r1), (f2, r2)] = m;
    eprintln!("{what}: relay fds {f0} -> {f1} -> {f2}, VmRSS {r0} -> {r1} -> {r2} KiB");
    assert!(f0 == f1 && f1 == f2, "{what}: the relay's fds grew");
    assert!(
        r2 <= r0 + RSS_TOLERANCE_KIB,
        "{what}: the relay's VmRSS grew from {r0} to {r2} KiB"
    );
    assert!(
        r2 <= r1 + RSS_SECOND_HALF_TOLERANCE_KIB,
        "{what}: the relay's VmRSS grew from {r1} to {r2} KiB over the second half"
    );
}

/// A relay with `dma0` (dma-engine) served by a loopback device VM, for the resource
/// runs, and a raw client's VERSION.
struct Resources {
    relay: Proc,
    _guest: Proc,
    dma0: PathBuf,
    _scratch: Scratch,
}

impl Resources {
    fn start(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let frontend = scratch.join("frontend.sock");
        let dma0 = scratch.join("dma0.sock");
        let relay = start_relay(&frontend, &[("dma0", &dma0)]);
        assert!(wait_for_socket(&dma0, SETUP));
        let guest = start_loopback_guest(&frontend, &[("dma0", "dma-engine")]);
        drop(served(&dma0, SETUP).expect("dma0 served"));
        Self {
            relay,
            _guest: guest,
            dma0,
            _scratch: scratch,
        }
    }

    /// A raw connection that did VERSION, retrying while the relay still holds the
    /// previous client.
    fn versioned(&self) -> Conn {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = Conn::connect(&self.dma0) {
                if c.send(&version(0), &[]).is_ok() && c.reply(0, 0).is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "dma0 refuses clients");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The relay's fds (once they stopped changing) and resident memory.
    fn measure(&self) -> (usize, u64) {
        let pid = self.relay.pid();
        let fds = steady_fd_count(pid, Duration::from_millis(100), WAIT);
        (fds, rss_kib(pid))
    }
}

/// `n` DMA map/unmap cycles on `conn`, pipelined: a writer thread sends each cycle as
/// one `sendmsg` (DMA_MAP with a memfd, DMA_UNMAP), the caller reads and checks the
/// replies. Every tenth memfd is sealed (the relay maps it, and the device VM gets a
/// window); the others are served with pread/pwrite.
fn map_unmap_cycles(conn: &mut Conn, n: u32) {
    let sealed = File::from(sealed(PAGE));
    let plain = File::from(unsealed(PAGE));
    let sock = conn.sock.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            let mut b = map(id(2 * i), IOVA, PAGE, 0);
            b.extend(unmap(id(2 * i + 1), IOVA, PAGE));
            let fd = if i.is_multiple_of(10) {
                &sealed
            } else {
                &plain
            };
            let sent = sock.send_with_fds(&[&b[..]], &[fd.as_raw_fd()]).unwrap();
            assert_eq!(sent, b.len());
        }
    });
    for i in 0..2 * n {
        conn.reply(id(i), 0)
            .unwrap_or_else(|e| panic!("cycle {}: {e}", i / 2));
    }
    writer.join().unwrap();
}

/// Proves that requests the relay has read ahead into its buffer are not forgotten
/// when it stops reading a client at the in-flight limit (1024) and the socket is
/// empty by then. With the device VM stopped (SIGSTOP), a client sends a one-byte
/// config write and 1100 config reads in one write: the relay reads until 1024 are in
/// flight, the last 77 already in its reader's buffer (which does not make the socket
/// readable). The device VM goes on: every one of the 1101 requests is answered, in
/// order, with nothing more sent by the client.
#[test]
fn requests_read_ahead_beyond_the_in_flight_limit_are_answered() {
    let res = Resources::start("read-ahead");
    let mut conn = res.versioned();
    let guest = res._guest.pid() as libc::pid_t;
    // SAFETY: kill(2) on the device VM process this test started.
    assert_eq!(unsafe { libc::kill(guest, libc::SIGSTOP) }, 0);
    let mut bytes = region_write_raw(id(0), pci_region::CONFIG, 0x3c, 1, &[0x0b]);
    for i in 1..=1100 {
        bytes.extend(region_read(id(i), pci_region::CONFIG, 0, 4));
    }
    conn.send(&bytes, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(guest, libc::SIGCONT) }, 0);
    for i in 0..=1100 {
        conn.reply(id(i), 0)
            .unwrap_or_else(|e| panic!("request {i} of 1101: {e}"));
    }
}

/// 100k DMA map/unmap cycles (each with an fd; 10k of them with windows and the
/// relay's own mapping), after 20k of warm-up, leave the relay with the fds it had and
/// its resident memory within the tolerances.
#[test]
fn no_growth_after_100k_dma_map_unmap_cycles() {
    let r = Resources::start("hostile-res-dma");
    let mut conn = r.versioned();
    map_unmap_cycles(&mut conn, 20_000);
    let m0 = r.measure();
    let t = Instant::now();
    map_unmap_cycles(&mut conn, 50_000);
    let m1 = r.measure();
    map_unmap_cycles(&mut conn, 50_000);
    let m2 = r.measure();
    eprintln!("100k DMA map/unmap cycles in {:.1?}", t.elapsed());
    check_growth("100k DMA map/unmap cycles", [m0, m1, m2]);
}

/// One client session that leaves state behind: VERSION, a DMA map with a memfd (a
/// sealed one every tenth time), an MSI-X eventfd, then gone without undoing any of it.
fn reconnect(r: &Resources, i: u32, sealed: &File, plain: &File) {
    let mut conn = r.versioned();
    let fd = if i.is_multiple_of(10) { sealed } else { plain };
    let mut b = map(1, IOVA, PAGE, 0);
    let irq = eventfd();
    conn.send(&b, &[fd.as_raw_fd()]).unwrap();
    b = set_irqs(2, DATA_EVENTFD | ACTION_TRIGGER, pci_irq::MSIX, 0, 1, &[]);
    conn.send(&b, &[irq.as_raw_fd()]).unwrap();
    conn.reply(1, 0)
        .unwrap_or_else(|e| panic!("reconnect {i}: {e}"));
    conn.reply(2, 0)
        .unwrap_or_else(|e| panic!("reconnect {i}: {e}"));
}

/// 10k client reconnects, each leaving a DMA map and an interrupt eventfd behind,
/// after 1000 of warm-up, leave the relay with the fds it had and its resident memory
/// within the tolerances.
#[test]
fn no_growth_after_10k_client_reconnects() {
    let r = Resources::start("hostile-res-reconnect");
    let sealed = File::from(sealed(PAGE));
    let plain = File::from(unsealed(PAGE));
    for i in 0..1000 {
        reconnect(&r, i, &sealed, &plain);
    }
    let m0 = r.measure();
    let t = Instant::now();
    for i in 0..5000 {
        reconnect(&r, i, &sealed, &plain);
    }
    let m1 = r.measure();
    for i in 0..5000 {
        reconnect(&r, i, &sealed, &plain);
    }
    let m2 = r.measure();
    eprintln!("10k client reconnects in {:.1?}", t.elapsed());
    check_growth("10k client reconnects", [m0, m1, m2]);
}

/// A client floods posted (NO_REPLY) REGION_WRITE_MULTIs of 200 writes each (QEMU's
/// most), each write starting a dma-engine operation, much faster than the device runs
/// them: the relay counts posted requests in flight like any other (it asks the device
/// VM for their replies itself and drops them), so at most 1024 (and 8 MiB) of them are
/// in flight and the rest wait in the client's socket, the device VM's memory does not
/// grow with the flood, and the other device is served throughout.
#[test]
fn posted_flood_is_held_back() {
    let scratch = Scratch::new("hostile-posted");
    let frontend = scratch.join("frontend.sock");
    let dma0 = scratch.join("dma0.sock");
    let gpio1 = scratch.join("gpio1.sock");
    let _relay = start_relay(&frontend, &[("dma0", &dma0), ("gpio1", &gpio1)]);
    assert!(wait_for_socket(&gpio1, SETUP));
    let guest = start_loopback_guest(&frontend, &[("dma0", "dma-engine"), ("gpio1", "gpio")]);
    drop(served(&gpio1, SETUP).expect("gpio1 served"));
    drop(served(&dma0, SETUP).expect("dma0 served"));
    let mut conn = Conn::connect(&dma0).unwrap();
    conn.send(&version(0), &[]).unwrap();
    conn.reply(0, 0).unwrap();
    let mem = File::from(sealed(2 << 20));
    for (id, (iova, off)) in [(SRC, 0u64), (DST, 1 << 20)].into_iter().enumerate() {
        let id = id as u16 + 1;
        let fd = mem.try_clone().unwrap();
        conn.send(&map(id, iova, 1 << 20, off), &[fd.as_raw_fd()])
            .unwrap();
        conn.reply(id, 0).unwrap();
    }
    for step in start_copy(10, SRC, DST, DST + (512 << 10), 0) {
        if let Send(bytes, _) = step {
            conn.send(&bytes, &[]).unwrap();
        }
    }
    for id in 10..=14 {
        conn.reply(id, 0).unwrap();
    }
    let mut multi = Vec::new();
    let n = 200u64;
    put64(&mut multi, n);
    for _ in 0..n {
        multi.extend_from_slice(&access_payload(0x24, 0, 4));
        multi.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    }
    let posted = framed(20, Command::RegionWriteMulti as u16, F_NO_REPLY, &multi);

    let control = vfu_tests::control_socket(&frontend);
    let in_flight = || {
        let out = vfu_tests::relay_ctl(&control, &["list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("list --json");
        v["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == "dma0"))
            .and_then(|d| d["in_flight"].as_u64())
            .expect("dma0 in the list")
    };
    let guest_rss = || rss_kib(guest.pid());
    let before = guest_rss();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let sock = conn.sock.try_clone().unwrap();
        sock.set_nonblocking(true).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0usize;
            let mut at = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match (&sock).write(&posted[at..]) {
                    Ok(k) => {
                        at += k;
                        if at == posted.len() {
                            at = 0;
                            sent += 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("flooding: {e}"),
                }
            }
            sent
        })
    };
    let start = Instant::now();
    let (mut peak, mut most, mut reads) = (before, 0, 0);
    while start.elapsed() < Duration::from_secs(3) {
        let mut c = served(&gpio1, WAIT).expect("gpio1 served during the flood");
        assert_eq!(
            c.region_read(pci_region::CONFIG, 0, 4).unwrap(),
            Gpio.ids(),
            "gpio1 during the flood"
        );
        reads += 1;
        most = most.max(in_flight());
        peak = peak.max(guest_rss());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    eprintln!(
        "posted flood: {sent} posted messages sent in 3 s; at most {most} in flight; device VM VmRSS {before} -> peak {peak} KiB; {reads} fresh clients of gpio1 served"
    );
    assert!(
        (100..=1024).contains(&most),
        "posted requests in flight: at most {most} seen (they are counted, up to 1024)"
    );
    assert!(
        peak <= before + 64 * 1024,
        "the device VM grew from {before} to {peak} KiB under a posted flood"
    );
}
