//! The CA's admin socket: `DATADIR/admin.sock`, mode 0600. Filesystem permissions are the
//! authorisation (as with SPIRE's admin socket). One JSON request line, one JSON answer line.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::api::{check_workload_id, CaState};
use super::ledger::{new_token, token_hash, LedgerError, Revocation, TokenRecord};
use super::metrics::OutcomeLabels;
use crate::clock::rfc3339;
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
}

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

    fn err(e: impl Into<String>) -> Self {
        AdminResponse {
            ok: false,
            error: Some(e.into()),
            ..Self::ok()
        }
    }
}

/// Binds the admin socket (replacing a stale one) with mode 0600 and serves it.
pub fn serve(
    path: &Path,
    state: Arc<CaState>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
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
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, &state).await {
                    tracing::warn!(error = %e, "admin connection failed");
                }
            });
        }
    });
    Ok(())
}

async fn serve_one(stream: UnixStream, state: &CaState) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r.take(16 * 1024))
        .read_line(&mut line)
        .await?;
    let resp = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(req) => execute(state, req).await,
        Err(e) => AdminResponse::err(format!("malformed admin request: {e}")),
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

use tokio::io::AsyncReadExt as _;

#[derive(Serialize)]
struct AdminAudit<'a> {
    time: String,
    event: &'a str,
    spiffe_id: Option<String>,
    serial: Option<String>,
    client: &'a str,
    outcome: &'a str,
    reason: Option<String>,
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
            let resp = match Serial::parse_hex(&serial) {
                None => AdminResponse::err(format!("serial {serial:?} is not hex")),
                Some(s) => answer(state.ledger.revoke(s, crate::clock::unix_secs(now)).await),
            };
            ("revoke", None, Some(serial), resp)
        }
        AdminRequest::RevokeId { spiffe_id } => {
            let resp = match workload_id(state, &spiffe_id) {
                Err(e) => AdminResponse::err(e),
                Ok(id) => answer(state.ledger.ban(&id, crate::clock::unix_secs(now)).await),
            };
            ("revoke_id", Some(spiffe_id), None, resp)
        }
        AdminRequest::LiftId { spiffe_id } => {
            let resp = match workload_id(state, &spiffe_id) {
                Err(e) => AdminResponse::err(e),
                Ok(id) => match state.ledger.lift(&id).await {
                    Ok(seq) => AdminResponse {
                        sequence: Some(seq),
                        ..AdminResponse::ok()
                    },
                    Err(e) => AdminResponse::err(e.to_string()),
                },
            };
            ("lift_id", Some(spiffe_id), None, resp)
        }
    };
    state.audit.record(&AdminAudit {
        time: rfc3339(now),
        event,
        spiffe_id: id,
        serial,
        client: "admin-socket",
        outcome: if resp.ok { "ok" } else { "error" },
        reason: resp.error.clone(),
    });
    resp
}

fn answer(r: Result<Revocation, LedgerError>) -> AdminResponse {
    match r {
        Ok(r) => AdminResponse::revocation(r),
        Err(e) => AdminResponse::err(e.to_string()),
    }
}

/// A workload SPIFFE ID this CA may issue, in its canonical text.
fn workload_id(state: &CaState, spiffe_id: &str) -> Result<String, String> {
    let id = parse_workload_id(spiffe_id).map_err(|e| e.to_string())?;
    check_workload_id(&state.authority, &id)?;
    Ok(id.to_string())
}

async fn make_token(state: &CaState, spiffe_id: &str, ttl_secs: u64) -> AdminResponse {
    let id = match workload_id(state, spiffe_id) {
        Ok(id) => id,
        Err(e) => return AdminResponse::err(e),
    };
    let ttl = Duration::from_secs(ttl_secs);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return AdminResponse::err(format!(
            "token ttl must be between 1s and {}",
            humantime::format_duration(MAX_TOKEN_TTL)
        ));
    }
    let token = new_token();
    let now = state.clock.now();
    let expires = now + ttl;
    let record = TokenRecord {
        spiffe_id: id,
        expires_at: crate::clock::unix_secs(expires),
        created_at: crate::clock::unix_secs(now),
        used: None,
        voided_at: None,
    };
    match state.ledger.add_token(token_hash(&token), record).await {
        Ok(()) => AdminResponse {
            token: Some(token),
            expires_at: Some(rfc3339(expires)),
            ..AdminResponse::ok()
        },
        Err(e) => AdminResponse::err(e.to_string()),
    }
}

/// A single-use join token for `spiffe_id`, valid `ttl_secs`, from the CA whose admin socket is
/// `socket`; the CA's refusal as the error.
pub async fn token(socket: &Path, spiffe_id: &str, ttl_secs: u64) -> Result<String, String> {
    let req = AdminRequest::Token {
        spiffe_id: spiffe_id.to_string(),
        ttl_secs,
    };
    let resp = call(socket, &req).await?;
    match (resp.ok, resp.token) {
        (true, Some(t)) => Ok(t),
        _ => Err(resp.error.unwrap_or_else(|| "no token returned".into())),
    }
}

/// Client side: sends one request to the admin socket of a running CA.
pub async fn call(socket: &Path, req: &AdminRequest) -> Result<AdminResponse, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the CA admin socket {}: {e} (is `trustline ca serve` running with this --data dir, and are you allowed to open the socket?)",
            socket.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut out = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    out.push(b'\n');
    w.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(r)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad answer from CA: {e}"))
}
