//! The CA's CSR intake and leaf template (src/ca/authority.rs): `parse_csr` on the body of
//! `POST /v1/svid`, then, for a request it accepts, `check_workload_id` and `sign_leaf` by a
//! real regional CA, as the API does.
//!
//! Input: a mode byte, then either a CSR (PEM text, or DER that is wrapped into PEM) or, in
//! structured mode, lines each giving one URI SAN of a CSR this target signs with a real key
//! (P-256, P-384 or Ed25519), so that mutations reach past the signature check.
//!
//! Beyond "no panic":
//! - a correctly signed CSR with exactly one URI SAN that is a valid SPIFFE ID is accepted, and
//!   the ID read is that one; with any other number of URI SANs it is refused;
//! - the leaf signed for an accepted request carries exactly the requested ID, passes the
//!   X.509-SVID leaf profile, names the serial the CA returned, and does not outlive the CA.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, KeyPair, SanType};
use trustline::ca::authority::{check_workload_id, parse_csr, Authority, CsrError, LeafUsage};
use trustline::identity::{inspect_cert, parse_id};

fn authority() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| Authority::load(&common::world().join("pki/eu-west")).expect("load the CA"))
}

fn keys() -> &'static [KeyPair; 3] {
    static KEYS: OnceLock<[KeyPair; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256"),
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384"),
            KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519"),
        ]
    })
}

/// A CSR signed by a real key with each line of `text` as a URI SAN (plus a DNS SAN if `dns`).
fn structured(key: &KeyPair, text: &str, dns: bool) -> Option<String> {
    let mut p = CertificateParams::default();
    for line in text.lines() {
        p.subject_alt_names
            .push(SanType::URI(line.try_into().ok()?));
    }
    if dns {
        p.subject_alt_names
            .push(SanType::DnsName("web.example.org".try_into().ok()?));
    }
    p.serialize_request(key).ok()?.pem().ok()
}

fn issue(csr: &trustline::ca::authority::Csr) {
    let ca = authority();
    if check_workload_id(ca, &csr.requested).is_err() {
        return;
    }
    let now = SystemTime::now();
    let issued = ca
        .sign_leaf(
            &csr.requested,
            &csr.public_key,
            Duration::from_secs(3600),
            now,
            LeafUsage::Svid,
        )
        .expect("the CA signs an accepted request");
    let info = inspect_cert(&issued.leaf).expect("our leaf parses");
    assert_eq!(info.id, csr.requested, "the leaf names another ID");
    info.check_leaf_profile()
        .expect("our leaf has the SVID profile");
    assert_eq!(info.serial, issued.serial);
    assert!(!info.is_ca);
    assert!(info.not_after <= ca.not_after, "the leaf outlives its CA");
    // How the seeds of `cert_inspect` were made: a leaf of our CA and its issuer.
    if let Some(dir) = std::env::var_os("TRUSTLINE_FUZZ_SEED_DIR") {
        let mut seed = (issued.leaf.len() as u16).to_be_bytes().to_vec();
        seed.extend_from_slice(&issued.leaf);
        seed.extend_from_slice(&ca.cert);
        let name = format!("leaf-{}", info.serial);
        std::fs::write(std::path::Path::new(&dir).join(name), seed).expect("write seed");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let pem = if rest.starts_with(b"-----") {
            rest.to_vec()
        } else {
            let b64 = base64::engine::general_purpose::STANDARD.encode(rest);
            format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
            )
            .into_bytes()
        };
        if let Ok(csr) = parse_csr(&pem) {
            issue(&csr);
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let key = &keys()[(mode as usize >> 1) % 3];
    let Some(pem) = structured(key, text, mode & 0x10 != 0) else {
        return;
    };
    let uris: Vec<&str> = text.lines().collect();
    match parse_csr(pem.as_bytes()) {
        Ok(csr) => {
            assert_eq!(uris.len(), 1, "accepted a CSR with {} URI SANs", uris.len());
            let id = parse_id(uris[0]).expect("the accepted URI is a SPIFFE ID");
            assert_eq!(csr.requested, id);
            issue(&csr);
        }
        Err(CsrError::UriCount(n)) => assert_eq!(n, uris.len()),
        Err(CsrError::BadUri(u)) => {
            assert_eq!(uris.len(), 1);
            assert!(parse_id(&u).is_err(), "refused the valid SPIFFE ID {u:?}");
        }
        Err(e) => panic!("a well-signed CSR refused: {e}"),
    }
});
