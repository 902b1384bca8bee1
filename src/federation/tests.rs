use super::*;
use crate::identity::parse_trust_domain;
use serde_json::Value;

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

fn doc(roots: &[CertificateDer<'static>], jwt: &[crate::jwt::PublicKey]) -> Value {
    crate::jwt::spiffe_bundle_json(roots, jwt, 7, 60)
}

fn parse_json(v: Value) -> Result<crate::jwt::SpiffeBundleDoc, FederationError> {
    doc::parse(&td(), v.to_string().as_bytes())
}

#[test]
fn a_document_with_roots_and_jwt_keys_reads_with_its_sequence_and_hint() {
    let root = cert(true);
    let signing = crate::jwt::SigningKey::generate().unwrap();
    let eu = crate::region::Region::new("eu").unwrap();
    let key = signing.public(Some(eu));
    let d = parse_json(doc(std::slice::from_ref(&root), &[key])).unwrap();
    assert_eq!(d.x509_roots, vec![root]);
    assert_eq!(d.jwt.len(), 1);
    assert_eq!(
        d.jwt.get(signing.kid()).unwrap().region(),
        None,
        "another trust domain's region label is dropped"
    );
    assert_eq!(d.sequence, Some(7));
    assert_eq!(d.refresh_hint, Some(Duration::from_secs(60)));
}

#[test]
fn a_document_naming_no_roots_or_a_non_ca_root_is_refused() {
    let key = crate::jwt::SigningKey::generate().unwrap().public(None);
    let no_roots = parse_json(doc(&[], &[key]));
    assert!(
        matches!(&no_roots, Err(FederationError::Document { reason, .. }) if reason.contains("no x509-svid roots")),
        "{no_roots:?}"
    );
    let leaf = parse_json(doc(&[cert(true), cert(false)], &[]));
    assert!(
        matches!(&leaf, Err(FederationError::Document { reason, .. }) if reason.contains("not a CA")),
        "{leaf:?}"
    );
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
    assert_eq!(f.bundles()[0].1, d.bootstrap);
    let mut own = d;
    own.trust_domain = ours;
    assert!(
        Federation::new(vec![own], Some(trust), Clock::system()).is_err(),
        "our own trust domain is never federated"
    );
}
