//! SPIFFE IDs, trust domains, region and service names and certificate serials as they arrive
//! in configs, CSRs, policy files, revocation lists and admin requests.
//!
//! Beyond "no panic": every accepted value prints to a text that parses back to the same value
//! (parse -> print -> parse), a workload ID is a SPIFFE ID with a path, and a serial's hex form
//! round-trips to the same normalised bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustline::identity::{parse_id, parse_trust_domain, parse_workload_id, Serial};
use trustline::region::{Region, ServiceName};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = parse_id(s) {
        let printed = id.to_string();
        let again = parse_id(&printed).expect("a printed SPIFFE ID parses");
        assert_eq!(again, id, "SPIFFE ID round trip: {s:?} -> {printed:?}");
        assert_eq!(again.to_string(), printed);
        let td = parse_trust_domain(id.trust_domain_name()).expect("its trust domain parses");
        assert!(id.is_member_of(&td));
        assert_eq!(parse_workload_id(s).is_ok(), !id.path().is_empty());
    } else {
        assert!(
            parse_workload_id(s).is_err(),
            "workload ID {s:?} but no SPIFFE ID"
        );
    }
    if let Ok(td) = parse_trust_domain(s) {
        let again = parse_trust_domain(&td.to_string()).expect("a printed trust domain parses");
        assert_eq!(again, td);
    }
    if let Ok(r) = Region::new(s) {
        assert_eq!(r.as_str(), s);
        assert!(r.len() <= Region::MAX);
    }
    if let Ok(n) = ServiceName::new(s) {
        assert_eq!(n.as_str(), s);
        assert!(n.len() <= ServiceName::MAX);
    }
    if let Some(serial) = Serial::parse_hex(s) {
        let printed = serial.to_string();
        let again = Serial::parse_hex(&printed).expect("a printed serial parses");
        assert_eq!(again, serial, "serial round trip: {s:?} -> {printed:?}");
        assert_eq!(again.as_bytes().first(), serial.as_bytes().first());
        assert_ne!(serial.as_bytes().first(), Some(&0), "serial not normalised");
    }
});
