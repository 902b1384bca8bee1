//! A peer's certificate as the data path reads it (src/identity/cert.rs): `inspect_cert` on the
//! leaf a sidecar, gateway or CA client presents, the SVID leaf profile, and the region of a
//! chain (leaf, issuer).
//!
//! Input: a two-byte big-endian length, the leaf's DER, then the issuer's DER.
//!
//! Beyond "no panic": what is read is stable (reading twice agrees), a leaf with a region has an
//! issuer that is a CA of the same trust domain carrying a region ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::CertificateDer;
use trustline::identity::{inspect_cert, region_of_chain, REGION_PATH_PREFIX};

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let (leaf, issuer) = rest.split_at((usize::from(*a) << 8 | usize::from(*b)).min(rest.len()));
    let leaf = CertificateDer::from(leaf);
    let issuer = CertificateDer::from(issuer);
    if let Ok(info) = inspect_cert(&leaf) {
        let again = inspect_cert(&leaf).expect("reads again");
        assert_eq!(format!("{info:?}"), format!("{again:?}"));
        let _ = info.check_leaf_profile();
        let _ = info.issued_lifetime();
    }
    if let Some(region) = region_of_chain(&[leaf.clone(), issuer.clone()]) {
        let l = inspect_cert(&leaf).expect("a leaf with a region parses");
        let i = inspect_cert(&issuer).expect("its issuer parses");
        assert!(i.is_ca);
        assert_eq!(i.id.trust_domain(), l.id.trust_domain());
        assert_eq!(
            i.id.path().strip_prefix(REGION_PATH_PREFIX),
            Some(region.as_str())
        );
    }
});
