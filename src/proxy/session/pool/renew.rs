//! The calling side of re-authentication ([`crate::proxy::session::reauth`]): before either
//! certificate of a session lapses (and on each of our rotations), prove our current SVID to
//! the destination and verify the one it proves back, so that a busy session is not cut when
//! the certificates it was opened with expire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use crate::identity::{inspect_cert, CertInfo, Serial, SpiffeId};
use crate::proxy::session::reauth::{self, Exporter, Proof, Refused, Role, REAUTH_URI};
use crate::refusal::Refusal;
use crate::region::Region;
use crate::svid::Identity;
use crate::tls::mesh::{self, MeshServerVerifier};

/// The destination's certificate a session rests on: its serial and when it expires.
#[derive(Clone, Debug)]
pub(crate) struct Term {
    pub serial: Serial,
    pub expires: tokio::time::Instant,
}

impl Term {
    /// The term of `cert`, read on `clock`.
    pub fn of(cert: &CertInfo, clock: &Clock) -> Term {
        let left = cert
            .not_after
            .duration_since(clock.now())
            .unwrap_or_default();
        Term {
            serial: cert.serial.clone(),
            expires: tokio::time::Instant::now() + left,
        }
    }
}

/// Re-authentications of the pool's sessions.
#[derive(Debug, Default)]
pub struct ReauthCounts {
    /// Both proofs verified: the session's limits moved to the newer certificates.
    pub renewed: AtomicU64,
    /// Refused by either side (the old limits stand).
    pub refused: AtomicU64,
}

/// Re-authenticates one session while it is in use.
pub(crate) struct Renewer {
    pub send: h2::client::SendRequest<Bytes>,
    /// Closes when the session is retired and its last stream is gone.
    pub unused: oneshot::Receiver<()>,
    pub exporter: Exporter,
    pub identity: Arc<Identity>,
    pub verifier: Arc<MeshServerVerifier>,
    pub clock: Clock,
    /// Who the destination was at the handshake: a proof must be of the same ID and region.
    pub peer_id: SpiffeId,
    pub peer_region: Option<Region>,
    /// The expiry of the certificate the destination holds for us.
    pub own_not_after: SystemTime,
    /// The expiry of the destination's certificate we hold.
    pub peer_not_after: SystemTime,
    pub term: watch::Sender<Term>,
    pub timeout: Duration,
    pub counts: Arc<ReauthCounts>,
}

/// Why a re-authentication did not happen.
enum Failed {
    /// The destination does not know re-authentication (`405`): its sessions end at expiry.
    Unsupported,
    Refused(Refused),
}

impl From<Refused> for Failed {
    fn from(r: Refused) -> Self {
        Failed::Refused(r)
    }
}

fn refused(reason: Refusal, detail: impl ToString) -> Failed {
    Failed::Refused(Refused {
        reason,
        detail: detail.to_string(),
    })
}

impl Renewer {
    /// Re-authenticates when a certificate is within a fifth of a lifetime of its expiry and
    /// after each of our rotations, until the session is no longer used, the destination
    /// turns out not to support it, or the certificates lapse.
    pub async fn run(mut self) {
        let mut rotations = self.identity.rotations();
        rotations.borrow_and_update();
        // Not before this: a destination that has not rotated yet is asked again later.
        let mut not_before = tokio::time::Instant::now();
        loop {
            let now = self.clock.now();
            let limit = self.own_not_after.min(self.peer_not_after);
            let margin = self.margin();
            let due = limit.checked_sub(margin).unwrap_or(limit);
            let wait = tokio::time::Instant::now() + due.duration_since(now).unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep_until(wait.max(not_before)) => {}
                r = rotations.changed() => if r.is_err() { return },
                _ = &mut self.unused => return,
            }
            let attempt = tokio::time::timeout(self.timeout, self.once()).await;
            match attempt.unwrap_or_else(|_| {
                Err(refused(
                    Refusal::ReauthTimeout,
                    format!("no answer within {:?}", self.timeout),
                ))
            }) {
                Ok(()) => {
                    self.counts.renewed.fetch_add(1, Ordering::Relaxed);
                }
                Err(Failed::Unsupported) => {
                    tracing::info!("the destination does not support session re-authentication: the session ends when a certificate expires");
                    return;
                }
                Err(Failed::Refused(r)) => {
                    self.counts.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(reason = r.reason.label(), detail = %r.detail, "session re-authentication failed: the session keeps its certificates' expiry");
                }
            }
            if self.clock.now() >= self.own_not_after.min(self.peer_not_after) {
                return;
            }
            not_before = tokio::time::Instant::now() + (margin / 4).max(Duration::from_millis(100));
        }
    }

    /// How long before a certificate's expiry the session is re-authenticated: a fifth of our
    /// SVID's lifetime (the destination rotates at about half of its own).
    fn margin(&self) -> Duration {
        self.identity
            .current()
            .map_or(Duration::from_secs(1), |s| s.info.issued_lifetime() / 5)
    }

    /// One exchange: our proof out, the destination's in and verified, the limits moved.
    async fn once(&mut self) -> Result<(), Failed> {
        let key = self
            .identity
            .resolver
            .0
            .load_full()
            .ok_or_else(|| refused(Refusal::NotReady, "no SVID"))?;
        let own = key
            .end_entity_cert()
            .ok()
            .and_then(|c| inspect_cert(c).ok())
            .ok_or_else(|| refused(Refusal::NotReady, "our SVID does not parse"))?;
        let proof = reauth::sign(&key, Role::Client, &self.exporter)?;
        let req = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri(REAUTH_URI)
            .body(())
            .map_err(|e| refused(Refusal::BadRequest, e))?;
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| refused(Refusal::SessionLost, e))?;
        let (response, mut body) = send
            .send_request(req, false)
            .map_err(|e| refused(Refusal::SessionLost, e))?;
        body.send_data(Bytes::from(proof.encode()), true)
            .map_err(|e| refused(Refusal::SessionLost, e))?;
        let response = response
            .await
            .map_err(|e| refused(Refusal::SessionLost, e))?;
        match response.status().as_u16() {
            200 => {}
            405 => return Err(Failed::Unsupported),
            s => {
                return Err(refused(
                    Refusal::ReauthRefused,
                    format!("the destination refused our proof ({s})"),
                ))
            }
        }
        let theirs = Proof::decode(&reauth::read_body(response.into_body()).await?)?;
        let peer = self.verify(&theirs)?;
        tracing::info!(serial = %peer.serial, not_after = ?peer.not_after, own_serial = %own.serial, "session re-authenticated");
        self.own_not_after = own.not_after;
        self.peer_not_after = peer.not_after;
        let _ = self.term.send(Term::of(&peer, &self.clock));
        Ok(())
    }

    /// The destination's proof, verified as its handshake was (chain, profile, trust domain,
    /// revocation, expected identity), for the session's ID and region, over its exporter.
    fn verify(&self, proof: &Proof) -> Result<CertInfo, Failed> {
        let (leaf, rest) = proof
            .chain
            .split_first()
            .ok_or_else(|| refused(Refusal::ReauthMalformed, "no certificate"))?;
        let name = ServerName::try_from("reauth.invalid").expect("static name");
        self.verifier
            .verify_server_cert(leaf, rest, &name, &[], reauth::unix(self.clock.now()))
            .map_err(|e| refused(mesh::tls_reason(&e), e))?;
        let (info, _) = proof.accept(
            Role::Server,
            &self.exporter,
            &self.peer_id,
            self.peer_region.as_ref(),
            self.identity.id().trust_domain(),
        )?;
        Ok(info)
    }
}
