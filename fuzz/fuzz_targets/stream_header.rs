//! The tunnel stream header (src/tunnel/header.rs): the first bytes of every stream a peer
//! region's gateway opens.
//!
//! Beyond "no panic": the header is strict, so an accepted input is exactly the encoding of what
//! was parsed (encode(parse(x)) == x), and any header encodes to bytes that parse back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustline::tunnel::header::{HeaderError, StreamHeader, MAX_BODY, PREFIX};

fn parse(data: &[u8]) -> Result<StreamHeader, HeaderError> {
    let prefix: &[u8; PREFIX] =
        data.get(..PREFIX)
            .and_then(|p| p.try_into().ok())
            .ok_or(HeaderError::Truncated {
                at: 0,
                field: "header prefix",
            })?;
    let len = StreamHeader::parse_prefix(prefix)?;
    assert!(len <= MAX_BODY);
    let body = data
        .get(PREFIX..PREFIX + len)
        .ok_or(HeaderError::Truncated {
            at: PREFIX,
            field: "header body",
        })?;
    StreamHeader::parse_body(body)
}

fuzz_target!(|data: &[u8]| {
    // As the gateway reads it: prefix, then exactly the announced body; what follows is payload.
    if let Ok(h) = parse(data) {
        let encoded = h.encode();
        assert_eq!(&data[..encoded.len()], &encoded[..], "not canonical: {h:?}");
        assert_eq!(parse(&encoded).expect("an encoded header parses"), h);
    }
    // The body alone (every offset in an error is inside the header).
    match StreamHeader::parse_body(data) {
        Ok(h) => assert_eq!(&h.encode()[PREFIX..], data),
        Err(HeaderError::Truncated { at, .. } | HeaderError::Bad { at, .. }) => {
            assert!(at <= PREFIX + data.len(), "offset {at} past the input")
        }
        Err(HeaderError::Trailing { at, n }) => assert_eq!(at - PREFIX + n, data.len()),
        Err(_) => {}
    }
});
