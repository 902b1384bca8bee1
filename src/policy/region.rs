//! The gateways' region-level policy: which source regions may reach which services of which
//! destination regions. Deny rules first, then allow rules, then [`DEFAULT_DENY`]; every decision
//! names the rule that made it, and [`RegionPolicy::explain`] says why each rule matched or not.
//!
//! Pure, like the rest of `policy/`: the gateway config (`tunnel/config.rs`) parses the
//! `[[rule]]` tables into these types, the gateway calls [`RegionPolicy::decide`] per stream, and
//! `trustline policy explain --gateway` renders a [`RegionExplanation`].

use std::fmt::{self, Write as _};

use crate::region::{Region, ServiceName};

/// The rule named by a decision no rule made (in audit lines, metrics and `policy explain`).
pub const DEFAULT_DENY: &str = "default-deny";

/// A list of a rule: some names, or `*` for any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match<T> {
    Any,
    Names(Vec<T>),
}

impl<T: PartialEq<str>> Match<T> {
    /// Whether `v` is in the list.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Match::Any => true,
            Match::Names(n) => n.iter().any(|x| x == v),
        }
    }
}

impl<T: fmt::Debug> fmt::Display for Match<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Any => f.write_str("[\"*\"]"),
            Match::Names(n) => write!(f, "{n:?}"),
        }
    }
}

/// One region-level rule (a `[[rule]]` table of a gateway config).
#[derive(Clone, Debug)]
pub struct RegionRule {
    pub name: String,
    /// An allow rule; otherwise a deny rule.
    pub allow: bool,
    /// Source regions.
    pub from: Match<Region>,
    /// Destination regions.
    pub to: Match<Region>,
    /// Destination services.
    pub services: Match<ServiceName>,
}

impl RegionRule {
    /// Why the rule does not match a stream from region `from` to `service` in region `to`;
    /// `None` if it matches. Names the first field (`from`, `to`, `services`) that does not.
    pub fn mismatch(&self, from: &str, to: &str, service: &str) -> Option<String> {
        if !self.from.matches(from) {
            return Some(format!("source region {from} not in from {}", self.from));
        }
        if !self.to.matches(to) {
            return Some(format!("destination region {to} not in to {}", self.to));
        }
        if !self.services.matches(service) {
            return Some(format!(
                "service {service} not in services {}",
                self.services
            ));
        }
        None
    }

    fn matches(&self, from: &str, to: &str, service: &str) -> bool {
        self.mismatch(from, to, service).is_none()
    }
}

/// A gateway's region-level policy: deny rules first, then allow rules, then deny.
#[derive(Clone, Debug, Default)]
pub struct RegionPolicy {
    /// In file order; within deny rules, and within allow rules, the first match decides.
    pub rules: Vec<RegionRule>,
}

/// Whether a stream may pass, and the rule that decided ([`DEFAULT_DENY`] when none matched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDecision<'p> {
    pub allowed: bool,
    pub rule: &'p str,
}

impl RegionPolicy {
    /// Whether a stream from region `from` to `service` in region `to` may pass, and the rule
    /// that decided (`default-deny` when none matched).
    pub fn decide(&self, from: &str, to: &str, service: &str) -> RegionDecision<'_> {
        let hit = |allow: bool| {
            self.rules
                .iter()
                .find(|r| r.allow == allow && r.matches(from, to, service))
        };
        if let Some(r) = hit(false) {
            return RegionDecision {
                allowed: false,
                rule: &r.name,
            };
        }
        match hit(true) {
            Some(r) => RegionDecision {
                allowed: true,
                rule: &r.name,
            },
            None => RegionDecision {
                allowed: false,
                rule: DEFAULT_DENY,
            },
        }
    }

    /// Decides as [`Self::decide`] and says why each rule matched or not, for the policy of the
    /// gateway of region `gateway`.
    pub fn explain(
        &self,
        gateway: &Region,
        from: &Region,
        to: &Region,
        service: &ServiceName,
    ) -> RegionExplanation {
        let d = self.decide(from, to, service);
        RegionExplanation {
            from: from.clone(),
            to: to.clone(),
            service: service.clone(),
            gateway: gateway.clone(),
            seen_as: SeenAs::of(gateway, from, to),
            allowed: d.allowed,
            rule: d.rule.to_string(),
            rules: self
                .rules
                .iter()
                .enumerate()
                .map(|(index, r)| RegionRuleVerdict {
                    index,
                    name: r.name.clone(),
                    allow: r.allow,
                    mismatch: r.mismatch(from, to, service),
                })
                .collect(),
        }
    }
}

