//! Golden vectors written from the tables of `docs/tunnel.md` (not produced by the
//! encoder), round trips and hostile-input properties of the tunnel codec.

use proptest::prelude::*;

use super::*;
use crate::tunnel::{features, TunnelHeader};
use crate::vfio_user::{Header, MessageType};

const MAX: usize = 1 << 20;

/// Builds a message from a header written field by field and a body.
fn msg(len: u32, channel: u32, kind: u16, flags: u16, tag: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&channel.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(body);
    assert_eq!(v.len(), 16 + len as usize, "golden vector is inconsistent");
    v
}

/// Checks that `bytes` decodes to `expected` and that `expected` encodes to `bytes`.
fn golden(bytes: &[u8], expected: TunnelMessage) {
    assert_eq!(TunnelMessage::decode(bytes, MAX).unwrap(), expected);
    assert_eq!(expected.encode(), bytes);
}

/// HELLO request, section 6.2: major 1, minor 0, 2 pairs, 64 KiB, WINDOWS|DOORBELLS.
#[test]
fn golden_hello() {
    #[rustfmt::skip]
    let body = [
        1, 0, 0, 0, 2, 0, 0, 0,
        0, 0, 1, 0, 0, 0, 0, 0,
        3, 0, 0, 0, 0, 0, 0, 0,
    ];
    let bytes = msg(24, 0, 2, 0, 7, &body);
    golden(
        &bytes,
        TunnelMessage {
            channel: 0,
            tag: 7,
            body: Body::Hello(Hello {
                version_major: 1,
                version_minor: 0,
                queue_pairs: 2,
                max_msg_size: 0x10000,
                features: features::WINDOWS | features::DOORBELLS,
            }),
        },
    );
}

/// HELLO reply, section 6.2: status 0, 1.0, 1 pair, 1 MiB, WINDOWS, 1 GiB of shm.
#[test]
fn golden_hello_reply() {
    #[rustfmt::skip]
    let body = [
        0, 0, 0, 0, 1, 0, 0, 0,
        1, 0, 0, 0, 0, 0, 0x10, 0,
        1, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0x40, 0, 0, 0, 0,
    ];
    let bytes = msg(32, 0, 2, 1, 7, &body);
    golden(
        &bytes,
        TunnelMessage {
            channel: 0,
            tag: 7,
            body: Body::HelloReply(HelloReply {
                status: 0,
                version_major: 1,
                version_minor: 0,
                queue_pairs: 1,
                max_msg_size: 0x10_0000,
                features: features::WINDOWS,
                shm_size: 1 << 30,
            }),
        },
    );
}

/// CHANNEL_UP "gpio0" on channel 3, and its status reply ENODEV (19).
#[test]
fn golden_channel_up_and_status() {
    let body = [5, 0, 0, 0, b'g', b'p', b'i', b'o', b'0'];
    golden(
        &msg(9, 3, 3, 0, 1, &body),
        TunnelMessage {
            channel: 3,
            tag: 1,
            body: Body::ChannelUp {
                name: "gpio0".into(),
            },
        },
    );
    golden(
        &msg(8, 3, 3, 1, 1, &[19, 0, 0, 0, 0, 0, 0, 0]),
        TunnelMessage {
            channel: 3,
            tag: 1,
            body: Body::Status {
                kind: 3,
                status: 19,
            },
        },
    );
}

/// CHANNEL_DOWN, SESSION_START and SESSION_END have empty bodies.
#[test]
fn golden_empty_requests() {
    for (kind, body) in [
        (4, Body::ChannelDown),
        (5, Body::SessionStart),
        (6, Body::SessionEnd),
    ] {
        golden(
            &msg(0, 9, kind, 0, 2, &[]),
            TunnelMessage {
                channel: 9,
                tag: 2,
                body,
            },
        );
    }
}

