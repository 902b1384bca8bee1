//! Which SPIFFE IDs each `trustline agent` may obtain for the workloads of its host.
//!
//! An agent joins like any workload (a join token for `spiffe://TD/trustline/agent/NODE`) and then
//! asks for its workloads' SVIDs and JWT-SVIDs with its own SVID as TLS client certificate. The CA
//! grants only what its own config registers for that agent (`[[agent]]` tables), so a host that
//! is taken over can obtain the identities registered to it and no others; everything else it
//! asks for is refused and audited. SPIRE's equivalent is the registration entry's parent ID.
//!
//! ```toml
//! [[agent]]
//! id = "spiffe://example.org/trustline/agent/node-1"
//! workloads = ["spiffe://example.org/ns/shop/sa/web", "spiffe://example.org/ns/batch/*"]
//! ```
//!
//! An agent ID is `spiffe://TD/trustline/agent/NODE` with one path segment NODE. A pattern is an
//! exact ID or an ID prefix with `/*`; it may not name trustline's own roles (`/trustline/...`)
//! nor another trust domain, and `*` alone (every ID) is refused: a registration names what it
//! grants.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::identity::ids::RESERVED_PREFIX;
use crate::identity::{parse_id, SpiffeId, TrustDomain};
use crate::policy::matchers::Principal;

/// The path prefix of agent IDs.
pub const AGENT_PATH_PREFIX: &str = "/trustline/agent/";
/// Most `[[agent]]` tables one CA reads.
pub const MAX_AGENTS: usize = 10_000;
/// Most patterns one agent may hold.
pub const MAX_PATTERNS: usize = 1_000;

/// One `[[agent]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub id: String,
    #[serde(default)]
    pub workloads: Vec<String>,
}

/// Whether `id` names an agent (`/trustline/agent/NODE`, NODE one non-empty segment).
pub fn is_agent_id(id: &SpiffeId) -> bool {
    id.path()
        .strip_prefix(AGENT_PATH_PREFIX)
        .is_some_and(|node| !node.is_empty() && !node.contains('/'))
}

/// The registrations, by agent ID.
#[derive(Clone, Debug, Default)]
pub struct AgentRegistry {
    agents: BTreeMap<String, Vec<Principal>>,
}

impl AgentRegistry {
    /// Validates the `[[agent]]` tables of `file` for trust domain `td`; every problem is named
    /// with its table index and key.
    pub fn from_file(
        tables: Vec<AgentFile>,
        td: &TrustDomain,
        file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        if tables.len() > MAX_AGENTS {
            return Err(ConfigError::field(
                file,
                "agent",
                format!("{} tables; at most {MAX_AGENTS}", tables.len()),
            ));
        }
        let mut agents = BTreeMap::new();
        for (i, t) in tables.into_iter().enumerate() {
            let at = |key: &str| format!("agent[{i}].{key}");
            let id =
                parse_id(&t.id).map_err(|e| ConfigError::field(file, &at("id"), e.to_string()))?;
            if !id.is_member_of(td) || !is_agent_id(&id) {
                return Err(ConfigError::field(
                    file,
                    &at("id"),
                    format!(
                        "{id} is not an agent ID of this CA (spiffe://{td}{AGENT_PATH_PREFIX}NODE)"
                    ),
                ));
            }
            if t.workloads.is_empty() {
                return Err(ConfigError::field(
                    file,
                    &at("workloads"),
                    "empty: list the SPIFFE IDs (or `prefix/*` patterns) this agent may obtain",
                ));
            }
            if t.workloads.len() > MAX_PATTERNS {
                return Err(ConfigError::field(
                    file,
                    &at("workloads"),
                    format!("{} patterns; at most {MAX_PATTERNS}", t.workloads.len()),
                ));
            }
            let mut patterns = Vec::with_capacity(t.workloads.len());
            for (j, w) in t.workloads.iter().enumerate() {
                let key = format!("agent[{i}].workloads[{j}]");
                patterns.push(pattern(w, td).map_err(|why| ConfigError::field(file, &key, why))?);
            }
            if agents.insert(id.to_string(), patterns).is_some() {
                return Err(ConfigError::field(
                    file,
                    &at("id"),
                    format!("{id} is registered twice: merge its tables"),
                ));
            }
        }
        Ok(AgentRegistry { agents })
    }

