//! JWT bundles (one trust domain's keys by kid, and the set a validator trusts) and the SPIFFE
//! bundle document (SPIFFE Trust Domain and Bundle spec, section 4) that carries a trust
//! domain's X.509 roots and JWT keys together.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde_json::{json, Map, Value};

use super::json::{b64std, object};
use super::keys::jwk_thumbprint;
use super::x509::cert_jwk;
use super::{JwtError, PublicKey};
use crate::identity::TrustDomain;

/// The largest bundle document read (bytes).
pub const MAX_BUNDLE_LEN: usize = 1024 * 1024;

/// The most keys a bundle document (or one trust domain's JWT bundle) may hold.
pub const MAX_BUNDLE_KEYS: usize = 4096;

/// One trust domain's JWT keys, by kid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtBundle {
    /// Whose keys these are.
    pub trust_domain: TrustDomain,
    keys: BTreeMap<String, PublicKey>,
}

impl JwtBundle {
    /// An empty bundle.
    pub fn new(td: TrustDomain) -> Self {
        JwtBundle {
            trust_domain: td,
            keys: BTreeMap::new(),
        }
    }

    /// Adds a key. The same key again replaces it (its region may change); another key under
    /// a kid already held is an error, as is a bundle over [`MAX_BUNDLE_KEYS`].
    pub fn insert(&mut self, key: PublicKey) -> Result<(), JwtError> {
        match self.keys.get(key.kid()) {
            Some(old) if old.clone().with_region(None) != key.clone().with_region(None) => {
                return Err(JwtError::KidConflict {
                    kid: key.kid().to_string(),
                    trust_domain: self.trust_domain.to_string(),
                })
            }
            Some(_) => {}
            None if self.keys.len() >= MAX_BUNDLE_KEYS => {
                return Err(JwtError::Bundle(format!(
                    "more than {MAX_BUNDLE_KEYS} JWT keys for {}",
                    self.trust_domain
                )))
            }
            None => {}
        }
        self.keys.insert(key.kid().to_string(), key);
        Ok(())
    }

    /// The key with this kid.
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid)
    }

    /// Every key, by kid.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No keys at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `{"keys":[...]}`: the JWKS the Workload API's FetchJWTBundles sends.
    pub fn to_jwks(&self) -> Value {
        json!({"keys": self.keys().map(PublicKey::to_jwk).collect::<Vec<_>>()})
    }
}

/// The JWT bundles of every trust domain a validator trusts (ours and federated ones).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtBundles {
    by_td: BTreeMap<TrustDomain, JwtBundle>,
}

impl JwtBundles {
    /// Adds a trust domain's bundle, replacing the one held for it.
    pub fn insert(&mut self, b: JwtBundle) {
        self.by_td.insert(b.trust_domain.clone(), b);
    }

    /// The bundle of `td`.
    pub fn get(&self, td: &TrustDomain) -> Option<&JwtBundle> {
        self.by_td.get(td)
    }

    /// Every bundle, by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &JwtBundle> {
        self.by_td.values()
    }
}

impl From<JwtBundle> for JwtBundles {
    fn from(b: JwtBundle) -> Self {
        let mut all = JwtBundles::default();
        all.insert(b);
        all
    }
}

/// A SPIFFE bundle document: JWKS with `use: "x509-svid"` (x5c, one certificate) and
/// `use: "jwt-svid"` keys. Size-bounded ([`MAX_BUNDLE_LEN`], [`MAX_BUNDLE_KEYS`]); keys of an
/// unknown `use` are skipped as the spec says.
#[derive(Clone, Debug)]
pub struct SpiffeBundleDoc {
    /// The X.509 roots, in document order.
    pub x509_roots: Vec<CertificateDer<'static>>,
    /// The JWT keys.
    pub jwt: JwtBundle,
    /// `spiffe_sequence`, if present.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, if present.
    pub refresh_hint: Option<Duration>,
}

/// The `keys` of a bounded, duplicate-free JSON document, and the document.
fn read_keys(json: &[u8]) -> Result<(Map<String, Value>, Vec<Value>), JwtError> {
    if json.len() > MAX_BUNDLE_LEN {
        return Err(JwtError::Bundle(format!(
            "{} bytes, larger than the {MAX_BUNDLE_LEN} allowed",
            json.len()
        )));
    }
    let mut doc = object(json).map_err(JwtError::Bundle)?;
    let keys = match doc.remove("keys") {
        Some(Value::Array(k)) => k,
        Some(_) => return Err(JwtError::Bundle("keys is not an array".into())),
        None => return Err(JwtError::Bundle("keys missing".into())),
    };
    if keys.len() > MAX_BUNDLE_KEYS {
        return Err(JwtError::Bundle(format!(
            "{} keys, more than the {MAX_BUNDLE_KEYS} allowed",
            keys.len()
        )));
    }
    Ok((doc, keys))
}

fn optional_u64(doc: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    match doc.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| JwtError::Bundle(format!("{name} {v} is not a non-negative integer"))),
    }
}

