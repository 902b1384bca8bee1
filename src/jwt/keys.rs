//! JWT-SVID keys: the ES256 signing key of a regional CA, and the verification keys a bundle
//! carries (EC P-256/P-384 and RSA), as JWKs (RFC 7517/7518) with RFC 7638 thumbprints.

use std::fmt;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::PublicKeyComponents as RsaPublicKeyComponents;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, ParsedPublicKey, UnparsedPublicKey};
use serde_json::{json, Map, Value};

use super::json::{b64url, b64url_encode};
use super::{Claims, JwtError, MAX_TOKEN_LEN};
use crate::region::Region;

/// The algorithms a token may name, for messages.
pub(crate) const ALLOWED_ALGS: &str = "ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512";

/// The longest `kid` accepted (SPIRE's are 32 characters, thumbprints 43).
pub const MAX_KID_LEN: usize = 256;

/// RSA moduli accepted, in bits (RFC 7518 section 3.3 asks for at least 2048).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// A JWS algorithm this crate verifies. No `none`, no HMAC: a bundle holds public keys only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 with SHA-256 (the default, and what trustline signs with).
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
}

impl Alg {
    /// The algorithm named `s` (exact, case-sensitive), if allowed.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            _ => return None,
        })
    }

    /// Its JWA name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    fn coord_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }

    fn verifier(self) -> &'static signature::EcdsaVerificationAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED,
        }
    }
}

/// The public key itself.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Material {
    /// An uncompressed point, 0x04 || x || y.
    Ec { curve: Curve, point: Vec<u8> },
    /// Big-endian, no leading zero bytes.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

impl Material {
    /// The JWK members that define the key (RFC 7638 section 3.2), without kid or use.
    pub(crate) fn jwk_members(&self) -> Map<String, Value> {
        let v = match self {
            Material::Ec { curve, point } => {
                let n = curve.coord_len();
                json!({
                    "kty": "EC",
                    "crv": curve.name(),
                    "x": b64url_encode(&point[1..1 + n]),
                    "y": b64url_encode(&point[1 + n..]),
                })
            }
            Material::Rsa { n, e } => {
                json!({"kty": "RSA", "n": b64url_encode(n), "e": b64url_encode(e)})
            }
        };
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The RFC 7638 thumbprint of the key.
    pub(crate) fn thumbprint(&self) -> String {
        jwk_thumbprint(&self.jwk_members()).unwrap_or_default()
    }

    /// What the key is, for messages: "an EC P-256 key, for ES256".
    fn describe(&self) -> String {
        match self {
            Material::Ec {
                curve: Curve::P256, ..
            } => "an EC P-256 key, for ES256".into(),
            Material::Ec {
                curve: Curve::P384, ..
            } => "an EC P-384 key, for ES384".into(),
            Material::Rsa { n, .. } => format!(
                "an RSA {}-bit key, for RS256/384/512 and PS256/384/512",
                bits(n)
            ),
        }
    }

    fn fits(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (
                Material::Ec {
                    curve: Curve::P256,
                    ..
                },
                Alg::Es256
            ) | (
                Material::Ec {
                    curve: Curve::P384,
                    ..
                },
                Alg::Es384
            ) | (
                Material::Rsa { .. },
                Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512
            )
        )
    }
}

/// The RFC 7638 thumbprint of a JWK (EC, RSA or OKP): SHA-256 over its required members in
/// lexicographic order, without white space, base64url. None for another kty or a member missing.
pub(crate) fn jwk_thumbprint(jwk: &Map<String, Value>) -> Option<String> {
    let required: &[&str] = match jwk.get("kty")?.as_str()? {
        "EC" => &["crv", "kty", "x", "y"],
        "RSA" => &["e", "kty", "n"],
        "OKP" => &["crv", "kty", "x"],
        _ => return None,
    };
    let mut canonical = String::from("{");
    for (i, name) in required.iter().enumerate() {
        let value = jwk.get(*name)?.as_str()?;
        if i > 0 {
            canonical.push(',');
        }
        // serde_json writes strings with the minimal escaping RFC 7638 asks for.
        canonical.push_str(&format!("{}:{}", json!(name), json!(value)));
    }
    canonical.push('}');
    Some(b64url_encode(
        digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref(),
    ))
}

/// The bit length of a big-endian unsigned integer without leading zeros.
fn bits(n: &[u8]) -> usize {
    match n.first() {
        Some(b) => (n.len() - 1) * 8 + (8 - b.leading_zeros() as usize),
        None => 0,
    }
}

