//! The CA's HTTP API: `POST /v1/svid`, `GET /v1/bundle`, `GET /v1/revoked`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

use super::authority::{check_workload_id, parse_csr, Csr, CsrError, LeafUsage};
use super::error::ClientCertError;
use super::ledger::{token_hash, Authorisation, IssuedRecord, Ledger, LedgerError, TokenSpend};
pub use super::limits::RateLimiter;
use super::metrics::CaMetrics;
use super::revoked_list::Scope;
use crate::audit::ca::CaEvent;
use crate::audit::AuditLog;
use crate::clock::{rfc3339, unix_secs, Clock};
use crate::identity::{CertInfo, SpiffeId};

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;

/// Everything a request handler needs.
pub struct CaState {
    /// The CA's keys: the intermediate that signs, the previous one still accepted for
    /// renewals, the published roots ([`super::rotation`]; replaced while serving).
    pub authority: super::rotation::CaKeys,
    /// The store of issuances, tokens and revocations.
    pub ledger: std::sync::Arc<dyn Ledger>,
    pub audit: AuditLog,
    pub metrics: CaMetrics,
    pub clock: Clock,
    pub svid_ttl: Duration,
    pub rate: RateLimiter,
    /// The per-client rate of the GET endpoints, generous: they are open to anyone.
    pub read_rate: RateLimiter,
    /// `GET /v1/revoked`'s bodies, rebuilt only when the lists change.
    pub revoked_cache: super::revoked_list::RevokedCache,
    /// The other regions' CAs and the revocations learned from them.
    pub peers: std::sync::Arc<super::peers::Peers>,
    /// Longest a request body may take to arrive (a slow body holds a connection).
    pub body_timeout: Duration,
    /// Which IDs each host agent may obtain.
    pub agents: super::agents::AgentRegistry,
    /// Lifetime of issued JWT-SVIDs.
    pub jwt_ttl: Duration,
    /// The keys JWT-SVIDs are signed with and published under ([`super::jwt`]).
    pub jwt: super::jwt::JwtKeys,
}

/// Facts about one client connection, taken once after the TLS handshake.
#[derive(Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client certificate's facts, when one was presented (rustls verified its chain).
    pub svid: Option<Result<CertInfo, ClientCertError>>,
}

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub detail: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }
    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
    fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    fn outcome(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limited",
            StatusCode::REQUEST_TIMEOUT => "timed_out",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "error",
        }
    }
}

impl From<CsrError> for ApiError {
    fn from(e: CsrError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::TokenUnknown
            | LedgerError::TokenUsed
            | LedgerError::TokenExpired
            | LedgerError::TokenVoided
            | LedgerError::ParentRevoked(_) => ApiError::unauthorized(e.to_string()),
            LedgerError::TokenWrongId => ApiError::bad_request(e.to_string()),
            LedgerError::Banned(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "revoked", e.to_string())
            }
            // The store failed (a full or read-only disk, an I/O error): nothing was recorded,
            // and the client should come back later, to this CA or another.
            LedgerError::Db(_) | LedgerError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the CA cannot record issuances now, retry later: {e}"),
            ),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error_response(e: &ApiError) -> Resp {
    let body = serde_json::json!({"error": e.error, "detail": e.detail}).to_string();
    respond(e.status, "application/json", body)
}

/// A refused SVID or JWT-SVID request: counted, audited (`deny`), logged, answered.
fn refused(
    state: &CaState,
    peer: &Peer,
    e: &ApiError,
    id: Option<&SpiffeId>,
    what: &'static str,
) -> Resp {
    state.metrics.count(e.outcome());
    audit(state, peer, "deny", id, None, e.outcome(), Some(&e.detail));
    tracing::info!(client = %peer.addr, status = %e.status, detail = %e.detail, "{what} request refused");
    error_response(e)
}

