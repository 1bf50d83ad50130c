//! Arbitrary bytes through every NBD parser and the request validator: nothing may panic, and
//! whatever a parser accepts must satisfy the invariants the server relies on.
#![no_main]

#[path = "../../src/protocol.rs"]
#[allow(dead_code)]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::*;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let _ = parse_client_flags([data[0], data[1], data[2], data[3]]);
    let rest = &data[4..];

    // Option header + payload, as read off the wire.
    if rest.len() >= 16 {
        let hdr: [u8; 16] = rest[..16].try_into().unwrap();
        let _ = parse_option_header(&hdr);
        let option = u32::from_be_bytes(rest[8..12].try_into().unwrap()) % 16;
        let payload = &rest[16..];
        if let Ok(ClientOption::Go(r) | ClientOption::Info(r)) = parse_option(option, payload) {
            assert!(r.name.len() <= MAX_STRING);
        }
        if let Ok(ClientOption::SetMetaContext(q) | ClientOption::ListMetaContext(q)) = parse_option(option, payload) {
            assert!(q.queries.len() as u32 <= MAX_QUERIES);
            let _ = meta_query_matches(&q.queries, true);
        }
    }

    // A request header validated against an export whose size comes from the input too.
    if rest.len() >= REQUEST_LEN + 9 {
        let hdr: [u8; REQUEST_LEN] = rest[..REQUEST_LEN].try_into().unwrap();
        let size = u64::from_be_bytes(rest[REQUEST_LEN..REQUEST_LEN + 8].try_into().unwrap()) >> (rest[REQUEST_LEN + 8] % 64);
        let flags = rest[REQUEST_LEN + 8];
        let n = Negotiated { size, structured: flags & 1 != 0, meta_context: flags & 2 != 0 };
        if let Ok(req) = parse_request(&hdr) {
            match check_request(&req, &n) {
                Ok(Command::Read { offset, len, .. }) | Ok(Command::Cache { offset, len }) => {
                    assert!(len > 0 && len <= MAX_PAYLOAD);
                    assert!(offset.checked_add(len as u64).is_some_and(|end| end <= size));
                }
                Ok(Command::BlockStatus { offset, len, req_one }) => {
                    assert!(n.structured && n.meta_context);
                    let chunk = 1u32 << (12 + flags % 8);
                    let ext = allocation_extents(offset, len, size, chunk, req_one, |i| i % 3 == 0);
                    assert!(!ext.is_empty());
                    let total: u64 = ext.iter().map(|e| e.0 as u64).sum();
                    assert!(total <= len as u64);
                }
                Ok(_) => {}
                Err(r) => assert!(r.error != 0),
            }
        }
    }
});
