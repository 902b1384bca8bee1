//! The CA's admin socket: `DATADIR/admin.sock`, mode 0600. Filesystem permissions are the
//! authorisation (as with SPIRE's admin socket). One JSON request line, one JSON answer line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::api::CaState;
use super::authority::check_workload_id;
use super::error::{AdminClientError, AdminError};
use super::ledger::{new_token, token_hash, Revocation, TokenRecord};
use super::metrics::OutcomeLabels;
use super::tasks::Tasks;
use crate::audit::ca::CaEvent;
use crate::clock::{rfc3339, unix_secs};
use crate::identity::{parse_workload_id, Serial};

/// Longest join-token lifetime the CA hands out.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// An admin request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Create a single-use join token bound to `spiffe_id`.
    Token { spiffe_id: String, ttl_secs: u64 },
    /// Revoke an issued leaf by serial (hex), and every SVID renewed from it.
    Revoke { serial: String },
    /// Ban a SPIFFE ID until lifted: no issuance or renewal, every live SVID of it revoked.
    RevokeId { spiffe_id: String },
    /// Lift a ban made with `revoke_id`.
    LiftId { spiffe_id: String },
    /// Activate the intermediate in directory `dir` (from `ca init --root --region`).
    RotateNext { dir: PathBuf },
    /// Publish the root in file `path`; intermediates it signed may be activated `wait_secs` later.
    AddRoot { path: PathBuf, wait_secs: u64 },
    /// Withdraw the root in file `path` from the published bundle.
    RetireRoot { path: PathBuf },
    /// The CA's keys now.
    RotationStatus,
    /// Prepare the next JWT-SVID key: published now, may sign `wait_secs` later.
    JwtPrepare { wait_secs: u64 },
    /// Make the prepared JWT-SVID key the signing one.
    JwtActivate,
}

/// The `client` of admin operations in the audit log.
const ADMIN: &str = "admin-socket";

/// Most revoked serials listed in one answer (the count is always complete).
const MAX_LISTED: usize = 1000;

/// An admin answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// How many serials a revocation revoked (the named one and its descendants, or an ID's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_count: Option<u64>,
    /// The first of them, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Vec<String>>,
    /// What a change of the CA's keys did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The CA's keys (`rotation_status`, and after every change of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<super::rotation::Status>,
    /// The JWT-SVID keys (with `keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<super::jwt::JwtStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminResponse {
    fn ok() -> Self {
        AdminResponse {
            ok: true,
            token: None,
            expires_at: None,
            sequence: None,
            revoked_count: None,
            revoked: None,
            detail: None,
            keys: None,
            jwt: None,
            error: None,
        }
    }

    fn revocation(r: Revocation) -> Self {
        AdminResponse {
            sequence: Some(r.sequence),
            revoked_count: Some(r.serials.len() as u64),
            revoked: Some(
                r.serials
                    .iter()
                    .take(MAX_LISTED)
                    .map(|s| s.to_string())
                    .collect(),
            ),
            ..Self::ok()
        }
    }

    fn err(e: AdminError) -> Self {
        AdminResponse {
            ok: false,
            error: Some(e.to_string()),
            ..Self::ok()
        }
    }

    /// The answer to an operation: its result, or why it was refused.
    fn of(r: Result<AdminResponse, AdminError>) -> Self {
        r.unwrap_or_else(Self::err)
    }
}

/// Binds the admin socket (replacing a stale one) with mode 0600 and serves it until shutdown;
/// requests in flight then finish.
pub(super) fn serve(path: &Path, state: Arc<CaState>, tasks: &Tasks) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tasks.spawn(accept_loop(listener, state, tasks.clone()));
    Ok(())
}

async fn accept_loop(listener: UnixListener, state: Arc<CaState>, tasks: Tasks) {
    let mut shutdown = tasks.shutdown.clone();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tasks.spawn(async move {
            if let Err(e) = serve_one(stream, &state).await {
                tracing::warn!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, state: &CaState) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(16 * 1024))
        .read_line(&mut line)
        .await?;
    let resp = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(req) => execute(state, req).await,
        Err(e) => AdminResponse::err(AdminError::Malformed(e)),
    };
    let outcome = if resp.ok { "ok" } else { "error" };
    state
        .metrics
        .admin_ops
        .get_or_create(&OutcomeLabels {
            outcome: outcome.into(),
        })
        .inc();
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await
}