/// IRQ: MSI-X (index 2) vectors 4..6.
#[test]
fn golden_irq() {
    let body = [2, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
    golden(
        &msg(16, 1, 7, 0, 0, &body),
        TunnelMessage::new(
            1,
            Body::Irq(IrqTrigger {
                index: 2,
                start: 4,
                count: 2,
            }),
        ),
    );
}

/// DMA_READ of two segments and its reply with 3 bytes of data.
#[test]
fn golden_dma_read() {
    #[rustfmt::skip]
    let body = [
        2, 0, 0, 0, 0, 0, 0, 0,
        0, 0x10, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
        0, 0x20, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,
    ];
    golden(
        &msg(40, 1, 8, 0, 5, &body),
        TunnelMessage {
            channel: 1,
            tag: 5,
            body: Body::DmaRead {
                segments: vec![
                    DmaSegment {
                        iova: 0x1000,
                        len: 1,
                    },
                    DmaSegment {
                        iova: 0x2000,
                        len: 2,
                    },
                ],
            },
        },
    );
    golden(
        &msg(11, 1, 8, 1, 5, &[0, 0, 0, 0, 0, 0, 0, 0, 0xa, 0xb, 0xc]),
        TunnelMessage {
            channel: 1,
            tag: 5,
            body: Body::DmaReadReply {
                status: 0,
                data: vec![0xa, 0xb, 0xc],
            },
        },
    );
}

/// DMA_WRITE of one segment with its data, and the EFAULT (14) status reply.
#[test]
fn golden_dma_write() {
    #[rustfmt::skip]
    let body = [
        1, 0, 0, 0, 0, 0, 0, 0,
        0x88, 0x77, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,
        0xde, 0xad,
    ];
    golden(
        &msg(26, 4, 9, 0, 6, &body),
        TunnelMessage {
            channel: 4,
            tag: 6,
            body: Body::DmaWrite {
                segments: vec![DmaSegment {
                    iova: 0x7788,
                    len: 2,
                }],
                data: vec![0xde, 0xad],
            },
        },
    );
    golden(
        &msg(8, 4, 9, 1, 6, &[14, 0, 0, 0, 0, 0, 0, 0]),
        TunnelMessage {
            channel: 4,
            tag: 6,
            body: Body::Status {
                kind: 9,
                status: 14,
            },
        },
    );
}

/// POSTED_DONE up to message 0xfffe on channel 2: kind 12, no reply, 8 bytes of body
/// whose reserved bytes must be zero.
#[test]
fn golden_posted_done() {
    let body = [0xfe, 0xff, 0, 0, 0, 0, 0, 0];
    golden(
        &msg(8, 2, 12, 0, 0, &body),
        TunnelMessage::new(2, Body::PostedDone { msg_id: 0xfffe }),
    );
    let mut bad = msg(8, 2, 12, 0, 0, &body);
    bad[TUNNEL_HEADER_SIZE + 2] = 1;
    assert!(TunnelMessage::decode(&bad, MAX).is_err());
}

/// DOORBELL id 0x42 fired 3 times; ERROR EINVAL "bad".
#[test]
fn golden_doorbell_and_error() {
    let mut body = vec![0x42, 0, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    golden(
        &msg(16, 2, 10, 0, 0, &body),
        TunnelMessage::new(2, Body::Doorbell { id: 0x42, count: 3 }),
    );
    golden(
        &msg(
            11,
            0,
            11,
            0,
            9,
            &[22, 0, 0, 0, 0, 0, 0, 0, b'b', b'a', b'd'],
        ),
        TunnelMessage {
            channel: 0,
            tag: 9,
            body: Body::Error {
                errno: 22,
                text: "bad".into(),
            },
        },
    );
}

/// VFIO_USER carrying a DMA_MAP request (32-byte payload) and one read-only window slot
/// at shm offset 0x200000 (section 7).
#[test]
fn golden_vfio_user_with_window_slot() {
    let mut body = Vec::new();
    // vfio-user header: msg_id 1, command 2, size 48, flags 0 (command), error 0.
    body.extend_from_slice(&[1, 0, 2, 0, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let payload: Vec<u8> = (0..32).collect();
    body.extend_from_slice(&payload);
    // slot: type 1, flags READ, value 0x200000.
    body.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]);
    golden(
        &msg(64, 5, 1, 0, 0, &body),
        TunnelMessage::new(
            5,
            Body::VfioUser(VfioUserFrame {
                header: Header::command(1, 2, 32),
                payload,
                slots: vec![Slot::window(0x20_0000, true, false)],
            }),
        ),
    );
}

/// Malformed messages are refused with the right reason.
#[test]
fn rejects_malformed() {
    let ok = TunnelMessage::new(1, Body::SessionStart).encode();
    // Header says more than is there.
    let mut b = ok.clone();
    b[0] = 1;
    assert!(matches!(
        TunnelMessage::decode(&b, MAX),
        Err(TunnelError::LengthMismatch { .. })
    ));
    // Reserved flag bit.
    let mut b = ok.clone();
    b[10] = 2;
    assert!(matches!(
        TunnelMessage::decode(&b, MAX),
        Err(TunnelError::ReservedFlags { .. })
    ));
    // Unknown kind: ENOSYS.
    let b = msg(0, 1, 0x77, 0, 0, &[]);
    let e = TunnelMessage::decode(&b, MAX).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSYS as u32);
    // REPLY on a kind that has none.
    let b = msg(16, 1, 7, 1, 0, &[0; 16]);
    assert!(matches!(
        TunnelMessage::decode(&b, MAX),
        Err(TunnelError::BadReplyFlag { .. })
    ));
    // IRQ with count 0.
    let b = msg(16, 1, 7, 0, 0, &[0; 16]);
    assert!(TunnelMessage::decode(&b, MAX).is_err());
    // Too large for the receiver.
    assert!(matches!(
        TunnelMessage::decode(&ok, 8),
        Err(TunnelError::TooLarge { .. })
    ));
    // DMA_READ with 65 segments, and with a segment that wraps around.
    let mut body = vec![65, 0, 0, 0, 0, 0, 0, 0];
    body.extend(std::iter::repeat_n(1u8, 65 * 16));
    let b = msg(body.len() as u32, 1, 8, 0, 0, &body);
    assert!(TunnelMessage::decode(&b, MAX).is_err());
    let mut body = vec![1, 0, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&u64::MAX.to_le_bytes());
    body.extend_from_slice(&2u64.to_le_bytes());
    let b = msg(24, 1, 8, 0, 0, &body);
    assert!(TunnelMessage::decode(&b, MAX).is_err());
    // DMA_WRITE whose data is shorter than its segments.
    let mut body = vec![1, 0, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&4u64.to_le_bytes());
    body.extend_from_slice(&[1, 2, 3]);
    let b = msg(body.len() as u32, 1, 9, 0, 0, &body);
    assert!(TunnelMessage::decode(&b, MAX).is_err());
    // Channel name empty, with NUL, and not UTF-8.
    for name in [&b""[..], b"a\0b", b"\xff\xfe"] {
        let mut body = (name.len() as u16).to_le_bytes().to_vec();
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(name);
        let b = msg(body.len() as u32, 1, 3, 0, 0, &body);
        assert!(TunnelMessage::decode(&b, MAX).is_err(), "{name:?}");
    }
    // VFIO_USER with a partial slot, and with a bad slot type.
    let mut f = TunnelMessage::new(
        1,
        Body::VfioUser(VfioUserFrame {
            header: Header::command(1, 4, 0),
            payload: vec![],
            slots: vec![Slot::eventfd()],
        }),
    )
    .encode();
    let mut short = f.clone();
    short.pop();
    short[0] -= 1;
    assert!(TunnelMessage::decode(&short, MAX).is_err());
    f[32] = 9;
    assert!(TunnelMessage::decode(&f, MAX).is_err());
}

fn arb_string(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::char::range('\u{1}', '\u{7ff}'), 0..=max / 2)
        .prop_map(|v| v.into_iter().collect::<String>())
        .prop_filter("fits", move |s| s.len() <= max)
}

