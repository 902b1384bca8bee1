//! The JWT-SVID profile of the Workload API.
//!
//! - **FetchJWTSVID**: for the requested ID (which the caller must be entitled to) or each of
//!   the caller's IDs, a JWT-SVID for the audience, asked of the CA with the agent's SVID
//!   (`POST /v1/jwt`: the CA signs only IDs the agent's registration names). Each token is
//!   validated against the agent's JWT bundles before it is handed out, then cached per (ID,
//!   audience set) and served from the cache until half its life has passed, so a busy caller
//!   does not make a CA call per request and always gets a token with at least half its life.
//!   The audience is required (InvalidArgument), at most [`MAX_AUDIENCES`] values of at most
//!   [`MAX_AUDIENCE_LEN`] bytes each; the cache holds at most [`MAX_CACHED`] tokens.
//! - **FetchJWTBundles**: the JWKS of every trust domain the agent holds JWT keys for (from the
//!   CA's SPIFFE bundle document, refreshed every `identity.refresh_interval`), streamed again
//!   when they change.
//! - **ValidateJWTSVID**: [`crate::jwt::validate`] against those bundles; the subject and the
//!   claims (as a `google.protobuf.Struct`).
//!
//! When the CA is out of reach the last JWT bundles keep being used; tokens in the cache keep
//! being served until half their life, then FetchJWTSVID answers Unavailable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::pb;
use super::service::{follow, Next, Shared, Stream};
use crate::identity::{parse_id, SpiffeId};
use crate::jwt::{JwtBundles, MAX_TOKEN_LEN};
use crate::svid::ca_client::{CaClient, ClientError};
use crate::svid::Identity;

/// Most audiences in one FetchJWTSVID request.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience value (bytes).
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Most JWT-SVIDs kept in the cache.
pub const MAX_CACHED: usize = 4096;
/// First wait before fetching the JWT bundles again after a failure.
const RETRY_START: Duration = Duration::from_millis(500);

/// A cached token: what it is, until when it is handed out, when it expires.
#[derive(Clone)]
struct Cached {
    token: String,
    serve_until: SystemTime,
}

/// The JWT side of the agent: the CA client, the token cache and the JWT bundles.
pub struct JwtService {
    client: CaClient,
    agent: Arc<Identity>,
    cache: Mutex<HashMap<(SpiffeId, Vec<String>), Cached>>,
    bundles: watch::Sender<Arc<JwtBundles>>,
    /// Asks the refresh task for a fetch now (a token signed by a key not yet known).
    refresh_now: Arc<Notify>,
}

impl JwtService {
    /// Starts the JWT bundle refresh (every `every`, until `stop`).
    pub(super) fn new(
        client: CaClient,
        agent: Arc<Identity>,
        every: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let (bundles, _) = watch::channel(Arc::new(JwtBundles::default()));
        let refresh_now = Arc::new(Notify::new());
        tokio::spawn(
            refresh_loop(
                client.clone(),
                agent.clone(),
                bundles.clone(),
                refresh_now.clone(),
                every,
                stop,
            )
            .instrument(tracing::info_span!("jwt_bundles")),
        );
        JwtService {
            client,
            agent,
            cache: Mutex::default(),
            bundles,
            refresh_now,
        }
    }

    /// The JWT bundles held now.
    pub fn bundles(&self) -> Arc<JwtBundles> {
        self.bundles.borrow().clone()
    }