async fn execute(state: &CaState, req: AdminRequest) -> AdminResponse {
    let now = state.clock.now();
    let (event, id, serial, resp) = match req {
        AdminRequest::Token {
            spiffe_id,
            ttl_secs,
        } => {
            let resp = make_token(state, &spiffe_id, ttl_secs).await;
            ("token", Some(spiffe_id), None, resp)
        }
        AdminRequest::Revoke { serial } => {
            let resp = revoke(state, &serial, unix_secs(now)).await;
            ("revoke", None, Some(serial), resp)
        }
        AdminRequest::RevokeId { spiffe_id } => {
            let resp = ban(state, &spiffe_id, unix_secs(now)).await;
            ("revoke_id", Some(spiffe_id), None, resp)
        }
        AdminRequest::LiftId { spiffe_id } => {
            let resp = lift(state, &spiffe_id).await;
            ("lift_id", Some(spiffe_id), None, resp)
        }
        req @ (AdminRequest::RotateNext { .. }
        | AdminRequest::AddRoot { .. }
        | AdminRequest::RetireRoot { .. }
        | AdminRequest::RotationStatus) => return rotate(state, req),
        req @ (AdminRequest::JwtPrepare { .. } | AdminRequest::JwtActivate) => {
            return rotate_jwt(state, req, now)
        }
    };
    let resp = AdminResponse::of(resp);
    state.audit.record(&CaEvent {
        time: rfc3339(now),
        event,
        spiffe_id: id,
        serial,
        client: "admin-socket".to_string(),
        outcome: if resp.ok { "ok" } else { "error" },
        reason: resp.error.clone(),
        agent: None,
        audience: None,
    });
    resp
}

/// The operations on the CA's own keys ([`super::rotation`]), each audited (the status is a
/// read and is not). Bad input (a bad `--next` dir, a root that does not fit) is refused with
/// what is wrong, and the CA keeps serving with the keys it had.
fn rotate(state: &CaState, req: AdminRequest) -> AdminResponse {
    use super::rotation::{MAX_PUBLISH_WAIT, MIN_PUBLISH_WAIT};
    let keys = &state.authority;
    let (event, result) = match req {
        AdminRequest::RotateNext { dir } => ("rotate_next", keys.activate(&dir, &state.clock)),
        AdminRequest::AddRoot { path, wait_secs } => {
            let wait = Duration::from_secs(wait_secs);
            if !(MIN_PUBLISH_WAIT..=MAX_PUBLISH_WAIT).contains(&wait) {
                let e = AdminError::Wait(format!(
                    "{wait_secs}s is outside {}..={}",
                    humantime::format_duration(MIN_PUBLISH_WAIT),
                    humantime::format_duration(MAX_PUBLISH_WAIT)
                ));
                super::rotation::audit(
                    state,
                    ADMIN,
                    "add_root",
                    None,
                    "error",
                    Some(e.to_string()),
                );
                return AdminResponse::err(e);
            }
            ("add_root", keys.add_root(&path, wait, &state.clock))
        }
        AdminRequest::RetireRoot { path } => ("retire_root", keys.retire_root(&path)),
        _ => {
            return AdminResponse {
                keys: Some(keys.status()),
                jwt: Some(state.jwt.status()),
                ..AdminResponse::ok()
            }
        }
    };
    match result {
        Ok(change) => {
            tracing::info!(serial = %change.serial, "{}", change.detail);
            super::rotation::audit(state, ADMIN, event, Some(change.serial), "ok", None);
            AdminResponse {
                detail: Some(change.detail),
                sequence: Some(change.sequence),
                keys: Some(keys.status()),
                ..AdminResponse::ok()
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "{event} refused; the CA keeps its keys");
            super::rotation::audit(state, ADMIN, event, None, "error", Some(e.to_string()));
            AdminResponse::err(e.into())
        }
    }
}

