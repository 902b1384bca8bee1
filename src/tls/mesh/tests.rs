//! The chain cache of [`super::Trust`].

use super::*;
use std::cell::Cell;

fn cert(not_after_secs: i64) -> CertificateDer<'static> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.not_before = time::OffsetDateTime::from_unix_timestamp(1_000).expect("time");
    p.not_after = time::OffsetDateTime::from_unix_timestamp(not_after_secs).expect("time");
    let key = rcgen::KeyPair::generate().expect("key");
    p.self_signed(&key).expect("cert").der().clone()
}

fn trust(root: &CertificateDer<'static>) -> Arc<Trust> {
    let td = crate::identity::parse_trust_domain("example.org").expect("td");
    Trust::new(Bundle::new(td, vec![root.clone()]).expect("bundle")).expect("trust")
}

/// Runs the cached check and says whether the real check ran.
fn ran(trust: &Trust, by: Presenter, leaf: &CertificateDer<'_>, at: u64, ok: bool) -> bool {
    let ran = Cell::new(false);
    let verify = || {
        ran.set(true);
        if ok {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            ))
        }
    };
    let got = trust.verify_path_cached(
        by,
        leaf,
        &[],
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(at)),
        verify,
    );
    assert_eq!(
        got.is_ok(),
        ok || !ran.get(),
        "the verdict follows the real check"
    );
    ran.get()
}

#[test]
fn a_verified_chain_is_remembered_within_its_validity_for_its_presenter_and_bundle() {
    let leaf = cert(5_000);
    let t = trust(&leaf);
    assert!(
        ran(&t, Presenter::Client, &leaf, 2_000, true),
        "first time: verified"
    );
    assert!(
        !ran(&t, Presenter::Client, &leaf, 3_000, true),
        "again: remembered"
    );
    assert!(
        ran(&t, Presenter::Server, &leaf, 3_000, true),
        "the other end: verified"
    );
    assert!(
        ran(&t, Presenter::Client, &leaf, 5_001, false),
        "expired: verified again"
    );
    assert!(
        ran(&t, Presenter::Client, &leaf, 999, false),
        "not yet valid: verified again"
    );
    assert!(
        !ran(&t, Presenter::Client, &leaf, 4_000, true),
        "still remembered in its window"
    );
    let other = cert(9_000);
    t.set_bundle(Bundle::new(t.bundle().trust_domain.clone(), vec![other]).unwrap())
        .unwrap();
    assert!(
        ran(&t, Presenter::Client, &leaf, 3_000, false),
        "new bundle: verified again"
    );
}

#[test]
fn a_failed_chain_is_not_remembered() {
    let leaf = cert(5_000);
    let t = trust(&leaf);
    assert!(ran(&t, Presenter::Client, &leaf, 2_000, false));
    assert!(
        ran(&t, Presenter::Client, &leaf, 2_000, false),
        "a failure is checked again"
    );
}

/// A CA of trust domain `td` and a signer of client SVIDs under it.
struct TestCa {
    root: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn test_ca(td: &str) -> TestCa {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{td}").try_into().expect("uri"),
    )];
    let root = p.self_signed(&key).expect("root").der().clone();
    TestCa {
        root,
        issuer: rcgen::Issuer::new(p, key),
    }
}

fn client_svid(ca: &TestCa, id: &str) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("uri"))];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.signed_by(&key, &ca.issuer).expect("leaf").der().clone()
}

fn admits(trust: &Arc<Trust>, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let checks = PeerChecks {
        trust_domain: crate::identity::parse_trust_domain("mesh.test").expect("td"),
        revoked: Default::default(),
    };
    let v = SpiffeClientVerifier::new(trust.clone(), checks);
    let now = UnixTime::since_unix_epoch(
        crate::clock::Clock::system()
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time"),
    );
    v.verify_client_cert(leaf, &[], now).map(|_| ())
}

#[test]
fn each_trust_domains_roots_vouch_for_its_own_ids_only() {
    let td = |s| crate::identity::parse_trust_domain(s).expect("td");
    let (ours, other, third) = (
        test_ca("mesh.test"),
        test_ca("other.test"),
        test_ca("third.test"),
    );
    let trust = Trust::new(Bundle::new(td("mesh.test"), vec![ours.root.clone()]).unwrap()).unwrap();
    let ours_leaf = client_svid(&ours, "spiffe://mesh.test/web");
    let other_leaf = client_svid(&other, "spiffe://other.test/web");
    assert!(admits(&trust, &ours_leaf).is_ok(), "our own");
    assert!(admits(&trust, &other_leaf).is_err(), "not federated yet");

    trust
        .set_federated(Bundle::new(td("other.test"), vec![other.root.clone()]).unwrap())
        .unwrap();
    assert!(admits(&trust, &ours_leaf).is_ok(), "ours still");
    assert!(
        admits(&trust, &other_leaf).is_ok(),
        "the federated domain's own ID"
    );
    let claims_ours = client_svid(&other, "spiffe://mesh.test/web");
    assert!(
        admits(&trust, &claims_ours).is_err(),
        "a federated root vouched for an ID of ours"
    );
    let claims_third = client_svid(&other, "spiffe://third.test/web");
    assert!(
        admits(&trust, &claims_third).is_err(),
        "a federated root vouched for a third trust domain"
    );
    let ours_claims_other = client_svid(&ours, "spiffe://other.test/web");
    assert!(
        admits(&trust, &ours_claims_other).is_err(),
        "our root vouched for a federated domain's ID"
    );
    // A third domain's root, even carried in the federated bundle, vouches for nobody there.
    trust
        .set_federated(
            Bundle::new(
                td("other.test"),
                vec![other.root.clone(), third.root.clone()],
            )
            .unwrap(),
        )
        .unwrap();
    let third_leaf = client_svid(&third, "spiffe://other.test/web");
    assert!(
        admits(&trust, &third_leaf).is_err(),
        "a root naming third.test"
    );
    assert!(
        trust
            .set_federated(Bundle::new(td("mesh.test"), vec![other.root.clone()]).unwrap())
            .is_err(),
        "our own trust domain is never federated"
    );
    assert_eq!(trust.federated_domains(), vec![td("other.test")]);
}
