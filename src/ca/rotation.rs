//! Rotation of the CA's own keys, without a restart: the next regional intermediate
//! (`trustline ca rotate --next DIR`), a new root published beside the old one (`--add-root`),
//! and an old root withdrawn (`--retire-root`).
//!
//! The signing authority, the previous intermediate (trusted for renewals until its last leaf
//! expired) and the published roots are one [`KeySet`] behind an [`ArcSwap`]: a request reads
//! one consistent set, a rotation swaps in the next one. Changes are serialised and written to
//! the CA directory before they are swapped in, so a restart comes back where it left off.
//!
//! On disk, in the CA directory (`ca serve --ca DIR`):
//!
//! ```text
//! DIR/ca.crt ca.key chain.pem   the active intermediate (what `ca init` wrote, then each --next)
//! DIR/bundle.pem                every root published in /v1/bundle (old and new during a roll)
//! DIR/rotation.json             spiffe_sequence, when each added root may sign an active
//!                               intermediate, the previous intermediate's retirement time
//! DIR/previous/ca.crt chain.pem the previous intermediate until it is retired (no key: it never
//!                               signs again)
//! DIR/incoming/                 only during an activation: the new files, complete; a restart
//!                               finds it and finishes moving them in (its rename is the commit)
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::authority::{Authority, AuthorityError, LeafUsage};
use crate::clock::{rfc3339, unix_secs, Clock};
use crate::crypto::provider;
use crate::identity::{certs_from_pem, inspect_cert, Bundle, TrustDomain, BACKDATE};
use crate::region::Region;
use crate::tls::mesh::Trust;
use crate::util::{write_public, write_secret};

/// Most roots the CA publishes at once (an old and a new one during a roll, plus room for
/// another trust domain's roots an operator put in `bundle.pem`).
pub const MAX_ROOTS: usize = 16;
/// Largest root file `--add-root` / `--retire-root` reads.
const MAX_ROOT_FILE: u64 = 64 * 1024;
/// Shortest and longest wait between publishing a root and activating an intermediate it signed.
pub const MIN_PUBLISH_WAIT: Duration = Duration::from_secs(1);
pub const MAX_PUBLISH_WAIT: Duration = Duration::from_secs(30 * 86400);
/// The default wait: the `spiffe_refresh_hint` the CA publishes in its bundle.
pub const DEFAULT_PUBLISH_WAIT: Duration = Duration::from_secs(300);
/// The refresh hint published in the SPIFFE bundle (seconds).
pub const REFRESH_HINT_SECS: u64 = 300;

const STATE_FILE: &str = "rotation.json";
const PREVIOUS: &str = "previous";
const INCOMING: &str = "incoming";