/// Routes one request.
pub async fn handle(state: &CaState, peer: &Peer, req: Request<hyper::body::Incoming>) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/svid") => {
            let started = Instant::now();
            let resp = match svid(state, peer, req).await {
                Ok(r) => r,
                Err((e, id)) => refused(state, peer, &e, id.as_ref(), "SVID"),
            };
            state
                .metrics
                .svid_latency
                .observe(started.elapsed().as_secs_f64());
            resp
        }
        (&Method::POST, "/v1/jwt") => match jwt(state, peer, req).await {
            Ok(r) => r,
            Err((e, id)) => refused(state, peer, &e, id.as_ref(), "JWT-SVID"),
        },
        (&Method::GET, "/v1/bundle" | "/v1/revoked") if !state.read_rate.allow(peer.addr.ip()) => {
            state.metrics.reads_rate_limited.inc();
            tracing::debug!(client = %peer.addr, "GET refused: over the per-client rate");
            error_response(&ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this client; retry later",
            ))
        }
        (&Method::GET, "/v1/bundle") => bundle(state, &req),
        (&Method::GET, "/v1/revoked") => revoked(state, &req).await,
        (_, "/v1/svid" | "/v1/jwt" | "/v1/bundle" | "/v1/revoked") => {
            error_response(&ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed here", req.method()),
            ))
        }
        (_, path) => error_response(&ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such endpoint {path}"),
        )),
    }
}

fn audit(
    state: &CaState,
    peer: &Peer,
    event: &'static str,
    id: Option<&SpiffeId>,
    serial: Option<String>,
    outcome: &'static str,
    reason: Option<&str>,
) {
    state.audit.record(&CaEvent {
        time: rfc3339(state.clock.now()),
        event,
        spiffe_id: id.map(|i| i.to_string()),
        serial,
        client: peer.addr.to_string(),
        outcome,
        reason: reason.map(str::to_string),
        agent: asking_agent(peer),
        audience: None,
    });
}

/// The host agent behind a request: the client certificate's ID when it names an agent.
pub(super) fn asking_agent(peer: &Peer) -> Option<String> {
    match &peer.svid {
        Some(Ok(info)) if super::agents::is_agent_id(&info.id) => Some(info.id.to_string()),
        _ => None,
    }
}

pub(super) enum Auth {
    Token {
        spend: TokenSpend,
        id: SpiffeId,
    },
    Svid(CertInfo),
    /// A host agent (its SVID) asking for `id`, which its registration allows.
    Agent {
        agent: CertInfo,
        id: SpiffeId,
    },
}

async fn read_body(
    req: Request<hyper::body::Incoming>,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let Ok(read) = tokio::time::timeout(deadline, body).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {deadline:?}"),
        ));
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!("reading body: {e}"))),
    }
}

/// What authorises this request for `requested`: a join token, or else the client's current
/// SVID (a renewal of its own ID, or a host agent asking for a workload of its host).
async fn authorise(
    state: &CaState,
    peer: &Peer,
    bearer: Option<&str>,
    requested: &SpiffeId,
) -> Result<Auth, ApiError> {
    match (bearer, &peer.svid) {
        (Some(token), _) => authorise_token(state, token).await,
        (None, None) => Err(ApiError::unauthorized(
            "no authorisation: send `Authorization: Bearer <join token>` or present your current SVID as client certificate",
        )),
        (None, Some(Err(why))) => Err(ApiError::unauthorized(format!("client certificate: {why}"))),
        (None, Some(Ok(info))) if info.id != *requested && super::agents::is_agent_id(&info.id) => {
            authorise_agent(state, info, requested)
        }
        (None, Some(Ok(info))) => authorise_renewal(state, info),
    }
}

/// A host agent asking for `requested` with its own SVID: the agent's SVID must be good for a
/// renewal of its own (unexpired, unrevoked, not banned), its registration must allow
/// `requested`, and `requested` must be an ID this CA issues and not banned.
pub(super) fn authorise_agent(
    state: &CaState,
    agent: &CertInfo,
    requested: &SpiffeId,
) -> Result<Auth, ApiError> {
    authorise_renewal(state, agent)?;
    if !state.agents.allows(&agent.id, requested) {
        let why = if state.agents.knows(&agent.id) {
            format!("agent {} is not registered for {requested}", agent.id)
        } else {
            format!(
                "agent {} has no registration on this CA (an [[agent]] table)",
                agent.id
            )
        };
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why));
    }
    check_workload_id(&state.authority, requested)
        .map_err(|why| ApiError::new(StatusCode::FORBIDDEN, "forbidden", why.to_string()))?;
    check_not_banned(state, requested)?;
    Ok(Auth::Agent {
        agent: agent.clone(),
        id: requested.clone(),
    })
}

