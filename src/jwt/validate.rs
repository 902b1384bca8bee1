//! The JWT-SVID validator (SPIFFE JWT-SVID spec, sections 3 and 7).

use std::time::SystemTime;

use serde_json::{Map, Value};

use super::json::{b64url, object};
use super::{Alg, JwtBundles, JwtError, Validated, MAX_TOKEN_LEN};
use crate::identity::{parse_id, SpiffeId};
use crate::region::Region;

/// A token split and decoded, nothing verified yet.
struct Parts<'a> {
    alg: Alg,
    kid: String,
    claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let dots = token.bytes().filter(|b| *b == b'.').count();
    if dots != 2 {
        return Err(JwtError::malformed(
            "JWT",
            format!(
                "a compact JWS has three parts separated by '.', found {}",
                dots + 1
            ),
        ));
    }
    let mut it = token.splitn(3, '.');
    let (h, p, s) = match (it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(s)) => (h, p, s),
        _ => return Err(JwtError::malformed("JWT", "not a compact JWS")),
    };
    let header = b64url(h)
        .map_err(|e| JwtError::malformed("JWT header", e))
        .and_then(|b| object(&b).map_err(|e| JwtError::malformed("JWT header", e)))?;
    let (alg, kid) = read_header(&header)?;
    let claims = b64url(p)
        .map_err(|e| JwtError::malformed("JWT claims", e))
        .and_then(|b| object(&b).map_err(|e| JwtError::malformed("JWT claims", e)))?;
    if s.is_empty() {
        return Err(JwtError::malformed("JWT signature", "empty"));
    }
    let signature = b64url(s).map_err(|e| JwtError::malformed("JWT signature", e))?;
    Ok(Parts {
        alg,
        kid,
        claims,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature,
    })
}

/// `alg` (allowed set), `kid` (required), `typ` (JWT or JOSE when present), no `crit`.
fn read_header(h: &Map<String, Value>) -> Result<(Alg, String), JwtError> {
    let bad = |r: String| JwtError::malformed("JWT header", r);
    let alg = match h.get("alg") {
        Some(Value::String(a)) => {
            Alg::parse(a).ok_or_else(|| JwtError::AlgNotAllowed { alg: a.clone() })?
        }
        Some(_) => return Err(bad("alg is not a string".into())),
        None => return Err(bad("alg missing".into())),
    };
    let kid = match h.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        Some(Value::String(_)) => return Err(bad("kid is empty".into())),
        Some(_) => return Err(bad("kid is not a string".into())),
        None => return Err(bad("kid missing (a JWT-SVID names its key)".into())),
    };
    match h.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(t) => return Err(bad(format!("typ {t} (JWT or JOSE expected)"))),
    }
    if h.contains_key("crit") {
        return Err(bad("crit: no extension is understood here".into()));
    }
    Ok((alg, kid))
}

fn sub_of(claims: &Map<String, Value>) -> Result<SpiffeId, JwtError> {
    match claims.get("sub") {
        Some(Value::String(s)) => parse_id(s).map_err(|e| JwtError::claim("sub", e.to_string())),
        Some(_) => Err(JwtError::claim("sub", "not a string")),
        None => Err(JwtError::claim("sub", "missing")),
    }
}

/// The `sub` of a token, **unverified**: only to choose which bundle to validate it with (the
/// `jwt validate` command without `--trust-domain`).
pub fn peek_subject(token: &str) -> Result<SpiffeId, JwtError> {
    sub_of(&split(token)?.claims)
}

/// A NumericDate claim: a non-negative integer.
fn date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| JwtError::claim(name, format!("{n} is not a non-negative integer"))),
        Some(v) => Err(JwtError::claim(name, format!("{v} is not a number"))),
    }
}

fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    let one = |v: &Value| match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::String(_) => Err(JwtError::claim("aud", "an empty audience")),
        other => Err(JwtError::claim("aud", format!("{other} is not a string"))),
    };
    match claims.get("aud") {
        None => Err(JwtError::claim("aud", "missing")),
        Some(Value::Array(a)) if a.is_empty() => Err(JwtError::claim("aud", "an empty array")),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// Validates per the SPIFFE JWT-SVID spec: compact JWS, alg from the allowed set and matching
/// the key, `kid` required, `sub` a SPIFFE ID whose trust domain's bundle holds `kid`,
/// signature, `exp` in the future (`now`), `nbf` if present not in the future, `aud` contains
/// `audience`. Region: when the key's region is known, the `region` claim is required and must
/// equal it and [`Validated::region`] is it; when unknown (a federated key), it is None (an
/// unverified claim is never reported as verified).
pub fn validate(
    token: &str,
    bundles: &JwtBundles,
    audience: &str,
    now: SystemTime,
) -> Result<Validated, JwtError> {
    let parts = split(token)?;
    let sub = sub_of(&parts.claims)?;
    let td = sub.trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| JwtError::UnknownTrustDomain {
            sub: sub.to_string(),
            trust_domain: td.to_string(),
        })?;
    let key = bundle.get(&parts.kid).ok_or_else(|| JwtError::UnknownKid {
        kid: parts.kid.clone(),
        trust_domain: td.to_string(),
    })?;
    key.verify(parts.alg, parts.signing_input.as_bytes(), &parts.signature)?;

    // Signed by a key we trust: now the claims.
    let claims = parts.claims;
    let now_s = crate::clock::unix_secs(now);
    let exp = date(&claims, "exp")?.ok_or_else(|| JwtError::claim("exp", "missing"))?;
    if exp <= now_s {
        return Err(JwtError::Expired { exp, now: now_s });
    }
    if let Some(nbf) = date(&claims, "nbf")? {
        if nbf > now_s {
            return Err(JwtError::NotYetValid { nbf, now: now_s });
        }
    }
    let iat = date(&claims, "iat")?;
    let aud = audiences(&claims)?;
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtError::Audience {
            want: audience.to_string(),
            got: aud,
        });
    }
    let claimed = match claims.get("region") {
        None => None,
        Some(Value::String(r)) => {
            Some(Region::new(r).map_err(|e| JwtError::claim("region", format!("{r:?}: {e}")))?)
        }
        Some(v) => return Err(JwtError::claim("region", format!("{v} is not a string"))),
    };
    let region = match (key.region(), claimed) {
        (None, _) => None,
        (Some(k), None) => {
            return Err(JwtError::RegionMissing {
                kid: key.kid().to_string(),
                key_region: k.to_string(),
            })
        }
        (Some(k), Some(c)) if *k != c => {
            return Err(JwtError::RegionMismatch {
                claimed: c.to_string(),
                kid: key.kid().to_string(),
                key_region: k.to_string(),
            })
        }
        (Some(k), Some(_)) => Some(k.clone()),
    };
    Ok(Validated {
        sub,
        aud,
        exp,
        iat,
        region,
        kid: parts.kid,
        claims,
    })
}
