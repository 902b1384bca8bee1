//! Policy files (TOML): parsing and validation that reports every problem at once.
//!
//! ```toml
//! [service.checkout]
//! default = "deny"           # optional; deny once there is an allow rule
//! http_ports = [8080]        # decided per HTTP request on these ports
//! path_slashes = "refuse"    # %2F, %5C and `\` in a path: refuse (400, default) | decode (as `/`)
//! path_semicolons = "refuse" # `;` in a path: refuse (400, default) | keep
//!
//! [[service.checkout.rule]]
//! name = "frontend-reads"
//! action = "allow"           # allow | deny | audit
//! from = ["spiffe://example.org/ns/shop/sa/frontend", "spiffe://example.org/ns/web/*"]
//! not_from = ["spiffe://example.org/ns/web/sa/legacy"]
//! ports = [8080]
//! methods = ["GET"]
//! paths = ["/api/*"]
//! regions = ["eu-west"]
//! hours = ["Mon-Fri 07:00-19:00 Europe/Berlin"]
//! mode = "dry-run"           # optional: evaluated and logged, not enforced
//!
//! [[service.checkout.rule]]
//! name = "orders-with-token"
//! action = "allow"
//! from = ["spiffe://example.org/ns/shop/*"]  # the mTLS peer (often a gateway or a proxy)
//! ports = [8080]
//! jwt = { audiences = ["checkout"], regions = ["eu-west"], from = ["spiffe://example.org/ns/web/*"] }
//! ```
//!
//! `jwt`: the request must carry `Authorization: Bearer <JWT-SVID>` valid against the sidecar's
//! JWT bundles (signature, `exp`, `nbf`) for one of `audiences` (required); `regions`, if given,
//! must contain its verified region (a token whose signing key's region is unknown, such as a
//! federated one, never matches a non-empty `regions`); `from`, if given, must match its `sub`
//! (exact, `prefix/*` or `*`, as the rule's own `from`). The rule's other fields still apply to
//! the mTLS peer and the request. A missing, malformed, expired or wrongly signed token makes
//! the condition false, for every action: a deny rule with `jwt` matches only requests with a
//! valid token, so to *require* a token, put `jwt` on the allow rules (and leave the default
//! deny). A `jwt` rule needs HTTP: its `ports` (or, when it names none, the service) must be
//! in `http_ports`; on other ports it never matches. Tokens are validated once per request, and
//! only for services with a `jwt` rule. The sidecar consumes the header: it is removed before
//! the request is forwarded, unless the service sets `jwt_forward = true` (Istio's
//! `forwardOriginalToken`). Audit lines of such services carry `jwt_sub` and `jwt_region`, or
//! `jwt_error` saying why no token was valid.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::matchers::{PathPattern, Principal, TimeWindow};
use super::path::{PathOptions, Semicolons, Slashes};
use super::{Action, DefaultAction, JwtRule, Mode, Rule, ServicePolicy};
use crate::region::{NameError, Region};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    service: BTreeMap<String, Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    default: Option<String>,
    #[serde(default)]
    http_ports: Vec<u16>,
    path_slashes: Option<String>,
    path_semicolons: Option<String>,
    #[serde(default)]
    jwt_forward: bool,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    action: String,
    mode: Option<String>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    not_from: Vec<String>,
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    hours: Vec<String>,
    jwt: Option<RawJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    audiences: Option<Vec<String>>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    from: Vec<String>,
}

/// How bad an issue is: errors make the file unusable, warnings do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a policy file.
#[derive(Clone, Debug)]
pub struct Issue {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub service: Option<String>,
    pub rule: Option<String>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}: {sev}", self.file.display(), self.line)?;
        if let Some(s) = &self.service {
            write!(f, ": service {s}")?;
        }
        if let Some(r) = &self.rule {
            write!(f, ", rule {r:?}")?;
        }
        write!(f, ", {}: {}", self.field, self.message)
    }
}

/// A policy file that cannot be used, with every error found.
#[derive(Debug, thiserror::Error)]
#[error("{}", .issues.iter().filter(|i| i.severity == Severity::Error).map(|i| i.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct PolicyError {
    pub issues: Vec<Issue>,
}