/// A first issuance: the token must be known, unused, not voided and unexpired (the ledger
/// checks again when it spends it).
async fn authorise_token(state: &CaState, token: &str) -> Result<Auth, ApiError> {
    let hash = token_hash(token);
    let rec = state
        .ledger
        .token(hash)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown join token"))?;
    let now = state.clock.unix();
    if rec.used.is_some() {
        return Err(ApiError::unauthorized("join token already used"));
    }
    if rec.voided_at.is_some() {
        return Err(ApiError::unauthorized(LedgerError::TokenVoided.to_string()));
    }
    if rec.expires_at <= now {
        return Err(ApiError::unauthorized("join token expired"));
    }
    let id = SpiffeId::new(&rec.spiffe_id)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    check_not_banned(state, &id)?;
    Ok(Auth::Token {
        spend: TokenSpend {
            hash,
            spiffe_id: rec.spiffe_id,
            now,
        },
        id,
    })
}

/// A renewal with the SVID presented as client certificate (rustls verified its chain).
fn authorise_renewal(state: &CaState, info: &CertInfo) -> Result<Auth, ApiError> {
    check_workload_id(&state.authority, &info.id)
        .map_err(|why| ApiError::new(StatusCode::FORBIDDEN, "forbidden", why.to_string()))?;
    if state.ledger.is_revoked(&info.serial) {
        return Err(ApiError::unauthorized(format!(
            "client certificate {} is revoked",
            info.serial
        )));
    }
    check_not_banned(state, &info.id)?;
    // A keep-alive connection can outlive the certificate it was opened with.
    if info.not_after <= state.clock.now() {
        return Err(ApiError::unauthorized("client certificate expired"));
    }
    Ok(Auth::Svid(info.clone()))
}

/// Refuses an ID banned here or by a peer region's CA (the ledger re-checks its own bans when
/// it records the issuance, so a ban racing this request still wins).
fn check_not_banned(state: &CaState, id: &SpiffeId) -> Result<(), ApiError> {
    let id = id.to_string();
    let why = if state.ledger.is_banned(&id) {
        LedgerError::Banned(id).to_string()
    } else if state.peers.bans(&id) {
        format!("{id} is revoked by another region's CA")
    } else {
        return Ok(());
    };
    Err(ApiError::new(StatusCode::FORBIDDEN, "revoked", why))
}

fn bearer(req: &Request<hyper::body::Incoming>) -> Result<Option<String>, ApiError> {
    let Some(v) = req.headers().get(AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization header is not text"))?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_string()))
        }
        _ => Err(ApiError::unauthorized(
            "Authorization header must be `Bearer <join token>`",
        )),
    }
}

/// The per-client rate of SVID and JWT-SVID requests (one bucket for both).
fn within_rate(state: &CaState, peer: &Peer) -> Result<(), ApiError> {
    if state.rate.allow(peer.addr.ip()) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many requests from this client; retry later",
    ))
}

