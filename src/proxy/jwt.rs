//! JWT-SVIDs on HTTP ports: the request's `Authorization: Bearer` token, its validation for one
//! of the audiences a service's `jwt` rules name, and what the audit line says of it (see
//! [`super::http`] for when tokens are read and whether the header reaches the app).

use std::time::{Duration, SystemTime};

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};

use crate::audit::decision::JwtAudit;
use crate::clock::rfc3339;
use crate::policy::{JwtFacts, VerifiedJwt};
use crate::region::Region;

/// The request's bearer token: exactly one `Authorization` header, scheme `Bearer` (any case),
/// or why there is none.
pub(super) fn bearer(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let value = match (all.next(), all.next()) {
        (None, _) => return Err("no Authorization header"),
        (Some(_), Some(_)) => return Err("more than one Authorization header"),
        (Some(v), None) => v,
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not visible ASCII")?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            match token.trim_matches(' ') {
                "" => Err("an empty Bearer token"),
                t => Ok(t),
            }
        }
        _ => Err("the Authorization header is not a Bearer token"),
    }
}

/// Removes the `Authorization` header when it holds a Bearer token (every value of it then).
pub(super) fn strip_bearer(headers: &mut HeaderMap) {
    let is_bearer = |v: &HeaderValue| {
        v.as_bytes()
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "))
    };
    if headers.get_all(AUTHORIZATION).iter().any(is_bearer) {
        headers.remove(AUTHORIZATION);
    }
}

/// The audit fields of a request's token.
pub(super) fn audit(j: &JwtFacts) -> JwtAudit {
    match j {
        JwtFacts::Verified(v) => JwtAudit {
            jwt_sub: Some(v.sub.clone()),
            jwt_region: v.region.as_ref().map(Region::to_string),
            jwt_error: None,
        },
        JwtFacts::Refused(why) => JwtAudit {
            jwt_error: Some(why.clone()),
            ..Default::default()
        },
    }
}

/// Longest `jwt_error` in an audit line (a claim the validator quotes can be long).
const MAX_JWT_ERROR: usize = 300;

/// Validates `token` for one of `audiences` (the service's, in file order): with the first,
/// and when only the audience failed, once more with one the token names (the audience is
/// checked after the signature, so its `aud` is then the signed one). Two validations at most.
pub(super) fn validate_for(
    token: &str,
    bundles: &crate::jwt::JwtBundles,
    audiences: &[String],
    now: SystemTime,
) -> JwtFacts {
    use crate::jwt::{validate, JwtError};
    let Some(first) = audiences.first() else {
        return JwtFacts::Refused("no rule of the service reads tokens".into());
    };
    let valid = match validate(token, bundles, first, now) {
        Err(JwtError::Audience { got, .. }) => match audiences.iter().find(|a| got.contains(a)) {
            Some(a) => validate(token, bundles, a, now),
            None => return JwtFacts::Refused(format!("aud {got:?} has none of {audiences:?}")),
        },
        other => other,
    };
    match valid {
        Ok(v) => JwtFacts::Verified(VerifiedJwt {
            sub: v.sub.to_string(),
            region: v.region,
            aud: v.aud,
        }),
        Err(JwtError::Expired { exp, .. }) => {
            let at = std::time::UNIX_EPOCH.checked_add(Duration::from_secs(exp));
            JwtFacts::Refused(format!(
                "expired at {}",
                at.map_or_else(|| exp.to_string(), rfc3339)
            ))
        }
        Err(e) => {
            let mut why = e.to_string();
            if why.len() > MAX_JWT_ERROR {
                let mut cut = MAX_JWT_ERROR;
                while !why.is_char_boundary(cut) {
                    cut -= 1;
                }
                why.truncate(cut);
                why.push_str("...");
            }
            JwtFacts::Refused(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_bearer_token_is_one_header_with_the_bearer_scheme() {
        assert_eq!(bearer(&headers(&["Bearer a.b.c"])), Ok("a.b.c"));
        assert_eq!(bearer(&headers(&["bEaReR   a.b.c"])), Ok("a.b.c"));
        assert_eq!(bearer(&headers(&[])), Err("no Authorization header"));
        let two = headers(&["Bearer a.b.c", "Bearer d.e.f"]);
        assert_eq!(bearer(&two), Err("more than one Authorization header"));
        let not = Err("the Authorization header is not a Bearer token");
        assert_eq!(bearer(&headers(&["Basic dTpw"])), not);
        assert_eq!(bearer(&headers(&["Bearer"])), not);
        assert_eq!(
            bearer(&headers(&["Bearer  "])),
            Err("an empty Bearer token")
        );
    }

    #[test]
    fn only_bearer_headers_are_stripped() {
        let mut h = headers(&["Basic dTpw"]);
        strip_bearer(&mut h);
        assert_eq!(h.get_all(AUTHORIZATION).iter().count(), 1);
        let mut h = headers(&["Basic dTpw", "bearer x.y.z"]);
        strip_bearer(&mut h);
        assert!(
            h.get(AUTHORIZATION).is_none(),
            "a Bearer value takes every value with it"
        );
    }

    #[test]
    fn no_audience_or_a_huge_token_is_refused_in_a_short_line() {
        let bundles = crate::jwt::JwtBundles::default();
        let aud = ["api".to_string()];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            validate_for("x.y.z", &bundles, &[], now),
            JwtFacts::Refused("no rule of the service reads tokens".into())
        );
        let JwtFacts::Refused(why) = validate_for(&"a".repeat(8000), &bundles, &aud, now) else {
            panic!("valid?");
        };
        assert!(why.len() <= MAX_JWT_ERROR + 3, "{why}");
    }
}
