//! Table tests of policy evaluation: every field and the order of precedence, time injected.

use std::path::Path;

use jiff::Timestamp;

use super::eval::Http;
use super::matchers::PathPattern;
use super::*;

const FRONT: &str = "spiffe://example.org/ns/shop/sa/frontend";
const ADMIN: &str = "spiffe://example.org/ns/ops/sa/admin";
const LEGACY: &str = "spiffe://example.org/ns/web/sa/legacy";
const WEB: &str = "spiffe://example.org/ns/web/sa/portal";

const POLICY: &str = r#"
[service.checkout]
http_ports = [8080]

[[service.checkout.rule]]
name = "no-legacy"
action = "deny"
from = ["spiffe://example.org/ns/web/sa/legacy"]

[[service.checkout.rule]]
name = "no-deletes-from-web"
action = "deny"
from = ["spiffe://example.org/ns/web/*"]
methods = ["DELETE"]
ports = [8080]

[[service.checkout.rule]]
name = "frontend-api"
action = "allow"
from = ["spiffe://example.org/ns/shop/sa/frontend"]
ports = [8080]
methods = ["GET", "POST"]
paths = ["/api/*", "/healthz"]

[[service.checkout.rule]]
name = "web-any"
action = "allow"
from = ["spiffe://example.org/ns/web/*"]
not_from = ["spiffe://example.org/ns/web/sa/batch"]
ports = [8080]

[[service.checkout.rule]]
name = "ops-in-eu-office-hours"
action = "allow"
from = ["spiffe://example.org/ns/ops/*"]
ports = [9090]
regions = ["eu-west"]
hours = ["Mon-Fri 07:00-19:00 Europe/Berlin"]

[[service.checkout.rule]]
name = "trial-deny-post"
action = "deny"
mode = "dry-run"
from = ["*"]
ports = [8080]
methods = ["POST"]

[[service.checkout.rule]]
name = "watch-admin"
action = "audit"
from = ["spiffe://example.org/ns/ops/sa/admin"]

[service.open]

[service.mapping]
default = "audit"
"#;

fn policy() -> Policy {
    parse(POLICY, Path::new("test.toml")).unwrap()
}

/// Monday 2026-11-23 10:00 in Berlin is 09:00 UTC.
fn monday_10_berlin() -> Timestamp {
    "2026-11-23T09:00:00Z".parse().unwrap()
}

fn facts<'a>(
    peer: &'a str,
    port: u16,
    http: Option<(&'a str, &'a str)>,
    region: Option<&'a str>,
    at: Timestamp,
) -> Facts<'a> {
    Facts {
        peer,
        region,
        port,
        http: http.map(|(method, path)| Http { method, path }),
        at,
    }
}