/// A JWT-SVID verification key as the SPIFFE bundle carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    kid: String,
    region: Option<Region>,
    /// The JWK's `alg`, when it names one: then only that algorithm is accepted.
    alg: Option<Alg>,
    material: Material,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("region", &self.region)
            .field("alg", &self.alg)
            .field("key", &self.material.describe())
            .finish()
    }
}

impl PublicKey {
    /// The key's id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The region whose CA holds the private key, if known.
    pub fn region(&self) -> Option<&Region> {
        self.region.as_ref()
    }

    /// The same key, said to belong to `region` (or to no known region).
    pub fn with_region(mut self, region: Option<Region>) -> Self {
        self.region = region;
        self
    }

    /// The RFC 7638 thumbprint of the key (base64url SHA-256), whatever its `kid`.
    pub fn thumbprint(&self) -> String {
        self.material.thumbprint()
    }

    /// The JWK: kty, crv/x/y (or n/e), kid, `"use": "jwt-svid"`, alg when the key was given
    /// one, and trustline's own `region` member when known.
    pub fn to_jwk(&self) -> Value {
        let mut m = self.material.jwk_members();
        m.insert("kid".into(), json!(self.kid));
        m.insert("use".into(), json!("jwt-svid"));
        if let Some(alg) = self.alg {
            m.insert("alg".into(), json!(alg.as_str()));
        }
        if let Some(r) = &self.region {
            m.insert("region".into(), json!(r.as_str()));
        }
        Value::Object(m)
    }

    /// Reads a JWK (EC P-256/P-384 or RSA of 2048 to 8192 bits, `kid` required, `region` and
    /// `alg` read when present; `use` is the caller's business).
    pub fn from_jwk(jwk: &Value) -> Result<Self, JwtError> {
        Self::from_jwk_at(jwk, "JWK")
    }

    /// [`PublicKey::from_jwk`] with `place` ("bundle key 3") in its errors.
    pub(crate) fn from_jwk_at(jwk: &Value, place: &str) -> Result<Self, JwtError> {
        let err = |r: String| JwtError::key(place, r);
        let m = jwk
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        let kid = match m.get("kid") {
            Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KID_LEN => k.clone(),
            Some(Value::String(k)) if k.is_empty() => return Err(err("kid is empty".into())),
            Some(Value::String(k)) => {
                return Err(err(format!(
                    "kid is {} bytes, longer than the {MAX_KID_LEN} allowed",
                    k.len()
                )))
            }
            Some(_) => return Err(err("kid is not a string".into())),
            None => return Err(err("kid missing (a jwt-svid key needs one)".into())),
        };
        let material = material_of(m).map_err(err)?;
        let alg = match m.get("alg") {
            None => None,
            Some(Value::String(a)) => {
                let alg = Alg::parse(a)
                    .ok_or_else(|| err(format!("alg {a:?} is not allowed ({ALLOWED_ALGS})")))?;
                if !material.fits(alg) {
                    return Err(err(format!(
                        "alg {a} does not fit the key ({})",
                        material.describe()
                    )));
                }
                Some(alg)
            }
            Some(_) => return Err(err("alg is not a string".into())),
        };
        let region = match m.get("region") {
            None => None,
            Some(Value::String(r)) => {
                Some(Region::new(r).map_err(|e| err(format!("region {r:?}: {e}")))?)
            }
            Some(_) => return Err(err("region is not a string".into())),
        };
        Ok(PublicKey {
            kid,
            region,
            alg,
            material,
        })
    }

    /// Checks `sig` over `msg` for a token whose header names `alg`: the algorithm must fit
    /// the key's type and curve (and the JWK's own `alg`, if it named one).
    pub(crate) fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        if !self.material.fits(alg) || self.alg.is_some_and(|a| a != alg) {
            let mut key = self.material.describe();
            if let Some(a) = self.alg {
                key = format!("{key}; its JWK says alg {a}");
            }
            return Err(JwtError::AlgKeyMismatch {
                alg: alg.as_str().into(),
                kid: self.kid.clone(),
                key,
            });
        }
        let ok = match &self.material {
            Material::Ec { curve, point } => UnparsedPublicKey::new(curve.verifier(), point)
                .verify(msg, sig)
                .is_ok(),
            Material::Rsa { n, e } => {
                let params: Option<&'static signature::RsaParameters> = match alg {
                    Alg::Rs256 => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
                    Alg::Rs384 => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
                    Alg::Rs512 => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
                    Alg::Ps256 => Some(&signature::RSA_PSS_2048_8192_SHA256),
                    Alg::Ps384 => Some(&signature::RSA_PSS_2048_8192_SHA384),
                    Alg::Ps512 => Some(&signature::RSA_PSS_2048_8192_SHA512),
                    // Refused by `fits` above.
                    Alg::Es256 | Alg::Es384 => None,
                };
                let key = RsaPublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                };
                params.is_some_and(|p| key.verify(p, msg, sig).is_ok())
            }
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::BadSignature {
                kid: self.kid.clone(),
                alg: alg.as_str().into(),
            })
        }
    }
}

