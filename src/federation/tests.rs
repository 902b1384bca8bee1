use super::*;
use crate::identity::parse_trust_domain;
use base64::Engine as _;
use serde_json::json;

fn td() -> TrustDomain {
    parse_trust_domain("other.test").unwrap()
}

fn cert(ca: bool) -> CertificateDer<'static> {
    let mut p = rcgen::CertificateParams::default();
    if ca {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    p.self_signed(&key).unwrap().der().clone()
}

fn x509_key(c: &CertificateDer<'_>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
    json!({"use": "x509-svid", "kty": "EC", "x5c": [b64]})
}

fn parse_json(v: Value) -> Result<doc::Document, FederationError> {
    doc::parse(&td(), v.to_string().as_bytes())
}

#[test]
fn a_document_with_roots_and_jwt_keys_reads_with_its_sequence_and_hint() {
    let root = cert(true);
    let d = parse_json(json!({
        "keys": [x509_key(&root), {"use": "jwt-svid", "kty": "EC", "kid": "k1"}, {"use": "other"}],
        "spiffe_sequence": 7,
        "spiffe_refresh_hint": 60,
    }))
    .unwrap();
    assert_eq!(d.x509_roots, vec![root]);
    assert_eq!(d.jwt_keys.len(), 1);
    assert_eq!(d.sequence, Some(7));
    assert_eq!(d.refresh_hint, Some(Duration::from_secs(60)));
}

#[test]
fn a_document_naming_no_roots_or_a_non_ca_root_is_refused() {
    let no_roots = parse_json(json!({"keys": [{"use": "jwt-svid", "kid": "k"}]}));
    assert!(
        matches!(&no_roots, Err(FederationError::Document { reason, .. }) if reason.contains("no x509-svid roots")),
        "{no_roots:?}"
    );
    let leaf = parse_json(json!({"keys": [x509_key(&cert(true)), x509_key(&cert(false))]}));
    assert!(
        matches!(&leaf, Err(FederationError::Document { reason, .. }) if reason.contains("not a CA")),
        "{leaf:?}"
    );
    let two = {
        let mut k = x509_key(&cert(true));
        k["x5c"] = json!([k["x5c"][0], k["x5c"][0]]);
        parse_json(json!({"keys": [k]}))
    };
    assert!(two.is_err(), "x5c with two certificates");
    let kidless = parse_json(json!({"keys": [x509_key(&cert(true)), {"use": "jwt-svid"}]}));
    assert!(kidless.is_err(), "a jwt-svid key without kid");
    let big = vec![b' '; doc::MAX_DOCUMENT + 1];
    assert!(doc::parse(&td(), &big).is_err(), "over 1 MiB");
}

#[test]
fn the_refresh_hint_is_clamped_and_the_override_wins() {
    let s = Duration::from_secs;
    assert_eq!(next_refresh(None, Some(s(1))), MIN_REFRESH);
    assert_eq!(next_refresh(None, Some(s(86_400))), MAX_REFRESH);
    assert_eq!(next_refresh(None, Some(s(120))), s(120));
    assert_eq!(next_refresh(None, None), DEFAULT_REFRESH);
    let fast = Duration::from_millis(200);
    assert_eq!(next_refresh(Some(fast), Some(s(600))), fast);
}

#[test]
fn endpoints_are_https_urls() {
    let e = Endpoint::parse("https://ca.other.test:8444").unwrap();
    assert_eq!(
        (e.host.as_str(), e.port, e.path.as_str()),
        ("ca.other.test", 8444, "/")
    );
    let e = Endpoint::parse("https://[::1]/bundle").unwrap();
    assert_eq!(
        (e.host.as_str(), e.port, e.path.as_str()),
        ("::1", 443, "/bundle")
    );
    assert!(Endpoint::parse("http://ca.other.test").is_err());
    assert!(Endpoint::parse("https://user@ca.other.test").is_err());
    assert!(Endpoint::parse("ca.other.test:8444").is_err());
}

#[test]
fn initial_bundles_are_trusted_for_their_trust_domain_at_once() {
    let ours = parse_trust_domain("mesh.test").unwrap();
    let trust = Trust::new(Bundle::new(ours.clone(), vec![cert(true)]).unwrap()).unwrap();
    let d = FederatedDomain {
        trust_domain: td(),
        endpoint: Endpoint::parse("https://127.0.0.1:1").unwrap(),
        profile: Profile::HttpsSpiffe {
            endpoint_id: crate::identity::ids::ca_id(&td()),
        },
        bootstrap: vec![cert(true)],
        refresh: None,
    };
    let f = Federation::new(vec![d.clone()], Some(trust.clone()), Clock::system()).unwrap();
    assert!(trust.is_federated(&td()));
    assert_eq!(f.bundles()[0].roots, d.bootstrap);
    let mut own = d;
    own.trust_domain = ours;
    assert!(
        Federation::new(vec![own], Some(trust), Clock::system()).is_err(),
        "our own trust domain is never federated"
    );
}