/// How the gateway of a region meets a stream between two regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenAs {
    /// The stream leaves the gateway's region (it comes from one of the region's sidecars).
    Leaving,
    /// The stream arrives in the gateway's region (it comes from the source region's gateway).
    Arriving,
    /// Source and destination are one region: sidecars connect directly, no gateway carries it.
    SameRegion,
    /// Neither end is the gateway's region: it never sees the stream.
    Elsewhere,
}

impl SeenAs {
    /// How the gateway of region `gateway` meets a stream from `from` to `to`.
    pub fn of(gateway: &Region, from: &Region, to: &Region) -> SeenAs {
        if from == to {
            SeenAs::SameRegion
        } else if from == gateway {
            SeenAs::Leaving
        } else if to == gateway {
            SeenAs::Arriving
        } else {
            SeenAs::Elsewhere
        }
    }
}

/// One rule's verdict in an explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionRuleVerdict {
    /// Position among the config's `[[rule]]` tables (as `rule[N]` in config errors).
    pub index: usize,
    pub name: String,
    pub allow: bool,
    /// `None` if the rule matched, else why not.
    pub mismatch: Option<String>,
}

/// A region-level decision with every rule's verdict, for `policy explain --gateway`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionExplanation {
    pub from: Region,
    pub to: Region,
    pub service: ServiceName,
    /// The region of the gateway whose rules these are.
    pub gateway: Region,
    pub seen_as: SeenAs,
    pub allowed: bool,
    /// The deciding rule, or [`DEFAULT_DENY`].
    pub rule: String,
    pub rules: Vec<RegionRuleVerdict>,
}

/// Human-readable form of an explanation (the layout of [`super::eval::render`]).
pub fn render(e: &RegionExplanation) -> String {
    let mut out = String::new();
    let verdict = if e.allowed { "ALLOW" } else { "DENY" };
    let _ = writeln!(out, "decision: {verdict} by rule {:?}", e.rule);
    let (from, to, service, gw) = (&e.from, &e.to, &e.service, &e.gateway);
    let _ = writeln!(
        out,
        "stream: from region {from} to service {service} in region {to}"
    );
    let _ = match e.seen_as {
        SeenAs::Leaving => writeln!(out, "gateway {gw}: decides it as the stream leaves {gw}"),
        SeenAs::Arriving => writeln!(
            out,
            "gateway {gw}: decides it as the stream arrives in {gw}"
        ),
        SeenAs::SameRegion => writeln!(
            out,
            "note: one region: sidecars connect directly and no gateway sees this stream"
        ),
        SeenAs::Elsewhere => writeln!(
            out,
            "note: gateway {gw} never sees this stream; the gateways of {from} and {to} decide it"
        ),
    };
    let _ = writeln!(
        out,
        "order: deny rules, then allow rules, then {DEFAULT_DENY}"
    );
    for r in &e.rules {
        let action = if r.allow { "Allow" } else { "Deny" };
        let what = match &r.mismatch {
            None => "MATCHED".to_string(),
            Some(why) => format!("no match: {why}"),
        };
        let _ = writeln!(
            out,
            "  {:<8} {action} {:?}: {what}",
            format!("rule[{}]", r.index),
            r.name
        );
    }
    out
}

#[cfg(test)]
mod tests;