/// Why a rotation was refused or failed; the CA keeps serving with what it had.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("--next {}: {source}", .dir.display())]
    Unusable {
        dir: PathBuf,
        source: AuthorityError,
    },
    #[error("--next {}: not a regional intermediate: {reason}", .dir.display())]
    NotIntermediate { dir: PathBuf, reason: String },
    #[error("--next {}: trust domain {found}, this CA's is {ours}", .dir.display())]
    WrongTrustDomain {
        dir: PathBuf,
        found: TrustDomain,
        ours: TrustDomain,
    },
    #[error("--next {}: region {found}, this CA's is {ours}", .dir.display())]
    WrongRegion {
        dir: PathBuf,
        found: String,
        ours: String,
    },
    #[error("--next {}: this intermediate is already the active one", .dir.display())]
    AlreadyActive { dir: PathBuf },
    #[error("--next {}: the intermediate expired at {at}", .dir.display())]
    Expired { dir: PathBuf, at: String },
    #[error("--next {}: the intermediate is not valid before {at}", .dir.display())]
    NotYetValid { dir: PathBuf, at: String },
    #[error(
        "--next {}: ca.crt is not signed by any root this CA publishes (publish its root first \
         with `trustline ca rotate --add-root ROOT/bundle.pem`)",
        .dir.display()
    )]
    NotChaining { dir: PathBuf },
    #[error("--next {}: a leaf signed with it does not verify against the published roots: {reason}", .dir.display())]
    ProbeFailed { dir: PathBuf, reason: String },
    #[error(
        "--next {}: its root was published at {published}; an intermediate it signed may be \
         activated from {usable} on, once every sidecar and gateway has fetched the root",
        .dir.display()
    )]
    RootTooNew {
        dir: PathBuf,
        published: String,
        usable: String,
    },
    #[error(
        "--next {}: the previous intermediate (serial {serial}) is still trusted for renewals \
         until {until}; rotate again after that",
        .dir.display()
    )]
    PreviousStillTrusted {
        dir: PathBuf,
        serial: String,
        until: String,
    },
    #[error("{}: {reason}", .path.display())]
    BadRoot { path: PathBuf, reason: String },
    #[error("{}: this root is already published", .path.display())]
    RootPublished { path: PathBuf },
    #[error("{}: this root is not published", .path.display())]
    RootNotPublished { path: PathBuf },
    #[error("{}: the {which} intermediate (serial {serial}) chains to this root; it can be withdrawn once no intermediate of this CA does", .path.display())]
    RootInUse {
        path: PathBuf,
        which: &'static str,
        serial: String,
    },
    #[error("{}: the only root of trust domain {td} cannot be withdrawn", .path.display())]
    LastRoot { path: PathBuf, td: TrustDomain },
    #[error("already {MAX_ROOTS} roots published; withdraw one first")]
    TooManyRoots,
    #[error(
        "publish wait must be between {} and {}",
        humantime::format_duration(MIN_PUBLISH_WAIT),
        humantime::format_duration(MAX_PUBLISH_WAIT)
    )]
    PublishWait,
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    BadState { path: PathBuf, reason: String },
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RotationError + '_ {
    move |source| RotationError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `DIR/rotation.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    /// The published bundle's `spiffe_sequence`: moves with every change of the roots.
    sequence: u64,
    /// When the active intermediate was activated by a rotation (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    activated_at: Option<u64>,
    /// When the previous intermediate stops being trusted (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_retire_at: Option<u64>,
    /// Roots added with `--add-root`, and from when an intermediate they signed may be activated.
    #[serde(default)]
    roots: Vec<RootRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootRecord {
    /// SHA-256 of the root's DER, hex.
    sha256: String,
    published_at: u64,
    usable_at: u64,
}

/// The previous intermediate, trusted for renewals only.
#[derive(Clone, Debug)]
pub struct Previous {
    pub cert: CertificateDer<'static>,
    pub serial: String,
    pub retire_at: SystemTime,
}

/// One consistent set of the CA's keys: what signs, what is still accepted, what is published.
pub struct KeySet {
    /// The intermediate that signs every new certificate.
    pub active: Arc<Authority>,
    /// The intermediate before it, until retired.
    pub previous: Option<Previous>,
    /// The roots served by `GET /v1/bundle`.
    pub published: Bundle,
    /// `spiffe_sequence` of the published bundle.
    pub sequence: u64,
    state: StateFile,
}

/// The CA's keys, rotatable while serving.
pub struct CaKeys {
    /// The trust domain (the same for every intermediate a rotation accepts).
    pub trust_domain: TrustDomain,
    /// The region (likewise fixed).
    pub region: Option<Region>,
    dir: PathBuf,
    svid_ttl: Duration,
    set: ArcSwap<KeySet>,
    /// Serialises changes.
    change: Mutex<()>,
    verifier: Arc<RotatingClientVerifier>,
    /// The published roots as the CA's own clients (peer pulls) trust them.
    trust: Arc<Trust>,
    activations: watch::Sender<u64>,
}

/// What a change did, for the admin answer and the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// The certificate acted on (hex serial).
    pub serial: String,
    /// One line for the operator.
    pub detail: String,
    /// The published bundle's sequence after the change.
    pub sequence: u64,
}

/// What `ca rotate --status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub active_serial: String,
    pub active_not_after: String,
    #[serde(default)]
    pub previous_serial: Option<String>,
    #[serde(default)]
    pub previous_retire_at: Option<String>,
    pub sequence: u64,
    /// Each published root: serial, and from when intermediates it signed may be activated.
    pub roots: Vec<RootStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootStatus {
    pub serial: String,
    pub sha256: String,
    pub usable_from: String,
}

