//! `trustline policy`: check, explain, suggest and replay policy files.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validates policy files; reports every error with file, line, rule and field.
    #[command(after_help = "Example:\n  trustline policy check config/policy.toml")]
    Check {
        /// Policy files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Prints the decision for a caller, the deciding rule, and why each rule matched or not.
    #[command(
        after_help = "Example:\n  trustline policy explain --policy config/policy.toml --from spiffe://example.org/ns/shop/sa/frontend \\\n      --to checkout --port 8080 --method GET --path /api/orders --region eu-west --at 2026-11-23T10:00:00+01:00"
    )]
    Explain(ExplainArgs),
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

#[derive(Args)]
pub struct ExplainArgs {
    /// Policy file.
    #[arg(long)]
    policy: PathBuf,
    /// The caller's SPIFFE ID.
    #[arg(long)]
    from: String,
    /// The protected service (a [service.NAME] of the file).
    #[arg(long)]
    to: String,
    /// Destination port.
    #[arg(long)]
    port: u16,
    /// HTTP method (for HTTP ports).
    #[arg(long, requires = "path")]
    method: Option<String>,
    /// HTTP path (for HTTP ports).
    #[arg(long, requires = "method")]
    path: Option<String>,
    /// The caller's region (as its certificate chain would say).
    #[arg(long)]
    region: Option<String>,
    /// When (RFC 3339); default now.
    #[arg(long)]
    at: Option<String>,
}

/// Runs one `policy` subcommand.
pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { files } => policy_check(&files),
        PolicyCommand::Explain(a) => policy_explain(a),
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
    print!(
        "{}",
        trustline::policy::eval::render(&trustline::policy::explain(svc, &facts))
    );
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
