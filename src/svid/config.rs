//! The `[identity]` table that the sidecar and gateway configs share, turned into an
//! [`IdentityConfig`]: where the SVID comes from (our CA, PEM files or a Workload API socket),
//! the bundle, and the refresh interval.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spiffe::transport::Endpoint;

use super::{IdentityConfig, IdentitySource, Jitter};
use crate::config::{ConfigError, Ctx};
use crate::identity::{Bundle, SpiffeId, TrustDomain};
use crate::region::Region;

/// The `[identity]` table, shared by the sidecar and gateway configs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    source: String,
    ca_url: Option<String>,
    token_file: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    poll_interval: Option<String>,
    refresh_interval: Option<String>,
    socket: Option<String>,
}

/// The identity of a role: its ID, the bundle file (`bundle`) and the `[identity]` table.
pub fn identity_config(
    ctx: &Ctx<'_>,
    td: &TrustDomain,
    id: SpiffeId,
    bundle: &Path,
    region: Option<&Region>,
    f: &IdentityFile,
) -> Result<IdentityConfig, ConfigError> {
    let bundle_path = ctx.path(bundle);
    let bundle_pem = std::fs::read(&bundle_path)
        .map_err(|e| ctx.err("bundle", format!("{}: {e}", bundle_path.display())))?;
    let bundle = Bundle::from_pem(td.clone(), &bundle_pem, &bundle_path.display().to_string())
        .map_err(|e| ctx.err("bundle", e.to_string()))?;
    Ok(IdentityConfig {
        id,
        bundle,
        source: identity_source(ctx, f, region)?,
        refresh: ctx.duration(
            "identity.refresh_interval",
            f.refresh_interval.as_deref(),
            Duration::from_secs(30),
        )?,
        jitter: Jitter::Random,
    })
}

/// `region` is the role's own: with it, the CA must be that region's ([`IdentitySource::Ca`]).
fn identity_source(
    ctx: &Ctx<'_>,
    f: &IdentityFile,
    region: Option<&Region>,
) -> Result<IdentitySource, ConfigError> {
    let need = |v: &Option<PathBuf>, field: &str| {
        v.as_deref().map(|p| ctx.path(p)).ok_or_else(|| {
            ctx.err(
                format!("identity.{field}"),
                format!("required for source = {:?}", f.source),
            )
        })
    };
    match f.source.as_str() {
        "ca" => {
            let url = f
                .ca_url
                .clone()
                .ok_or_else(|| ctx.err("identity.ca_url", "required for source = \"ca\""))?;
            if !url.starts_with("https://") {
                return Err(ctx.err(
                    "identity.ca_url",
                    format!("{url:?} must start with https://"),
                ));
            }
            Ok(IdentitySource::Ca {
                url,
                token_file: need(&f.token_file, "token_file")?,
                region: region.cloned(),
            })
        }
        "files" => Ok(IdentitySource::Files {
            cert: need(&f.cert, "cert")?,
            key: need(&f.key, "key")?,
            poll: ctx.duration(
                "identity.poll_interval",
                f.poll_interval.as_deref(),
                Duration::from_secs(2),
            )?,
        }),
        "workload-api" => Ok(IdentitySource::WorkloadApi {
            endpoint: workload_api_endpoint(
                ctx,
                f.socket.as_deref(),
                std::env::var(SPIFFE_ENDPOINT_SOCKET).ok(),
            )?,
        }),
        other => Err(ctx.err(
            "identity.source",
            format!("{other:?}: expected \"ca\", \"files\" or \"workload-api\""),
        )),
    }
}

/// The environment variable naming the Workload API socket when `identity.socket` is unset.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The Workload API endpoint: `socket` from the file (a `unix:` URI, or a plain path relative to
/// the file), else `env` (the value of `SPIFFE_ENDPOINT_SOCKET`, a URI). Unix sockets only.
fn workload_api_endpoint(
    ctx: &Ctx<'_>,
    socket: Option<&str>,
    env: Option<String>,
) -> Result<Endpoint, ConfigError> {
    let field = "identity.socket";
    let value = match (socket, env.as_deref()) {
        (Some(s), _) => s,
        (None, Some(e)) if !e.is_empty() => e,
        _ => {
            return Err(ctx.err(
                field,
                format!(
                    "required for source = \"workload-api\" when {SPIFFE_ENDPOINT_SOCKET} is not \
                     set, e.g. socket = \"unix:///run/spire/agent.sock\""
                ),
            ))
        }
    };
    let from_env = socket.is_none();
    let what = if from_env {
        format!("{SPIFFE_ENDPOINT_SOCKET}={value:?}")
    } else {
        format!("{value:?}")
    };
    if value.contains(':') {
        return match Endpoint::parse(value) {
            Ok(e @ Endpoint::Unix(_)) => Ok(e),
            // The API carries private keys in clear text: a local socket only.
            Ok(_) => Err(ctx.err(
                field,
                format!("{what}: only unix sockets are accepted (the Workload API sends private keys unencrypted)"),
            )),
            Err(e) => Err(ctx.err(
                field,
                format!("{what}: {e} (expected unix:///path/to/socket or a path)"),
            )),
        };
    }
    if value.is_empty() {
        return Err(ctx.err(field, "empty; give the agent's socket path"));
    }
    if from_env {
        // The variable holds a URI by the SPIFFE spec; a bare absolute path is accepted too.
        if !value.starts_with('/') {
            return Err(ctx.err(field, format!("{what}: expected unix:///path/to/socket")));
        }
        return Ok(Endpoint::Unix(PathBuf::from(value)));
    }
    Ok(Endpoint::Unix(ctx.path(Path::new(value))))
}