fn sha256_hex(der: &[u8]) -> String {
    crate::util::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
}

fn serial_of(der: &CertificateDer<'_>) -> String {
    inspect_cert(der)
        .map(|i| i.serial.to_string())
        .or_else(|_| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, c)| crate::util::hex(c.raw_serial()))
        })
        .unwrap_or_default()
}

fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// How long after its activation the previous intermediate stays trusted: one SVID lifetime
/// (no leaf it signed lives longer) plus the clock-skew margin ([`BACKDATE`], at most one SVID
/// lifetime: a CA clock jumping further forward has expired every SVID anyway).
pub fn retire_after(svid_ttl: Duration) -> Duration {
    svid_ttl + BACKDATE.min(svid_ttl)
}

impl CaKeys {
    /// Loads the CA directory, finishing an activation a crash interrupted.
    pub fn open(dir: &Path, svid_ttl: Duration) -> Result<Self, RotationError> {
        recover(dir)?;
        let state_path = dir.join(STATE_FILE);
        let mut state = match fs::read(&state_path) {
            Ok(b) => {
                serde_json::from_slice::<StateFile>(&b).map_err(|e| RotationError::BadState {
                    path: state_path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile {
                sequence: 1,
                ..Default::default()
            },
            Err(e) => return Err(io_at(&state_path)(e)),
        };
        let active = Authority::load(dir)?;
        let published = active.bundle.clone();
        let prev_dir = dir.join(PREVIOUS);
        let prev_cert = prev_dir.join("ca.crt");
        let previous = match (state.previous_retire_at, fs::read(&prev_cert)) {
            (Some(at), Ok(pem)) => {
                let cert = certs_from_pem(&pem, &prev_cert.display().to_string())
                    .map_err(AuthorityError::from)?
                    .swap_remove(0);
                (cert != active.cert).then(|| Previous {
                    serial: serial_of(&cert),
                    cert,
                    retire_at: from_unix(at),
                })
            }
            _ => None,
        };
        if previous.is_none() {
            // Retired, or written by an activation that never committed.
            state.previous_retire_at = None;
            remove_dir(&prev_dir)?;
        }
        let shas: Vec<String> = published
            .roots
            .iter()
            .map(|r| sha256_hex(r.as_ref()))
            .collect();
        state.roots.retain(|r| shas.contains(&r.sha256));
        let trust = Trust::new(published.clone())?;
        let set = KeySet {
            active: Arc::new(active),
            previous,
            published,
            sequence: state.sequence.max(1),
            state,
        };
        let verifier = Arc::new(RotatingClientVerifier {
            inner: ArcSwap::from_pointee(Inner(client_verifier(&set)?)),
        });
        Ok(CaKeys {
            trust_domain: set.active.trust_domain.clone(),
            region: set.active.region.clone(),
            dir: dir.to_path_buf(),
            svid_ttl,
            set: ArcSwap::from_pointee(set),
            change: Mutex::new(()),
            verifier,
            trust,
            activations: watch::channel(0).0,
        })
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<KeySet> {
        self.set.load_full()
    }

    /// The intermediate that signs now.
    pub fn active(&self) -> Arc<Authority> {
        self.set.load().active.clone()
    }

    /// The roots published now.
    pub fn published(&self) -> Bundle {
        self.set.load().published.clone()
    }

    /// The published roots, as the CA's own clients trust them (follows every change).
    pub fn trust(&self) -> Arc<Trust> {
        self.trust.clone()
    }

    /// The TLS client verifier of the API: SVIDs of the active or the previous intermediate.
    pub fn client_verifier(&self) -> Arc<RotatingClientVerifier> {
        self.verifier.clone()
    }

    /// Changes whenever a new intermediate is activated.
    pub fn activations(&self) -> watch::Receiver<u64> {
        self.activations.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn swap(&self, set: KeySet) -> Result<(), RotationError> {
        let verifier = client_verifier(&set)?;
        let roots_changed = set.published.roots != self.set.load().published.roots;
        if roots_changed {
            self.trust.set_bundle(set.published.clone())?;
        }
        self.set.store(Arc::new(set));
        self.verifier.inner.store(Arc::new(Inner(verifier)));
        Ok(())
    }

    /// What the keys are now.
    pub fn status(&self) -> Status {
        let set = self.current();
        let info = inspect_cert(&set.active.cert).ok();
        let roots = set
            .published
            .roots
            .iter()
            .map(|r| {
                let sha = sha256_hex(r.as_ref());
                let usable = set
                    .state
                    .roots
                    .iter()
                    .find(|rec| rec.sha256 == sha)
                    .map_or(0, |rec| rec.usable_at);
                RootStatus {
                    serial: serial_of(r),
                    sha256: sha,
                    usable_from: rfc3339(from_unix(usable)),
                }
            })
            .collect();
        Status {
            active_serial: serial_of(&set.active.cert),
            active_not_after: info.map(|i| rfc3339(i.not_after)).unwrap_or_default(),
            previous_serial: set.previous.as_ref().map(|p| p.serial.clone()),
            previous_retire_at: set.previous.as_ref().map(|p| rfc3339(p.retire_at)),
            sequence: set.sequence,
            roots,
        }
    }

    /// `ca rotate --next DIR`: validates the intermediate in `next_dir` and makes it the one
    /// that signs; the active one becomes the previous, trusted for renewals until
    /// [`retire_after`] from now.
    pub fn activate(&self, next_dir: &Path, clock: &Clock) -> Result<Change, RotationError> {
        let _g = self.lock();
        let now = clock.now();
        let cur = self.current();
        if let Some(p) = &cur.previous {
            return Err(RotationError::PreviousStillTrusted {
                dir: next_dir.to_path_buf(),
                serial: p.serial.clone(),
                until: rfc3339(p.retire_at),
            });
        }
        self.check_next(&cur, next_dir, now)?;
        let retire_at = now + retire_after(self.svid_ttl);
        let mut state = cur.state.clone();
        state.activated_at = Some(unix_secs(now));
        state.previous_retire_at = Some(unix_secs(retire_at));
        self.install(next_dir, &state)?;
        let active = Authority::load(&self.dir)?;
        let serial = serial_of(&active.cert);
        let old = cur.active.cert.clone();
        let set = KeySet {
            active: Arc::new(active),
            previous: Some(Previous {
                serial: serial_of(&old),
                cert: old,
                retire_at,
            }),
            published: cur.published.clone(),
            sequence: cur.sequence,
            state,
        };
        self.swap(set)?;
        self.activations.send_modify(|n| *n += 1);
        Ok(Change {
            detail: format!(
                "intermediate {serial} is active; the previous one ({}) is trusted for renewals until {}",
                serial_of(&cur.active.cert),
                rfc3339(retire_at)
            ),
            serial,
            sequence: cur.sequence,
        })
    }

    /// Every check of `--next DIR`; the loaded authority when it passes.
    fn check_next(&self, cur: &KeySet, dir: &Path, now: SystemTime) -> Result<(), RotationError> {
        let d = || dir.to_path_buf();
        let next =
            Authority::load(dir).map_err(|source| RotationError::Unusable { dir: d(), source })?;
        if next.trust_domain != self.trust_domain {
            return Err(RotationError::WrongTrustDomain {
                dir: d(),
                found: next.trust_domain.clone(),
                ours: self.trust_domain.clone(),
            });
        }
        let shown = |r: Option<&Region>| r.map_or("(none: a root)".to_string(), |r| r.to_string());
        if next.region != self.region {
            return Err(RotationError::WrongRegion {
                dir: d(),
                found: shown(next.region.as_ref()),
                ours: shown(self.region.as_ref()),
            });
        }
        if next.cert == cur.active.cert {
            return Err(RotationError::AlreadyActive { dir: d() });
        }
        check_ca_constraints(&next.cert)
            .map_err(|reason| RotationError::NotIntermediate { dir: d(), reason })?;
        let info = inspect_cert(&next.cert).map_err(|e| RotationError::NotIntermediate {
            dir: d(),
            reason: e.to_string(),
        })?;
        if info.not_after <= now {
            return Err(RotationError::Expired {
                dir: d(),
                at: rfc3339(info.not_after),
            });
        }
        if info.not_before > now {
            return Err(RotationError::NotYetValid {
                dir: d(),
                at: rfc3339(info.not_before),
            });
        }
        let root = signing_root(&cur.published, &next.cert)
            .ok_or(RotationError::NotChaining { dir: d() })?;
        // The whole path as a sidecar checks it: a probe leaf signed with the new key, with the
        // chain the CA would send, against the published roots.
        let probe = rcgen::KeyPair::generate().map_err(AuthorityError::from)?;
        let id = crate::identity::ids::ca_id(&self.trust_domain);
        let leaf = next.sign_leaf(
            &id,
            &probe,
            Duration::from_secs(60),
            now,
            LeafUsage::Server { names: &[] },
        )?;
        crate::tls::verify_svid_chain(&cur.published, &next.chain_for(&leaf.leaf), now).map_err(
            |e| RotationError::ProbeFailed {
                dir: d(),
                reason: e.to_string(),
            },
        )?;
        let sha = sha256_hex(root.as_ref());
        if let Some(rec) = cur.state.roots.iter().find(|r| r.sha256 == sha) {
            if unix_secs(now) < rec.usable_at {
                return Err(RotationError::RootTooNew {
                    dir: d(),
                    published: rfc3339(from_unix(rec.published_at)),
                    usable: rfc3339(from_unix(rec.usable_at)),
                });
            }
        }
        Ok(())
    }

    /// Writes the activation to disk: `previous/` from the active files, then `incoming/`
    /// (complete, renamed into place: the commit), then moves its files over the active ones.
    fn install(&self, next_dir: &Path, state: &StateFile) -> Result<(), RotationError> {
        let dir = &self.dir;
        // previous/: the active certificate and chain, never its key.
        let prev_tmp = dir.join("previous.tmp");
        remove_dir(&prev_tmp)?;
        fs::create_dir(&prev_tmp).map_err(io_at(&prev_tmp))?;
        for f in ["ca.crt", "chain.pem"] {
            copy_if_there(&dir.join(f), &prev_tmp.join(f), false)?;
        }
        let prev = dir.join(PREVIOUS);
        remove_dir(&prev)?;
        fs::rename(&prev_tmp, &prev).map_err(io_at(&prev))?;
        // incoming/: the next key, certificate and chain, and the state that goes with them.
        let in_tmp = dir.join("incoming.tmp");
        remove_dir(&in_tmp)?;
        fs::create_dir(&in_tmp).map_err(io_at(&in_tmp))?;
        copy_if_there(&next_dir.join("ca.key"), &in_tmp.join("ca.key"), true)?;
        copy_if_there(&next_dir.join("ca.crt"), &in_tmp.join("ca.crt"), false)?;
        copy_if_there(
            &next_dir.join("chain.pem"),
            &in_tmp.join("chain.pem"),
            false,
        )?;
        write_state(&in_tmp.join(STATE_FILE), state)?;
        sync_dir(&in_tmp)?;
        let incoming = dir.join(INCOMING);
        fs::rename(&in_tmp, &incoming).map_err(io_at(&incoming))?;
        sync_dir(dir)?;
        finish_incoming(dir)
    }

    /// `ca rotate --add-root FILE`: publishes the root in `path` beside the others; an
    /// intermediate it signed may be activated `wait` from now.
    pub fn add_root(
        &self,
        path: &Path,
        wait: Duration,
        clock: &Clock,
    ) -> Result<Change, RotationError> {
        if !(MIN_PUBLISH_WAIT..=MAX_PUBLISH_WAIT).contains(&wait) {
            return Err(RotationError::PublishWait);
        }
        let _g = self.lock();
        let now = clock.now();
        let cur = self.current();
        let root = read_root(path)?;
        check_root(path, &root, &self.trust_domain, now)?;
        if cur.published.roots.contains(&root) {
            return Err(RotationError::RootPublished {
                path: path.to_path_buf(),
            });
        }
        if cur.published.roots.len() >= MAX_ROOTS {
            return Err(RotationError::TooManyRoots);
        }
        let mut state = cur.state.clone();
        state.sequence = cur.sequence + 1;
        let usable = now + wait;
        state.roots.push(RootRecord {
            sha256: sha256_hex(root.as_ref()),
            published_at: unix_secs(now),
            usable_at: unix_secs(usable),
        });
        let mut roots = cur.published.roots.clone();
        roots.push(root.clone());
        let published =
            Bundle::new(self.trust_domain.clone(), roots).map_err(AuthorityError::from)?;
        // The record first: a root in bundle.pem without one would be usable at once.
        write_state(&self.dir.join(STATE_FILE), &state)?;
        write_bundle(&self.dir, &published)?;
        let serial = serial_of(&root);
        let sequence = state.sequence;
        self.swap(KeySet {
            active: cur.active.clone(),
            previous: cur.previous.clone(),
            published,
            sequence,
            state,
        })?;
        Ok(Change {
            detail: format!(
                "root {serial} published (bundle sequence {sequence}); an intermediate it signed may be activated from {}",
                rfc3339(usable)
            ),
            serial,
            sequence,
        })
    }

    /// `ca rotate --retire-root FILE`: withdraws the root in `path` from the published bundle,
    /// refused while the active or the previous intermediate chains to it.
    pub fn retire_root(&self, path: &Path) -> Result<Change, RotationError> {
        let _g = self.lock();
        let cur = self.current();
        let root = read_root(path)?;
        if !cur.published.roots.contains(&root) {
            return Err(RotationError::RootNotPublished {
                path: path.to_path_buf(),
            });
        }
        let chains = |cert: &CertificateDer<'_>| {
            let one = Bundle::new(self.trust_domain.clone(), vec![root.clone()]);
            one.is_ok_and(|b| signing_root(&b, cert).is_some())
        };
        if chains(&cur.active.cert) {
            return Err(RotationError::RootInUse {
                path: path.to_path_buf(),
                which: "active",
                serial: serial_of(&cur.active.cert),
            });
        }
        if let Some(p) = cur.previous.as_ref().filter(|p| chains(&p.cert)) {
            return Err(RotationError::RootInUse {
                path: path.to_path_buf(),
                which: "previous",
                serial: p.serial.clone(),
            });
        }
        let roots: Vec<_> = cur
            .published
            .roots
            .iter()
            .filter(|r| **r != root)
            .cloned()
            .collect();
        let published =
            Bundle::new(self.trust_domain.clone(), roots).map_err(AuthorityError::from)?;
        if published.store().is_empty() {
            return Err(RotationError::LastRoot {
                path: path.to_path_buf(),
                td: self.trust_domain.clone(),
            });
        }
        let mut state = cur.state.clone();
        state.sequence = cur.sequence + 1;
        let sha = sha256_hex(root.as_ref());
        state.roots.retain(|r| r.sha256 != sha);
        // The bundle first: a record left without its root is dropped at the next load.
        write_bundle(&self.dir, &published)?;
        write_state(&self.dir.join(STATE_FILE), &state)?;
        let sequence = state.sequence;
        self.swap(KeySet {
            active: cur.active.clone(),
            previous: cur.previous.clone(),
            published,
            sequence,
            state,
        })?;
        let serial = serial_of(&root);
        Ok(Change {
            detail: format!("root {serial} withdrawn (bundle sequence {sequence})"),
            serial,
            sequence,
        })
    }

    /// Retires the previous intermediate if its time has come: no longer accepted for
    /// renewals, dropped from memory and from the CA directory. Returns what it did.
    pub fn retire_due(&self, clock: &Clock) -> Result<Option<Change>, RotationError> {
        let _g = self.lock();
        let cur = self.current();
        let Some(p) = cur.previous.as_ref() else {
            return Ok(None);
        };
        if clock.now() < p.retire_at {
            return Ok(None);
        }
        let mut state = cur.state.clone();
        state.previous_retire_at = None;
        write_state(&self.dir.join(STATE_FILE), &state)?;
        remove_dir(&self.dir.join(PREVIOUS))?;
        self.swap(KeySet {
            active: cur.active.clone(),
            previous: None,
            published: cur.published.clone(),
            sequence: cur.sequence,
            state,
        })?;
        Ok(Some(Change {
            serial: p.serial.clone(),
            detail: format!(
                "previous intermediate {} retired: its last SVID has expired",
                p.serial
            ),
            sequence: cur.sequence,
        }))
    }
}

/// The client-auth anchors of the API: the active intermediate and the previous one (renewal
/// is only for SVIDs this CA issued, so the anchors are its own intermediates, not the roots).
fn client_verifier(set: &KeySet) -> Result<Arc<dyn ClientCertVerifier>, RotationError> {
    let mut roots = RootCertStore::empty();
    roots.add(set.active.cert.clone())?;
    if let Some(p) = &set.previous {
        roots.add(p.cert.clone())?;
    }
    // Client certificates are optional at the TLS layer (first issuance uses a join token);
    // the handler requires one or the other.
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()?,
    )
}

struct Inner(Arc<dyn ClientCertVerifier>);

/// The API's client verifier, swapped at each rotation and retirement; every handshake reads
/// the one in force.
pub struct RotatingClientVerifier {
    inner: ArcSwap<Inner>,
}

impl std::fmt::Debug for RotatingClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotatingClientVerifier")
    }
}

impl ClientCertVerifier for RotatingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: SVID holders have one certificate, and the anchors change.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().0.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().0.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().0.supported_verify_schemes()
    }
}

