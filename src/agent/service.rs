//! The Workload API service: every call checks the spec's `workload.spiffe.io: true` metadata
//! (else InvalidArgument), attests the caller from its socket credentials ([`super::attest`]),
//! and serves what the registration entries it matches grant (none: PermissionDenied "no
//! identity issued", and an audit line).
//!
//! Streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) send the current state at once,
//! then a whole new message whenever it changes (a rotation, a withdrawal at expiry, a new
//! bundle); they end when the agent stops. A caller entitled to IDs whose SVIDs are not yet
//! obtained waits for the first; when no SVID of a caller may be served any more (all expired,
//! the CA out of reach for their whole lifetime, or revoked) its stream ends with
//! PermissionDenied, so the client stops using them as the spec says for withdrawn identities,
//! and a new call waits for the next SVID.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::attest::{attest, matching, Caller, PeerCred};
use super::config::Entry;
use super::jwt::JwtService;
use super::metrics::AgentMetrics;
use super::pb;
use super::pb::spiffe_workload_api_server::SpiffeWorkloadApi;
use super::workloads::Workloads;
use crate::audit::agent::AgentEvent;
use crate::audit::AuditLog;
use crate::identity::SpiffeId;
use crate::svid::Identity;

/// The metadata every Workload API call must carry (SPIFFE Workload Endpoint spec, 4.3).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

pub(super) type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// What the service reads.
pub(super) struct Shared {
    pub entries: Vec<Entry>,
    pub workloads: Arc<Workloads>,
    pub agent: Arc<Identity>,
    pub audit: Arc<AuditLog>,
    pub metrics: AgentMetrics,
    pub allow_unauthenticated_verifiers: bool,
    pub shutdown: watch::Receiver<bool>,
    pub proc_root: PathBuf,
    pub jwt: JwtService,
    /// The federated trust domains' bundles (none configured: an empty federation).
    pub federation: Arc<crate::federation::Federation>,
}

/// The SpiffeWorkloadAPI service of `trustline agent`.
#[derive(Clone)]
pub struct WorkloadApi {
    pub(super) shared: Arc<Shared>,
}

/// One RPC's name, as the audit log and the metrics show it.
pub(super) type Rpc = &'static str;

impl Shared {
    /// The security header, then the caller's attestation: the caller and the IDs it may have.
    pub(super) fn admit<T>(
        &self,
        req: &Request<T>,
        rpc: Rpc,
    ) -> Result<(Caller, Vec<SpiffeId>), Status> {
        let header = req.metadata().get(SECURITY_HEADER);
        if header.and_then(|v| v.to_str().ok()) != Some("true") {
            self.metrics.call(rpc, "no_metadata");
            return Err(Status::invalid_argument(
                "security header missing from request (workload.spiffe.io: true)",
            ));
        }
        let Some(cred) = req.extensions().get::<PeerCred>().copied() else {
            self.metrics.call(rpc, "not_attested");
            return Err(Status::permission_denied("caller could not be attested"));
        };
        let caller = attest(cred, &self.proc_root);
        let ids = matching(&self.entries, &caller);
        Ok((caller, ids))
    }

