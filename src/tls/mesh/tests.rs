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
