//! The `trustline` binary: parse the command line, load and validate configuration, call the
//! role. Errors become one clear message and a non-zero exit code.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use trustline::ca::admin::{self, AdminRequest};
use trustline::ca::authority;
use trustline::ca::config::{CaServeConfig, CaServeFile};
use trustline::clock::Clock;
use trustline::identity::parse_trust_domain;
use trustline::proxy::config::SidecarConfig;
use trustline::tunnel::config::GatewayConfig;
use trustline::util::parse_duration;

#[derive(Parser)]
#[command(
    name = "trustline",
    version,
    about = "Zero-trust service-mesh data plane: SPIFFE mTLS 1.3 sidecar, CA and gateways"
)]
#[command(
    after_help = "Examples:\n  trustline demo                       run a whole mesh on loopback\n  trustline ca init --trust-domain example.org --out ca/root\n  trustline ca serve --ca ca/root --data ca/data --listen 127.0.0.1:8443"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The certificate authority: init, serve, token, revoke.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Runs a whole mesh on loopback and prints what happens.
    Demo,
    /// The per-workload proxy: inbound and outbound mTLS 1.3 with SPIFFE identities.
    #[command(
        after_help = "Example:\n  trustline sidecar --config /etc/trustline/sidecar.toml\n\nSee config/sidecar-*.toml for annotated examples."
    )]
    Sidecar(SidecarArgs),
    /// The regional gateway: joins regions with warm QUIC (mTLS 1.3) tunnels; never terminates
    /// the workloads' mTLS.
    #[command(
        after_help = "Example:\n  trustline gateway --config /etc/trustline/gateway.toml\n\nSee config/gateway-*.toml for annotated examples."
    )]
    Gateway(SidecarArgs),
    /// Installs (or prints, or removes) the iptables rules that send a pod's TCP through the sidecar.
    #[command(
        after_help = "Examples:\n  trustline redirect --proxy-uid 1337 --dry-run\n  trustline redirect --proxy-uid 1337 --exclude-inbound-ports 8443\n  trustline redirect --remove"
    )]
    Redirect(trustline::proxy::redirect::RedirectArgs),
    /// Policy files: check, explain.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Relays TCP and UDP with an added one-way delay (and UDP loss): a WAN between two regions.
    #[command(
        after_help = "Example (150 ms RTT in front of a gateway on 127.0.0.1:4433):\n  trustline wan-relay --listen 127.0.0.1:5433 --to 127.0.0.1:4433 --delay 75ms --loss 0.01\n\nTCP pays the handshake too: a client's first bytes arrive 3 delays after it connects."
    )]
    WanRelay(WanRelayArgs),
}

#[derive(Args)]
struct WanRelayArgs {
    /// Address to listen on (TCP and/or UDP, the same port number).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Address to relay to.
    #[arg(long)]
    to: std::net::SocketAddr,
    /// One-way delay added in each direction (RTT = 2 x delay), at most 10s, e.g. 75ms.
    #[arg(long)]
    delay: String,
    /// Which protocols to relay.
    #[arg(long, value_enum, default_value_t = WanProto::Both)]
    proto: WanProto,
    /// Probability of dropping a UDP datagram, in each direction (0 to 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    loss: f64,
    /// Seed of the loss generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum WanProto {
    Tcp,
    Udp,
    Both,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validates policy files; reports every error with file, line, rule and field.
    #[command(after_help = "Example:\n  trustline policy check config/policy.toml")]
    Check {
        /// Policy files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Prints the decision for a caller (or, with --gateway, a cross-region stream), the deciding
    /// rule, and why each rule matched or not.
    #[command(
        after_help = "Examples:\n  trustline policy explain --policy config/policy.toml --from spiffe://example.org/ns/shop/sa/frontend \\\n      --to checkout --port 8080 --method GET --path /api/orders --region eu-west --at 2026-11-23T10:00:00+01:00\n  trustline policy explain --gateway config/gateway.toml --from-region us-east --to-region eu-west \\\n      --service checkout"
    )]
    Explain(ExplainCommand),
    /// Writes the least-privilege allow list covering the flows of an audit log.
    #[command(
        after_help = "Example (a sidecar ran with `default = \"audit\"` to map traffic first):\n  trustline policy suggest --audit checkout-audit.log --service checkout > checkout-policy.toml"
    )]
    Suggest {
        /// A sidecar's decision audit log (JSON lines).
        #[arg(long)]
        audit: PathBuf,
        /// The protected service; default: every service in the log.
        #[arg(long)]
        service: Option<String>,
    },
    /// Replays the flows of an audit log against a candidate policy; reports changes per rule.
    #[command(
        after_help = "Example:\n  trustline policy replay --audit checkout-audit.log --policy new-policy.toml"
    )]
    Replay {
        /// A sidecar's decision audit log (JSON lines).
        #[arg(long)]
        audit: PathBuf,
        /// The candidate policy file.
        #[arg(long)]
        policy: PathBuf,
    },
}

