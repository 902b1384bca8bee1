//! `trustline ca`: init, serve, token, revoke, rotate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::authority;
use trustline::ca::config::{CaServeConfig, CaServeFile};
use trustline::clock::Clock;
use trustline::identity::parse_trust_domain;
use trustline::util::parse_duration;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Makes a root CA, or a regional intermediate signed by a root.
    #[command(
        after_help = "Examples:\n  trustline ca init --trust-domain example.org --out ca/root\n  trustline ca init --root ca/root --region eu-west --out ca/eu-west"
    )]
    Init(InitArgs),
    /// Serves the CA's HTTPS API (TLS 1.3 only).
    #[command(
        after_help = "Examples:\n  trustline ca serve --ca ca/eu-west --data /var/lib/trustline-ca --listen 0.0.0.0:8443 --san ca.eu-west.internal\n  trustline ca serve --config ca.toml"
    )]
    Serve(Box<ServeArgs>),
    /// Prints a single-use join token bound to one SPIFFE ID (talks to the running server).
    #[command(
        after_help = "Example:\n  trustline ca token --data ca/data --spiffe-id spiffe://example.org/ns/shop/sa/web --ttl 15m"
    )]
    Token(TokenArgs),
    /// Revokes a certificate and every SVID renewed from it, or cuts a SPIFFE ID off until
    /// lifted (talks to the running server).
    #[command(
        after_help = "Examples:\n  trustline ca revoke --data ca/data --serial 3f9a...\n  trustline ca revoke --data ca/data --spiffe-id spiffe://example.org/ns/shop/sa/web\n  trustline ca revoke --data ca/data --spiffe-id spiffe://example.org/ns/shop/sa/web --lift"
    )]
    Revoke(RevokeArgs),
    /// Rotates the running CA's own keys: activates its next intermediate, publishes a new
    /// root beside the old one, or withdraws an old root (talks to the running server).
    #[command(
        after_help = "Examples (README, \"Rotating the CA's keys\"):\n  trustline ca rotate --data ca/data --next ca/eu-west-2\n  trustline ca rotate --data ca/data --add-root ca/root-2/bundle.pem --wait 5m\n  trustline ca rotate --data ca/data --retire-root ca/root/bundle.pem\n  trustline ca rotate --data ca/data --jwt-prepare --wait 10m\n  trustline ca rotate --data ca/data --jwt-activate\n  trustline ca rotate --data ca/data --status"
    )]
    Rotate(RotateArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Trust domain of a new root, e.g. example.org.
    #[arg(long, conflicts_with_all = ["root", "region"], required_unless_present = "root")]
    trust_domain: Option<String>,
    /// Directory of the root that signs a regional intermediate.
    #[arg(long, requires = "region")]
    root: Option<PathBuf>,
    /// Region name recorded in the intermediate (spiffe://TD/trustline/region/NAME).
    #[arg(long, requires = "root")]
    region: Option<String>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Lifetime (default 10 years for a root, 1 year for an intermediate).
    #[arg(long)]
    ttl: Option<String>,
    /// Replace an existing key.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    /// CA directory (from `ca init`).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Data directory: ledger, admin socket, audit log.
    #[arg(long)]
    data: Option<PathBuf>,
    /// HTTPS API address [default: 127.0.0.1:8443].
    #[arg(long)]
    listen: Option<String>,
    /// Lifetime of issued SVIDs [default: 24h].
    #[arg(long)]
    svid_ttl: Option<String>,
    /// Extra DNS name or IP for the server certificate (repeatable).
    #[arg(long)]
    san: Vec<String>,
    /// Prometheus metrics address, or `off` [default: 127.0.0.1:15021].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Audit log file [default: DATA/audit.log].
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Serve this trust domain's SPIFFE bundle at ADDR (SPIFFE Federation bundle endpoint).
    #[arg(long)]
    bundle_endpoint: Option<String>,
    /// The bundle endpoint's profile: https_spiffe (the CA's server SVID) or https_web
    /// [default: https_spiffe].
    #[arg(long)]
    bundle_endpoint_profile: Option<String>,
    /// https_web: the endpoint's WebPKI certificate chain (PEM).
    #[arg(long)]
    bundle_endpoint_cert: Option<PathBuf>,
    /// https_web: the key of that certificate (PEM).
    #[arg(long)]
    bundle_endpoint_key: Option<PathBuf>,
    /// SVID requests per second per client IP, 0 for no limit [default: 50].
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Another region's CA (https://HOST:PORT, or REGION=https://HOST:PORT to require that
    /// region's CA) whose revocations this CA pulls and serves with its own (repeatable;
    /// replaces `peers` of the file). A peer of this CA's own region is refused.
    #[arg(long = "peer-ca", value_name = "[REGION=]URL")]
    peer_ca: Vec<String>,
    /// How often each peer CA's revocations are pulled [default: 5s].
    #[arg(long)]
    peer_refresh: Option<String>,
    /// The ledger: redb:PATH, or postgres://USER@HOST:PORT/DB shared by the region's CA
    /// replicas (TLS: ?sslmode=verify-full&sslrootcert=FILE) [default: redb:DATA/ledger.redb].
    #[arg(long, value_name = "URL")]
    ledger: Option<String>,
    /// How often a shared ledger's revocations are re-read [default: 1s].
    #[arg(long)]
    ledger_refresh: Option<String>,
    /// Connections this replica keeps to a shared ledger at most [default: 16].
    #[arg(long)]
    ledger_pool: Option<usize>,
    /// Lifetime of issued JWT-SVIDs [default: 5m].
    #[arg(long)]
    jwt_ttl: Option<String>,
    /// TOML file with any of the keys above (flags win), and `[[agent]]` registrations.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
pub struct TokenArgs {
    /// Data directory of the running CA.
    #[arg(long)]
    data: PathBuf,
    /// The SPIFFE ID the token is bound to.
    #[arg(long)]
    spiffe_id: String,
    /// Token lifetime.
    #[arg(long, default_value = "15m")]
    ttl: String,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["serial", "spiffe_id"])))]