    /// A token for `id` and `audience` (sorted, deduplicated): from the cache until half its
    /// life, else from the CA, validated.
    async fn token(&self, id: &SpiffeId, audience: &[String]) -> Result<String, Status> {
        let key = (id.clone(), audience.to_vec());
        let now = self.agent.clock().now();
        if let Some(c) = self.lock().get(&key).filter(|c| now < c.serve_until) {
            return Ok(c.token.clone());
        }
        let svid = self
            .agent
            .current()
            .filter(|s| s.info.not_after > now)
            .ok_or_else(|| Status::unavailable("the agent holds no SVID of its own yet"))?;
        let (token, exp) = self
            .client
            .fetch_jwt(&svid, id, audience)
            .await
            .map_err(ca_status)?;
        self.check(&token, id, &audience[0]).await?;
        let fetched = self.agent.clock().now();
        let life = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
        let half = life.duration_since(fetched).unwrap_or_default() / 2;
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.serve_until > fetched);
        }
        if cache.len() >= MAX_CACHED {
            // Still full of live tokens: start over rather than grow.
            cache.clear();
        }
        cache.insert(
            key,
            Cached {
                token: token.clone(),
                serve_until: fetched + half,
            },
        );
        Ok(token)
    }

    /// Validates a token the CA just signed for `id`; a key not yet in the bundles makes one
    /// refresh before it is refused.
    async fn check(&self, token: &str, id: &SpiffeId, audience: &str) -> Result<(), Status> {
        let mut rx = self.bundles.subscribe();
        for attempt in 0..2 {
            let now = self.agent.clock().now();
            match crate::jwt::validate(token, &self.bundles(), audience, now) {
                Ok(v) if &v.sub == id => return Ok(()),
                Ok(v) => {
                    return Err(Status::internal(format!(
                        "the CA signed a JWT-SVID for {}, not {id}",
                        v.sub
                    )))
                }
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "a fresh JWT-SVID does not validate yet; refreshing the JWT bundles");
                    rx.borrow_and_update();
                    self.refresh_now.notify_one();
                    let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
                }
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "the CA's JWT-SVID does not validate against the agent's JWT bundles: {e}"
                    )))
                }
            }
        }
        Err(Status::unavailable("JWT bundles unavailable"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SpiffeId, Vec<String>), Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A CA failure as the caller sees it.
fn ca_status(e: ClientError) -> Status {
    match &e {
        ClientError::Refused { status, .. } if status.as_u16() == 403 || status.as_u16() == 401 => {
            Status::permission_denied(format!("the CA refused: {e}"))
        }
        _ => Status::unavailable(format!("the CA is unavailable: {e}")),
    }
}

/// Fetches the CA's SPIFFE bundle document every `every` (sooner after a failure, or when
/// asked) and publishes its JWT keys when they changed.
async fn refresh_loop(
    client: CaClient,
    agent: Arc<Identity>,
    bundles: watch::Sender<Arc<JwtBundles>>,
    now: Arc<Notify>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let td = agent.id().trust_domain().clone();
    let mut retry = RETRY_START;
    loop {
        let own = agent.current();
        let wait = match client.fetch_bundle_json(own.as_deref()).await {
            Ok(json) => match crate::jwt::parse_spiffe_bundle(&td, &json) {
                Ok(doc) => {
                    retry = RETRY_START;
                    // A key's region is vouched for only by a CA whose region was checked in
                    // the handshake (the config's `region`), as for the sidecar.
                    let checked =
                        matches!(client.region(), crate::svid::ca_client::CaRegion::Is(_));
                    let jwt = if checked {
                        doc.jwt
                    } else {
                        without_regions(doc.jwt)
                    };
                    let fresh = JwtBundles::from(jwt);
                    bundles.send_if_modified(|held| {
                        let changed = **held != fresh;
                        if changed {
                            tracing::info!(
                                keys = fresh.iter().map(|b| b.len()).sum::<usize>(),
                                "JWT bundles updated from the CA"
                            );
                            *held = Arc::new(fresh.clone());
                        }
                        changed
                    });
                    every
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the CA's bundle document is unusable; keeping the last JWT bundles");
                    every
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "fetching the JWT bundles failed; keeping the last ones");
                let w = retry.min(every);
                retry = (retry * 2).min(every);
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = now.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// `jwt` with every key's region dropped (tokens it validates have no verified region).
fn without_regions(jwt: crate::jwt::JwtBundle) -> crate::jwt::JwtBundle {
    let mut plain = crate::jwt::JwtBundle::new(jwt.trust_domain.clone());
    for k in jwt.keys() {
        // Same kids as the document, which had each once.
        let _ = plain.insert(k.clone().with_region(None));
    }
    plain
}

/// The audiences of a request, checked, sorted and deduplicated.
fn audiences(mut aud: Vec<String>) -> Result<Vec<String>, Status> {
    if aud.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if aud.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "{} audiences; at most {MAX_AUDIENCES}",
            aud.len()
        )));
    }
    if let Some(bad) = aud
        .iter()
        .find(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
    {
        return Err(Status::invalid_argument(format!(
            "an audience is 1 to {MAX_AUDIENCE_LEN} bytes (got {})",
            bad.len()
        )));
    }
    aud.sort();
    aud.dedup();
    Ok(aud)
}

/// FetchJWTSVID.
pub(super) async fn fetch_jwtsvid(
    shared: &Arc<Shared>,
    request: Request<pb::JwtsvidRequest>,
) -> Result<Response<pb::JwtsvidResponse>, Status> {
    let rpc = "FetchJWTSVID";
    let (caller, ids) = shared.entitled(&request, rpc)?;
    let req = request.into_inner();
    let audience =
        audiences(req.audience).inspect_err(|_| shared.metrics.call(rpc, "bad_request"))?;
    let targets = if req.spiffe_id.is_empty() {
        ids
    } else {
        let asked = parse_id(&req.spiffe_id).map_err(|e| {
            shared.metrics.call(rpc, "bad_request");
            Status::invalid_argument(e.to_string())
        })?;
        if !ids.contains(&asked) {
            shared.deny(
                &caller,
                rpc,
                std::slice::from_ref(&asked),
                "not entitled to this SPIFFE ID",
            );
            return Err(Status::permission_denied(format!(
                "no identity issued: this caller is not entitled to {asked}"
            )));
        }
        vec![asked]
    };
    let mut svids = Vec::with_capacity(targets.len());
    for id in &targets {
        let token = shared.jwt.token(id, &audience).await.inspect_err(|s| {
            tracing::warn!(%id, error = %s.message(), "no JWT-SVID for a caller");
            shared.metrics.call(rpc, "unavailable");
        })?;
        svids.push(pb::Jwtsvid {
            spiffe_id: id.to_string(),
            svid: token,
            hint: String::new(),
        });
    }
    shared.grant(&caller, rpc, &targets);
    Ok(Response::new(pb::JwtsvidResponse { svids }))
}

/// FetchJWTBundles.
pub(super) fn fetch_jwt_bundles(
    shared: &Arc<Shared>,
    request: Request<pb::JwtBundlesRequest>,
) -> Result<Response<Stream<pb::JwtBundlesResponse>>, Status> {
    let rpc = "FetchJWTBundles";
    let caller = shared.verifier(&request, rpc)?;
    shared.grant(&caller, rpc, &[]);
    // The JWT bundles' own signal, as a counter the stream follows.
    let (tx, rx) = watch::channel(0u64);
    let mut bundles = shared.jwt.bundles.subscribe();
    let mut federated = shared.federation.changes();
    let mut stop = shared.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = bundles.changed() => if r.is_err() { return },
                r = federated.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
                _ = tx.closed() => return,
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(Response::new(follow(shared, rx, |s, _| {
        let held = s.jwt_bundles();
        let bundles: HashMap<String, Vec<u8>> = held
            .iter()
            .map(|b| {
                let jwks = serde_json::to_vec(&b.to_jwks()).unwrap_or_default();
                (format!("spiffe://{}", b.trust_domain), jwks)
            })
            .collect();
        if bundles.is_empty() {
            Next::Wait
        } else {
            Next::Send(pb::JwtBundlesResponse { bundles })
        }
    })))
}

/// ValidateJWTSVID.
pub(super) fn validate_jwtsvid(
    shared: &Arc<Shared>,
    request: Request<pb::ValidateJwtsvidRequest>,
) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
    let rpc = "ValidateJWTSVID";
    let caller = shared.verifier(&request, rpc)?;
    let req = request.into_inner();
    if req.audience.is_empty() {
        shared.metrics.call(rpc, "bad_request");
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if req.svid.is_empty() || req.svid.len() > MAX_TOKEN_LEN {
        shared.metrics.call(rpc, "bad_request");
        return Err(Status::invalid_argument(format!(
            "svid must be a JWT of 1 to {MAX_TOKEN_LEN} bytes"
        )));
    }
    let now = shared.agent.clock().now();
    let v = crate::jwt::validate(&req.svid, &shared.jwt_bundles(), &req.audience, now).map_err(
        |e| {
            shared.metrics.call(rpc, "invalid_token");
            Status::invalid_argument(e.to_string())
        },
    )?;
    shared.grant(&caller, rpc, std::slice::from_ref(&v.sub));
    Ok(Response::new(pb::ValidateJwtsvidResponse {
        spiffe_id: v.sub.to_string(),
        claims: Some(to_struct(verified_claims(v.claims, v.region.as_ref()))),
    }))
}

/// JSON claims as a `google.protobuf.Struct`.
/// The claims as signed, except `region`: the verified one, or none (a claim no key vouched
/// for is not handed on as if it were).
fn verified_claims(
    mut claims: serde_json::Map<String, serde_json::Value>,
    region: Option<&crate::region::Region>,
) -> serde_json::Map<String, serde_json::Value> {
    match region {
        Some(r) => {
            claims.insert("region".into(), serde_json::Value::String(r.to_string()));
        }
        None => {
            claims.remove("region");
        }
    }
    claims
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_required_bounded_sorted_and_deduplicated() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(audiences(s(&["b", "a", "b"])).unwrap(), s(&["a", "b"]));
        for bad in [
            vec![],
            vec![String::new()],
            vec!["x".repeat(MAX_AUDIENCE_LEN + 1)],
            (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect(),
        ] {
            let e = audiences(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        }
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        let claims = serde_json::json!({"sub": "spiffe://x/y", "aud": ["a"], "exp": 5, "n": null});
        let s = to_struct(claims.as_object().unwrap().clone());
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://x/y".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else {
            panic!("{s:?}")
        };
        assert_eq!(l.values[0].kind, Some(Kind::StringValue("a".into())));
        assert_eq!(s.fields["n"].kind, Some(Kind::NullValue(0)));
    }
}
