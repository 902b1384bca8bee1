//! Learning from recorded traffic: `policy suggest` turns the flows of an audit log into the
//! least-privilege allow list that covers them, and `policy replay` shows what a candidate
//! policy would change for those flows, per rule, with examples.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;

use super::eval::{evaluate_with, Facts, Http, Outcome};
use super::jwt::{JwtFacts, VerifiedJwt};
use super::{Policy, ServicePolicy};

/// One recorded decision, as written by the sidecar's audit log (`event = "decision"`).
#[derive(Clone, Debug, Deserialize)]
pub struct Flow {
    pub time: String,
    #[serde(default)]
    pub event: String,
    pub source_id: String,
    pub source_region: Option<String>,
    pub destination_service: String,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    pub outcome: String,
    pub rule: String,
    #[serde(default)]
    pub mode: String,
    /// The request's verified token, on services whose rules read tokens.
    #[serde(default)]
    pub jwt_sub: Option<String>,
    #[serde(default)]
    pub jwt_region: Option<String>,
    /// Why the request had no valid token.
    #[serde(default)]
    pub jwt_error: Option<String>,
}

impl Flow {
    /// The token facts recorded with the flow. The audit line does not keep the token's
    /// audiences: a recorded valid token is replayed as valid for every audience `svc`'s rules
    /// name (it was valid for one of the recording policy's).
    fn jwt(&self, svc: &ServicePolicy) -> JwtFacts {
        match (&self.jwt_sub, &self.jwt_error) {
            (Some(sub), _) => JwtFacts::Verified(VerifiedJwt {
                sub: sub.clone(),
                region: self
                    .jwt_region
                    .as_deref()
                    .and_then(|r| crate::region::Region::new(r).ok()),
                aud: svc.jwt_audiences.clone(),
            }),
            (None, Some(why)) => JwtFacts::Refused(why.clone()),
            (None, None) => JwtFacts::Refused("no token was recorded".into()),
        }
    }
}

/// Parses audit-log lines, keeping enforced decisions; reports lines that are not JSON decisions.
pub fn parse_flows(text: &str) -> (Vec<Flow>, Vec<String>) {
    let mut flows = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Flow>(line) {
            Ok(f) if f.event == "decision" && f.mode != "dry-run" => flows.push(f),
            Ok(_) => {}
            Err(e) => bad.push(format!("line {}: {e}", n + 1)),
        }
    }
    (flows, bad)
}

