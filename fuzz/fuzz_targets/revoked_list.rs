//! The revocation list, `GET /v1/revoked`, as a CA pulls it from its peers (src/ca/peers.rs
//! `parse_list`) and as a sidecar or gateway pulls it from its CA (src/svid/ca.rs
//! `parse_revoked`).
//!
//! Beyond "no panic": the two readers agree (a list the CA accepts, the sidecar reads, with every
//! serial the CA keeps); the caps hold; every kept serial is unexpired and cut to the longest an
//! SVID lives; no ban of trustline's own roles is kept and every kept ban is a SPIFFE ID; and the
//! list, printed in the same JSON form, parses back to the same entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use trustline::ca::config::MAX_SVID_TTL;
use trustline::ca::peers::{parse_list, MAX_PEER_BANS, MAX_PEER_SERIALS};
use trustline::identity::ids::RESERVED_PREFIX;
use trustline::identity::parse_id;
use trustline::svid::parse_revoked;

/// A realistic "now" (the CA's clock), late 2026.
const NOW: u64 = 1_796_000_000;

fuzz_target!(|data: &[u8]| {
    let sidecar = parse_revoked(data);
    let Ok(list) = parse_list(data, NOW) else {
        return;
    };
    // serde also reads a struct from a JSON array (`[0, []]`), which the sidecar's reader
    // refuses; trustline's CAs publish objects, so the readers are compared on objects only.
    // serde_json also skips unknown fields without checking their UTF-8 or escapes (a lone
    // surrogate), which a `Value` (the sidecar's reader) does check: compare on JSON that a
    // `Value` reads.
    let object = serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    if !object {
        return;
    }
    let serials = sidecar.expect("a list a CA accepts, a sidecar reads");
    for (s, _) in &list.revoked {
        assert!(serials.contains(s), "the sidecar misses serial {s}");
    }
    assert!(list.revoked.len() <= MAX_PEER_SERIALS);
    assert!(list.banned.len() <= MAX_PEER_BANS);
    for (_, not_after) in &list.revoked {
        assert!(*not_after > NOW && *not_after <= NOW + MAX_SVID_TTL.as_secs());
    }
    for (id, _) in &list.banned {
        let id = parse_id(id).expect("a kept ban is a SPIFFE ID");
        assert!(!id.path().starts_with(RESERVED_PREFIX));
    }
    let printed = json!({
        "sequence": list.sequence,
        "revoked": list.revoked.iter().map(|(s, na)| json!({"serial": s.to_string(), "not_after": na})).collect::<Vec<_>>(),
        "spiffe_ids": list.banned.iter().map(|(id, since)| json!({"spiffe_id": id, "since": since})).collect::<Vec<_>>(),
    });
    let again = parse_list(printed.to_string().as_bytes(), NOW).expect("a printed list parses");
    assert_eq!(again.sequence, list.sequence);
    assert_eq!(again.revoked, list.revoked);
    assert_eq!(again.banned, list.banned);
});