#[test]
fn evaluation_table() {
    let p = policy();
    let svc = p.service("checkout").unwrap();
    let mon = monday_10_berlin();
    let sat: Timestamp = "2026-11-28T09:00:00Z".parse().unwrap();
    let mon_evening: Timestamp = "2026-11-23T18:30:00Z".parse().unwrap(); // 19:30 Berlin
    use Outcome::{Allow, Deny};
    let table: Vec<(Facts<'_>, Outcome, &str)> = vec![
        // exact principal, method and path prefix
        (
            facts(FRONT, 8080, Some(("GET", "/api/orders")), None, mon),
            Allow,
            "frontend-api",
        ),
        (
            facts(FRONT, 8080, Some(("GET", "/healthz")), None, mon),
            Allow,
            "frontend-api",
        ),
        (
            facts(FRONT, 8080, Some(("GET", "/admin")), None, mon),
            Deny,
            "default",
        ),
        (
            facts(FRONT, 8080, Some(("PUT", "/api/orders")), None, mon),
            Deny,
            "default",
        ),
        // an L7 allow never matches a bare connection
        (facts(FRONT, 8080, None, None, mon), Deny, "default"),
        // ports
        (
            facts(FRONT, 9999, Some(("GET", "/api/x")), None, mon),
            Deny,
            "default",
        ),
        // deny first, even though web-any would allow
        (facts(LEGACY, 8080, None, None, mon), Deny, "no-legacy"),
        (
            facts(WEB, 8080, Some(("DELETE", "/api/x")), None, mon),
            Deny,
            "no-deletes-from-web",
        ),
        (
            facts(WEB, 8080, Some(("GET", "/api/x")), None, mon),
            Allow,
            "web-any",
        ),
        // an L7 deny refuses a bare connection it cannot look into (fail closed)
        (
            facts(WEB, 8080, None, None, mon),
            Deny,
            "no-deletes-from-web",
        ),
        // not_from
        (
            facts(
                "spiffe://example.org/ns/web/sa/batch",
                8080,
                Some(("GET", "/api/x")),
                None,
                mon,
            ),
            Deny,
            "default",
        ),
        // prefix is per path segment: ns/webx is not under ns/web/
        (
            facts("spiffe://example.org/ns/webx/sa/a", 8080, None, None, mon),
            Deny,
            "default",
        ),
        // other trust domain with the same path
        (
            facts("spiffe://other.org/ns/web/sa/portal", 8080, None, None, mon),
            Deny,
            "default",
        ),
        // regions and hours
        (
            facts(ADMIN, 9090, None, Some("eu-west"), mon),
            Allow,
            "ops-in-eu-office-hours",
        ),
        (
            facts(ADMIN, 9090, None, Some("us-east"), mon),
            Deny,
            "default",
        ),
        (facts(ADMIN, 9090, None, None, mon), Deny, "default"),
        (
            facts(ADMIN, 9090, None, Some("eu-west"), sat),
            Deny,
            "default",
        ),
        (
            facts(ADMIN, 9090, None, Some("eu-west"), mon_evening),
            Deny,
            "default",
        ),
    ];
    for (f, outcome, rule) in table {
        let d = evaluate(svc, &f);
        assert_eq!((d.outcome, d.rule), (outcome, rule), "{f:?}");
    }
}

#[test]
fn dry_run_and_audit_rules_report_without_enforcing() {
    let p = policy();
    let svc = p.service("checkout").unwrap();
    let d = evaluate(
        svc,
        &facts(
            FRONT,
            8080,
            Some(("POST", "/api/pay")),
            None,
            monday_10_berlin(),
        ),
    );
    assert_eq!((d.outcome, d.rule), (Outcome::Allow, "frontend-api"));
    assert_eq!(d.dry_run, vec![("trial-deny-post", Outcome::Deny)]);
    assert!(!d.audit);
    let d = evaluate(
        svc,
        &facts(ADMIN, 9090, None, Some("eu-west"), monday_10_berlin()),
    );
    assert!(d.audit, "the audit rule matched");
}

#[test]
fn defaults_allow_without_allow_rules_and_audit_allows_and_logs() {
    let p = policy();
    let at = monday_10_berlin();
    let d = evaluate(p.service("open").unwrap(), &facts(FRONT, 1, None, None, at));
    assert_eq!(
        (d.outcome, d.rule, d.audit),
        (Outcome::Allow, "default", false)
    );
    let d = evaluate(
        p.service("mapping").unwrap(),
        &facts(FRONT, 1, None, None, at),
    );
    assert_eq!(
        (d.outcome, d.rule, d.audit),
        (Outcome::Allow, "default", true)
    );
    assert_eq!(p.service("checkout").unwrap().default, DefaultAction::Deny);
}

