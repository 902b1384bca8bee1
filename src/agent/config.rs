//! `trustline agent --config FILE`: the TOML file and its validation.
//!
//! ```toml
//! trust_domain = "example.org"
//! bundle = "bundle.pem"                 # trust roots (relative paths: relative to this file)
//! socket = "/run/trustline/agent.sock"  # the Workload API (Unix socket)
//! socket_mode = "0666"                  # or "0660" (with `socket_group`) or "0600"
//! node = "web-1"                        # default: /proc/sys/kernel/hostname
//! admin = "127.0.0.1:15021"             # optional: /metrics /healthz /readyz /identity
//!
//! [identity]                            # how the agent itself joins (as in the sidecar)
//! source = "ca"
//! ca_url = "https://127.0.0.1:8443"
//! token_file = "node.token"             # for spiffe://example.org/trustline/agent/NODE
//!
//! [[workload]]
//! spiffe_id = "spiffe://example.org/ns/shop/sa/web"
//! uid = 1000                            # and/or gid, path: all that are given must match
//! ```
//!
//! The agent's own SPIFFE ID is `spiffe://TD/trustline/agent/NODE`, NODE being `node` or the
//! host name: what the CA's `[[agent]]` registration and the join token name.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{load_toml, ConfigError, Ctx};
use crate::identity::{parse_trust_domain, SpiffeId, TrustDomain};
use crate::svid::config::{identity_config, IdentityFile};
use crate::svid::{IdentityConfig, IdentitySource};

/// The default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/trustline/agent.sock";
/// Default cap on open Workload API connections, all callers together.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on open Workload API connections of one uid.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 128;
/// Most `[[workload]]` entries (each SVID is obtained eagerly at start).
pub const MAX_WORKLOADS: usize = 1000;
/// Where the host name is read when `node` is not set.
pub const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    trust_domain: String,
    bundle: PathBuf,
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<u32>,
    node: Option<String>,
    /// The region of the CA at `ca_url`: its certificate must be that region's CA, which makes
    /// the regions of the JWT keys it publishes trusted.
    region: Option<String>,
    admin: Option<String>,
    audit_log: Option<PathBuf>,
    max_connections: Option<usize>,
    max_connections_per_uid: Option<usize>,
    allow_unauthenticated_verifiers: Option<bool>,
    identity: IdentityFile,
    #[serde(default, rename = "workload")]
    workloads: Vec<WorkloadFile>,
    /// Other trust domains whose bundles callers get (SPIFFE Federation).
    #[serde(default)]
    federation: Vec<crate::federation::config::FederationFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    spiffe_id: String,
    uid: Option<u32>,
    gid: Option<u32>,
    path: Option<PathBuf>,
}

/// One registration entry: the SPIFFE ID a caller gets when every selector given matches its
/// kernel credentials (uid, primary gid) and executable path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub spiffe_id: SpiffeId,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The executable as `/proc/PID/exe` shows it: absolute, symbolic links resolved.
    pub path: Option<PathBuf>,
}

/// Who may open the socket (the file mode; attestation decides what each caller gets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketMode {
    /// 0666: every local user (the default, as SPIRE's agent; callers matching no entry get
    /// PermissionDenied).
    World,
    /// 0660: the socket's owner and group (`socket_group`, else the agent's group).
    Group,
    /// 0600: the agent's own user only.
    Owner,
}

impl SocketMode {
    /// The permission bits.
    pub fn bits(self) -> u32 {
        match self {
            SocketMode::World => 0o666,
            SocketMode::Group => 0o660,
            SocketMode::Owner => 0o600,
        }
    }
}

/// The validated agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub trust_domain: TrustDomain,
    /// The agent's own identity (`spiffe://TD/trustline/agent/NODE`, CA source).
    pub identity: IdentityConfig,
    pub socket: PathBuf,
    pub socket_mode: SocketMode,
    /// The group the socket is given (`chown`), if set.
    pub socket_group: Option<u32>,
    /// The admin listener (metrics, readiness), if any.
    pub admin: Option<SocketAddr>,
    /// Attestation audit log (JSON lines), if any.
    pub audit_log: Option<PathBuf>,
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    /// Serve bundles and JWT validation to callers that match no entry (default: no).
    pub allow_unauthenticated_verifiers: bool,
    /// Registration entries, in file order (the first matching one is the default identity).
    pub workloads: Vec<Entry>,
    /// Federated trust domains: their X.509 and JWT bundles go to callers with ours
    /// (`federated_bundles`, FetchX509Bundles, FetchJWTBundles, ValidateJWTSVID).
    pub federation: Vec<crate::federation::config::FederatedDomain>,
}