pub struct RevokeArgs {
    /// Data directory of the running CA.
    #[arg(long)]
    data: PathBuf,
    /// Serial number in hex (as printed by trustline or `openssl x509 -serial`); every SVID
    /// renewed from it is revoked too.
    #[arg(long)]
    serial: Option<String>,
    /// A SPIFFE ID to cut off: no issuance or renewal, every live SVID revoked, its unused join
    /// tokens voided, until `--lift`.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Lifts the cut-off of `--spiffe-id` (what it revoked stays revoked; rejoin with a new token).
    #[arg(long, requires = "spiffe_id", conflicts_with = "serial")]
    lift: bool,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("op").required(true).args(["next", "add_root", "retire_root", "status"])))]
pub struct RotateArgs {
    /// Data directory of the running CA.
    #[arg(long)]
    data: PathBuf,
    /// The next intermediate's directory (`ca init --root ROOT --region REGION --out DIR`):
    /// validated, then it signs everything new; the active one stays trusted for renewals
    /// until its last SVID expired.
    #[arg(long, value_name = "DIR")]
    next: Option<PathBuf>,
    /// A new root (its `bundle.pem`) to publish in /v1/bundle beside the current ones.
    #[arg(long, value_name = "FILE")]
    add_root: Option<PathBuf>,
    /// With --add-root: how long the root must be published before an intermediate it signed
    /// may be activated (at least the sidecars' and gateways' bundle refresh interval).
    #[arg(long, default_value = "5m")]
    wait: String,
    /// Prepares the next JWT-SVID signing key (`DATA/../CA_DIR/jwt-next.key`, made unless
    /// already there: copy one key to every replica of the region first): published at once,
    /// signing only after --wait.
    #[arg(long)]
    jwt_prepare: bool,
    /// Makes the prepared JWT key the signing one (refused before its --wait is over); the old
    /// one stays published until its last token expired.
    #[arg(long)]
    jwt_activate: bool,
    /// An old root (its `bundle.pem`) to withdraw from /v1/bundle (refused while the active or
    /// previous intermediate chains to it).
    #[arg(long, value_name = "FILE")]
    retire_root: Option<PathBuf>,
    /// Shows the active and previous intermediates and the published roots.
    #[arg(long)]
    status: bool,
}