/// A regional intermediate's constraints: CA:TRUE with pathLenConstraint 0 (signs leaves only)
/// and keyCertSign.
fn check_ca_constraints(cert: &CertificateDer<'_>) -> Result<(), String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    match c.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if bc.value.path_len_constraint != Some(0) {
                return Err(
                    "basicConstraints must carry pathLenConstraint 0 (a regional CA signs leaves only)"
                        .into(),
                );
            }
        }
        _ => return Err("not a CA certificate (CA:FALSE or no basicConstraints)".into()),
    }
    match c.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        _ => Err("keyUsage lacks keyCertSign".into()),
    }
}

/// The published root of our trust domain that signed `cert` directly, if any.
fn signing_root(published: &Bundle, cert: &CertificateDer<'_>) -> Option<CertificateDer<'static>> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    published
        .roots
        .iter()
        .filter(|r| {
            // Only roots that vouch for our trust domain (the bundle's store holds those alone).
            Bundle::new(published.trust_domain.clone(), vec![(*r).clone()])
                .is_ok_and(|b| !b.store().is_empty())
        })
        .find(|r| {
            x509_parser::parse_x509_certificate(r.as_ref()).is_ok_and(|(_, root)| {
                root.subject() == c.issuer() && c.verify_signature(Some(root.public_key())).is_ok()
            })
        })
        .cloned()
}