/// Reads a SPIFFE bundle document of trust domain `td` (the document does not name it).
pub fn parse_spiffe_bundle(td: &TrustDomain, json: &[u8]) -> Result<SpiffeBundleDoc, JwtError> {
    let (doc, keys) = read_keys(json)?;
    let mut out = SpiffeBundleDoc {
        x509_roots: Vec::new(),
        jwt: JwtBundle::new(td.clone()),
        sequence: optional_u64(&doc, "spiffe_sequence")?,
        refresh_hint: optional_u64(&doc, "spiffe_refresh_hint")?.map(Duration::from_secs),
    };
    for (i, key) in keys.iter().enumerate() {
        let place = format!("bundle key {i}");
        match key.get("use") {
            Some(Value::String(u)) if u == "x509-svid" => {
                out.x509_roots.push(x509_root(key, &place)?);
            }
            Some(Value::String(u)) if u == "jwt-svid" => {
                insert_new(&mut out.jwt, PublicKey::from_jwk_at(key, &place)?, &place)?;
            }
            // Section 4.2.1: elements not understood are ignored.
            Some(Value::String(_)) => {}
            Some(_) => return Err(JwtError::key(&place, "use is not a string")),
            None => return Err(JwtError::key(&place, "use missing (x509-svid or jwt-svid)")),
        }
    }
    Ok(out)
}

/// Reads a plain JWKS (what FetchJWTBundles sends) as `td`'s JWT bundle: keys with `use`
/// absent or `"jwt-svid"`; `x509-svid` and other uses are skipped, so a SPIFFE bundle document
/// reads too (its JWT keys).
pub fn parse_jwks(td: &TrustDomain, json: &[u8]) -> Result<JwtBundle, JwtError> {
    let (_, keys) = read_keys(json)?;
    let mut out = JwtBundle::new(td.clone());
    for (i, key) in keys.iter().enumerate() {
        let place = format!("bundle key {i}");
        match key.get("use") {
            None => {}
            Some(Value::String(u)) if u == "jwt-svid" => {}
            Some(Value::String(_)) => continue,
            Some(_) => return Err(JwtError::key(&place, "use is not a string")),
        }
        insert_new(&mut out, PublicKey::from_jwk_at(key, &place)?, &place)?;
    }
    Ok(out)
}

/// A document's key: a kid seen before is refused even for the same key (two entries that may
/// differ in region or alg have no one reading).
fn insert_new(b: &mut JwtBundle, key: PublicKey, place: &str) -> Result<(), JwtError> {
    if b.get(key.kid()).is_some() {
        return Err(JwtError::key(
            place,
            format!("kid {:?} appears twice in the bundle", key.kid()),
        ));
    }
    b.insert(key)
        .map_err(|e| JwtError::key(place, e.to_string()))
}

/// An `x509-svid` key: exactly one certificate in `x5c` (standard base64 DER) whose key is the
/// one the JWK states (go-spiffe checks the same).
fn x509_root(key: &Value, place: &str) -> Result<CertificateDer<'static>, JwtError> {
    let x5c = match key.get("x5c") {
        Some(Value::Array(a)) if a.len() == 1 => &a[0],
        Some(Value::Array(a)) => {
            return Err(JwtError::key(
                place,
                format!("x5c must hold exactly one certificate, found {}", a.len()),
            ))
        }
        Some(_) => return Err(JwtError::key(place, "x5c is not an array")),
        None => return Err(JwtError::key(place, "x5c missing")),
    };
    let der = match x5c {
        Value::String(s) => b64std(s).map_err(|e| JwtError::key(place, format!("x5c: {e}")))?,
        _ => return Err(JwtError::key(place, "x5c holds a non-string")),
    };
    let stated = cert_jwk(&der).ok_or_else(|| {
        JwtError::key(
            place,
            "x5c: not a certificate with an EC, RSA or Ed25519 key",
        )
    })?;
    for (name, value) in &stated {
        if key.get(name) != Some(value) {
            return Err(JwtError::key(
                place,
                format!("the JWK's {name} is not the x5c certificate's key"),
            ));
        }
    }
    Ok(CertificateDer::from(der))
}

/// What the CA serves: its roots as `x509-svid` keys, the given JWT keys, `spiffe_sequence` and
/// `spiffe_refresh_hint` (seconds). Every key has a `kid` (py-spiffe's JwtBundle.parse refuses
/// keys without one): for a root, the RFC 7638 thumbprint of its public key. A root whose key no
/// JWK can state (DSA, GOST) or that does not parse is left out.
pub fn spiffe_bundle_json(
    roots: &[CertificateDer<'_>],
    jwt_keys: &[PublicKey],
    sequence: u64,
    refresh_hint_secs: u64,
) -> Value {
    let mut keys: Vec<Value> = roots
        .iter()
        .filter_map(|der| {
            let mut key = cert_jwk(der.as_ref())?;
            if let Some(kid) = jwk_thumbprint(&key) {
                key.insert("kid".into(), json!(kid));
            }
            key.insert("use".into(), json!("x509-svid"));
            key.insert(
                "x5c".into(),
                json!([base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    der.as_ref()
                )]),
            );
            Some(Value::Object(key))
        })
        .collect();
    keys.extend(jwt_keys.iter().map(PublicKey::to_jwk));
    json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    })
}
