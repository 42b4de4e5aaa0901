//! Feeds arbitrary bytes to the vfio-user decoders: the header, then the payload as a
//! request and as a reply of the command the header names, with 0 to 3 fds (taken from
//! the first byte). Anything that decodes must encode back to a message that decodes to
//! the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfu_proto::vfio_user::{encode_reply, encode_request, Header, Reply, Request, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((&nfds, rest)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(nfds % 4);
    let Ok(header) = Header::decode(rest) else {
        return;
    };
    let payload = &rest[HEADER_SIZE.min(rest.len())..];
    if let Ok(req) = Request::decode(header.command, payload, nfds) {
        let bytes = encode_request(header.msg_id, &req, header.no_reply);
        let again = Request::decode(header.command, &bytes[HEADER_SIZE..], nfds)
            .expect("re-encoded request must decode");
        assert_eq!(again, req);
    }
    if let Ok(reply) = Reply::decode(header.command, payload, nfds) {
        let bytes = encode_reply(header.msg_id, &reply);
        let _ = Reply::decode(header.command, &bytes[HEADER_SIZE..], nfds);
    }
});
