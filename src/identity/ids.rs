//! The SPIFFE IDs trustline reserves for its own roles, under `spiffe://TD/trustline/`, built and
//! read in this one place: the CA server (`trustline/ca`), regional intermediates
//! (`trustline/region/NAME`, their URI SAN) and gateways (`trustline/gateway/REGION`). The CA
//! issues nothing else under the prefix (`ca::authority`), so no workload can hold one of these.

use super::{SpiffeId, TrustDomain};

/// Every ID under this path prefix is reserved for trustline's own roles.
pub const RESERVED_PREFIX: &str = "/trustline/";
/// Path prefix of the SPIFFE ID carried by a regional intermediate CA.
pub const REGION_PATH_PREFIX: &str = "/trustline/region/";
/// Path prefix of a gateway's SPIFFE ID; the region follows.
pub const GATEWAY_PATH_PREFIX: &str = "/trustline/gateway/";
/// Path of every CA server's SPIFFE ID (one ID for the CAs of all regions).
pub const CA_PATH: &str = "/trustline/ca";

fn reserved(td: &TrustDomain, path: &str) -> SpiffeId {
    SpiffeId::new(format!("spiffe://{td}{path}"))
        .expect("a valid trust domain and a reserved path of valid segments make a valid ID")
}

/// `spiffe://TD/trustline/ca`: the ID of the CA servers of `td`.
pub fn ca_id(td: &TrustDomain) -> SpiffeId {
    reserved(td, CA_PATH)
}

/// `spiffe://TD/trustline/gateway/REGION`: the ID of a region's gateways.
pub fn gateway_id(td: &TrustDomain, region: &str) -> SpiffeId {
    reserved(td, &format!("{GATEWAY_PATH_PREFIX}{region}"))
}

/// The region named by a gateway ID, if `id` is one.
pub fn gateway_region(id: &SpiffeId) -> Option<&str> {
    id.path().strip_prefix(GATEWAY_PATH_PREFIX)
}

/// `spiffe://TD/trustline/region/NAME`: the URI SAN of a region's intermediate CA.
pub fn region_ca_uri(td: &TrustDomain, region: &str) -> String {
    format!("spiffe://{td}{REGION_PATH_PREFIX}{region}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ids_round_trip() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(ca_id(&td).to_string(), "spiffe://example.org/trustline/ca");
        let gw = gateway_id(&td, "eu-west");
        assert_eq!(
            gw.to_string(),
            "spiffe://example.org/trustline/gateway/eu-west"
        );
        assert_eq!(gateway_region(&gw), Some("eu-west"));
        assert_eq!(gateway_region(&ca_id(&td)), None);
        assert_eq!(
            region_ca_uri(&td, "eu-west"),
            "spiffe://example.org/trustline/region/eu-west"
        );
        for id in [ca_id(&td), gw] {
            assert!(id.path().starts_with(RESERVED_PREFIX));
        }
    }
}