/// Runs one `ca` subcommand.
pub async fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init(a) => ca_init(a),
        CaCommand::Serve(a) => ca_serve(*a).await,
        CaCommand::Token(a) => ca_token(a).await,
        CaCommand::Revoke(a) => ca_revoke(a).await,
        CaCommand::Rotate(a) => ca_rotate(a).await,
    }
}

/// An absolute path (the CA reads it, from its own working directory).
fn absolute(p: &std::path::Path, flag: &str) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{flag} {}", p.display()))
}

async fn ca_rotate(a: RotateArgs) -> anyhow::Result<()> {
    let req = if let Some(dir) = &a.next {
        AdminRequest::RotateNext {
            dir: absolute(dir, "--next")?,
        }
    } else if let Some(path) = &a.add_root {
        let wait = parse_duration(&a.wait)
            .map_err(anyhow::Error::msg)
            .context("--wait")?;
        AdminRequest::AddRoot {
            path: absolute(path, "--add-root")?,
            wait_secs: wait.as_secs(),
        }
    } else if a.jwt_prepare {
        let wait = parse_duration(&a.wait)
            .map_err(anyhow::Error::msg)
            .context("--wait")?;
        AdminRequest::JwtPrepare {
            wait_secs: wait.as_secs(),
        }
    } else if a.jwt_activate {
        AdminRequest::JwtActivate
    } else if let Some(path) = &a.retire_root {
        AdminRequest::RetireRoot {
            path: absolute(path, "--retire-root")?,
        }
    } else {
        AdminRequest::RotationStatus
    };
    let resp = admin::call(&a.data.join("admin.sock"), &req)
        .await
        .map_err(anyhow::Error::msg)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_default());
    }
    if let Some(detail) = resp.detail {
        println!("{detail}");
    }
    if let Some(k) = resp.keys {
        println!(
            "active intermediate: {} (until {})",
            k.active_serial, k.active_not_after
        );
        if let (Some(s), Some(at)) = (k.previous_serial, k.previous_retire_at) {
            println!("previous intermediate: {s} (trusted for renewals until {at})");
        }
        println!("published roots (bundle sequence {}):", k.sequence);
        for r in k.roots {
            println!(
                "  {} sha256 {} (may sign an active intermediate from {})",
                r.serial, r.sha256, r.usable_from
            );
        }
    }
    if let Some(j) = resp.jwt {
        println!("JWT-SVID signing key: {}", j.active_kid);
        if let (Some(k), Some(at)) = (j.next_kid, j.next_usable_from) {
            println!(
                "  next key {k} (published; may sign from {})",
                rfc3339_of(at)
            );
        }
        for (k, until) in j.retired {
            println!("  retired key {k} (published until {})", rfc3339_of(until));
        }
    }
    Ok(())
}

fn rfc3339_of(unix: u64) -> String {
    trustline::clock::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

async fn ca_token(a: TokenArgs) -> anyhow::Result<()> {
    let ttl = parse_duration(&a.ttl)
        .map_err(anyhow::Error::msg)
        .context("--ttl")?;
    let t = admin::token(&a.data.join("admin.sock"), &a.spiffe_id, ttl.as_secs())
        .await
        .map_err(anyhow::Error::msg)?;
    println!("{t}");
    Ok(())
}

async fn ca_revoke(a: RevokeArgs) -> anyhow::Result<()> {
    let (req, what) = match (a.serial, a.spiffe_id) {
        (Some(serial), _) => (
            AdminRequest::Revoke {
                serial: serial.clone(),
            },
            serial,
        ),
        (None, Some(spiffe_id)) if a.lift => (
            AdminRequest::LiftId {
                spiffe_id: spiffe_id.clone(),
            },
            spiffe_id,
        ),
        (None, Some(spiffe_id)) => (
            AdminRequest::RevokeId {
                spiffe_id: spiffe_id.clone(),
            },
            spiffe_id,
        ),
        (None, None) => bail!("give --serial HEX or --spiffe-id ID"),
    };
    let resp = admin::call(&a.data.join("admin.sock"), &req)
        .await
        .map_err(anyhow::Error::msg)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_default());
    }
    let seq = resp.sequence.unwrap_or_default();
    match req {
        AdminRequest::LiftId { .. } => {
            println!("lifted the revocation of {what} (revocation list sequence {seq})")
        }
        _ => {
            println!(
                "revoked {what}: {} certificate(s) (revocation list sequence {seq})",
                resp.revoked_count.unwrap_or_default()
            );
            for s in resp.revoked.unwrap_or_default() {
                println!("  {s}");
            }
        }
    }
    Ok(())
}

