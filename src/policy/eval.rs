//! Evaluation: a pure function from (service policy, facts) to a decision naming its rule.
//!
//! Rules are indexed by principal so a decision touches only the rules that can concern the
//! caller: exact IDs in a hash map, `prefix/*` patterns looked up once per path segment of the
//! caller's ID, and rules for any caller. Within a class the first rule in file order wins.

use jiff::Timestamp;
use rustc_hash::FxHashMap;

use super::jwt::JwtFacts;
use super::matchers::Principal;
use super::{Action, DefaultAction, Mode, Rule, ServicePolicy};

/// The facts a decision is made on. `peer` is the verified SPIFFE ID (canonical text), `region`
/// comes from the verified chain, `http` is set for a request on an HTTP port.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub peer: &'a str,
    pub region: Option<&'a str>,
    pub port: u16,
    pub http: Option<Http<'a>>,
    pub at: Timestamp,
}

/// An HTTP request's method and path (without the query). The path is in normal form
/// ([`super::path::normalise`] with the service's options): rules match it as is.
#[derive(Clone, Copy, Debug)]
pub struct Http<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
}

/// A decision: the outcome, the rule that made it (`"default"` when none did), whether it is to
/// be audited, and what dry-run rules would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'p> {
    pub outcome: Outcome,
    pub rule: &'p str,
    /// The default was `audit`, or an `audit` rule matched.
    pub audit: bool,
    /// Dry-run rules that matched, with what they would have decided.
    pub dry_run: Vec<(&'p str, Outcome)>,
}

#[derive(Clone, Debug, Default)]
struct Bucket {
    exact: FxHashMap<Box<str>, Vec<u32>>,
    prefix: FxHashMap<Box<str>, Vec<u32>>,
    any: Vec<u32>,
}

impl Bucket {
    fn add(&mut self, i: u32, from: &[Principal]) {
        if from.is_empty() {
            self.any.push(i);
        }
        for p in from {
            let list = match p {
                Principal::Any => &mut self.any,
                Principal::Exact(e) => self.exact.entry(e.as_str().into()).or_default(),
                Principal::Prefix(p) => self.prefix.entry(p.as_str().into()).or_default(),
            };
            if list.last() != Some(&i) {
                list.push(i);
            }
        }
    }

    /// Calls `f` with each candidate list (each sorted ascending).
    fn candidates<'s>(&'s self, peer: &str, mut f: impl FnMut(&'s [u32])) {
        if !self.any.is_empty() {
            f(&self.any);
        }
        if let Some(l) = self.exact.get(peer) {
            f(l);
        }
        if self.prefix.is_empty() {
            return;
        }
        let start = peer.find("://").map_or(0, |i| i + 3);
        for (i, b) in peer.bytes().enumerate().skip(start) {
            if b == b'/' {
                if let Some(l) = self.prefix.get(&peer[..=i]) {
                    f(l);
                }
            }
        }
    }

    /// The first rule (in file order) that matches.
    fn first(&self, rules: &[Rule], facts: &Facts<'_>, jwt: &JwtFacts) -> Option<u32> {
        let mut best: Option<u32> = None;
        self.candidates(facts.peer, |list| {
            for &i in list {
                if best.is_some_and(|b| b <= i) {
                    break;
                }
                if matches_rest(&rules[i as usize], facts, jwt) {
                    best = Some(i);
                    break;
                }
            }
        });
        best
    }

    fn all(&self, rules: &[Rule], facts: &Facts<'_>, jwt: &JwtFacts, out: &mut Vec<u32>) {
        self.candidates(facts.peer, |list| {
            out.extend(
                list.iter()
                    .copied()
                    .filter(|&i| matches_rest(&rules[i as usize], facts, jwt)),
            );
        });
        out.sort_unstable();
        out.dedup();
    }
}

/// The compiled form of a service's rules.
#[derive(Clone, Debug, Default)]
pub struct Index {
    deny: Bucket,
    allow: Bucket,
    /// Audit rules and dry-run rules: reported, never enforced.
    report: Bucket,
    has_report: bool,
}