    /// Whether agent `agent` may obtain `id`. Never true for an ID under `/trustline/`.
    pub fn allows(&self, agent: &SpiffeId, id: &SpiffeId) -> bool {
        if id.path().starts_with(RESERVED_PREFIX) {
            return false;
        }
        let id = id.to_string();
        self.agents
            .get(&agent.to_string())
            .is_some_and(|ps| ps.iter().any(|p| p.matches(&id)))
    }

    /// Whether `agent` has a registration at all.
    pub fn knows(&self, agent: &SpiffeId) -> bool {
        self.agents.contains_key(&agent.to_string())
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

fn pattern(s: &str, td: &TrustDomain) -> Result<Principal, String> {
    let p = Principal::parse(s).map_err(|e| e.to_string())?;
    let text = match &p {
        Principal::Any => {
            return Err("`*` would grant every ID: name the IDs or an ID prefix".into());
        }
        Principal::Exact(t) | Principal::Prefix(t) => t.clone(),
    };
    let base = text.trim_end_matches('/');
    let id = parse_id(base).map_err(|e| e.to_string())?;
    if !id.is_member_of(td) {
        return Err(format!("{s} is not in trust domain {td}"));
    }
    if id.path().is_empty() {
        return Err(format!(
            "{s} would grant the whole trust domain: name a path prefix"
        ));
    }
    if format!("{}/", id.path()).starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "{s} names trustline's own roles ({RESERVED_PREFIX}...), which agents never obtain"
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        crate::identity::parse_trust_domain("example.org").unwrap()
    }

    fn reg(workloads: &[&str]) -> Result<AgentRegistry, ConfigError> {
        AgentRegistry::from_file(
            vec![AgentFile {
                id: "spiffe://example.org/trustline/agent/n1".into(),
                workloads: workloads.iter().map(|s| s.to_string()).collect(),
            }],
            &td(),
            None,
        )
    }

    fn id(s: &str) -> SpiffeId {
        parse_id(s).unwrap()
    }

    #[test]
    fn an_agent_obtains_what_is_registered_to_it_and_nothing_else() {
        let r = reg(&[
            "spiffe://example.org/ns/shop/sa/web",
            "spiffe://example.org/ns/batch/*",
        ])
        .unwrap();
        let n1 = id("spiffe://example.org/trustline/agent/n1");
        let n2 = id("spiffe://example.org/trustline/agent/n2");
        assert!(r.allows(&n1, &id("spiffe://example.org/ns/shop/sa/web")));
        assert!(r.allows(&n1, &id("spiffe://example.org/ns/batch/sa/job")));
        assert!(!r.allows(&n1, &id("spiffe://example.org/ns/shop/sa/web2")));
        assert!(!r.allows(&n1, &id("spiffe://example.org/ns/batchx/sa/a")));
        assert!(!r.allows(&n2, &id("spiffe://example.org/ns/shop/sa/web")));
        assert!(!r.allows(&n1, &id("spiffe://example.org/trustline/agent/n1")));
    }

    #[test]
    fn registrations_that_grant_too_much_are_refused_with_their_place() {
        for (bad, why) in [
            ("*", "every ID"),
            ("spiffe://example.org/*", "whole trust domain"),
            ("spiffe://other.org/ns/a/sa/b", "not in trust domain"),
            ("spiffe://example.org/trustline/*", "own roles"),
            ("spiffe://example.org/trustline/gateway/eu", "own roles"),
            ("spiffe://example.org/ns/*/sa/x", "*"),
        ] {
            let e = reg(&[bad]).unwrap_err().to_string();
            assert!(
                e.contains("agent[0].workloads[0]") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let e = reg(&[]).unwrap_err().to_string();
        assert!(
            e.contains("agent[0].workloads") && e.contains("empty"),
            "{e}"
        );
        let e = AgentRegistry::from_file(
            vec![AgentFile {
                id: "spiffe://example.org/ns/a/sa/b".into(),
                workloads: vec!["spiffe://example.org/ns/a/sa/c".into()],
            }],
            &td(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("agent[0].id") && e.contains("not an agent ID"),
            "{e}"
        );
    }

    #[test]
    fn agent_ids_have_one_node_segment() {
        assert!(is_agent_id(&id("spiffe://example.org/trustline/agent/n1")));
        assert!(!is_agent_id(&id(
            "spiffe://example.org/trustline/agent/n1/x"
        )));
        assert!(!is_agent_id(&id("spiffe://example.org/trustline/agentx")));
    }
}