fn ca_init(a: InitArgs) -> anyhow::Result<()> {
    let ttl = a
        .ttl
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--ttl")?;
    let paths = match (a.trust_domain, a.root, a.region) {
        (Some(td), None, None) => {
            let td = parse_trust_domain(&td).context("--trust-domain")?;
            let ttl = ttl.unwrap_or(Duration::from_secs(10 * 365 * 24 * 3600));
            authority::init_root(&td, &a.out, ttl, a.force)?
        }
        (None, Some(root), Some(region)) => {
            let ttl = ttl.unwrap_or(Duration::from_secs(365 * 24 * 3600));
            authority::init_intermediate(&root, &region, &a.out, ttl, a.force)?
        }
        _ => bail!("give either --trust-domain TD, or --root ROOTDIR --region NAME"),
    };
    println!(
        "wrote {} (key {}, mode 0600)",
        paths.cert.display(),
        paths.key.display()
    );
    println!("trust bundle for workloads: {}", paths.bundle.display());
    if paths.chain.exists() {
        println!("chain (intermediate + root): {}", paths.chain.display());
    }
    Ok(())
}

async fn ca_serve(a: ServeArgs) -> anyhow::Result<()> {
    let flags = CaServeFile {
        ca: a.ca,
        data: a.data,
        listen: a.listen,
        svid_ttl: a.svid_ttl,
        san: (!a.san.is_empty()).then_some(a.san),
        metrics_listen: a.metrics_listen,
        audit_log: a.audit_log,
        bundle_endpoint: a.bundle_endpoint,
        bundle_endpoint_profile: a.bundle_endpoint_profile,
        bundle_endpoint_cert: a.bundle_endpoint_cert,
        bundle_endpoint_key: a.bundle_endpoint_key,
        rate_limit: a.rate_limit,
        peers: (!a.peer_ca.is_empty()).then_some(a.peer_ca),
        peer_refresh: a.peer_refresh,
        ledger: a.ledger,
        ledger_refresh: a.ledger_refresh,
        ledger_pool: a.ledger_pool,
        limits: None,
        jwt_ttl: a.jwt_ttl,
        agent: Vec::new(),
    };
    let config = CaServeConfig::resolve(flags, a.config.as_deref())?;
    let bound = trustline::ca::server::build(config, Clock::system()).await?;
    println!("trustline CA serving https://{}", bound.api);
    if let Some(addr) = bound.bundle_endpoint {
        println!("SPIFFE bundle endpoint https://{addr}");
    }
    super::wait_for_signal().await?;
    tracing::info!("shutting down");
    // Stop accepting, let open requests finish (up to the per-connection grace), cut the rest.
    let cut = bound.drain(trustline::ca::server::DRAIN_TIMEOUT).await;
    if cut > 0 {
        tracing::warn!(
            cut,
            "tasks still running at the drain deadline were stopped"
        );
    }
    // The audit log's writer may still hold the last events: out before the process ends.
    let state = bound.state.clone();
    tokio::task::spawn_blocking(move || state.audit.flush()).await?;
    let lost = bound.state.audit.lost();
    if lost > 0 {
        tracing::warn!(
            lost,
            "audit events were lost (queue full or write failed); the audit file marks where"
        );
    }
    Ok(())
}