/// The key of a JWK's members.
fn material_of(m: &Map<String, Value>) -> Result<Material, String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        match m.get(name) {
            Some(Value::String(s)) => b64url(s).map_err(|e| format!("{name}: {e}")),
            Some(_) => Err(format!("{name} is not a string")),
            None => Err(format!("{name} missing")),
        }
    };
    match m.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            let curve = match m.get("crv").and_then(Value::as_str) {
                Some("P-256") => Curve::P256,
                Some("P-384") => Curve::P384,
                Some(c) => return Err(format!("crv {c:?} is not supported (P-256, P-384)")),
                None => return Err("crv missing".into()),
            };
            let (x, y) = (field("x")?, field("y")?);
            let n = curve.coord_len();
            if x.len() != n || y.len() != n {
                return Err(format!(
                    "x and y of a {} key are {n} bytes each, found {} and {}",
                    curve.name(),
                    x.len(),
                    y.len()
                ));
            }
            let mut point = Vec::with_capacity(1 + 2 * n);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            ParsedPublicKey::new(curve.verifier(), &point)
                .map_err(|_| format!("x, y is not a point on {}", curve.name()))?;
            Ok(Material::Ec { curve, point })
        }
        Some("RSA") => {
            let (n, e) = (field("n")?, field("e")?);
            if n.first() == Some(&0) || e.first() == Some(&0) {
                return Err("n or e has leading zero bytes (RFC 7518 section 6.3.1)".into());
            }
            if !RSA_BITS.contains(&bits(&n)) {
                return Err(format!(
                    "RSA modulus of {} bits; {} to {} accepted",
                    bits(&n),
                    RSA_BITS.start(),
                    RSA_BITS.end()
                ));
            }
            if e.is_empty() || e.len() > 4 || e.last().is_some_and(|b| b & 1 == 0) || e == [1] {
                return Err("RSA exponent e is not an odd number of at most 32 bits".into());
            }
            Ok(Material::Rsa { n, e })
        }
        Some(k) => Err(format!(
            "kty {k:?} is not supported for jwt-svid keys (EC P-256/P-384, RSA)"
        )),
        None => Err("kty missing".into()),
    }
}