fn arb_segments() -> impl Strategy<Value = Vec<DmaSegment>> {
    proptest::collection::vec(
        (any::<u32>(), 1u64..64).prop_map(|(iova, len)| DmaSegment {
            iova: iova.into(),
            len,
        }),
        1..8,
    )
}

fn arb_slot() -> impl Strategy<Value = Slot> {
    prop_oneof![
        (any::<u64>(), any::<bool>(), any::<bool>()).prop_map(|(o, r, w)| Slot::window(o, r, w)),
        Just(Slot::eventfd()),
        any::<u64>().prop_map(|value| Slot {
            slot_type: SlotType::IoEventFd,
            flags: 0,
            value
        }),
        any::<u64>().prop_map(|value| Slot {
            slot_type: SlotType::GuestMemory,
            flags: 0,
            value
        }),
    ]
}

fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(arb_slot(), 0..4)
        )
            .prop_map(|(id, cmd, reply, payload, slots)| {
                let mut header = Header::command(id, cmd, payload.len());
                if reply {
                    header.msg_type = MessageType::Reply;
                }
                Body::VfioUser(VfioUserFrame {
                    header,
                    payload,
                    slots,
                })
            }),
        (any::<u16>(), any::<u16>(), 1u16.., 4096u32.., any::<u64>()).prop_map(
            |(a, b, q, m, f)| Body::Hello(Hello {
                version_major: a,
                version_minor: b,
                queue_pairs: q,
                max_msg_size: m,
                features: f
            })
        ),
        (
            any::<u16>(),
            any::<u16>(),
            1u16..,
            4096u32..,
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(a, b, q, m, f, s)| Body::HelloReply(HelloReply {
                status: 0,
                version_major: a,
                version_minor: b,
                queue_pairs: q,
                max_msg_size: m,
                features: f,
                shm_size: s
            })),
        arb_string(MAX_CHANNEL_NAME)
            .prop_filter("non-empty", |s| !s.is_empty())
            .prop_map(|name| Body::ChannelUp { name }),
        Just(Body::ChannelDown),
        Just(Body::SessionStart),
        Just(Body::SessionEnd),
        (any::<u32>(), any::<u32>(), 1u32..).prop_map(|(index, start, count)| Body::Irq(
            IrqTrigger {
                index,
                start,
                count
            }
        )),
        arb_segments().prop_map(|segments| Body::DmaRead { segments }),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|data| Body::DmaReadReply { status: 0, data }),
        (1u32..200).prop_map(|status| Body::DmaReadReply {
            status,
            data: vec![]
        }),
        arb_segments().prop_flat_map(|segments| {
            let total = segments.iter().map(|s| s.len as usize).sum::<usize>();
            proptest::collection::vec(any::<u8>(), total).prop_map(move |data| Body::DmaWrite {
                segments: segments.clone(),
                data,
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(id, count)| Body::Doorbell { id, count }),
        any::<u16>().prop_map(|msg_id| Body::PostedDone { msg_id }),
        (any::<u32>(), arb_string(MAX_ERROR_TEXT))
            .prop_map(|(errno, text)| Body::Error { errno, text }),
        (
            prop_oneof![Just(3u16), Just(4), Just(5), Just(6), Just(9), 100u16..],
            any::<u32>()
        )
            .prop_map(|(kind, status)| Body::Status { kind, status }),
    ]
}

proptest! {
    /// decode(encode(m)) == m for every message the encoder can build.
    #[test]
    fn round_trip(channel in any::<u32>(), tag in any::<u32>(), body in arb_body()) {
        let m = TunnelMessage { channel, tag, body };
        let bytes = m.encode();
        prop_assert_eq!(TunnelMessage::decode(&bytes, MAX).unwrap(), m);
    }

    /// Arbitrary bytes never make the decoder panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = TunnelMessage::decode(&bytes, MAX);
        let _ = TunnelHeader::decode(&bytes);
    }

    /// A valid header followed by arbitrary body bytes never panics either; this reaches
    /// every body decoder, which random headers rarely do.
    #[test]
    fn arbitrary_bodies_never_panic(kind in 0u16..14, reply in any::<bool>(),
                                    body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let bytes = msg(body.len() as u32, 1, kind, reply as u16, 0, &body);
        let _ = TunnelMessage::decode(&bytes, MAX);
    }
}