/// A validated policy: every protected service of one file, plus its warnings.
#[derive(Clone, Debug)]
pub struct Policy {
    pub services: BTreeMap<String, ServicePolicy>,
    pub warnings: Vec<Issue>,
}

impl Policy {
    /// The policy of `service`, if the file has one.
    pub fn service(&self, service: &str) -> Option<&ServicePolicy> {
        self.services.get(service)
    }
}

/// Reads and validates a policy file.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        issues: vec![Issue {
            severity: Severity::Error,
            file: path.to_path_buf(),
            line: 0,
            service: None,
            rule: None,
            field: "(file)".into(),
            message: e.to_string(),
        }],
    })?;
    parse(&text, path)
}

/// Line numbers of byte offsets, without rescanning the text for each (large files).
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        Lines(text.match_indices('\n').map(|(i, _)| i).collect())
    }
    fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&nl| nl < offset) + 1
    }
}

struct Checker<'a> {
    file: &'a Path,
    issues: Vec<Issue>,
}

impl Checker<'_> {
    fn push(
        &mut self,
        severity: Severity,
        line: usize,
        service: &str,
        rule: Option<&str>,
        field: &str,
        message: String,
    ) {
        self.issues.push(Issue {
            severity,
            file: self.file.to_path_buf(),
            line,
            service: Some(service.to_string()),
            rule: rule.map(str::to_string),
            field: field.to_string(),
            message,
        });
    }

    /// How many errors (not warnings) were found so far.
    fn errors(&self) -> usize {
        self.issues
            .iter()
            .filter(|i| i.severity == Severity::Error)
            .count()
    }
}

/// Parses and validates policy text; `path` names it in issues.
pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| PolicyError {
        issues: vec![Issue {
            severity: Severity::Error,
            file: path.to_path_buf(),
            line: e
                .span()
                .map(|s| crate::util::line_of(text, s.start))
                .unwrap_or(0),
            service: None,
            rule: None,
            field: e
                .span()
                .map(|s| {
                    text[s]
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|| "(document)".into()),
            message: e.message().trim().to_string(),
        }],
    })?;
    let mut c = Checker {
        file: path,
        issues: Vec::new(),
    };
    let mut services = BTreeMap::new();
    let lines = Lines::new(text);
    for (name, svc) in raw.service {
        let line = lines.of(svc.span().start);
        if let Some(sp) = service_policy(&mut c, &lines, &name, svc.into_inner(), line) {
            services.insert(name, sp);
        }
    }
    let (errors, warnings): (Vec<_>, Vec<_>) = c
        .issues
        .into_iter()
        .partition(|i| i.severity == Severity::Error);
    if !errors.is_empty() {
        let mut issues = errors;
        issues.extend(warnings);
        return Err(PolicyError { issues });
    }
    Ok(Policy { services, warnings })
}

fn service_policy(
    c: &mut Checker<'_>,
    lines: &Lines,
    name: &str,
    raw: RawService,
    line: usize,
) -> Option<ServicePolicy> {
    let before = c.errors();
    let declared = raw.rule.len();
    let rules = rules(c, lines, name, raw.rule, &raw.http_ports);
    let has_allow = rules
        .iter()
        .any(|r| r.action == Action::Allow && r.mode == Mode::Enforce);
    let default = default_action(c, name, line, raw.default.as_deref(), has_allow);
    if default == DefaultAction::Allow && raw.default.is_none() && declared == 0 {
        c.push(
            Severity::Warning,
            line,
            name,
            None,
            "rule",
            "no rules: every caller is allowed".into(),
        );
    }
    shadowing(c, name, &rules);
    let paths = path_options(
        c,
        name,
        line,
        raw.path_slashes.as_deref(),
        raw.path_semicolons.as_deref(),
    );
    let mut jwt_audiences: Vec<String> = Vec::new();
    for a in rules
        .iter()
        .filter_map(|r| r.jwt.as_ref())
        .flat_map(|j| &j.audiences)
    {
        if !jwt_audiences.contains(a) {
            jwt_audiences.push(a.clone());
        }
    }
    (c.errors() == before).then(|| ServicePolicy {
        index: super::eval::Index::build(&rules),
        name: name.to_string(),
        default,
        http_ports: raw.http_ports,
        paths,
        rules,
        jwt_audiences,
        jwt_forward: raw.jwt_forward,
    })
}