fn read_root(path: &Path) -> Result<CertificateDer<'static>, RotationError> {
    let bad = |reason: String| RotationError::BadRoot {
        path: path.to_path_buf(),
        reason,
    };
    let mut pem = Vec::new();
    fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_ROOT_FILE + 1), &mut pem)
        })
        .map_err(io_at(path))?;
    if pem.len() as u64 > MAX_ROOT_FILE {
        return Err(bad(format!("larger than {MAX_ROOT_FILE} bytes")));
    }
    let mut certs =
        certs_from_pem(&pem, &path.display().to_string()).map_err(|e| bad(e.to_string()))?;
    if certs.len() != 1 {
        return Err(bad(format!(
            "holds {} certificates; give exactly one root (the new root's bundle.pem)",
            certs.len()
        )));
    }
    Ok(certs.swap_remove(0))
}

/// A root we may publish: self-signed, CA:TRUE with keyCertSign, `spiffe://TD` of our trust
/// domain, valid now.
fn check_root(
    path: &Path,
    root: &CertificateDer<'_>,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<(), RotationError> {
    let bad = |reason: String| RotationError::BadRoot {
        path: path.to_path_buf(),
        reason,
    };
    let (_, c) =
        x509_parser::parse_x509_certificate(root.as_ref()).map_err(|e| bad(e.to_string()))?;
    if c.subject() != c.issuer() || c.verify_signature(None).is_err() {
        return Err(bad("not a self-signed root".into()));
    }
    let info = inspect_cert(root).map_err(|e| bad(e.to_string()))?;
    if !info.is_ca || info.key_usage.is_some_and(|(_, sign)| !sign) {
        return Err(bad(
            "not a CA certificate that may sign (CA:TRUE, keyCertSign)".into(),
        ));
    }
    if info.id.trust_domain() != td || !info.id.path().is_empty() {
        return Err(bad(format!(
            "names {}, this CA's trust domain is spiffe://{td}",
            info.id
        )));
    }
    if info.not_after <= now {
        return Err(bad(format!("expired at {}", rfc3339(info.not_after))));
    }
    if info.not_before > now {
        return Err(bad(format!(
            "not valid before {}",
            rfc3339(info.not_before)
        )));
    }
    Ok(())
}