impl Index {
    /// Builds the index of `rules`.
    pub fn build(rules: &[Rule]) -> Self {
        let mut ix = Index::default();
        for (i, r) in rules.iter().enumerate() {
            let bucket = match (r.mode, r.action) {
                (Mode::Enforce, Action::Deny) => &mut ix.deny,
                (Mode::Enforce, Action::Allow) => &mut ix.allow,
                _ => {
                    ix.has_report = true;
                    &mut ix.report
                }
            };
            bucket.add(i as u32, &r.from);
        }
        ix
    }
}

/// Everything but `from` (which the index already matched).
fn matches_rest(r: &Rule, f: &Facts<'_>, jwt: &JwtFacts) -> bool {
    mismatch_rest(r, f, jwt).is_none()
}

/// Why a rule does not match, ignoring `from`; `None` if it matches.
fn mismatch_rest(r: &Rule, f: &Facts<'_>, jwt: &JwtFacts) -> Option<String> {
    if let Some(p) = r.not_from.iter().find(|p| p.matches(f.peer)) {
        return Some(format!("caller is excluded by not_from {p}"));
    }
    if !r.ports.is_empty() && !r.ports.contains(&f.port) {
        return Some(format!("port {} not in {:?}", f.port, r.ports));
    }
    if !r.regions.is_empty()
        && !f
            .region
            .is_some_and(|reg| r.regions.iter().any(|x| x == reg))
    {
        return Some(format!(
            "caller region {} not in {:?}",
            f.region.unwrap_or("(none)"),
            r.regions
        ));
    }
    if r.is_l7() {
        match f.http {
            Some(h) => {
                if !r.methods.is_empty() && !method_matches(r, h.method) {
                    return Some(format!("method {} not in {:?}", h.method, r.methods));
                }
                if !r.paths.is_empty() && !r.paths.iter().any(|p| p.matches(h.path)) {
                    let list: Vec<String> = r.paths.iter().map(|p| p.to_string()).collect();
                    return Some(format!("path {} not in {list:?}", h.path));
                }
            }
            // A connection on a port where requests are not parsed: an allow about requests
            // cannot vouch for requests it cannot see, so it does not match ...
            None if r.action == Action::Allow => {
                return Some("the rule is about HTTP requests; this is a connection".into());
            }
            // ... while a deny (or audit) about requests matches the whole connection on its
            // other fields: it may carry the very requests the rule is about (fail closed, as
            // Istio does with HTTP fields of a DENY policy on a TCP port).
            None => {}
        }
    }
    if !r.hours.is_empty() && !r.hours.iter().any(|w| w.contains(f.at)) {
        let list: Vec<String> = r.hours.iter().map(|w| w.to_string()).collect();
        return Some(format!("{} is outside {list:?}", f.at));
    }
    if let Some(j) = &r.jwt {
        // Whatever the action: a jwt rule is about a request's token, and a connection has
        // none (so a deny with jwt matches only a valid token, never a bare connection).
        if f.http.is_none() {
            return Some("jwt: the rule is about HTTP requests; this is a connection".into());
        }
        return j.mismatch(jwt);
    }
    None
}

/// RFC 9110 methods are case-sensitive: an allow matches exactly; a deny or audit rule also
/// catches case variants, which lenient servers treat as the same method.
fn method_matches(r: &Rule, method: &str) -> bool {
    match r.action {
        Action::Allow => r.methods.iter().any(|m| m == method),
        Action::Deny | Action::Audit => r.methods.iter().any(|m| m.eq_ignore_ascii_case(method)),
    }
}

fn mismatch(r: &Rule, f: &Facts<'_>, jwt: &JwtFacts) -> Option<String> {
    if !r.from.is_empty() && !r.from.iter().any(|p| p.matches(f.peer)) {
        let list: Vec<String> = r.from.iter().map(|p| p.to_string()).collect();
        return Some(format!("caller {} not in from {list:?}", f.peer));
    }
    mismatch_rest(r, f, jwt)
}

/// Decides: enforced DENY rules first, then enforced ALLOW rules, then the default. No token
/// was read: rules with `jwt` do not match (see [`evaluate_with`]).
pub fn evaluate<'p>(policy: &'p ServicePolicy, facts: &Facts<'_>) -> Decision<'p> {
    evaluate_with(policy, facts, &JwtFacts::not_read())
}

