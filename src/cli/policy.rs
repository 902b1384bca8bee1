//! `trustline policy`: check, explain, suggest and replay policy files.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use trustline::tunnel::config::GatewayConfig;

#[derive(Subcommand)]
pub enum PolicyCommand {
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
        after_help = "Examples:\n  trustline policy explain --policy config/policy.toml --from spiffe://example.org/ns/shop/sa/frontend \\\n      --to checkout --port 8080 --method GET --path /api/orders --region eu-west --at 2026-11-23T10:00:00+01:00\n  trustline policy explain --policy config/policy.toml --from spiffe://example.org/ns/edge/sa/gateway \\\n      --to checkout --port 8080 --method POST --path /api/orders --jwt-sub spiffe://example.org/ns/web/sa/portal --jwt-region eu-west\n  trustline policy explain --gateway config/gateway.toml --from-region us-east --to-region eu-west \\\n      --service checkout"
    )]
    Explain(Box<ExplainCommand>),
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
pub struct ExplainCommand {
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
pub struct GatewayExplainArgs {
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
pub struct ExplainArgs {
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
    /// The `sub` of the request's JWT-SVID, taken as verified (for rules with `jwt`); without
    /// it the request carries no token.
    #[arg(long, value_name = "ID", requires_all = ["policy", "method"])]
    jwt_sub: Option<String>,
    /// The token's verified region (none: its signing key's region is unknown).
    #[arg(long, value_name = "REGION", requires = "jwt_sub")]
    jwt_region: Option<trustline::region::Region>,
    /// An audience of the token (repeat for more); default: every audience the service's
    /// rules name.
    #[arg(long, value_name = "AUD", requires = "jwt_sub")]
    jwt_aud: Vec<String>,
}

/// Runs one `policy` subcommand.
pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { files } => policy_check(&files),
        PolicyCommand::Explain(a) => match (a.service, a.gateway) {
            (_, Some(g)) => gateway_explain(g),
            (Some(a), None) => policy_explain(a),
            (None, None) => bail!("give --policy FILE or --gateway FILE"),
        },
        PolicyCommand::Suggest { audit, service } => policy_suggest(&audit, service),
        PolicyCommand::Replay { audit, policy } => {
            let flows = read_flows(&audit)?;
            let candidate = trustline::policy::load(&policy)?;
            let report = trustline::policy::flows::replay(&flows, &candidate);
            print!("{}", trustline::policy::flows::render_replay(&report));
            Ok(())
        }
    }
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
    let jwt = match a.jwt_sub {
        Some(sub) => trustline::policy::JwtFacts::Verified(trustline::policy::VerifiedJwt {
            sub: trustline::identity::parse_id(&sub)
                .context("--jwt-sub")?
                .to_string(),
            region: a.jwt_region,
            aud: if a.jwt_aud.is_empty() {
                svc.jwt_audiences.clone()
            } else {
                a.jwt_aud
            },
        }),
        None => trustline::policy::JwtFacts::Refused(
            "no Authorization header (give --jwt-sub for a request with a valid token)".into(),
        ),
    };
    let e = trustline::policy::explain_with(svc, &facts, &jwt);
    print!("{}", trustline::policy::eval::render(&e));
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
