//! The one crypto provider every role uses (aws-lc-rs, TLS 1.3 only) and the protocol-version
//! list that goes with it. A plain building block: the certificate types below `tls/` need the
//! provider's signature algorithms, so it sits under both.

use std::sync::{Arc, OnceLock};

use rustls::crypto::{aws_lc_rs, CryptoProvider};

/// The only protocol version trustline speaks.
pub static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider: aws-lc-rs, TLS 1.3 suites with AES-128-GCM first, key exchange
/// X25519MLKEM768 first, then X25519, then P-256.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = aws_lc_rs::default_provider();
            // TLS 1.3 only; AES-128-GCM/SHA-256 first: SHA-256 has hardware help on common
            // CPUs where SHA-384 does not, and the handshake transcript and bulk records both
            // get cheaper (a profile of the sidecar pair showed SHA-384 at 9 % of a handshake).
            p.cipher_suites = vec![
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ];
            p.kx_groups = vec![
                aws_lc_rs::kx_group::X25519MLKEM768,
                aws_lc_rs::kx_group::X25519,
                aws_lc_rs::kx_group::SECP256R1,
            ];
            Arc::new(p)
        })
        .clone()
}
