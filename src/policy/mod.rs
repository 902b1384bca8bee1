//! Authorization policy: per-service allow lists on identity and context, deny-first, default
//! deny, every decision naming the rule that made it.
//!
//! This module is pure: no sockets, no runtime. [`file`] reads and validates policy files (and
//! reports every problem with file, line, rule and field); [`eval`] compiles a service's rules
//! into an index and decides in well under a microsecond, also with 10,000 rules or principals.
//! [`region`] is the gateways' region-level engine (source region, destination region, service),
//! with the same deny-first order and its own `default-deny`.
//!
//! Semantics (Istio's): DENY rules first, then ALLOW, then the service's default. The default is
//! `deny` once a service has any ALLOW rule, `allow` otherwise, or set explicitly; `audit` allows
//! and logs everything (for mapping traffic before writing rules). Rules with `mode = "dry-run"`
//! are evaluated and reported as what they would have decided, never enforced; `audit` rules only
//! log.

pub mod anomaly;
pub mod eval;
pub mod file;
pub mod flows;
pub mod jwt;
pub mod matchers;
pub mod path;
pub mod reach;
pub mod region;

pub use eval::{
    evaluate, evaluate_with, explain, explain_with, Decision, Explanation, Facts, Outcome,
};
pub use file::{load, parse, Issue, Policy, PolicyError, Severity};
pub use jwt::{JwtFacts, JwtRule, VerifiedJwt};

use matchers::{PathPattern, Principal, TimeWindow};

use crate::region::Region;

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// Whether a rule is enforced or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Enforce,
    DryRun,
}

/// What happens to a request no rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    Allow,
    Deny,
    /// Allow and log everything.
    Audit,
}

/// One rule, validated.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub mode: Mode,
    /// Empty means any caller.
    pub from: Vec<Principal>,
    pub not_from: Vec<Principal>,
    /// Empty means any port.
    pub ports: Vec<u16>,
    /// Upper-case methods (RFC 9110 tokens); empty means any. An allow matches a request's method
    /// exactly (methods are case-sensitive); a deny or audit rule also matches any case variant
    /// (`delete`), which lenient servers treat as the same method.
    pub methods: Vec<String>,
    pub paths: Vec<PathPattern>,
    pub regions: Vec<Region>,
    pub hours: Vec<TimeWindow>,
    /// A JWT-SVID the request must carry (HTTP ports only; see [`jwt`]).
    pub jwt: Option<JwtRule>,
    /// Line of the rule in its file.
    pub line: usize,
}

impl Rule {
    /// Whether the rule says anything about HTTP (so only matches requests, not connections).
    pub fn is_l7(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }
}

impl ServicePolicy {
    /// Whether some rule has a `jwt` condition: only then are requests' tokens validated.
    pub fn reads_jwt(&self) -> bool {
        !self.jwt_audiences.is_empty()
    }
}

/// The policy of one protected service.
#[derive(Clone, Debug)]
pub struct ServicePolicy {
    pub name: String,
    pub default: DefaultAction,
    /// Ports on which HTTP is parsed and decided per request.
    pub http_ports: Vec<u16>,
    /// How request paths are normalised before any rule sees them (and forwarded so).
    pub paths: path::PathOptions,
    pub rules: Vec<Rule>,
    /// Every audience of the rules' `jwt` conditions, in file order, once each: the ones a
    /// request's token is validated for. Empty when no rule has `jwt` (tokens are not read).
    pub jwt_audiences: Vec<String>,
    /// Whether a request's `Authorization: Bearer` header reaches the app (`jwt_forward`);
    /// by default the sidecar consumes it.
    pub jwt_forward: bool,
    /// The compiled index used by [`evaluate`].
    pub(crate) index: eval::Index,
}

#[cfg(test)]
mod tests;