fn write_state(path: &Path, state: &StateFile) -> Result<(), RotationError> {
    let mut text = serde_json::to_vec_pretty(state).map_err(|e| RotationError::BadState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    text.push(b'\n');
    write_durable(path, &text, false)
}

fn write_bundle(dir: &Path, bundle: &Bundle) -> Result<(), RotationError> {
    write_durable(&dir.join("bundle.pem"), bundle.to_pem().as_bytes(), false)
}

/// Writes atomically (a temporary file, synced, renamed); a secret is 0600 from the start.
fn write_durable(path: &Path, contents: &[u8], secret: bool) -> Result<(), RotationError> {
    if secret {
        write_secret(path, contents).map_err(io_at(path))?;
    } else {
        write_public(path, contents).map_err(io_at(path))?;
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io_at(path))?;
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn copy_if_there(from: &Path, to: &Path, secret: bool) -> Result<(), RotationError> {
    match fs::read(from) {
        Ok(b) => write_durable(to, &b, secret),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !secret => Ok(()),
        Err(e) => Err(io_at(from)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), RotationError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_at(dir))
}

fn remove_dir(dir: &Path) -> Result<(), RotationError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(dir)(e)),
    }
}

/// Moves the files of a committed `incoming/` over the active ones (each rename is atomic, so
/// doing it again after a crash is harmless), then removes it.
fn finish_incoming(dir: &Path) -> Result<(), RotationError> {
    let incoming = dir.join(INCOMING);
    // The key, certificate and chain before the state: the state names the previous one.
    for f in ["ca.key", "ca.crt", "chain.pem", STATE_FILE] {
        let from = incoming.join(f);
        if from.exists() {
            let to = dir.join(f);
            fs::rename(&from, &to).map_err(io_at(&to))?;
        }
    }
    sync_dir(dir)?;
    remove_dir(&incoming)
}

