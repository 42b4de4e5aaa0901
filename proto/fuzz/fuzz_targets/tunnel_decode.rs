//! Feeds arbitrary bytes to the tunnel message decoder; whatever decodes must encode
//! to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfu_proto::tunnel::TunnelMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = TunnelMessage::decode(data, 1 << 20) {
        let bytes = msg.encode();
        assert_eq!(TunnelMessage::decode(&bytes, 1 << 20).as_ref(), Ok(&msg));
    }
});