async fn svid(
    state: &CaState,
    peer: &Peer,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, (ApiError, Option<SpiffeId>)> {
    let no_id = |e: ApiError| (e, None);
    within_rate(state, peer).map_err(no_id)?;
    let bearer = bearer(&req).map_err(no_id)?;
    let body = read_body(req, state.body_timeout).await.map_err(no_id)?;
    let csr = parse_csr(&body).map_err(|e| no_id(e.into()))?;
    let requested = csr.requested.clone();
    let auth = authorise(state, peer, bearer.as_deref(), &requested)
        .await
        .map_err(|e| (e, Some(requested.clone())))?;
    issue(state, peer, csr, auth)
        .await
        .map_err(|e| (e, Some(requested)))
}

impl Auth {
    /// The ID it authorises, the audit event (`issue` or `renew`) and the ledger's record of it.
    fn grant(&self) -> (SpiffeId, &'static str, Authorisation) {
        match self {
            Auth::Token { id, spend } => (
                id.clone(),
                "issue",
                Authorisation::Token {
                    token_hash: crate::util::hex(&spend.hash[..8]),
                },
            ),
            Auth::Svid(info) => (
                info.id.clone(),
                "renew",
                Authorisation::Svid {
                    serial: info.serial.to_string(),
                },
            ),
            Auth::Agent { agent, id } => (
                id.clone(),
                "issue",
                Authorisation::Agent {
                    agent: agent.id.to_string(),
                    serial: agent.serial.to_string(),
                },
            ),
        }
    }

    /// The token to spend with the issuance, if it is a first one.
    fn into_spend(self) -> Option<TokenSpend> {
        match self {
            Auth::Token { spend, .. } => Some(spend),
            Auth::Svid(_) | Auth::Agent { .. } => None,
        }
    }
}

/// Signs the SVID `csr` asks for if `auth` allows it, records it (spending the token), and
/// answers with its chain.
async fn issue(state: &CaState, peer: &Peer, csr: Csr, auth: Auth) -> Result<Resp, ApiError> {
    let (authorised, event, authorisation) = auth.grant();
    if csr.requested != authorised {
        return Err(CsrError::Mismatch {
            requested: csr.requested.to_string(),
            authorised: authorised.to_string(),
        }
        .into());
    }
    let now = state.clock.now();
    // One intermediate for the leaf and the chain sent with it, whatever a rotation does meanwhile.
    let authority = state.authority.active();
    let issued = authority
        .sign_leaf(
            &authorised,
            &csr.public_key,
            state.svid_ttl,
            now,
            LeafUsage::Svid,
        )
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let record = IssuedRecord {
        spiffe_id: authorised.to_string(),
        not_after: unix_secs(issued.not_after),
        issued_at: unix_secs(now),
        authorisation,
    };
    state
        .ledger
        .record_issue(issued.serial.clone(), record, auth.into_spend())
        .await?;
    let outcome = if event == "issue" {
        "issued"
    } else {
        "renewed"
    };
    state.metrics.count(outcome);
    let serial = Some(issued.serial.to_string());
    audit(state, peer, event, Some(&authorised), serial, "ok", None);
    tracing::debug!(client = %peer.addr, id = %authorised, serial = %issued.serial, not_after = %rfc3339(issued.not_after), "SVID {outcome}");
    let pem = crate::identity::chain_to_pem(&authority.chain_for(&issued.leaf));
    Ok(respond(
        StatusCode::OK,
        "application/pem-certificate-chain",
        pem,
    ))
}

/// A `POST /v1/jwt` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtRequest {
    spiffe_id: String,
    audience: Vec<String>,
}

/// `POST /v1/jwt`: a JWT-SVID for the caller's own ID, or for an ID its agent registration
/// names, signed with this region's key ([`super::jwt`]).
async fn jwt(
    state: &CaState,
    peer: &Peer,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, (ApiError, Option<SpiffeId>)> {
    let no_id = |e: ApiError| (e, None);
    within_rate(state, peer).map_err(no_id)?;
    let info = match &peer.svid {
        Some(Ok(info)) => info.clone(),
        Some(Err(why)) => {
            return Err(no_id(ApiError::unauthorized(format!(
                "client certificate: {why}"
            ))))
        }
        None => {
            return Err(no_id(ApiError::unauthorized(
                "a JWT-SVID is obtained with an SVID: present yours as client certificate",
            )))
        }
    };
    let body = read_body(req, state.body_timeout).await.map_err(no_id)?;
    let asked: JwtRequest = serde_json::from_slice(&body)
        .map_err(|e| no_id(ApiError::bad_request(format!("JWT request body: {e}"))))?;
    let id = crate::identity::parse_workload_id(&asked.spiffe_id).map_err(|e| {
        no_id(ApiError::bad_request(format!(
            "spiffe_id {:?}: {e}",
            asked.spiffe_id
        )))
    })?;
    let with_id = |e: ApiError| (e, Some(id.clone()));
    super::jwt::check_audience(&asked.audience).map_err(|e| with_id(ApiError::bad_request(e)))?;
    if id == info.id {
        authorise_renewal(state, &info).map_err(with_id)?;
    } else if super::agents::is_agent_id(&info.id) {
        authorise_agent(state, &info, &id).map_err(with_id)?;
    } else {
        return Err(with_id(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} may obtain JWT-SVIDs for itself only, not for {id}",
                info.id
            ),
        )));
    }
    let iat = state.clock.unix();
    let exp = iat + state.jwt_ttl.as_secs();
    let signer = state.jwt.signer();
    let claims = crate::jwt::Claims {
        sub: id.clone(),
        aud: asked.audience.clone(),
        iat,
        exp,
        region: signer.region.clone(),
    };
    let token = signer.key.sign(&claims).map_err(|e| {
        with_id(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        ))
    })?;
    state.metrics.count("jwt_issued");
    state.audit.record(&CaEvent {
        time: rfc3339(state.clock.now()),
        event: "jwt",
        spiffe_id: Some(id.to_string()),
        serial: None,
        client: peer.addr.to_string(),
        outcome: "ok",
        reason: None,
        agent: asking_agent(peer),
        audience: Some(asked.audience),
    });
    let body = serde_json::json!({"token": token, "expires_at": exp}).to_string();
    Ok(respond(StatusCode::OK, "application/json", body))
}

