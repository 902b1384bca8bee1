//! A rule's `jwt` condition: the request must carry a JWT-SVID, and the policy decides on what
//! its validation established (the verified `sub`, `region` and `aud`), never on the token.
//!
//! Validation happens outside this module (the sidecar checks signature, expiry, one of the
//! service's audiences and the region against the signing key's, with
//! [`crate::jwt::validate`]); what it found is handed in as [`JwtFacts`]. So the policy stays
//! pure and `policy explain` can decide on facts an operator types in.

use std::fmt;

use super::matchers::Principal;
use crate::region::Region;

/// What a request's `Authorization: Bearer` token established, for the rules with `jwt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtFacts {
    /// A valid JWT-SVID.
    Verified(VerifiedJwt),
    /// No usable token, and why ("no Authorization header", "expired at ...").
    Refused(String),
}

impl JwtFacts {
    /// The facts when no token was read for a decision (a caller that does not look at tokens).
    pub fn not_read() -> Self {
        JwtFacts::Refused("no JWT-SVID was read".into())
    }
}

/// The verified claims of a valid JWT-SVID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// `sub`, a SPIFFE ID (canonical text).
    pub sub: String,
    /// The issuing region, verified against the signing key's region; `None` when the key's
    /// region is unknown (a federated key), whatever the token claims.
    pub region: Option<Region>,
    /// Every audience of the token (it was valid for at least one of the service's).
    pub aud: Vec<String>,
}

/// A rule's `jwt = { audiences = [...], regions = [...], from = [...] }`.
#[derive(Clone, Debug)]
pub struct JwtRule {
    /// The token must be for one of these (never empty).
    pub audiences: Vec<String>,
    /// Empty: any region, or none. Else the verified region must be one of these (a token
    /// without a verified region never matches).
    pub regions: Vec<Region>,
    /// Empty: any subject the bundles vouch for. Else `sub` must match one (exact, `prefix/*`
    /// or `*`, as the rule's own `from`).
    pub from: Vec<Principal>,
}

impl JwtRule {
    /// Why `facts` do not satisfy the condition (a text starting with `jwt:`); `None` if
    /// they do.
    pub fn mismatch(&self, facts: &JwtFacts) -> Option<String> {
        let v = match facts {
            JwtFacts::Refused(why) => return Some(format!("jwt: {why}")),
            JwtFacts::Verified(v) => v,
        };
        if !self.audiences.iter().any(|a| v.aud.contains(a)) {
            return Some(format!(
                "jwt: aud {:?} has none of {:?}",
                v.aud, self.audiences
            ));
        }
        if !self.regions.is_empty() {
            match &v.region {
                None => {
                    return Some(format!(
                        "jwt: no verified region (the signing key's region is unknown), regions {:?} need one",
                        Names(&self.regions)
                    ))
                }
                Some(r) if !self.regions.contains(r) => {
                    return Some(format!(
                        "jwt: region {r} not in {:?}",
                        Names(&self.regions)
                    ))
                }
                Some(_) => {}
            }
        }
        if !self.from.is_empty() && !self.from.iter().any(|p| p.matches(&v.sub)) {
            let list: Vec<String> = self.from.iter().map(|p| p.to_string()).collect();
            return Some(format!("jwt: sub {} not in from {list:?}", v.sub));
        }
        None
    }
}

/// Regions listed as their names.
struct Names<'a>(&'a [Region]);

impl fmt::Debug for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|r| r.as_str()))
            .finish()
    }
}