    /// [`Shared::admit`] for a call that needs an identity: none is PermissionDenied.
    pub(super) fn entitled<T>(
        &self,
        req: &Request<T>,
        rpc: Rpc,
    ) -> Result<(Caller, Vec<SpiffeId>), Status> {
        let (caller, ids) = self.admit(req, rpc)?;
        if ids.is_empty() {
            self.deny(&caller, rpc, &[], "no identity issued");
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok((caller, ids))
    }

    /// [`Shared::admit`] for bundles and validation: callers with no identity are served only
    /// with `allow_unauthenticated_verifiers`.
    pub(super) fn verifier<T>(&self, req: &Request<T>, rpc: Rpc) -> Result<Caller, Status> {
        if self.allow_unauthenticated_verifiers {
            return Ok(self.admit(req, rpc)?.0);
        }
        Ok(self.entitled(req, rpc)?.0)
    }

    pub(super) fn deny(&self, caller: &Caller, rpc: Rpc, asked: &[SpiffeId], reason: &str) {
        self.metrics.call(rpc, "no_identity");
        tracing::warn!(uid = caller.cred.uid, gid = caller.cred.gid, pid = ?caller.cred.pid, path = ?caller.path, rpc, reason, "Workload API caller refused");
        self.audit_event(caller, "deny", rpc, asked, Some(reason.to_string()));
    }

    pub(super) fn grant(&self, caller: &Caller, rpc: Rpc, ids: &[SpiffeId]) {
        self.metrics.call(rpc, "ok");
        self.audit_event(caller, "grant", rpc, ids, caller.path_error.clone());
    }

    fn audit_event(
        &self,
        caller: &Caller,
        event: &'static str,
        rpc: Rpc,
        ids: &[SpiffeId],
        reason: Option<String>,
    ) {
        self.audit.record(&AgentEvent {
            time: crate::clock::rfc3339(self.agent.clock().now()),
            event,
            rpc,
            uid: caller.cred.uid,
            gid: caller.cred.gid,
            pid: caller.cred.pid,
            path: caller.path.as_ref().map(|p| p.display().to_string()),
            spiffe_ids: ids.iter().map(ToString::to_string).collect(),
            reason,
        });
    }

    /// The roots of our trust domain, concatenated DER (the Workload API's bundle encoding).
    fn bundle_der(&self) -> Vec<u8> {
        self.agent
            .bundle()
            .roots
            .iter()
            .flat_map(|c| c.as_ref().to_vec())
            .collect()
    }

    /// Each federated trust domain's roots, concatenated DER, keyed by `spiffe://TD`.
    fn federated_der(&self) -> HashMap<String, Vec<u8>> {
        self.federation
            .bundles()
            .into_iter()
            .map(|(td, roots, _)| {
                let der = roots.iter().flat_map(|c| c.as_ref().to_vec()).collect();
                (format!("spiffe://{td}"), der)
            })
            .collect()
    }

    /// The JWT bundles callers validate with: our trust domain's (every region's keys, from
    /// the CA) and each federated trust domain's.
    pub(super) fn jwt_bundles(&self) -> Arc<crate::jwt::JwtBundles> {
        let ours = self.jwt.bundles();
        let federated = self.federation.bundles();
        if federated.is_empty() {
            return ours;
        }
        let mut all = (*ours).clone();
        for (_, _, jwt) in federated {
            all.insert(jwt);
        }
        Arc::new(all)
    }

    /// The X.509 answer for `ids`: their SVIDs that are held and not expired, in order.
    fn x509_response(&self, ids: &[SpiffeId]) -> pb::X509svidResponse {
        let now = self.agent.clock().now();
        let bundle = self.bundle_der();
        let svids = ids
            .iter()
            .filter_map(|id| self.workloads.servable(id, now))
            .map(|s| pb::X509svid {
                spiffe_id: s.id().to_string(),
                x509_svid: s.chain.iter().flat_map(|c| c.as_ref().to_vec()).collect(),
                x509_svid_key: s.key.secret_der().to_vec(),
                bundle: bundle.clone(),
                hint: String::new(),
            })
            .collect();
        pb::X509svidResponse {
            svids,
            federated_bundles: self.federated_der(),
            ..Default::default()
        }
    }

    fn bundles_response(&self) -> pb::X509BundlesResponse {
        let td = self.agent.id().trust_domain();
        let mut bundles = self.federated_der();
        bundles.insert(format!("spiffe://{td}"), self.bundle_der());
        pb::X509BundlesResponse {
            crl: vec![],
            bundles,
        }
    }
}

/// What a stream sends next: a message, nothing yet, or a final error.
pub(super) enum Next<T> {
    Send(T),
    Wait,
    End(Status),
}

/// A stream that sends `next()`'s message at once and again whenever it changes (looked at on
/// every change of `changes`), until the agent stops or the caller goes.
pub(super) fn follow<T, F>(
    shared: &Arc<Shared>,
    mut changes: watch::Receiver<u64>,
    mut next: F,
) -> Stream<T>
where
    T: Clone + PartialEq + Send + 'static,
    F: FnMut(&Shared, bool) -> Next<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    let shared = shared.clone();
    let mut stop = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut last: Option<T> = None;
        loop {
            match next(&shared, last.is_some()) {
                Next::Send(msg) if last.as_ref() != Some(&msg) => {
                    tokio::select! {
                        r = tx.send(Ok(msg.clone())) => if r.is_err() { return },
                        _ = stop.changed() => return,
                    }
                    last = Some(msg);
                }
                Next::Send(_) | Next::Wait => {}
                Next::End(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<pb::X509svidResponse>;
    type FetchX509BundlesStream = Stream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let rpc = "FetchX509SVID";
        let (caller, ids) = self.shared.entitled(&request, rpc)?;
        self.shared.grant(&caller, rpc, &ids);
        let changes = self.shared.workloads.changes();
        Ok(Response::new(follow(
            &self.shared,
            changes,
            move |s, sent| {
                let r = s.x509_response(&ids);
                match (r.svids.is_empty(), sent) {
                    (false, _) => Next::Send(r),
                    (true, false) => Next::Wait,
                    (true, true) => Next::End(Status::permission_denied(
                        "no identity issued: every SVID of this caller expired or was revoked",
                    )),
                }
            },
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let rpc = "FetchX509Bundles";
        let caller = self.shared.verifier(&request, rpc)?;
        self.shared.grant(&caller, rpc, &[]);
        let changes = self.shared.workloads.changes();
        Ok(Response::new(follow(&self.shared, changes, |s, _| {
            Next::Send(s.bundles_response())
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        super::jwt::fetch_jwtsvid(&self.shared, request).await
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        super::jwt::fetch_jwt_bundles(&self.shared, request)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        super::jwt::validate_jwtsvid(&self.shared, request)
    }
}
