//! JWT-SVIDs: each regional CA signs with its own ES256 key (`CA_DIR/jwt.key`, 0600) and puts
//! the `region` claim, its own region, in every token; `POST /v1/jwt` hands them out.
//!
//! Who may ask: a workload for its own ID (its SVID as client certificate), or a host agent for
//! an ID its `[[agent]]` registration names ([`super::agents`]), with the same checks as an SVID
//! request (unexpired, unrevoked, not banned here or by a peer region's CA).
//!
//! Where the verification keys go: the CA's SPIFFE bundle document (`GET /v1/bundle`, JSON)
//! carries its own key and every peer region's (`use: "jwt-svid"`, with a `region` member), so
//! a validator holding any one region's bundle validates tokens of all regions. A peer's keys
//! come from `GET /v1/bundle?scope=local` on that peer and are labelled with the region of the
//! CA certificate the peer presented, never with what the document says ([`super::peers`]): a
//! compromised regional CA can sign tokens of its own region only. A peer that is cut off keeps
//! its last keys here, so tokens of a region that cannot be reached still validate until they
//! expire.
//!
//! The key file is made by `ca serve` when it is missing (atomically: two replicas starting at
//! once end up with one key). Replicas of one region must share it; copy it with `ca.key`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;

use crate::jwt::{JwtError, PublicKey, SigningKey};
use crate::region::Region;

/// The key file's name in the CA directory.
pub const KEY_FILE: &str = "jwt.key";

/// Most audiences one token may carry.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience accepted.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// Why the JWT key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PKCS#8 PEM private key: {why}")]
    Pem { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: JwtError },
    #[error("JWT key rotation: {0}")]
    Rotation(String),
}

/// One signing key and the region it signs for.
#[derive(Debug)]
pub struct JwtSigner {
    pub key: SigningKey,
    /// The region put in every token (the CA's; `None` for a CA without one).
    pub region: Option<Region>,
}

impl JwtSigner {
    /// Loads `DIR/jwt.key`, making it first when it is missing.
    pub fn open(ca_dir: &Path, region: Option<Region>) -> Result<Self, JwtKeyError> {
        let path = ca_dir.join(KEY_FILE);
        if !path.exists() {
            make_key(&path)?;
        }
        Ok(JwtSigner {
            key: read_key(&path)?,
            region,
        })
    }

    /// The verification key as published.
    pub fn public(&self) -> PublicKey {
        self.key.public(self.region.clone())
    }
}