/// A service's rules in file order, those with errors left out; rule names must be unique.
fn rules(
    c: &mut Checker<'_>,
    lines: &Lines,
    svc: &str,
    raw: Vec<Spanned<RawRule>>,
    http_ports: &[u16],
) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut names = BTreeMap::new();
    for spanned in raw {
        let rline = lines.of(spanned.span().start);
        let r = spanned.into_inner();
        if let Some(prev) = names.insert(r.name.clone(), rline) {
            c.push(
                Severity::Error,
                rline,
                svc,
                Some(&r.name),
                "name",
                format!("duplicate rule name (also on line {prev})"),
            );
        }
        if let Some(rule) = rule(c, svc, r, rline, http_ports) {
            rules.push(rule);
        }
    }
    rules
}

/// `default`; when unset, deny once the service has an enforced allow rule, allow otherwise.
fn default_action(
    c: &mut Checker<'_>,
    svc: &str,
    line: usize,
    default: Option<&str>,
    has_allow: bool,
) -> DefaultAction {
    match default {
        None if has_allow => DefaultAction::Deny,
        None => DefaultAction::Allow,
        Some("deny") => DefaultAction::Deny,
        Some("allow") => DefaultAction::Allow,
        Some("audit") => DefaultAction::Audit,
        Some(other) => {
            c.push(
                Severity::Error,
                line,
                svc,
                None,
                "default",
                format!("{other:?}: expected \"deny\", \"allow\" or \"audit\""),
            );
            DefaultAction::Deny
        }
    }
}

/// `path_slashes` and `path_semicolons`; the safe choice (refuse) when unset.
fn path_options(
    c: &mut Checker<'_>,
    svc: &str,
    line: usize,
    slashes: Option<&str>,
    semicolons: Option<&str>,
) -> PathOptions {
    let slashes = match slashes {
        None | Some("refuse") => Slashes::Refuse,
        Some("decode") => Slashes::Decode,
        Some(other) => {
            let msg = format!("{other:?}: expected \"refuse\" or \"decode\"");
            c.push(Severity::Error, line, svc, None, "path_slashes", msg);
            Slashes::Refuse
        }
    };
    let semicolons = match semicolons {
        None | Some("refuse") => Semicolons::Refuse,
        Some("keep") => Semicolons::Keep,
        Some(other) => {
            let msg = format!("{other:?}: expected \"refuse\" or \"keep\"");
            c.push(Severity::Error, line, svc, None, "path_semicolons", msg);
            Semicolons::Refuse
        }
    };
    PathOptions {
        slashes,
        semicolons,
    }
}

/// RFC 9110 §5.6.2: a method is a token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A rule's `action` (an error, and deny, when it is none of the three).
fn action(c: &mut Checker<'_>, svc: &str, rule: &str, line: usize, action: &str) -> Action {
    match action {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        "audit" => Action::Audit,
        other => {
            c.push(
                Severity::Error,
                line,
                svc,
                Some(rule),
                "action",
                format!("{other:?}: expected \"allow\", \"deny\" or \"audit\""),
            );
            Action::Deny
        }
    }
}

/// A rule's `mode`: enforced unless `dry-run`.
fn mode(c: &mut Checker<'_>, svc: &str, rule: &str, line: usize, mode: Option<&str>) -> Mode {
    match mode {
        None | Some("enforce") => Mode::Enforce,
        Some("dry-run") => Mode::DryRun,
        Some(other) => {
            c.push(
                Severity::Error,
                line,
                svc,
                Some(rule),
                "mode",
                format!("{other:?}: expected \"enforce\" or \"dry-run\""),
            );
            Mode::Enforce
        }
    }
}

/// An entry of `methods`, written in any case, kept upper-case: requests match an allow only
/// in upper case.
fn method(m: &str) -> Result<String, EntryError> {
    if is_token(m) {
        Ok(m.to_ascii_uppercase())
    } else {
        Err(EntryError::Method(m.to_string()))
    }
}

/// An entry of `regions`.
fn region(s: &str) -> Result<Region, EntryError> {
    Region::new(s).map_err(|why| EntryError::Region {
        value: s.to_string(),
        why,
    })
}