/// The SPIFFE bundle document: the published roots, this region's JWT keys and (unless
/// `local`) every peer region's. Each kid once, ours first: a peer key whose kid is already
/// there is left out (one duplicate kid would make every consumer refuse the whole document).
pub(super) fn bundle_document(state: &CaState, local: bool) -> serde_json::Value {
    let keys = state.authority.current();
    let hint = super::rotation::REFRESH_HINT_SECS;
    let mut jwt_keys = state.jwt.published(state.clock.unix());
    if !local {
        for k in state.peers.jwt_keys() {
            if jwt_keys.iter().any(|held| held.kid() == k.kid()) {
                tracing::debug!(
                    kid = k.kid(),
                    "a peer's JWT key repeats a kid already published; left out"
                );
            } else {
                jwt_keys.push(k);
            }
        }
    }
    crate::jwt::spiffe_bundle_json(&keys.published.roots, &jwt_keys, keys.sequence, hint)
}

/// Whether a GET asks for this CA's own entries only (`?scope=local`, what peer CAs ask).
fn local_scope(req: &Request<hyper::body::Incoming>) -> bool {
    req.uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "scope=local"))
}

fn wants_json(req: &Request<hyper::body::Incoming>) -> bool {
    req.headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

/// `GET /v1/bundle`: every root published now (old and new ones during a root rotation); as
/// JSON (`Accept: application/json`) the SPIFFE bundle document, with this region's JWT key and
/// every peer region's. `?scope=local` (what peer CAs ask) is that document with this CA's own
/// JWT key only, so keys never echo between CAs.
fn bundle(state: &CaState, req: &Request<hyper::body::Incoming>) -> Resp {
    let keys = state.authority.current();
    let local = local_scope(req);
    if wants_json(req) || local {
        respond(
            StatusCode::OK,
            "application/json",
            bundle_document(state, local).to_string(),
        )
    } else {
        respond(
            StatusCode::OK,
            "application/x-pem-file",
            keys.published.to_pem(),
        )
    }
}

/// `GET /v1/revoked`: the unexpired revoked serials and the banned SPIFFE IDs of this CA and
/// of its peers; `?scope=local` gives this CA's own entries only (what peers pull). `sequence`
/// counts this CA's own changes. The peers' state (URLs, errors) is not told to anyone who asks:
/// it is on the metrics listener's `/peers`.
async fn revoked(state: &CaState, req: &Request<hyper::body::Incoming>) -> Resp {
    let scope = if local_scope(req) {
        Scope::Local
    } else {
        Scope::All
    };
    // A replica cut off from its shared ledger cannot know what the others revoked since: it
    // says so rather than serve an old list as current (clients keep the list they have).
    if let Some(why) = state.ledger.stale() {
        return error_response(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("this CA's revocation list may be out of date: {why}"),
        ));
    }
    let body = state.revoked_cache.body(state, scope).await;
    respond(StatusCode::OK, "application/json", body)
}