fn read_key(path: &Path) -> Result<SigningKey, JwtKeyError> {
    let pem = std::fs::read(path).map_err(|source| JwtKeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| JwtKeyError::Pem {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    SigningKey::from_pkcs8(der.secret_pkcs8_der()).map_err(|source| JwtKeyError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// The file of a prepared next key.
pub const NEXT_KEY_FILE: &str = "jwt-next.key";
/// Public state of a JWT key rotation: when the next key was published, and the retired keys
/// still published until the last token they signed has expired.
pub const STATE_FILE: &str = "jwt-rotation.json";

/// What a rotation leaves on disk besides the keys.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RotationState {
    /// When the next key was first published (Unix seconds), and how long it must be before
    /// it may sign.
    next_since: Option<u64>,
    next_wait_secs: Option<u64>,
    /// Retired public keys (JWK) and until when they stay published.
    retired: Vec<(serde_json::Value, u64)>,
}

/// The JWT keys of a running CA: the one that signs, a prepared next one (published, not
/// signing), and retired ones published until their tokens have expired. Rotation is
/// `prepare` (a new key, published at once) then `activate` (refused until the publish wait
/// has passed, so every validator holds the key before the first token it signs), like the
/// roots of [`super::rotation`].
pub struct JwtKeys {
    dir: PathBuf,
    region: Option<Region>,
    ttl: std::time::Duration,
    now: arc_swap::ArcSwap<JwtSet>,
    /// Serialises rotations (admin requests) against each other.
    change: std::sync::Mutex<()>,
}

/// The keys in force at one moment.
pub struct JwtSet {
    pub signer: Arc<JwtSigner>,
    pub next: Option<(Arc<JwtSigner>, u64, u64)>,
    pub retired: Vec<(PublicKey, u64)>,
}

/// What `ca rotate --jwt-status` shows.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct JwtStatus {
    pub active_kid: String,
    pub next_kid: Option<String>,
    /// When the next key may be activated (Unix seconds).
    pub next_usable_from: Option<u64>,
    /// Retired kids and until when they are published.
    pub retired: Vec<(String, u64)>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    /// Loads (or first makes) `DIR/jwt.key`, and a rotation in progress.
    pub fn open(
        dir: &Path,
        region: Option<Region>,
        ttl: std::time::Duration,
        now: u64,
    ) -> Result<Self, JwtKeyError> {
        let signer = Arc::new(JwtSigner::open(dir, region.clone())?);
        let state = read_state(dir)?;
        let next_path = dir.join(NEXT_KEY_FILE);
        let next = if next_path.exists() {
            let key = read_key(&next_path)?;
            // A next key without its publication time (a crash between the two writes) counts
            // as published now: the wait starts again rather than being skipped.
            let since = state.next_since.unwrap_or(now);
            let wait = state
                .next_wait_secs
                .unwrap_or(super::rotation::REFRESH_HINT_SECS);
            let next = JwtSigner {
                key,
                region: region.clone(),
            };
            Some((Arc::new(next), since, wait))
        } else {
            None
        };
        let mut retired = Vec::new();
        for (jwk, until) in &state.retired {
            let k = PublicKey::from_jwk(jwk).map_err(|source| JwtKeyError::Key {
                path: dir.join(STATE_FILE),
                source,
            })?;
            retired.push((k, *until));
        }
        Ok(JwtKeys {
            dir: dir.to_path_buf(),
            region,
            ttl,
            now: arc_swap::ArcSwap::from_pointee(JwtSet {
                signer,
                next,
                retired,
            }),
            change: std::sync::Mutex::new(()),
        })
    }

    /// The key that signs now.
    pub fn signer(&self) -> Arc<JwtSigner> {
        self.now.load().signer.clone()
    }

    /// Every key to publish at `now`: the active one, the prepared next one, and retired ones
    /// whose tokens may still be alive.
    pub fn published(&self, now: u64) -> Vec<PublicKey> {
        let set = self.now.load();
        let mut keys = vec![set.signer.public()];
        if let Some((k, _, _)) = &set.next {
            keys.push(k.public());
        }
        for (k, until) in &set.retired {
            if *until > now && keys.iter().all(|p| p.kid() != k.kid()) {
                keys.push(k.clone());
            }
        }
        keys
    }

    pub fn status(&self) -> JwtStatus {
        let set = self.now.load();
        JwtStatus {
            active_kid: set.signer.key.kid().to_string(),
            next_kid: set.next.as_ref().map(|(k, _, _)| k.key.kid().to_string()),
            next_usable_from: set.next.as_ref().map(|(_, since, wait)| since + wait),
            retired: set
                .retired
                .iter()
                .map(|(k, u)| (k.kid().to_string(), *u))
                .collect(),
        }
    }

    /// Prepares the next key: `DIR/jwt-next.key` if an operator put one there (the same key
    /// copied to every replica of the region), else a new one. Published from now on; it may
    /// sign `wait` from now.
    pub fn prepare(&self, wait: std::time::Duration, now: u64) -> Result<String, JwtKeyError> {
        let _one = self.change.lock().unwrap_or_else(|e| e.into_inner());
        let set = self.now.load();
        if let Some((k, _, _)) = &set.next {
            return Err(JwtKeyError::Rotation(format!(
                "next key {} is already prepared: activate it first",
                k.key.kid()
            )));
        }
        let path = self.dir.join(NEXT_KEY_FILE);
        if !path.exists() {
            make_key(&path)?;
        }
        let key = Arc::new(JwtSigner {
            key: read_key(&path)?,
            region: self.region.clone(),
        });
        let mut state = self.disk_state(&set);
        state.next_since = Some(now);
        state.next_wait_secs = Some(wait.as_secs());
        write_state(&self.dir, &state)?;
        let kid = key.key.kid().to_string();
        self.now.store(Arc::new(JwtSet {
            signer: set.signer.clone(),
            next: Some((key, now, wait.as_secs())),
            retired: set.retired.clone(),
        }));
        Ok(kid)
    }

    /// Makes the prepared key the signing one; the old one stays published until every token
    /// it signed has expired (the JWT lifetime plus a minute of clock skew).
    pub fn activate(&self, now: u64) -> Result<String, JwtKeyError> {
        let _one = self.change.lock().unwrap_or_else(|e| e.into_inner());
        let set = self.now.load();
        let Some((next, since, wait)) = set.next.clone() else {
            return Err(JwtKeyError::Rotation(
                "no next key is prepared (ca rotate --jwt-prepare)".into(),
            ));
        };
        if now < since + wait {
            return Err(JwtKeyError::Rotation(format!(
                "next key {} was published {}s ago; it may sign {}s after publication, so that \
                 every validator holds it first",
                next.key.kid(),
                now.saturating_sub(since),
                wait
            )));
        }
        let until = now + self.ttl.as_secs() + 60;
        let mut retired: Vec<_> = set
            .retired
            .iter()
            .filter(|(_, u)| *u > now)
            .cloned()
            .collect();
        retired.push((set.signer.public(), until));
        let state = RotationState {
            next_since: None,
            next_wait_secs: None,
            retired: retired.iter().map(|(k, u)| (k.to_jwk(), *u)).collect(),
        };
        // The retired key is written down first: a crash before the rename leaves the old key
        // active and also listed as retired, which publishes it once (deduplicated by kid).
        write_state(&self.dir, &state)?;
        let io = |source| JwtKeyError::Io {
            path: self.dir.join(KEY_FILE),
            source,
        };
        std::fs::rename(self.dir.join(NEXT_KEY_FILE), self.dir.join(KEY_FILE)).map_err(io)?;
        let kid = next.key.kid().to_string();
        self.now.store(Arc::new(JwtSet {
            signer: next,
            next: None,
            retired,
        }));
        Ok(kid)
    }

    fn disk_state(&self, set: &JwtSet) -> RotationState {
        RotationState {
            next_since: None,
            next_wait_secs: None,
            retired: set.retired.iter().map(|(k, u)| (k.to_jwk(), *u)).collect(),
        }
    }
}

/// Writes a new key to `path` unless one appears meanwhile (a replica starting at the same
/// time): a private temporary file, hard-linked into place, which fails if the name exists.
fn make_key(path: &Path) -> Result<(), JwtKeyError> {
    let key = SigningKey::generate().map_err(|source| JwtKeyError::Key {
        path: path.to_path_buf(),
        source,
    })?;
    let pem = pem_of(&key.to_pkcs8());
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let io = |source| JwtKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    crate::util::write_secret(&tmp, pem.as_bytes()).map_err(io)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), kid = key.kid(), "made this CA's JWT-SVID signing key");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

/// Checks the audiences of a request: 1 to [`MAX_AUDIENCES`], each non-empty, at most
/// [`MAX_AUDIENCE_LEN`] bytes and printable.
pub fn check_audience(aud: &[String]) -> Result<(), String> {
    if aud.is_empty() {
        return Err("audience: at least one is required".into());
    }
    if aud.len() > MAX_AUDIENCES {
        return Err(format!(
            "audience: {} given, at most {MAX_AUDIENCES}",
            aud.len()
        ));
    }
    for (i, a) in aud.iter().enumerate() {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(char::is_control) {
            return Err(format!(
                "audience[{i}]: must be 1 to {MAX_AUDIENCE_LEN} bytes of printable text"
            ));
        }
    }
    Ok(())
}

fn read_state(dir: &Path) -> Result<RotationState, JwtKeyError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| JwtKeyError::Rotation(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RotationState::default()),
        Err(source) => Err(JwtKeyError::Io { path, source }),
    }
}

fn write_state(dir: &Path, state: &RotationState) -> Result<(), JwtKeyError> {
    let path = dir.join(STATE_FILE);
    let json =
        serde_json::to_vec_pretty(state).map_err(|e| JwtKeyError::Rotation(e.to_string()))?;
    crate::util::write_public(&path, &json).map_err(|source| JwtKeyError::Io { path, source })
}