/// An ES256 (P-256) signing key of one regional CA.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    kid: String,
    material: Material,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The kid only: never the key.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh P-256 key.
    pub fn generate() -> Result<Self, JwtError> {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| JwtError::Crypto("generating a P-256 key failed".into()))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| JwtError::Crypto("encoding the P-256 key failed".into()))?;
        Ok(Self::from_pair(pair, pkcs8.as_ref().to_vec()))
    }

    /// The key of a PKCS#8 document (as [`SigningKey::to_pkcs8`] wrote it).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| JwtError::Crypto(format!("not a PKCS#8 P-256 key: {e}")))?;
        Ok(Self::from_pair(pair, der.to_vec()))
    }

    fn from_pair(pair: EcdsaKeyPair, pkcs8: Vec<u8>) -> Self {
        let material = Material::Ec {
            curve: Curve::P256,
            point: pair.public_key().as_ref().to_vec(),
        };
        SigningKey {
            kid: material.thumbprint(),
            pair,
            pkcs8,
            material,
        }
    }

    /// The PKCS#8 document of the key, for the 0600 key file only.
    pub fn to_pkcs8(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }

    /// The RFC 7638 JWK thumbprint of the public key, base64url.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The verification key, held by `region`'s CA (None: not said).
    pub fn public(&self, region: Option<Region>) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            region,
            alg: Some(Alg::Es256),
            material: self.material.clone(),
        }
    }

    /// A compact JWS with header `{"alg":"ES256","kid":..,"typ":"JWT"}` and the claims `sub`,
    /// `aud` (a string when one, else an array), `iat`, `exp` and `region` when set.
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        if claims.aud.is_empty() || claims.aud.iter().any(String::is_empty) {
            return Err(JwtError::Sign(
                "a JWT-SVID needs at least one non-empty audience".into(),
            ));
        }
        if claims.exp <= claims.iat {
            return Err(JwtError::Sign(format!(
                "exp {} is not after iat {}",
                claims.exp, claims.iat
            )));
        }
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let aud = match claims.aud.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        let mut payload = json!({
            "sub": claims.sub.to_string(),
            "aud": aud,
            "iat": claims.iat,
            "exp": claims.exp,
        });
        if let Some(r) = &claims.region {
            payload["region"] = json!(r.as_str());
        }
        let signing_input = format!(
            "{}.{}",
            b64url_encode(header.to_string().as_bytes()),
            b64url_encode(payload.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| JwtError::Crypto("ES256 signing failed".into()))?;
        let token = format!("{signing_input}.{}", b64url_encode(sig.as_ref()));
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Sign(format!(
                "the token would be {} bytes, longer than the {MAX_TOKEN_LEN} validators accept",
                token.len()
            )));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 section 3.1: the RSA key and its thumbprint.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let jwk = json!({"kty": "RSA", "n": n, "e": "AQAB", "kid": "x"});
        let k = PublicKey::from_jwk(&jwk).unwrap();
        assert_eq!(
            k.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn a_signing_key_round_trips_through_pkcs8_and_its_kid_is_its_thumbprint() {
        let k = SigningKey::generate().unwrap();
        let again = SigningKey::from_pkcs8(&k.to_pkcs8()).unwrap();
        assert_eq!(k.kid(), again.kid());
        assert_eq!(k.public(None), again.public(None));
        let jwk = k.public(None).to_jwk();
        let read = PublicKey::from_jwk(&jwk).unwrap();
        assert_eq!(read, k.public(None));
        assert_eq!(read.thumbprint(), k.kid());
        assert!(!format!("{k:?}").contains("pkcs8"));
    }

    #[test]
    fn jwk_checks() {
        let k = SigningKey::generate().unwrap().public(None).to_jwk();
        let with = |f: &dyn Fn(&mut Value)| {
            let mut j = k.clone();
            f(&mut j);
            PublicKey::from_jwk(&j).unwrap_err().to_string()
        };
        assert!(with(&|j| {
            j.as_object_mut().unwrap().remove("kid");
        })
        .contains("kid missing"));
        assert!(with(&|j| j["crv"] = json!("P-521")).contains("crv \"P-521\""));
        assert!(with(&|j| j["kty"] = json!("oct")).contains("kty \"oct\""));
        assert!(with(&|j| j["alg"] = json!("HS256")).contains("alg \"HS256\""));
        assert!(with(&|j| j["alg"] = json!("RS256")).contains("does not fit"));
        assert!(with(&|j| j["region"] = json!("EU WEST")).contains("region"));
        // A point off the curve.
        assert!(with(&|j| j["y"] = j["x"].clone()).contains("not a point"));
        // A short RSA key.
        let short =
            json!({"kty": "RSA", "kid": "r", "e": "AQAB", "n": b64url_encode(&[0xc1; 128])});
        let e = PublicKey::from_jwk(&short).unwrap_err().to_string();
        assert!(e.contains("1024 bits"), "{e}");
        let rsa = |n: Vec<u8>, e: &[u8]| {
            let j =
                json!({"kty": "RSA", "kid": "r", "e": b64url_encode(e), "n": b64url_encode(&n)});
            PublicKey::from_jwk(&j).map_err(|e| e.to_string())
        };
        let n = vec![0xc1; 256];
        assert!(rsa(n.clone(), &[1, 0, 1]).is_ok());
        let mut zero = vec![0];
        zero.extend_from_slice(&n);
        assert!(rsa(zero, &[1, 0, 1]).unwrap_err().contains("leading zero"));
        assert!(rsa(n.clone(), &[0, 1, 0, 1])
            .unwrap_err()
            .contains("leading zero"));
        assert!(rsa(n.clone(), &[1, 0, 0]).unwrap_err().contains("exponent"));
        assert!(rsa(n.clone(), &[1]).unwrap_err().contains("exponent"));
        assert!(rsa(n.clone(), &[1; 5]).unwrap_err().contains("exponent"));
        assert!(rsa(vec![0xc1; 1025], &[3])
            .unwrap_err()
            .contains("8200 bits"));
        assert!(with(&|j| j["kid"] = json!("k".repeat(MAX_KID_LEN + 1))).contains("longer than"));
        assert!(with(&|j| j["kid"] = json!("")).contains("kid is empty"));
        assert!(with(&|j| j["x"] = json!("AAAA")).contains("32 bytes each"));
    }
}