impl AgentConfig {
    /// Reads and validates an agent config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let raw: AgentFile = load_toml(file)?;
        let ctx = Ctx {
            file,
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let td = parse_trust_domain(&raw.trust_domain)
            .map_err(|e| ctx.err("trust_domain", e.to_string()))?;
        let node = match &raw.node {
            Some(n) => n.clone(),
            None => host_name().map_err(|e| {
                ctx.err(
                    "node",
                    format!("not set, and the host name is unreadable ({HOSTNAME_FILE}: {e})"),
                )
            })?,
        };
        let id = agent_id(&td, &node).map_err(|e| ctx.err("node", e))?;
        let region = match &raw.region {
            Some(r) => Some(ctx.region("region", r)?),
            None => None,
        };
        let identity = identity_config(&ctx, &td, id, &raw.bundle, region.as_ref(), &raw.identity)?;
        if !matches!(identity.source, IdentitySource::Ca { .. }) {
            return Err(ctx.err(
                "identity.source",
                "the agent obtains its workloads' SVIDs from trustline's CA, so it joins with \
                 source = \"ca\"",
            ));
        }
        let socket = ctx.path(raw.socket.as_deref().unwrap_or(Path::new(DEFAULT_SOCKET)));
        let socket_mode = socket_mode(&ctx, raw.socket_mode.as_deref())?;
        if raw.socket_group.is_some() && socket_mode != SocketMode::Group {
            return Err(ctx.err(
                "socket_group",
                "only meaningful with socket_mode = \"0660\"",
            ));
        }
        let admin = match &raw.admin {
            Some(a) => Some(ctx.addr("admin", a)?),
            None => None,
        };
        let max_connections = positive(
            &ctx,
            "max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
        )?;
        let max_connections_per_uid = positive(
            &ctx,
            "max_connections_per_uid",
            raw.max_connections_per_uid,
            DEFAULT_MAX_CONNECTIONS_PER_UID.min(max_connections),
        )?;
        if max_connections_per_uid > max_connections {
            return Err(ctx.err(
                "max_connections_per_uid",
                format!(
                    "{max_connections_per_uid} is more than max_connections ({max_connections})"
                ),
            ));
        }
        let federation = crate::federation::config::federation_config(&ctx, &raw.federation, &td)?;
        Ok(AgentConfig {
            federation,
            workloads: workloads(&ctx, &raw.workloads, &td)?,
            trust_domain: td,
            identity,
            socket,
            socket_mode,
            socket_group: raw.socket_group,
            admin,
            audit_log: raw.audit_log.as_deref().map(|p| ctx.path(p)),
            max_connections,
            max_connections_per_uid,
            allow_unauthenticated_verifiers: raw.allow_unauthenticated_verifiers.unwrap_or(false),
        })
    }
}

/// `spiffe://TD/trustline/agent/NODE`; NODE must be one path segment.
pub fn agent_id(td: &TrustDomain, node: &str) -> Result<SpiffeId, String> {
    if node.is_empty() || node.contains('/') {
        return Err(format!(
            "{node:?}: the node name is one path segment (letters, digits, '.', '-', '_')"
        ));
    }
    SpiffeId::new(format!("spiffe://{td}/trustline/agent/{node}"))
        .map_err(|e| format!("{node:?} does not make a SPIFFE ID: {e}"))
}

/// The host name, trimmed.
fn host_name() -> std::io::Result<String> {
    Ok(std::fs::read_to_string(HOSTNAME_FILE)?.trim().to_string())
}

fn socket_mode(ctx: &Ctx<'_>, v: Option<&str>) -> Result<SocketMode, ConfigError> {
    match v.unwrap_or("0666") {
        "0666" | "666" => Ok(SocketMode::World),
        "0660" | "660" => Ok(SocketMode::Group),
        "0600" | "600" => Ok(SocketMode::Owner),
        other => Err(ctx.err(
            "socket_mode",
            format!("{other:?}: expected \"0666\", \"0660\" or \"0600\""),
        )),
    }
}

fn positive(
    ctx: &Ctx<'_>,
    field: &str,
    v: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(ctx.err(field, "must be at least 1")),
        Some(n) if n > 1_000_000 => Err(ctx.err(field, format!("{n}: at most 1000000"))),
        Some(n) => Ok(n),
    }
}

fn workloads(
    ctx: &Ctx<'_>,
    raw: &[WorkloadFile],
    td: &TrustDomain,
) -> Result<Vec<Entry>, ConfigError> {
    if raw.len() > MAX_WORKLOADS {
        return Err(ctx.err(
            "workload",
            format!("{} entries; at most {MAX_WORKLOADS}", raw.len()),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, w) in raw.iter().enumerate() {
        let at = |key: &str| format!("workload[{i}].{key}");
        let spiffe_id = ctx.id(&at("spiffe_id"), &w.spiffe_id, td)?;
        if spiffe_id
            .path()
            .starts_with(crate::identity::ids::RESERVED_PREFIX)
        {
            return Err(ctx.err(
                at("spiffe_id"),
                format!("{spiffe_id}: IDs under /trustline/ are trustline's own roles'"),
            ));
        }
        if w.uid.is_none() && w.gid.is_none() && w.path.is_none() {
            return Err(ctx.err(
                format!("workload[{i}]"),
                format!(
                    "{spiffe_id} has no selector: give uid, gid and/or path (an entry matching \
                     every process would hand this identity to any local user)"
                ),
            ));
        }
        if w.path.is_some() && w.uid.is_none() && w.gid.is_none() {
            // A process of any user can exec the binary, or hold a connection opened before
            // it exec'd into it (the socket stays with its children): the path narrows a uid
            // or gid, it is never an identity of its own.
            return Err(ctx.err(
                at("path"),
                format!(
                    "{spiffe_id}: path alone would hand this identity to any user who can run                      that executable; give uid or gid too"
                ),
            ));
        }
        if let Some(p) = &w.path {
            if !p.is_absolute() {
                return Err(ctx.err(
                    at("path"),
                    format!(
                        "{}: an absolute path, as /proc/PID/exe shows it (symbolic links resolved)",
                        p.display()
                    ),
                ));
            }
        }
        let entry = Entry {
            spiffe_id,
            uid: w.uid,
            gid: w.gid,
            path: w.path.clone(),
        };
        if !seen.insert((
            entry.spiffe_id.clone(),
            entry.uid,
            entry.gid,
            entry.path.clone(),
        )) {
            return Err(ctx.err(format!("workload[{i}]"), "the same entry is given twice"));
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