/// Proves that the split encoders used for direct data placement (head here, data
/// placed by the caller) produce byte for byte what the whole-message encoder does, and
/// that the head decoder finds the data where the encoder put it.
#[test]
fn direct_data_heads_match_whole_messages() {
    let segments = vec![
        DmaSegment {
            iova: 0x1000,
            len: 3,
        },
        DmaSegment {
            iova: 0x9000,
            len: 2,
        },
    ];
    let data = vec![1u8, 2, 3, 4, 5];
    let whole = TunnelMessage {
        channel: 7,
        tag: 9,
        body: Body::DmaWrite {
            segments: segments.clone(),
            data: data.clone(),
        },
    }
    .encode();
    let mut split = encode_dma_write_head(7, 9, &segments, data.len());
    let (decoded, data_at) = decode_dma_request_head(&split[TUNNEL_HEADER_SIZE..]).unwrap();
    assert_eq!(decoded, segments);
    assert_eq!(TUNNEL_HEADER_SIZE + data_at, split.len());
    split.extend_from_slice(&data);
    assert_eq!(split, whole);

    let whole = TunnelMessage {
        channel: 7,
        tag: 9,
        body: Body::DmaReadReply {
            status: 0,
            data: data.clone(),
        },
    }
    .encode();
    let mut split = encode_reply_head(7, 9, Kind::DmaRead, 0, data.len()).to_vec();
    split.extend_from_slice(&data);
    assert_eq!(split, whole);
    let failed = TunnelMessage {
        channel: 7,
        tag: 9,
        body: Body::Status {
            kind: Kind::DmaWrite as u16,
            status: 14,
        },
    }
    .encode();
    assert_eq!(
        encode_reply_head(7, 9, Kind::DmaWrite, 14, 0).to_vec(),
        failed
    );
    // A head that promises more segments than it holds is refused.
    assert!(decode_dma_request_head(&[2, 0, 0, 0, 0, 0, 0, 0]).is_err());
}