#[test]
fn time_windows_wrap_midnight_and_respect_zones() {
    use super::matchers::TimeWindow;
    let w = TimeWindow::parse("Fri 22:00-06:00 UTC").unwrap();
    let at = |s: &str| s.parse::<Timestamp>().unwrap();
    assert!(w.contains(at("2026-11-27T23:00:00Z"))); // Friday night
    assert!(w.contains(at("2026-11-28T05:59:00Z"))); // Saturday early, Friday's window
    assert!(!w.contains(at("2026-11-28T06:00:00Z")));
    assert!(!w.contains(at("2026-11-28T23:00:00Z"))); // Saturday night
    let ny = TimeWindow::parse("Mon-Fri 09:00-17:00 America/New_York").unwrap();
    assert!(ny.contains(at("2026-11-23T14:30:00Z"))); // 09:30 EST
    assert!(!ny.contains(at("2026-11-23T13:30:00Z"))); // 08:30 EST
    for bad in [
        "Mon 07:00",
        "Funday 07:00-08:00 UTC",
        "Mon 25:00-26:00 UTC",
        "Mon 07:00-08:00 Mars/Base",
        "Mon 08:00-08:00 UTC",
    ] {
        assert!(TimeWindow::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn check_reports_every_error_with_line_rule_and_field() {
    let text = r#"
[service.a]
http_ports = [80]

[[service.a.rule]]
name = "bad-id"
action = "allow"
from = ["spiffe://example.org/ns//sa/x", "spiffe://example.org/ns/*/sa/x"]

[[service.a.rule]]
name = "bad-window"
action = "allow"
hours = ["Mon 9-5"]

[[service.a.rule]]
name = "l7-on-tcp"
action = "allow"
ports = [5432]
methods = ["GET"]

[[service.a.rule]]
name = "never"
action = "allow"
from = ["spiffe://example.org/ns/a/sa/b"]
not_from = ["spiffe://example.org/ns/a/*"]

[[service.a.rule]]
name = "bad-action"
action = "permit"
"#;
    let err = parse(text, Path::new("p.toml")).unwrap_err();
    let find = |rule: &str, field: &str| {
        err.issues
            .iter()
            .find(|i| i.rule.as_deref() == Some(rule) && i.field.starts_with(field))
            .unwrap_or_else(|| panic!("no issue for {rule}/{field}: {err}"))
    };
    assert_eq!(find("bad-id", "from[0]").line, 5);
    assert!(find("bad-id", "from[1]").message.contains('*'));
    assert_eq!(find("bad-window", "hours[0]").line, 10);
    assert!(find("l7-on-tcp", "methods").message.contains("never match"));
    assert!(find("never", "from").message.contains("not_from"));
    assert!(find("bad-action", "action").message.contains("permit"));
    let text = err.to_string();
    assert!(
        text.contains("p.toml:5: error: service a, rule \"bad-id\", from[0]"),
        "{text}"
    );

    let unknown = parse("[service.a]\nfoo = 1\n", Path::new("u.toml")).unwrap_err();
    assert_eq!(unknown.issues[0].line, 2);
    assert!(unknown.to_string().contains("foo"), "{unknown}");
}

#[test]
fn an_allow_shadowed_by_a_deny_is_a_warning() {
    let text = r#"
[[service.a.rule]]
name = "deny-web"
action = "deny"
from = ["spiffe://example.org/ns/web/*"]

[[service.a.rule]]
name = "allow-portal"
action = "allow"
from = ["spiffe://example.org/ns/web/sa/portal"]
"#;
    let p = parse(text, Path::new("s.toml")).unwrap();
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(p.warnings[0].rule.as_deref(), Some("allow-portal"));
    assert!(p.warnings[0].message.contains("deny-web"));
}

#[test]
fn explain_says_why_each_rule_did_not_match() {
    let p = policy();
    let e = explain(
        p.service("checkout").unwrap(),
        &facts(
            FRONT,
            8080,
            Some(("GET", "/admin")),
            None,
            monday_10_berlin(),
        ),
    );
    assert_eq!((e.outcome, e.rule.as_str()), (Outcome::Deny, "default"));
    let api = e.rules.iter().find(|r| r.name == "frontend-api").unwrap();
    assert!(
        api.mismatch.as_deref().unwrap().contains("path /admin"),
        "{:?}",
        api.mismatch
    );
    let legacy = e.rules.iter().find(|r| r.name == "no-legacy").unwrap();
    assert!(legacy.mismatch.as_deref().unwrap().contains("not in from"));
}

#[test]
fn large_lists_stay_indexed() {
    // 10,000 rules of one principal each, and one rule of 10,000 principals.
    let mut text = String::from("[service.big]\n");
    for i in 0..10_000 {
        text.push_str(&format!("[[service.big.rule]]\nname = \"r{i}\"\naction = \"allow\"\nfrom = [\"spiffe://example.org/ns/n{i}/sa/s\"]\n"));
    }
    let p = parse(&text, Path::new("big.toml")).unwrap();
    let svc = p.service("big").unwrap();
    let d = evaluate(
        svc,
        &facts(
            "spiffe://example.org/ns/n9999/sa/s",
            1,
            None,
            None,
            monday_10_berlin(),
        ),
    );
    assert_eq!(d.rule, "r9999");
    let d = evaluate(
        svc,
        &facts(
            "spiffe://example.org/ns/n10000/sa/s",
            1,
            None,
            None,
            monday_10_berlin(),
        ),
    );
    assert_eq!((d.outcome, d.rule), (Outcome::Deny, "default"));
}

/// F13: a deny on methods or paths must not be escaped by reaching the service on a port whose
/// requests are not parsed.
#[test]
fn an_l7_deny_refuses_connections_on_ports_without_http() {
    let text = format!(
        r#"
[service.a]
http_ports = [8080]

[[service.a.rule]]
name = "no-admin"
action = "deny"
paths = ["/admin/*"]

[[service.a.rule]]
name = "frontend"
action = "allow"
from = ["{FRONT}"]
"#
    );
    let p = parse(&text, Path::new("a.toml")).unwrap();
    let svc = p.service("a").unwrap();
    let mon = monday_10_berlin();
    let decide = |port, http| {
        let d = evaluate(svc, &facts(FRONT, port, http, None, mon));
        (d.outcome, d.rule)
    };
    assert_eq!(decide(9000, None), (Outcome::Deny, "no-admin"));
    assert_eq!(
        decide(8080, Some(("GET", "/api/x"))),
        (Outcome::Allow, "frontend")
    );
    assert_eq!(
        decide(8080, Some(("GET", "/admin/x"))),
        (Outcome::Deny, "no-admin")
    );
    let w = &p.warnings;
    assert!(
        w.iter()
            .any(|i| i.rule.as_deref() == Some("no-admin")
                && i.message.contains("whole connections")),
        "{w:?}"
    );
}

#[test]
fn methods_are_case_sensitive_for_allows_and_any_case_for_denies() {
    let text = r#"
[service.a]
http_ports = [80]

[[service.a.rule]]
name = "no-deletes"
action = "deny"
methods = ["DELETE"]

[[service.a.rule]]
name = "reads"
action = "allow"
methods = ["get", "M-SEARCH"]
"#;
    let p = parse(text, Path::new("m.toml")).unwrap();
    let svc = p.service("a").unwrap();
    let decide = |method| {
        let d = evaluate(
            svc,
            &facts(FRONT, 80, Some((method, "/")), None, monday_10_berlin()),
        );
        (d.outcome, d.rule)
    };
    assert_eq!(decide("GET"), (Outcome::Allow, "reads"));
    assert_eq!(decide("M-SEARCH"), (Outcome::Allow, "reads"));
    assert_eq!(decide("get"), (Outcome::Deny, "default"));
    assert_eq!(decide("DELETE"), (Outcome::Deny, "no-deletes"));
    assert_eq!(decide("delete"), (Outcome::Deny, "no-deletes"));
    assert_eq!(decide("DeLeTe"), (Outcome::Deny, "no-deletes"));
    let bad = parse(
        "[service.a]\nhttp_ports = [80]\n[[service.a.rule]]\nname = \"x\"\naction = \"deny\"\nmethods = [\"GE T\"]\n",
        Path::new("b.toml"),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("token"), "{bad}");
}

#[test]
fn a_directory_prefix_covers_the_directory_itself() {
    let admin = PathPattern::parse("/admin/*").unwrap();
    for p in ["/admin", "/admin/", "/admin/x", "/admin/x/y"] {
        assert!(admin.matches(p), "{p}");
    }
    for p in ["/administrator", "/admi", "/", "/Admin/x"] {
        assert!(!admin.matches(p), "{p}");
    }
    let adm = PathPattern::parse("/adm*").unwrap();
    assert!(adm.matches("/admin") && adm.matches("/adm") && !adm.matches("/ad"));
    let exact = PathPattern::parse("/admin").unwrap();
    assert!(exact.matches("/admin") && !exact.matches("/admin/"));
    assert!(PathPattern::parse("*").unwrap().matches("/anything"));
    assert!(PathPattern::parse("/*").unwrap().matches("/"));
}

#[test]
fn patterns_must_be_in_normal_form() {
    for (bad, hint) in [
        ("/api/../x", "\"/x\""),
        ("//admin/*", "\"/admin/*\""),
        ("/%61dmin/*", "\"/admin/*\""),
        ("/a/./b", "\"/a/b\""),
        ("/a%2fb", "encoded slash"),
        ("/a b", "not allowed"),
    ] {
        let e = PathPattern::parse(bad).unwrap_err().to_string();
        assert!(e.contains(hint), "{bad}: {e}");
    }
    for good in [
        "/api/.well-known/*",
        "/api/.*",
        "/api/..x",
        "/a%2Bb",
        "/a;v=1/*",
        "/",
    ] {
        PathPattern::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn path_options_are_read_per_service_and_default_to_refuse() {
    use super::path::{Semicolons, Slashes};
    let p = parse(
        "[service.a]\npath_slashes = \"decode\"\npath_semicolons = \"keep\"\n[service.b]\n",
        Path::new("o.toml"),
    )
    .unwrap();
    let a = p.service("a").unwrap().paths;
    assert_eq!(
        (a.slashes, a.semicolons),
        (Slashes::Decode, Semicolons::Keep)
    );
    let b = p.service("b").unwrap().paths;
    assert_eq!(
        (b.slashes, b.semicolons),
        (Slashes::Refuse, Semicolons::Refuse)
    );
    let bad = parse(
        "[service.a]\npath_slashes = \"merge\"\n",
        Path::new("o.toml"),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("path_slashes: \"merge\""), "{bad}");
}

/// The texts `policy check` prints for a bad matcher (after `field[i]: `), byte for byte.
#[test]
fn matcher_errors_keep_their_texts() {
    use super::matchers::Principal;
    let principal = |s| Principal::parse(s).unwrap_err().to_string();
    assert_eq!(
        principal("spiffe://example.org/a*b"),
        "\"spiffe://example.org/a*b\": `*` is only allowed alone or as a trailing `/*` segment"
    );
    // A bad ID shows the identity module's own message, unchanged.
    assert_eq!(
        principal("https://example.org/x"),
        crate::identity::parse_workload_id("https://example.org/x")
            .unwrap_err()
            .to_string()
    );
    let path = |s| PathPattern::parse(s).unwrap_err().to_string();
    assert_eq!(path("api/*"), "\"api/*\": a path starts with `/`");
    assert_eq!(path("/a*b"), "\"/a*b\": `*` is only allowed at the end");
    assert_eq!(path("/a*/b*"), "\"/a*/b*\": `*` is only allowed at the end");
    assert_eq!(
        path("//admin/*"),
        "\"//admin/*\": requests are matched in normal form, so this never matches; write \"/admin/*\""
    );
    assert_eq!(
        path("/a b"),
        "\"/a b\": no request path can match this: byte 0x20 at byte 2 is not allowed in a path"
    );
    let window = |s| TimeWindow::parse(s).unwrap_err().to_string();
    for (bad, want) in [
        (
            "Mon",
            "\"Mon\": expected \"Mon-Fri 07:00-19:00 Europe/Berlin\"",
        ),
        (
            "Funday 07:00-08:00",
            "\"Funday 07:00-08:00\": \"Funday\" is not a weekday (Mon..Sun)",
        ),
        (
            "Mon 0700",
            "\"Mon 0700\": expected a time range like 07:00-19:00",
        ),
        ("Mon 7-08:00", "\"Mon 7-08:00\": \"7\" is not HH:MM"),
        (
            "Mon 25:00-26:00",
            "\"Mon 25:00-26:00\": \"25:00\" is not a time of day",
        ),
        (
            "Mon 08:00-08:00 UTC",
            "\"Mon 08:00-08:00 UTC\": the window is empty (start equals end)",
        ),
    ] {
        assert_eq!(window(bad), want);
    }
    let zone = window("Mon 07:00-08:00 Mars/Base");
    assert!(
        zone.starts_with("\"Mon 07:00-08:00 Mars/Base\": unknown time zone \"Mars/Base\": "),
        "{zone}"
    );
}

/// The texts of bad `methods` and `regions` entries and of the rule-level fields, byte for byte.
#[test]
fn entry_errors_keep_their_texts() {
    let text = r#"
[service.a]
default = "maybe"

[[service.a.rule]]
name = "r"
action = "permit"
mode = "sometimes"
methods = ["G ET"]
regions = ["EU WEST"]
"#;
    let err = parse(text, Path::new("p.toml")).unwrap_err();
    let message = |field: &str| {
        let i = err.issues.iter().find(|i| i.field == field);
        i.unwrap_or_else(|| panic!("no issue for {field}: {err}"))
            .message
            .clone()
    };
    assert_eq!(
        message("default"),
        "\"maybe\": expected \"deny\", \"allow\" or \"audit\""
    );
    assert_eq!(
        message("action"),
        "\"permit\": expected \"allow\", \"deny\" or \"audit\""
    );
    assert_eq!(
        message("mode"),
        "\"sometimes\": expected \"enforce\" or \"dry-run\""
    );
    assert_eq!(
        message("methods[0]"),
        "\"G ET\" is not an HTTP method (a token, RFC 9110)"
    );
    let why = crate::region::Region::new("EU WEST").unwrap_err();
    assert_eq!(message("regions[0]"), format!("region \"EU WEST\": {why}"));
}

// ---------------------------------------------------------------------------------------------
// `jwt` conditions
// ---------------------------------------------------------------------------------------------

const GATEWAY: &str = "spiffe://example.org/ns/edge/sa/gateway";

const JWT_POLICY: &str = r#"
[service.api]
http_ports = [8080, 8081]

[[service.api.rule]]
name = "no-us-tokens-on-admin"
action = "deny"
paths = ["/admin/*"]
jwt = { audiences = ["api"], regions = ["us-east"] }

[[service.api.rule]]
name = "web-via-gateway"
action = "allow"
from = ["spiffe://example.org/ns/edge/sa/gateway"]
jwt = { audiences = ["api", "api-v2"], regions = ["eu-west", "eu-north"], from = ["spiffe://example.org/ns/web/*"] }

[[service.api.rule]]
name = "batch-any-region"
action = "allow"
ports = [8081]
jwt = { audiences = ["batch"], from = ["spiffe://example.org/ns/ops/sa/batch"] }

[[service.api.rule]]
name = "health"
action = "allow"
paths = ["/healthz"]
"#;

fn verified(sub: &str, region: Option<&str>, aud: &[&str]) -> JwtFacts {
    JwtFacts::Verified(VerifiedJwt {
        sub: sub.to_string(),
        region: region.map(|r| crate::region::Region::new(r).unwrap()),
        aud: aud.iter().map(|a| a.to_string()).collect(),
    })
}

#[test]
fn jwt_conditions_decide_on_the_verified_sub_region_and_audience() {
    let p = parse(JWT_POLICY, Path::new("jwt.toml")).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let svc = p.service("api").unwrap();
    assert!(svc.reads_jwt());
    assert_eq!(svc.jwt_audiences, ["api", "api-v2", "batch"]);
    assert!(!svc.jwt_forward);
    let mon = monday_10_berlin();
    let decide = |peer: &str, port: u16, path: &str, jwt: JwtFacts| {
        let f = facts(peer, port, Some(("GET", path)), None, mon);
        let d = evaluate_with(svc, &f, &jwt);
        (d.outcome, d.rule.to_string())
    };
    let allow = |r: &str| (Outcome::Allow, r.to_string());
    let deny = |r: &str| (Outcome::Deny, r.to_string());
    let good = || verified(WEB, Some("eu-west"), &["api"]);
    assert_eq!(
        decide(GATEWAY, 8080, "/x", good()),
        allow("web-via-gateway")
    );
    // any of the rule's audiences, whichever the token names first
    let v2 = verified(WEB, Some("eu-north"), &["other", "api-v2"]);
    assert_eq!(decide(GATEWAY, 8080, "/x", v2), allow("web-via-gateway"));
    // the mTLS peer still has to be the gateway
    assert_eq!(decide(FRONT, 8080, "/x", good()), deny("default"));
    // wrong audience, region, none, subject
    let table = [
        verified(WEB, Some("eu-west"), &["batch"]),
        verified(WEB, Some("us-east"), &["api"]),
        verified(WEB, None, &["api"]),
        verified(FRONT, Some("eu-west"), &["api"]),
        JwtFacts::Refused("no Authorization header".into()),
        JwtFacts::Refused("expired at 2026-11-23T08:00:00Z".into()),
    ];
    for jwt in table {
        assert_eq!(
            decide(GATEWAY, 8080, "/x", jwt.clone()),
            deny("default"),
            "{jwt:?}"
        );
    }
    // a rule without a jwt condition does not care about tokens
    let none = JwtFacts::Refused("no Authorization header".into());
    assert_eq!(decide(FRONT, 8080, "/healthz", none), allow("health"));
    // regions empty: a token without a verified region (a federated key) matches
    let batch = verified(BATCH_ID, None, &["batch"]);
    assert_eq!(
        decide(FRONT, 8081, "/run", batch.clone()),
        allow("batch-any-region")
    );
    assert_eq!(
        decide(FRONT, 8080, "/run", batch),
        deny("default"),
        "ports still apply"
    );
    // evaluate without facts: no token was read, jwt rules never match
    let f = facts(GATEWAY, 8080, Some(("GET", "/x")), None, mon);
    assert_eq!(evaluate(svc, &f).rule, "default");
}

const BATCH_ID: &str = "spiffe://example.org/ns/ops/sa/batch";

#[test]
fn a_deny_with_jwt_matches_only_a_valid_token_and_never_a_connection() {
    let p = parse(JWT_POLICY, Path::new("jwt.toml")).unwrap();
    let svc = p.service("api").unwrap();
    let mon = monday_10_berlin();
    let us = verified(WEB, Some("us-east"), &["api"]);
    let d = evaluate_with(
        svc,
        &facts(GATEWAY, 8080, Some(("GET", "/admin/x")), None, mon),
        &us,
    );
    assert_eq!(
        (d.outcome, d.rule),
        (Outcome::Deny, "no-us-tokens-on-admin")
    );
    // an invalid token does not make the deny match (the allow rules then decide: default deny)
    let bad = JwtFacts::Refused("JWT signature: does not verify".into());
    let d = evaluate_with(
        svc,
        &facts(GATEWAY, 8080, Some(("GET", "/admin/x")), None, mon),
        &bad,
    );
    assert_eq!((d.outcome, d.rule), (Outcome::Deny, "default"));
    // a connection (no request) matches no jwt rule, deny or allow
    let d = evaluate_with(svc, &facts(GATEWAY, 8080, None, None, mon), &us);
    assert_eq!(d.rule, "default");
    let e = explain_with(svc, &facts(GATEWAY, 8080, None, None, mon), &us);
    let deny = e
        .rules
        .iter()
        .find(|r| r.name == "no-us-tokens-on-admin")
        .unwrap();
    assert!(
        deny.mismatch
            .as_deref()
            .unwrap()
            .contains("this is a connection"),
        "{deny:?}"
    );
    // so a jwt deny does not refuse the caller's connections up front
    assert!(reach::could_admit(svc, GATEWAY, None, 8080));
}

#[test]
fn explain_says_why_the_jwt_condition_failed() {
    let p = parse(JWT_POLICY, Path::new("jwt.toml")).unwrap();
    let svc = p.service("api").unwrap();
    let f = facts(GATEWAY, 8080, Some(("GET", "/x")), None, monday_10_berlin());
    let why = |jwt: JwtFacts| {
        let e = explain_with(svc, &f, &jwt);
        let r = e
            .rules
            .iter()
            .find(|r| r.name == "web-via-gateway")
            .unwrap();
        r.mismatch.clone().unwrap_or_default()
    };
    let expired = JwtFacts::Refused("expired at 2026-11-23T08:00:00Z".into());
    assert_eq!(why(expired), "jwt: expired at 2026-11-23T08:00:00Z");
    let missing = JwtFacts::Refused("no Authorization header".into());
    assert_eq!(why(missing), "jwt: no Authorization header");
    assert_eq!(
        why(verified(WEB, Some("us-east"), &["api"])),
        "jwt: region us-east not in [\"eu-west\", \"eu-north\"]"
    );
    assert!(why(verified(WEB, None, &["api"])).contains("no verified region"));
    assert_eq!(
        why(verified(WEB, Some("eu-west"), &["batch"])),
        "jwt: aud [\"batch\"] has none of [\"api\", \"api-v2\"]"
    );
    assert_eq!(
        why(verified(FRONT, Some("eu-west"), &["api"])),
        format!("jwt: sub {FRONT} not in from [\"spiffe://example.org/ns/web/*\"]")
    );
    assert_eq!(why(verified(WEB, Some("eu-west"), &["api"])), "");
    let e = explain_with(svc, &f, &verified(WEB, Some("eu-west"), &["api"]));
    assert!(super::eval::render(&e).contains("\"web-via-gateway\": MATCHED"));
}

#[test]
fn jwt_conditions_are_checked_when_the_file_is() {
    let text = r#"
[service.a]
http_ports = [8080]

[[service.a.rule]]
name = "no-audiences"
action = "allow"
jwt = { regions = ["eu-west"] }

[[service.a.rule]]
name = "empty-audiences"
action = "allow"
jwt = { audiences = [] }

[[service.a.rule]]
name = "blank-audience"
action = "allow"
jwt = { audiences = [""] }

[[service.a.rule]]
name = "on-tcp"
action = "deny"
ports = [8080, 5432]
jwt = { audiences = ["a"] }

[[service.a.rule]]
name = "bad-entries"
action = "allow"
jwt = { audiences = ["a"], regions = ["EU West"], from = ["spiffe://example.org/ns/*/x"] }

[service.b]

[[service.b.rule]]
name = "no-http"
action = "allow"
jwt = { audiences = ["b"] }
"#;
    let err = parse(text, Path::new("j.toml")).unwrap_err();
    let find = |rule: &str, field: &str| {
        err.issues
            .iter()
            .find(|i| i.rule.as_deref() == Some(rule) && i.field == field)
            .unwrap_or_else(|| panic!("no issue for {rule}/{field}: {err}"))
            .message
            .clone()
    };
    assert!(find("no-audiences", "jwt.audiences").contains("required"));
    assert!(find("empty-audiences", "jwt.audiences").contains("at least one"));
    assert!(find("blank-audience", "jwt.audiences[0]").contains("1 to 1024 bytes"));
    let tcp = find("on-tcp", "jwt");
    assert!(
        tcp.starts_with("jwt needs an HTTP port: add the port to http_ports"),
        "{tcp}"
    );
    assert!(tcp.contains("[5432]"), "{tcp}");
    assert!(find("bad-entries", "jwt.regions[0]").contains("EU West"));
    assert!(find("bad-entries", "jwt.from[0]").contains('*'));
    let none = find("no-http", "jwt");
    assert!(none.contains("no http_ports"), "{none}");
    assert!(
        err.to_string()
            .contains("j.toml:20: error: service a, rule \"on-tcp\", jwt: jwt needs an HTTP port"),
        "{err}"
    );

    let unknown = "[service.a]\nhttp_ports = [80]\n[[service.a.rule]]\nname = \"x\"\naction = \"allow\"\njwt = { audience = [\"a\"] }\n";
    let err = parse(unknown, Path::new("u.toml")).unwrap_err();
    assert!(err.to_string().contains("audience"), "{err}");
    assert_eq!(err.issues[0].line, 6, "{err}");
}

#[test]
fn services_without_jwt_rules_read_no_tokens() {
    let p = policy();
    for svc in p.services.values() {
        assert!(!svc.reads_jwt(), "{}", svc.name);
    }
    let fwd = "[service.a]\nhttp_ports = [80]\njwt_forward = true\n[[service.a.rule]]\nname = \"x\"\naction = \"allow\"\njwt = { audiences = [\"a\", \"a\"] }\n";
    let p = parse(fwd, Path::new("f.toml")).unwrap();
    let svc = p.service("a").unwrap();
    assert!(svc.jwt_forward);
    assert_eq!(svc.jwt_audiences, ["a"]);
}

#[test]
fn a_deny_with_jwt_does_not_shadow_an_allow() {
    let text = r#"
[service.a]
http_ports = [80]

[[service.a.rule]]
name = "deny-us-tokens"
action = "deny"
jwt = { audiences = ["a"], regions = ["us-east"] }

[[service.a.rule]]
name = "allow-all"
action = "allow"
"#;
    let p = parse(text, Path::new("s.toml")).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}