/// [`evaluate`] with what the request's JWT-SVID established, for the rules with `jwt`.
pub fn evaluate_with<'p>(
    policy: &'p ServicePolicy,
    facts: &Facts<'_>,
    jwt: &JwtFacts,
) -> Decision<'p> {
    let ix = &policy.index;
    let rules = &policy.rules;
    let (outcome, rule) = if let Some(i) = ix.deny.first(rules, facts, jwt) {
        (Outcome::Deny, rules[i as usize].name.as_str())
    } else if let Some(i) = ix.allow.first(rules, facts, jwt) {
        (Outcome::Allow, rules[i as usize].name.as_str())
    } else {
        match policy.default {
            DefaultAction::Deny => (Outcome::Deny, "default"),
            DefaultAction::Allow | DefaultAction::Audit => (Outcome::Allow, "default"),
        }
    };
    let mut decision = Decision {
        outcome,
        rule,
        audit: rule == "default" && policy.default == DefaultAction::Audit,
        dry_run: Vec::new(),
    };
    if ix.has_report {
        let mut hits = Vec::new();
        ix.report.all(rules, facts, jwt, &mut hits);
        for i in hits {
            let r = &rules[i as usize];
            match (r.mode, r.action) {
                (_, Action::Audit) => decision.audit = true,
                (Mode::DryRun, Action::Allow) => {
                    decision.dry_run.push((r.name.as_str(), Outcome::Allow))
                }
                (Mode::DryRun, Action::Deny) => {
                    decision.dry_run.push((r.name.as_str(), Outcome::Deny))
                }
                (Mode::Enforce, _) => {}
            }
        }
    }
    decision
}

/// One rule's verdict in an explanation.
#[derive(Clone, Debug)]
pub struct RuleVerdict {
    pub name: String,
    pub action: Action,
    pub mode: Mode,
    pub line: usize,
    /// `None` if the rule matched, else why not.
    pub mismatch: Option<String>,
}

/// A decision with every rule's verdict, for `policy explain`.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub outcome: Outcome,
    pub rule: String,
    pub default: DefaultAction,
    pub rules: Vec<RuleVerdict>,
    pub dry_run: Vec<(String, Outcome)>,
}

/// Evaluates and explains: which rules matched and why the others did not.
pub fn explain(policy: &ServicePolicy, facts: &Facts<'_>) -> Explanation {
    explain_with(policy, facts, &JwtFacts::not_read())
}

/// [`explain`] with what the request's JWT-SVID established.
pub fn explain_with(policy: &ServicePolicy, facts: &Facts<'_>, jwt: &JwtFacts) -> Explanation {
    let d = evaluate_with(policy, facts, jwt);
    Explanation {
        outcome: d.outcome,
        rule: d.rule.to_string(),
        default: policy.default,
        dry_run: d.dry_run.iter().map(|(n, o)| (n.to_string(), *o)).collect(),
        rules: policy
            .rules
            .iter()
            .map(|r| RuleVerdict {
                name: r.name.clone(),
                action: r.action,
                mode: r.mode,
                line: r.line,
                mismatch: mismatch(r, facts, jwt),
            })
            .collect(),
    }
}

/// Human-readable form of an explanation.
pub fn render(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verdict = match e.outcome {
        Outcome::Allow => "ALLOW",
        Outcome::Deny => "DENY",
    };
    let _ = writeln!(out, "decision: {verdict} by rule {:?}", e.rule);
    let _ = writeln!(
        out,
        "order: enforced deny rules, then enforced allow rules, then default ({:?})",
        e.default
    );
    for r in &e.rules {
        let mode = if r.mode == Mode::DryRun {
            " dry-run"
        } else {
            ""
        };
        let what = match &r.mismatch {
            None => "MATCHED".to_string(),
            Some(why) => format!("no match: {why}"),
        };
        let _ = writeln!(
            out,
            "  line {:>4}  {:?}{mode} {:?}: {what}",
            r.line, r.action, r.name
        );
    }
    for (rule, o) in &e.dry_run {
        let _ = writeln!(out, "dry-run: rule {rule:?} would {o:?}");
    }
    out
}