/// `policy explain`: a sidecar's service rules (`--policy`) or a gateway's region rules
/// (`--gateway`).
#[derive(Args)]
#[command(
    group(clap::ArgGroup::new("rules").required(true).args(["policy", "gateway"])),
    override_usage = "trustline policy explain --policy FILE --from ID --to SERVICE --port PORT [OPTIONS]\n       \
                      trustline policy explain --gateway FILE --from-region REGION --to-region REGION --service NAME"
)]
struct ExplainCommand {
    #[command(flatten)]
    service: Option<ExplainArgs>,
    #[command(flatten)]
    gateway: Option<GatewayExplainArgs>,
}

// Each mode's flags are required only in that mode (`required = false` plus `requires`, so clap
// still names what is missing); a flattened `Option` alone would not lift `required`.
/// `policy explain --gateway`: a stream through a gateway, decided by its `[[rule]]` tables.
#[derive(Args)]
#[group(id = "gateway-rules", conflicts_with = "service-rules")]
#[command(next_help_heading = "A gateway's region rules (--gateway)")]
struct GatewayExplainArgs {
    /// Gateway config file; only its `region` and `[[rule]]` tables are read.
    #[arg(long, value_name = "FILE", required = false, requires_all = ["from_region", "to_region", "service"])]
    gateway: PathBuf,
    /// The stream's source region (the calling workload's).
    #[arg(long, value_name = "REGION", required = false, requires = "gateway")]
    from_region: trustline::region::Region,
    /// The stream's destination region.
    #[arg(long, value_name = "REGION", required = false, requires = "gateway")]
    to_region: trustline::region::Region,
    /// The destination service (as the stream header names it).
    #[arg(long, value_name = "NAME", required = false, requires = "gateway")]
    service: trustline::region::ServiceName,
}

#[derive(Args)]
#[group(id = "service-rules")]
#[command(next_help_heading = "A sidecar's service rules (--policy)")]
struct ExplainArgs {
    /// Policy file.
    #[arg(long, value_name = "FILE", required = false, requires_all = ["from", "to", "port"])]
    policy: PathBuf,
    /// The caller's SPIFFE ID.
    #[arg(long, required = false, requires = "policy")]
    from: String,
    /// The protected service (a [service.NAME] of the file).
    #[arg(long, required = false, requires = "policy")]
    to: String,
    /// Destination port.
    #[arg(long, required = false, requires = "policy")]
    port: u16,
    /// HTTP method (for HTTP ports).
    #[arg(long, requires = "path", requires = "policy")]
    method: Option<String>,
    /// HTTP path (for HTTP ports).
    #[arg(long, requires = "method", requires = "policy")]
    path: Option<String>,
    /// The caller's region (as its certificate chain would say).
    #[arg(long, requires = "policy")]
    region: Option<String>,
    /// When (RFC 3339); default now.
    #[arg(long, requires = "policy")]
    at: Option<String>,
}

#[derive(Args)]
struct SidecarArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Makes a root CA, or a regional intermediate signed by a root.
    #[command(
        after_help = "Examples:\n  trustline ca init --trust-domain example.org --out ca/root\n  trustline ca init --root ca/root --region eu-west --out ca/eu-west"
    )]
    Init(InitArgs),
    /// Serves the CA's HTTPS API (TLS 1.3 only).
    #[command(
        after_help = "Examples:\n  trustline ca serve --ca ca/eu-west --data /var/lib/trustline-ca --listen 0.0.0.0:8443 --san ca.eu-west.internal\n  trustline ca serve --config ca.toml"
    )]
    Serve(ServeArgs),
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
}

