//! Strict decoding of the parts of a token and of bundle documents: base64url without padding in
//! its one canonical form, and JSON objects whose member names are unique at every depth (JSON
//! parsers disagree on duplicates: one takes the first, another the last, so a token or bundle
//! that two validators read differently is refused here).

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// base64url without padding (RFC 7515 section 2): `=`, characters of the standard alphabet and
/// non-zero trailing bits (a second spelling of the same bytes) are refused.
pub(crate) fn b64url(s: &str) -> Result<Vec<u8>, String> {
    if s.contains('=') {
        return Err("base64url with padding ('='); JWS uses none".into());
    }
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("not base64url without padding: {e}"))
}

/// Standard base64 with padding, canonical (x5c, RFC 7517 section 4.7).
pub(crate) fn b64std(s: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(s)
        .map_err(|e| format!("not standard base64: {e}"))
}

/// base64url without padding, for writing.
pub(crate) fn b64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Parses a JSON object, refusing duplicate member names at any depth.
pub(crate) fn object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// A JSON value read with unique member names.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::Number(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Strict, E> {
        Number::from_f64(v)
            .map(|n| Strict(Value::Number(n)))
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Strict(Value::Array(out)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate member {k:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Strict(Value::Object(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        assert!(object(br#"{"a":1,"b":2}"#).is_ok());
        let e = object(br#"{"a":1,"a":2}"#).unwrap_err();
        assert!(e.contains("duplicate member \"a\""), "{e}");
        let e = object(br#"{"k":[{"x":1,"x":1}]}"#).unwrap_err();
        assert!(e.contains("duplicate member \"x\""), "{e}");
        // The same name spelled with an escape is the same name.
        assert!(object(br#"{"a":1,"\u0061":2}"#).is_err());
        assert!(object(b"[1]").is_err());
        assert!(object(br#"{"a":1} x"#).is_err());
    }

    #[test]
    fn base64url_is_canonical_and_unpadded() {
        assert_eq!(b64url("AQ").unwrap(), vec![1]);
        assert!(b64url("AQ==").unwrap_err().contains("padding"));
        // "AR" has non-zero trailing bits: a second spelling of [1].
        assert!(b64url("AR").is_err());
        assert!(b64url("A+").is_err());
        assert!(b64url("A/").is_err());
        assert!(b64url("A").is_err());
        assert_eq!(b64url("-_8").unwrap(), vec![0xfb, 0xff]);
    }
}