/// At start: drops what an activation left half-written, and finishes a committed one.
fn recover(dir: &Path) -> Result<(), RotationError> {
    remove_dir(&dir.join("incoming.tmp"))?;
    remove_dir(&dir.join("previous.tmp"))?;
    if dir.join(INCOMING).is_dir() {
        tracing::warn!(dir = %dir.display(), "finishing an activation interrupted by a restart");
        finish_incoming(dir)?;
    }
    Ok(())
}

/// Retires the previous intermediate when its time comes, checking every `every`; audits it.
pub(super) async fn retire_loop(
    state: Arc<super::api::CaState>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match state.authority.retire_due(&state.clock) {
            Ok(Some(change)) => {
                tracing::info!(serial = %change.serial, "{}", change.detail);
                audit(
                    &state,
                    "ca",
                    "retire_intermediate",
                    Some(change.serial),
                    "ok",
                    None,
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "retiring the previous intermediate failed; retrying");
                audit(
                    &state,
                    "ca",
                    "retire_intermediate",
                    None,
                    "error",
                    Some(e.to_string()),
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One audit line for a change of the CA's keys.
pub(super) fn audit(
    state: &super::api::CaState,
    client: &str,
    event: &'static str,
    serial: Option<String>,
    outcome: &'static str,
    reason: Option<String>,
) {
    let region_id = state
        .authority
        .region
        .as_ref()
        .map(|r| crate::identity::ids::region_ca_uri(&state.authority.trust_domain, r));
    state.audit.record(&crate::audit::ca::CaEvent {
        time: rfc3339(state.clock.now()),
        event,
        spiffe_id: region_id,
        serial,
        client: client.to_string(),
        outcome,
        reason,
        agent: None,
        audience: None,
    });
}