/// `ca rotate --jwt-prepare / --jwt-activate` ([`super::jwt::JwtKeys`]), audited like the
/// other key changes (the kid in `serial`).
fn rotate_jwt(state: &CaState, req: AdminRequest, now: std::time::SystemTime) -> AdminResponse {
    use super::rotation::{MAX_PUBLISH_WAIT, MIN_PUBLISH_WAIT};
    let unix = crate::clock::unix_secs(now);
    let (event, result) = match req {
        AdminRequest::JwtPrepare { wait_secs } => {
            let wait = Duration::from_secs(wait_secs);
            let r = if (MIN_PUBLISH_WAIT..=MAX_PUBLISH_WAIT).contains(&wait) {
                state.jwt.prepare(wait, unix).map_err(|e| e.to_string())
            } else {
                Err(AdminError::Wait(format!("{wait_secs}s is outside 1s..=30days")).to_string())
            };
            ("jwt_prepare", r)
        }
        _ => (
            "jwt_activate",
            state.jwt.activate(unix).map_err(|e| e.to_string()),
        ),
    };
    match result {
        Ok(kid) => {
            tracing::info!(%kid, "{event}");
            super::rotation::audit(state, ADMIN, event, Some(kid.clone()), "ok", None);
            AdminResponse {
                detail: Some(format!("{event}: key {kid}")),
                jwt: Some(state.jwt.status()),
                ..AdminResponse::ok()
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "{event} refused; the CA keeps its JWT keys");
            super::rotation::audit(state, ADMIN, event, None, "error", Some(e.clone()));
            AdminResponse {
                ok: false,
                error: Some(e),
                ..AdminResponse::ok()
            }
        }
    }
}

async fn revoke(state: &CaState, serial: &str, now: u64) -> Result<AdminResponse, AdminError> {
    let s = Serial::parse_hex(serial).ok_or_else(|| AdminError::BadSerial(serial.to_string()))?;
    Ok(AdminResponse::revocation(
        state.ledger.revoke(s, now).await?,
    ))
}

async fn ban(state: &CaState, spiffe_id: &str, now: u64) -> Result<AdminResponse, AdminError> {
    let id = workload_id(state, spiffe_id)?;
    Ok(AdminResponse::revocation(state.ledger.ban(&id, now).await?))
}

async fn lift(state: &CaState, spiffe_id: &str) -> Result<AdminResponse, AdminError> {
    let id = workload_id(state, spiffe_id)?;
    let seq = state.ledger.lift(&id).await?;
    Ok(AdminResponse {
        sequence: Some(seq),
        ..AdminResponse::ok()
    })
}

/// A workload SPIFFE ID this CA may issue, in its canonical text.
fn workload_id(state: &CaState, spiffe_id: &str) -> Result<String, AdminError> {
    let id = parse_workload_id(spiffe_id)?;
    check_workload_id(&state.authority, &id)?;
    Ok(id.to_string())
}

async fn make_token(
    state: &CaState,
    spiffe_id: &str,
    ttl_secs: u64,
) -> Result<AdminResponse, AdminError> {
    let id = workload_id(state, spiffe_id)?;
    let ttl = Duration::from_secs(ttl_secs);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(AdminError::TokenTtl { max: MAX_TOKEN_TTL });
    }
    let token = new_token();
    let now = state.clock.now();
    let expires = now + ttl;
    let record = TokenRecord {
        spiffe_id: id,
        expires_at: unix_secs(expires),
        created_at: unix_secs(now),
        used: None,
        voided_at: None,
    };
    state.ledger.add_token(token_hash(&token), record).await?;
    Ok(AdminResponse {
        token: Some(token),
        expires_at: Some(rfc3339(expires)),
        ..AdminResponse::ok()
    })
}

/// A single-use join token for `spiffe_id`, valid `ttl_secs`, from the CA whose admin socket is
/// `socket`; the CA's refusal as the error.
pub async fn token(
    socket: &Path,
    spiffe_id: &str,
    ttl_secs: u64,
) -> Result<String, AdminClientError> {
    let req = AdminRequest::Token {
        spiffe_id: spiffe_id.to_string(),
        ttl_secs,
    };
    let resp = call(socket, &req).await?;
    match (resp.ok, resp.token, resp.error) {
        (true, Some(t), _) => Ok(t),
        (_, _, Some(refusal)) => Err(AdminClientError::Refused(refusal)),
        (_, _, None) => Err(AdminClientError::NoToken),
    }
}

/// Client side: sends one request to the admin socket of a running CA.
pub async fn call(socket: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AdminClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut out = serde_json::to_vec(req).map_err(AdminClientError::Encode)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    serde_json::from_str(&line).map_err(AdminClientError::BadAnswer)
}
