//! Whether a caller could ever be admitted to a service on a port, whatever the time and
//! whatever HTTP requests it sends. A sidecar asks this before it accepts a multiplexed session
//! (all of whose streams go to one port): a caller every stream of which would be denied gets no
//! session, so it cannot hold one open and make the sidecar decide and audit stream after stream.

use super::{Action, DefaultAction, Mode, Rule, ServicePolicy};

/// `false` only when every connection or request of `peer` (from `region`) to `port` is denied
/// under `svc`: an enforced deny rule with no time window and no HTTP condition concerns it, or
/// the default is deny and no enforced allow rule concerns it at any time. Conservative: `true`
/// whenever some time or request could be allowed.
pub fn could_admit(svc: &ServicePolicy, peer: &str, region: Option<&str>, port: u16) -> bool {
    let concerns = |r: &Rule| {
        r.mode == Mode::Enforce
            && (r.from.is_empty() || r.from.iter().any(|p| p.matches(peer)))
            && !r.not_from.iter().any(|p| p.matches(peer))
            && (r.ports.is_empty() || r.ports.contains(&port))
            && (r.regions.is_empty() || region.is_some_and(|g| r.regions.iter().any(|x| x == g)))
    };
    // An HTTP condition only narrows a deny on a port where requests are parsed; elsewhere the
    // deny refuses the whole connection (fail closed). A jwt condition always narrows: such a
    // deny matches only requests with a valid token.
    let unconditional = |r: &Rule| {
        r.hours.is_empty() && r.jwt.is_none() && (!r.is_l7() || !svc.http_ports.contains(&port))
    };
    let always_denied = svc
        .rules
        .iter()
        .any(|r| r.action == Action::Deny && unconditional(r) && concerns(r));
    if always_denied {
        return false;
    }
    svc.default != DefaultAction::Deny
        || svc
            .rules
            .iter()
            .any(|r| r.action == Action::Allow && concerns(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(rules: &str) -> crate::policy::Policy {
        let text = format!("[service.api]\nhttp_ports = [8080]\n{rules}");
        crate::policy::parse(&text, std::path::Path::new("test.toml")).expect("valid policy")
    }

    fn could(p: &crate::policy::Policy, peer: &str, region: Option<&str>, port: u16) -> bool {
        could_admit(p.service("api").unwrap(), peer, region, port)
    }

    const WEB: &str = "spiffe://t.test/ns/shop/sa/web";
    const BATCH: &str = "spiffe://t.test/ns/ops/sa/batch";

    #[test]
    fn only_callers_no_rule_can_ever_admit_are_refused() {
        let p = service(
            r#"
[[service.api.rule]]
name = "shop-in-office-hours"
action = "allow"
from = ["spiffe://t.test/ns/shop/*"]
regions = ["eu"]
hours = ["Mon-Fri 09:00-17:00 UTC"]

[[service.api.rule]]
name = "no-deletes"
action = "deny"
from = ["spiffe://t.test/ns/shop/*"]
methods = ["DELETE"]
"#,
        );
        assert!(could(&p, WEB, Some("eu"), 8080), "allowed at some hours");
        assert!(!could(&p, WEB, Some("us"), 8080), "no rule for region us");
        assert!(!could(&p, WEB, None, 8080), "no region at all");
        assert!(!could(&p, BATCH, Some("eu"), 8080), "no rule for ops");
        assert!(
            !could(&p, WEB, Some("eu"), 9000),
            "the DELETE deny refuses whole connections on a port without HTTP"
        );
    }

    #[test]
    fn an_unconditional_deny_refuses_and_a_conditional_one_does_not() {
        let p = service(
            r#"
[[service.api.rule]]
name = "everyone"
action = "allow"

[[service.api.rule]]
name = "not-batch"
action = "deny"
from = ["spiffe://t.test/ns/ops/sa/batch"]

[[service.api.rule]]
name = "not-web-at-night"
action = "deny"
from = ["spiffe://t.test/ns/shop/sa/web"]
hours = ["Mon-Sun 00:00-06:00 UTC"]
"#,
        );
        assert!(!could(&p, BATCH, Some("eu"), 8080));
        assert!(could(&p, WEB, Some("eu"), 8080));
    }
}