fn rule_name(id: &str) -> String {
    // spiffe://td/ns/shop/sa/web -> shop-web (readable, unique enough; numbered on collision)
    let path = id.split_once("://").map_or(id, |(_, r)| r);
    let parts: Vec<&str> = path
        .split('/')
        .skip(1)
        .filter(|p| *p != "ns" && *p != "sa")
        .collect();
    let base = parts.join("-");
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn quoted(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let v: Vec<String> = items
        .into_iter()
        .map(|s| format!("{:?}", s.as_ref()))
        .collect();
    format!("[{}]", v.join(", "))
}

/// What the decided flows to one service used.
#[derive(Default)]
struct Observed<'a> {
    /// Caller -> plain (non-HTTP) ports.
    l4: BTreeMap<&'a str, BTreeSet<u16>>,
    /// (caller, port, upper-case method) -> paths.
    l7: BTreeMap<(&'a str, u16, String), BTreeSet<&'a str>>,
    http_ports: BTreeSet<u16>,
}

impl<'a> Observed<'a> {
    fn of(flows: &'a [Flow], service: &str) -> Self {
        let mut o = Observed::default();
        // Requests refused before any rule saw them (`bad-request`) cannot be allowed by a rule.
        let decided = flows
            .iter()
            .filter(|f| f.destination_service == service && f.rule != super::path::REFUSED);
        for f in decided {
            match (&f.method, &f.path) {
                // An allow matches a method exactly and a policy file holds upper-case methods:
                // no rule can allow `get`, so suggesting `GET` for it would not cover the flow.
                (Some(m), Some(_)) if *m != m.to_ascii_uppercase() => {}
                (Some(m), Some(p)) => {
                    o.http_ports.insert(f.port);
                    o.l7.entry((f.source_id.as_str(), f.port, m.to_ascii_uppercase()))
                        .or_default()
                        .insert(p.as_str());
                }
                _ => {
                    o.l4.entry(&f.source_id).or_default().insert(f.port);
                }
            }
        }
        o
    }
}

/// Rule names, made unique by appending `-2`, `-3`, ... to a name already given.
#[derive(Default)]
struct UniqueNames(BTreeSet<String>);

impl UniqueNames {
    fn get(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut i = 2;
        while !self.0.insert(name.clone()) {
            name = format!("{base}-{i}");
            i += 1;
        }
        name
    }
}

/// The least-privilege policy for `service` covering `flows`: per caller, its plain ports; per
/// caller, HTTP port and method, the exact paths it used. Everything else is denied by default.
pub fn suggest(flows: &[Flow], service: &str) -> String {
    let Observed { l4, l7, http_ports } = Observed::of(flows, service);
    let mut out = format!(
        "# Suggested by `trustline policy suggest` from {} recorded flows: every observed flow is\n# allowed, nothing else (default deny). Review before use.\n[service.{service}]\n",
        flows.iter().filter(|f| f.destination_service == service).count()
    );
    if !http_ports.is_empty() {
        let _ = writeln!(
            out,
            "http_ports = [{}]",
            http_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut names = UniqueNames::default();
    for (caller, ports) in &l4 {
        // Plain ports that are also HTTP ports are covered per request below.
        let ports: Vec<String> = ports
            .iter()
            .filter(|p| !http_ports.contains(*p))
            .map(u16::to_string)
            .collect();
        if ports.is_empty() {
            continue;
        }
        let name = names.get(format!("allow-{}", rule_name(caller)));
        let _ = write!(
            out,
            "\n[[service.{service}.rule]]\nname = {name:?}\naction = \"allow\"\nfrom = [{caller:?}]\nports = [{}]\n",
            ports.join(", ")
        );
    }
    for ((caller, port, method), paths) in &l7 {
        let name = names.get(format!(
            "allow-{}-{}-{port}",
            rule_name(caller),
            method.to_ascii_lowercase()
        ));
        let _ = write!(
            out,
            "\n[[service.{service}.rule]]\nname = {name:?}\naction = \"allow\"\nfrom = [{caller:?}]\nports = [{port}]\nmethods = [{method:?}]\npaths = {}\n",
            quoted(paths)
        );
    }
    out
}

/// What a candidate policy changes for one rule.
#[derive(Clone, Debug, Default)]
pub struct RuleChange {
    pub newly_denied: usize,
    pub newly_allowed: usize,
    pub examples: Vec<String>,
}

/// The effect of a candidate policy on recorded flows.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    pub flows: usize,
    pub unchanged: usize,
    /// Flows whose service the candidate has no policy for.
    pub unknown_service: usize,
    /// Keyed by the candidate's deciding rule.
    pub by_rule: BTreeMap<String, RuleChange>,
}

/// Replays recorded flows against `candidate` (at the time each was recorded).
pub fn replay(flows: &[Flow], candidate: &Policy) -> Replay {
    let mut r = Replay {
        flows: flows.len(),
        ..Default::default()
    };
    for f in flows {
        // Refused before any rule saw it: no policy changes that.
        if f.rule == super::path::REFUSED {
            r.unchanged += 1;
            continue;
        }
        let Some(svc) = candidate.service(&f.destination_service) else {
            r.unknown_service += 1;
            continue;
        };
        let at = f.time.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let facts = Facts {
            peer: &f.source_id,
            region: f.source_region.as_deref(),
            port: f.port,
            http: f
                .method
                .as_deref()
                .zip(f.path.as_deref())
                .map(|(method, path)| Http { method, path }),
            at,
        };
        let d = evaluate_with(svc, &facts, &f.jwt(svc));
        let was_allowed = f.outcome == "allow";
        let now_allowed = d.outcome == Outcome::Allow;
        if was_allowed == now_allowed {
            r.unchanged += 1;
            continue;
        }
        let c = r
            .by_rule
            .entry(format!("{}/{}", f.destination_service, d.rule))
            .or_default();
        if now_allowed {
            c.newly_allowed += 1;
        } else {
            c.newly_denied += 1;
        }
        if c.examples.len() < 3 {
            let what = match (&f.method, &f.path) {
                (Some(m), Some(p)) => format!("{m} {p}"),
                _ => "connection".into(),
            };
            let was = if was_allowed { "allowed" } else { "denied" };
            c.examples.push(format!(
                "{} -> {}:{} {what} (was {was} by {:?})",
                f.source_id, f.destination_service, f.port, f.rule
            ));
        }
    }
    r
}

/// Human-readable replay report.
pub fn render_replay(r: &Replay) -> String {
    let mut out = format!("{} recorded flows: {} unchanged", r.flows, r.unchanged);
    if r.unknown_service > 0 {
        let _ = write!(
            out,
            ", {} for services the candidate does not cover",
            r.unknown_service
        );
    }
    out.push('\n');
    for (rule, c) in &r.by_rule {
        let _ = writeln!(
            out,
            "rule {rule}: {} newly denied, {} newly allowed",
            c.newly_denied, c.newly_allowed
        );
        for e in &c.examples {
            let _ = writeln!(out, "    e.g. {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz target policy_suggest (fuzz/regressions/policy_suggest/lower-case-method):
    /// a recorded `zET` request was suggested as an allow of `ZET`, which does not match it.
    #[test]
    fn suggest_never_allows_a_case_variant_of_a_recorded_method() {
        let log = r#"{"time":"2026-12-01T10:00:00Z","event":"decision","source_id":"spiffe://example.org/ns/shop/sa/web","source_region":null,"destination_service":"checkout","port":8080,"method":"zET","path":"/api/a","outcome":"allow","rule":"default","mode":"enforced"}"#;
        let (flows, bad) = parse_flows(log);
        assert!(bad.is_empty(), "{bad:?}");
        let text = suggest(&flows, "checkout");
        assert!(!text.contains("ZET"), "{text}");
    }

    #[test]
    fn replay_decides_on_the_recorded_token() {
        let line = |sub: &str, region: &str| {
            format!(
                r#"{{"time":"2026-12-01T10:00:00Z","event":"decision","source_id":"spiffe://example.org/ns/edge/sa/gw","source_region":"eu","destination_service":"api","port":8080,"method":"GET","path":"/x","outcome":"allow","rule":"t","mode":"enforced"{sub}{region}}}"#
            )
        };
        let log = [
            line(
                r#","jwt_sub":"spiffe://example.org/ns/web/sa/a""#,
                r#","jwt_region":"eu""#,
            ),
            line(
                r#","jwt_sub":"spiffe://example.org/ns/web/sa/a""#,
                r#","jwt_region":"us""#,
            ),
            line(r#","jwt_error":"no Authorization header""#, ""),
        ]
        .join("\n");
        let (flows, bad) = parse_flows(&log);
        assert!(bad.is_empty(), "{bad:?}");
        let candidate = r#"
[service.api]
http_ports = [8080]
[[service.api.rule]]
name = "eu-web"
action = "allow"
jwt = { audiences = ["api"], regions = ["eu"], from = ["spiffe://example.org/ns/web/*"] }
"#;
        let p = crate::policy::parse(candidate, std::path::Path::new("c.toml")).unwrap();
        let r = replay(&flows, &p);
        assert_eq!(r.unchanged, 1, "{r:?}");
        assert_eq!(r.by_rule["api/default"].newly_denied, 2, "{r:?}");
    }
}
