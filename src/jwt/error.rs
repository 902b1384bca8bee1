//! What can be wrong with a JWT-SVID, a JWK or a SPIFFE bundle document: each message says what
//! was wrong and where (the token part, the claim, the bundle key by index).

/// A refused token, key or bundle.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// Longer than [`super::MAX_TOKEN_LEN`]: refused before any decoding.
    #[error("JWT: {len} bytes, longer than the {max} allowed")]
    TooLong {
        /// The token's length in bytes.
        len: usize,
        /// The longest token accepted.
        max: usize,
    },
    /// Not a compact JWS, or a part that does not decode or parse.
    #[error("{place}: {reason}")]
    Malformed {
        /// Where: "JWT", "JWT header", "JWT claims", "JWT signature".
        place: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The header's `alg` is not one of the allowed asymmetric algorithms.
    #[error("JWT header: alg {alg:?} is not allowed ({allowed})", allowed = super::keys::ALLOWED_ALGS)]
    AlgNotAllowed {
        /// The header's alg.
        alg: String,
    },
    /// The header's `alg` is not one the key can verify (alg confusion).
    #[error("JWT header: alg {alg} does not match key {kid:?} ({key})")]
    AlgKeyMismatch {
        /// The header's alg.
        alg: String,
        /// The key's id.
        kid: String,
        /// What the key is ("an EC P-256 key, for ES256").
        key: String,
    },
    /// No JWT bundle for the trust domain of `sub`.
    #[error("JWT claims: sub {sub:?}: no JWT bundle for trust domain {trust_domain:?}")]
    UnknownTrustDomain {
        /// The token's sub.
        sub: String,
        /// Its trust domain.
        trust_domain: String,
    },
    /// The trust domain's bundle holds no key with the header's `kid`.
    #[error("JWT header: kid {kid:?} is not in the JWT bundle of {trust_domain:?}")]
    UnknownKid {
        /// The header's kid.
        kid: String,
        /// The trust domain whose bundle was searched.
        trust_domain: String,
    },
    /// The signature does not verify with the key.
    #[error("JWT signature: does not verify with key {kid:?} ({alg})")]
    BadSignature {
        /// The key's id.
        kid: String,
        /// The header's alg.
        alg: String,
    },
    /// `exp` is not in the future.
    #[error("JWT claims: expired (exp {exp}, now {now})")]
    Expired {
        /// The token's exp (Unix seconds).
        exp: u64,
        /// The validator's time (Unix seconds).
        now: u64,
    },
    /// `nbf` is in the future.
    #[error("JWT claims: not valid yet (nbf {nbf}, now {now})")]
    NotYetValid {
        /// The token's nbf (Unix seconds).
        nbf: u64,
        /// The validator's time (Unix seconds).
        now: u64,
    },
    /// `aud` does not contain the expected audience.
    #[error("JWT claims: aud {got:?} does not contain {want:?}")]
    Audience {
        /// The audience this validator expects.
        want: String,
        /// The token's audiences.
        got: Vec<String>,
    },
    /// The signing key belongs to a known region and the `region` claim is missing.
    #[error("JWT claims: region missing; key {kid:?} is region {key_region:?}'s")]
    RegionMissing {
        /// The key's id.
        kid: String,
        /// The region whose CA holds the key.
        key_region: String,
    },
    /// The `region` claim is not the signing key's region.
    #[error("JWT claims: region {claimed:?}, but key {kid:?} is region {key_region:?}'s")]
    RegionMismatch {
        /// The token's region claim.
        claimed: String,
        /// The key's id.
        kid: String,
        /// The region whose CA holds the key.
        key_region: String,
    },
    /// A claim that is missing, of the wrong type or invalid (`sub`, `aud`, `exp`, ...).
    #[error("JWT claims: {claim}: {reason}")]
    Claim {
        /// The claim's name.
        claim: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A JWK that is not a usable JWT-SVID verification key.
    #[error("{place}: {reason}")]
    Key {
        /// Where: "JWK", "bundle key 3".
        place: String,
        /// What was wrong.
        reason: String,
    },
    /// A SPIFFE bundle document or JWKS that cannot be used.
    #[error("bundle: {0}")]
    Bundle(String),
    /// Two different keys under one kid.
    #[error("JWT bundle of {trust_domain:?}: two different keys with kid {kid:?}")]
    KidConflict {
        /// The kid.
        kid: String,
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// Claims this crate refuses to sign (no audience, a token too long).
    #[error("JWT signing: {0}")]
    Sign(String),
    /// The crypto library failed (key generation, a key file that does not parse).
    #[error("JWT key: {0}")]
    Crypto(String),
}

impl JwtError {
    /// A short, fixed reason for metrics and audit lines (never the token's contents).
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::TooLong { .. } => "too_long",
            JwtError::Malformed { .. } | JwtError::Claim { .. } => "malformed",
            JwtError::AlgNotAllowed { .. } | JwtError::AlgKeyMismatch { .. } => "alg",
            JwtError::UnknownTrustDomain { .. } => "unknown_trust_domain",
            JwtError::UnknownKid { .. } => "unknown_kid",
            JwtError::BadSignature { .. } => "signature",
            JwtError::Expired { .. } => "expired",
            JwtError::NotYetValid { .. } => "not_yet_valid",
            JwtError::Audience { .. } => "audience",
            JwtError::RegionMissing { .. } | JwtError::RegionMismatch { .. } => "region",
            JwtError::Key { .. } | JwtError::Bundle(_) | JwtError::KidConflict { .. } => "bundle",
            JwtError::Sign(_) | JwtError::Crypto(_) => "internal",
        }
    }

    pub(crate) fn malformed(place: &'static str, reason: impl Into<String>) -> Self {
        JwtError::Malformed {
            place,
            reason: reason.into(),
        }
    }

    pub(crate) fn claim(claim: &'static str, reason: impl Into<String>) -> Self {
        JwtError::Claim {
            claim,
            reason: reason.into(),
        }
    }

    pub(crate) fn key(place: &str, reason: impl Into<String>) -> Self {
        JwtError::Key {
            place: place.to_string(),
            reason: reason.into(),
        }
    }
}