#[derive(Args)]
struct InitArgs {
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
struct ServeArgs {
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
    /// TOML file with any of the keys above (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct TokenArgs {
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
struct RevokeArgs {
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The sidecar's config says how many worker threads it gets; load it before the runtime.
    let sidecar = match &cli.command {
        Command::Sidecar(a) => match SidecarConfig::load(&a.config) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let gateway = match &cli.command {
        Command::Gateway(a) => match GatewayConfig::load(&a.config) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    // The demo prints its own story; its components only log warnings unless RUST_LOG says more.
    let default_level = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A sidecar with one worker runs on the current thread: no cross-thread hand-offs.
    let workers = sidecar
        .as_ref()
        .map(|c| c.workers)
        .or(gateway.as_ref().map(|g| g.workers));
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match (sidecar, gateway) {
        (Some(config), _) => rt.block_on(sidecar_run(config)),
        (_, Some(config)) => rt.block_on(gateway_run(config)),
        _ => rt.block_on(run(cli)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo => trustline::demo::run().await,
        Command::Sidecar(_) | Command::Gateway(_) => {
            unreachable!("handled before the runtime starts")
        }
        Command::Redirect(a) => trustline::proxy::redirect::run(&a).map_err(Into::into),
        Command::Policy(PolicyCommand::Check { files }) => policy_check(&files),
        Command::Policy(PolicyCommand::Explain(a)) => match (a.service, a.gateway) {
            (_, Some(g)) => gateway_explain(g),
            (Some(a), None) => policy_explain(a),
            (None, None) => bail!("give --policy FILE or --gateway FILE"),
        },
        Command::Policy(PolicyCommand::Suggest { audit, service }) => {
            policy_suggest(&audit, service)
        }
        Command::Policy(PolicyCommand::Replay { audit, policy }) => {
            let flows = read_flows(&audit)?;
            let candidate = trustline::policy::load(&policy)?;
            let report = trustline::policy::flows::replay(&flows, &candidate);
            print!("{}", trustline::policy::flows::render_replay(&report));
            Ok(())
        }
        Command::WanRelay(a) => wan_relay(a).await,
        Command::Ca(CaCommand::Init(a)) => ca_init(a),
        Command::Ca(CaCommand::Serve(a)) => ca_serve(a).await,
        Command::Ca(CaCommand::Token(a)) => {
            let ttl = parse_duration(&a.ttl)
                .map_err(anyhow::Error::msg)
                .context("--ttl")?;
            let t = admin::token(&a.data.join("admin.sock"), &a.spiffe_id, ttl.as_secs())
                .await
                .map_err(anyhow::Error::msg)?;
            println!("{t}");
            Ok(())
        }
        Command::Ca(CaCommand::Revoke(a)) => ca_revoke(a).await,
    }
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
        rate_limit: a.rate_limit,
        peers: (!a.peer_ca.is_empty()).then_some(a.peer_ca),
        peer_refresh: a.peer_refresh,
        limits: None,
    };
    let config = CaServeConfig::resolve(flags, a.config.as_deref())?;
    let bound = trustline::ca::server::build(config, Clock::system()).await?;
    println!("trustline CA serving https://{}", bound.api);
    wait_for_signal().await?;
    tracing::info!("shutting down");
    bound.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

async fn sidecar_run(config: SidecarConfig) -> anyhow::Result<()> {
    let drain = config.drain_timeout;
    let bound = trustline::proxy::build(config, Clock::system()).await?;
    println!(
        "trustline sidecar {}: admin http://{}/readyz",
        bound.identity.id(),
        bound.admin
    );
    wait_for_signal().await?;
    tracing::info!(open = bound.active_connections(), deadline = ?drain, "draining");
    let cut = bound.drain(drain).await;
    tracing::info!(cut_off = cut, "drained");
    Ok(())
}

async fn gateway_run(config: GatewayConfig) -> anyhow::Result<()> {
    let bound = trustline::tunnel::gateway::build(config, Clock::system())
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "trustline gateway {}: QUIC on {}, admin http://{}/paths",
        bound.identity.id(),
        bound.listen,
        bound.admin
    );
    wait_for_signal().await?;
    bound.shutdown().await;
    Ok(())
}

async fn wan_relay(a: WanRelayArgs) -> anyhow::Result<()> {
    use trustline::wan::{self, WanSpec};
    let delay = parse_duration(&a.delay)
        .map_err(anyhow::Error::msg)
        .context("--delay")?;
    let spec = WanSpec {
        delay,
        udp_loss: a.loss,
        seed: a.seed,
    };
    spec.check().map_err(|e| {
        let flag = match e {
            wan::SpecError::Loss(_) => "--loss",
            wan::SpecError::Delay(_) => "--delay",
        };
        anyhow::anyhow!("{flag}: {e}")
    })?;
    // TCP first, so that UDP takes the same port when --listen asks for port 0.
    let tcp = match a.proto {
        WanProto::Udp => None,
        _ => Some(
            wan::spawn_tcp(a.listen, a.to, spec)
                .await
                .context("TCP relay")?,
        ),
    };
    let listen = tcp.as_ref().map_or(a.listen, |t| t.local_addr());
    let udp = match a.proto {
        WanProto::Tcp => None,
        _ => Some(
            wan::spawn_udp(listen, a.to, spec)
                .await
                .context("UDP relay")?,
        ),
    };
    tracing::info!(
        %listen,
        to = %a.to,
        tcp = tcp.is_some(),
        udp = udp.is_some(),
        delay = %humantime::format_duration(delay),
        rtt = %humantime::format_duration(spec.rtt()),
        loss = a.loss,
        seed = a.seed,
        "wan relay running"
    );
    wait_for_signal().await?;
    tracing::info!("stopping");
    Ok(())
}

/// Waits for SIGTERM or Ctrl-C.
async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

fn policy_check(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut failed = 0;
    for f in files {
        match trustline::policy::load(f) {
            Ok(p) => {
                for w in &p.warnings {
                    println!("{w}");
                }
                let rules: usize = p.services.values().map(|s| s.rules.len()).sum();
                println!(
                    "{}: ok ({} services, {rules} rules, {} warnings)",
                    f.display(),
                    p.services.len(),
                    p.warnings.len()
                );
            }
            Err(e) => {
                failed += 1;
                for i in &e.issues {
                    println!("{i}");
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} policy files have errors", files.len());
    }
    Ok(())
}

fn policy_explain(a: ExplainArgs) -> anyhow::Result<()> {
    use trustline::policy::eval::Http;
    let policy = trustline::policy::load(&a.policy)?;
    let svc = policy.service(&a.to).with_context(|| {
        let names: Vec<_> = policy.services.keys().collect();
        format!(
            "no [service.{}] in {} (services: {names:?})",
            a.to,
            a.policy.display()
        )
    })?;
    let peer = trustline::identity::parse_id(&a.from).context("--from")?;
    let at: jiff::Timestamp = match &a.at {
        Some(t) => t
            .parse()
            .with_context(|| format!("--at {t:?}: expected RFC 3339"))?,
        None => jiff::Timestamp::now(),
    };
    let peer = peer.to_string();
    // Decided on the normalised path, as the sidecar does.
    let path = a
        .path
        .as_deref()
        .map(|p| trustline::policy::path::normalise(p, &svc.paths))
        .transpose()
        .with_context(|| format!("--path {:?} is refused with 400 by the sidecar", a.path))?;
    let facts = trustline::policy::Facts {
        peer: &peer,
        region: a.region.as_deref(),
        port: a.port,
        http: a
            .method
            .as_deref()
            .zip(path.as_deref())
            .map(|(method, path)| Http { method, path }),
        at,
    };
    print!(
        "{}",
        trustline::policy::eval::render(&trustline::policy::explain(svc, &facts))
    );
    Ok(())
}

/// `policy explain --gateway`: the region-level decision of one gateway for one stream.
fn gateway_explain(a: GatewayExplainArgs) -> anyhow::Result<()> {
    let rules = GatewayConfig::load_rules(&a.gateway)?;
    let e = rules
        .policy
        .explain(&rules.region, &a.from_region, &a.to_region, &a.service);
    print!("{}", trustline::policy::region::render(&e));
    Ok(())
}

fn read_flows(audit: &std::path::Path) -> anyhow::Result<Vec<trustline::policy::flows::Flow>> {
    let text =
        std::fs::read_to_string(audit).with_context(|| format!("reading {}", audit.display()))?;
    let (flows, bad) = trustline::policy::flows::parse_flows(&text);
    for b in bad.iter().take(5) {
        eprintln!("warning: {}: {b} (skipped)", audit.display());
    }
    if flows.is_empty() {
        bail!("{}: no decision records found", audit.display());
    }
    Ok(flows)
}

fn policy_suggest(audit: &std::path::Path, service: Option<String>) -> anyhow::Result<()> {
    let flows = read_flows(audit)?;
    let services: std::collections::BTreeSet<String> = match service {
        Some(s) => [s].into(),
        None => flows
            .iter()
            .map(|f| f.destination_service.clone())
            .collect(),
    };
    for s in services {
        print!("{}", trustline::policy::flows::suggest(&flows, &s));
    }
    Ok(())
}
