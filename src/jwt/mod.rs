//! JWT-SVIDs (SPIFFE JWT-SVID spec) with trustline's `region` claim: the ES256 signing key of a
//! regional CA, the verification keys and bundles of every trusted trust domain, the SPIFFE
//! bundle document that carries both X.509 roots and JWT keys, and the one validator.
//!
//! Everything a token or bundle holds is refused unless it has one reading: base64url without
//! padding in its canonical form, JSON without duplicate member names, an `alg` that fits the
//! key (never `none` or HMAC), sizes bounded before decoding.

mod bundle;
mod error;
mod json;
mod keys;
mod validate;
mod x509;

use std::time::{Duration, SystemTime};

use crate::identity::SpiffeId;
use crate::region::Region;

pub use bundle::{
    parse_jwks, parse_spiffe_bundle, spiffe_bundle_json, JwtBundle, JwtBundles, SpiffeBundleDoc,
    MAX_BUNDLE_KEYS, MAX_BUNDLE_LEN,
};
pub use error::JwtError;
pub use keys::{Alg, PublicKey, SigningKey, MAX_KID_LEN};
pub use validate::{peek_subject, validate};

/// Longer tokens are refused unparsed.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// How long a JWT-SVID lives unless configured otherwise.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

/// The claims trustline signs into a JWT-SVID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The workload's SPIFFE ID.
    pub sub: SpiffeId,
    /// Who the token is for (at least one).
    pub aud: Vec<String>,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// The issuing region (the region of the CA whose key signs).
    pub region: Option<Region>,
}

impl Claims {
    /// Claims issued at `now` for `ttl`.
    pub fn new(
        sub: SpiffeId,
        aud: Vec<String>,
        now: SystemTime,
        ttl: Duration,
        region: Option<Region>,
    ) -> Self {
        let iat = crate::clock::unix_secs(now);
        Claims {
            sub,
            aud,
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            region,
        }
    }
}

/// A JWT-SVID whose signature, expiry, audience and region were checked.
#[derive(Clone, Debug)]
pub struct Validated {
    /// The verified subject.
    pub sub: SpiffeId,
    /// Its audiences.
    pub aud: Vec<String>,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Issued at (Unix seconds), if the token says.
    pub iat: Option<u64>,
    /// The issuing region, verified against the key's region; None when the key's region is
    /// not known (a federated key), whatever the token claims.
    pub region: Option<Region>,
    /// The key that verified the signature.
    pub kid: String,
    /// Every claim of the token, as signed.
    pub claims: serde_json::Map<String, serde_json::Value>,
}