/// An entry of `methods` or `regions` that is not one (the matchers have
/// [`MatcherError`](super::matchers::MatcherError)).
#[derive(Debug, thiserror::Error)]
enum EntryError {
    #[error("{0:?} is not an HTTP method (a token, RFC 9110)")]
    Method(String),
    #[error("region {value:?}: {why}")]
    Region { value: String, why: NameError },
}

fn each<T, E: std::fmt::Display>(
    c: &mut Checker<'_>,
    svc: &str,
    rule: &str,
    line: usize,
    field: &str,
    items: &[String],
    parse: impl Fn(&str) -> Result<T, E>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, s) in items.iter().enumerate() {
        match parse(s) {
            Ok(v) => out.push(v),
            Err(e) => c.push(
                Severity::Error,
                line,
                svc,
                Some(rule),
                &format!("{field}[{i}]"),
                e.to_string(),
            ),
        }
    }
    out
}

fn rule(
    c: &mut Checker<'_>,
    svc: &str,
    r: RawRule,
    line: usize,
    http_ports: &[u16],
) -> Option<Rule> {
    let n = r.name.as_str();
    let before = c.issues.len();
    if n.is_empty() || n == "default" {
        c.push(
            Severity::Error,
            line,
            svc,
            Some(n),
            "name",
            "a rule needs a name other than \"default\"".into(),
        );
    }
    let action = action(c, svc, n, line, &r.action);
    let mode = mode(c, svc, n, line, r.mode.as_deref());
    let from = each(c, svc, n, line, "from", &r.from, Principal::parse);
    let not_from = each(c, svc, n, line, "not_from", &r.not_from, Principal::parse);
    let paths = each(c, svc, n, line, "paths", &r.paths, PathPattern::parse);
    let hours = each(c, svc, n, line, "hours", &r.hours, TimeWindow::parse);
    let methods = each(c, svc, n, line, "methods", &r.methods, method);
    let regions = each(c, svc, n, line, "regions", &r.regions, region);
    let jwt = r.jwt.map(|j| jwt_rule(c, svc, n, line, j));
    if r.ports.contains(&0) {
        c.push(
            Severity::Error,
            line,
            svc,
            Some(n),
            "ports",
            "port 0 is not a port".into(),
        );
    }
    let rule = Rule {
        name: r.name.clone(),
        action,
        mode,
        from,
        not_from,
        ports: r.ports,
        methods,
        paths,
        regions,
        hours,
        jwt,
        line,
    };
    never_matches(c, svc, &rule, http_ports);
    (c.issues[before..]
        .iter()
        .all(|i| i.severity != Severity::Error))
    .then_some(rule)
}

/// A rule's `jwt` table: `audiences` required, `regions` and `from` parsed as the rule's own.
fn jwt_rule(c: &mut Checker<'_>, svc: &str, n: &str, line: usize, j: RawJwt) -> JwtRule {
    let audiences = match j.audiences {
        Some(a) if !a.is_empty() => a,
        _ => {
            let msg = "required: the audiences a token may be for (at least one; a token is valid for the rule when its aud names one of them)".into();
            c.push(Severity::Error, line, svc, Some(n), "jwt.audiences", msg);
            Vec::new()
        }
    };
    for (i, a) in audiences.iter().enumerate() {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(char::is_control) {
            let msg = format!(
                "{a:?}: an audience is 1 to {MAX_AUDIENCE_LEN} bytes without control characters"
            );
            c.push(
                Severity::Error,
                line,
                svc,
                Some(n),
                &format!("jwt.audiences[{i}]"),
                msg,
            );
        }
    }
    JwtRule {
        audiences,
        regions: each(c, svc, n, line, "jwt.regions", &j.regions, region),
        from: each(c, svc, n, line, "jwt.from", &j.from, Principal::parse),
    }
}

/// Longest audience a `jwt` condition names.
const MAX_AUDIENCE_LEN: usize = 1024;

/// Rules that can never match are errors: they are almost always a typo.
fn never_matches(c: &mut Checker<'_>, svc: &str, r: &Rule, http_ports: &[u16]) {
    let n = Some(r.name.as_str());
    // A rule with jwt never matches a bare connection (the jwt check below covers its ports).
    if r.is_l7() && r.jwt.is_none() {
        let ports: Vec<u16> = if r.ports.is_empty() {
            http_ports.to_vec()
        } else {
            r.ports.clone()
        };
        if http_ports.is_empty() || !ports.iter().any(|p| http_ports.contains(p)) {
            let what = if r.action == Action::Allow {
                "so it can never match"
            } else {
                "so it would refuse whole connections instead"
            };
            c.push(Severity::Error, r.line, svc, n, "methods/paths", format!("the rule matches HTTP methods or paths, but none of its ports is in the service's http_ports, {what}"));
        } else if r.action != Action::Allow {
            let other: Vec<u16> = ports
                .iter()
                .copied()
                .filter(|p| !http_ports.contains(p))
                .collect();
            if r.ports.is_empty() || !other.is_empty() {
                let on = if r.ports.is_empty() {
                    "every port not in http_ports".to_string()
                } else {
                    format!("ports {other:?}, not in http_ports,")
                };
                c.push(Severity::Warning, r.line, svc, n, "methods/paths", format!("on {on} requests are not parsed, so this rule refuses whole connections of the callers it names (fail closed); set ports to scope it to http_ports"));
            }
        }
    }
    if r.jwt.is_some() {
        // Tokens are read only from HTTP requests: a jwt rule elsewhere could never match.
        let outside: Vec<u16> = r
            .ports
            .iter()
            .copied()
            .filter(|p| !http_ports.contains(p))
            .collect();
        if http_ports.is_empty() || !outside.is_empty() {
            let why = if http_ports.is_empty() {
                "the service has no http_ports".to_string()
            } else {
                format!("ports {outside:?} are not in http_ports {http_ports:?}")
            };
            c.push(Severity::Error, r.line, svc, n, "jwt", format!("jwt needs an HTTP port: add the port to http_ports ({why}; tokens are only read from HTTP requests)"));
        }
    }
    for (i, p) in r.from.iter().enumerate() {
        if r.not_from.iter().any(|x| p.within(x)) {
            c.push(
                Severity::Error,
                r.line,
                svc,
                n,
                &format!("from[{i}]"),
                format!("{p} is excluded again by not_from, so this entry never matches"),
            );
        }
    }
    if !r.from.is_empty()
        && r.from
            .iter()
            .all(|p| r.not_from.iter().any(|x| p.within(x)))
    {
        c.push(
            Severity::Error,
            r.line,
            svc,
            n,
            "from",
            "every caller in from is excluded by not_from: the rule can never match".into(),
        );
    }
}

/// An ALLOW rule whose every request is also matched by an earlier-or-later DENY (which is
/// evaluated first) is dead: warn about it.
fn shadowing(c: &mut Checker<'_>, svc: &str, rules: &[Rule]) {
    let covers = |d: &Rule, a: &Rule| -> bool {
        let principals = if d.from.is_empty() {
            true
        } else {
            !a.from.is_empty() && a.from.iter().all(|p| d.from.iter().any(|q| p.within(q)))
        };
        principals
            && d.not_from.is_empty()
            && (d.ports.is_empty()
                || (!a.ports.is_empty() && a.ports.iter().all(|p| d.ports.contains(p))))
            && (d.methods.is_empty()
                || (!a.methods.is_empty() && a.methods.iter().all(|m| d.methods.contains(m))))
            && d.paths.is_empty()
            && d.hours.is_empty()
            && d.jwt.is_none()
            && (d.regions.is_empty()
                || (!a.regions.is_empty() && a.regions.iter().all(|r| d.regions.contains(r))))
    };
    let denies: Vec<&Rule> = rules
        .iter()
        .filter(|d| d.action == Action::Deny && d.mode == Mode::Enforce)
        .collect();
    if denies.is_empty() {
        return;
    }
    for a in rules.iter().filter(|r| r.action == Action::Allow) {
        if let Some(d) = denies.iter().find(|d| covers(d, a)) {
            c.push(
                Severity::Warning,
                a.line,
                svc,
                Some(&a.name),
                "action",
                format!("shadowed by deny rule {:?} (line {}): deny rules are evaluated first, so this allow never takes effect", d.name, d.line),
            );
        }
    }
}
