//! Table tests of the region-level engine: deny first, then allow, then default deny; `*`;
//! each field; every decision names its rule; the explanation says why.

use super::*;

fn region(s: &str) -> Region {
    Region::new(s).unwrap()
}

fn regions(v: &[&str]) -> Match<Region> {
    match v {
        ["*"] => Match::Any,
        v => Match::Names(v.iter().map(|s| region(s)).collect()),
    }
}

fn services(v: &[&str]) -> Match<ServiceName> {
    match v {
        ["*"] => Match::Any,
        v => Match::Names(v.iter().map(|s| ServiceName::new(s).unwrap()).collect()),
    }
}

fn rule(name: &str, allow: bool, from: &[&str], to: &[&str], svc: &[&str]) -> RegionRule {
    RegionRule {
        name: name.into(),
        allow,
        from: regions(from),
        to: regions(to),
        services: services(svc),
    }
}

/// The rules of `config/gateway.toml` (gateway eu-west) plus a deny on one service.
fn policy() -> RegionPolicy {
    RegionPolicy {
        rules: vec![
            rule("eu-out", true, &["eu-west"], &["*"], &["*"]),
            rule(
                "us-to-checkout",
                true,
                &["us-east"],
                &["eu-west"],
                &["checkout"],
            ),
            rule("no-ap", false, &["ap-south"], &["*"], &["*"]),
            rule("no-ledger", false, &["*"], &["*"], &["ledger"]),
            rule(
                "us-ap-to-web",
                true,
                &["us-east", "ap-south"],
                &["eu-west", "us-east"],
                &["web", "checkout"],
            ),
        ],
    }
}

#[test]
fn decisions_name_their_rule() {
    let p = policy();
    // (from, to, service, allowed, rule)
    let table = [
        // allow: the first allow rule that matches, in file order
        ("eu-west", "us-east", "anything", true, "eu-out"),
        ("us-east", "eu-west", "checkout", true, "us-to-checkout"),
        ("us-east", "eu-west", "web", true, "us-ap-to-web"),
        // deny rules come first, whatever the file order: no-ap is after the allows ...
        ("ap-south", "eu-west", "web", false, "no-ap"),
        // ... and a deny on a service beats an allow of `*`
        ("eu-west", "us-east", "ledger", false, "no-ledger"),
        ("us-east", "eu-west", "ledger", false, "no-ledger"),
        // unmatched: default deny
        ("us-east", "eu-west", "db", false, DEFAULT_DENY),
        ("us-east", "ap-south", "checkout", false, DEFAULT_DENY),
        ("sa-east", "eu-west", "checkout", false, DEFAULT_DENY),
    ];
    for (from, to, service, allowed, rule) in table {
        assert_eq!(
            p.decide(from, to, service),
            RegionDecision { allowed, rule },
            "{from} -> {service} in {to}"
        );
    }
}

#[test]
fn no_rules_deny_by_default_named_default_deny() {
    assert_eq!(
        RegionPolicy::default().decide("eu", "us", "web"),
        RegionDecision {
            allowed: false,
            rule: "default-deny"
        }
    );
}

#[test]
fn each_field_must_match() {
    let p = RegionPolicy {
        rules: vec![rule("only", true, &["a"], &["b"], &["api"])],
    };
    let only = RegionDecision {
        allowed: true,
        rule: "only",
    };
    assert_eq!(p.decide("a", "b", "api"), only);
    for (from, to, service) in [("x", "b", "api"), ("a", "x", "api"), ("a", "b", "x")] {
        assert_eq!(p.decide(from, to, service).rule, DEFAULT_DENY);
    }
    // Names match exactly: no prefixes, no case folding.
    for (from, to, service) in [("a-1", "b", "api"), ("a", "b", "API"), ("a", "b", "api2")] {
        assert_eq!(p.decide(from, to, service).rule, DEFAULT_DENY);
    }
}

#[test]
fn star_matches_anything_in_its_field_only() {
    let table = [
        (
            rule("r", true, &["*"], &["b"], &["api"]),
            "zz",
            "b",
            "api",
            true,
        ),
        (
            rule("r", true, &["*"], &["b"], &["api"]),
            "zz",
            "c",
            "api",
            false,
        ),
        (
            rule("r", true, &["a"], &["*"], &["api"]),
            "a",
            "zz",
            "api",
            true,
        ),
        (
            rule("r", true, &["a"], &["*"], &["api"]),
            "a",
            "zz",
            "web",
            false,
        ),
        (
            rule("r", true, &["a"], &["b"], &["*"]),
            "a",
            "b",
            "anything",
            true,
        ),
        (
            rule("r", true, &["a"], &["b"], &["*"]),
            "c",
            "b",
            "anything",
            false,
        ),
        (
            rule("r", false, &["*"], &["*"], &["*"]),
            "a",
            "b",
            "api",
            true,
        ),
    ];
    for (r, from, to, service, matched) in table {
        let p = RegionPolicy { rules: vec![r] };
        let rule = if matched { "r" } else { DEFAULT_DENY };
        assert_eq!(
            p.decide(from, to, service).rule,
            rule,
            "{p:?} {from} {to} {service}"
        );
    }
}

#[test]
fn the_first_matching_rule_of_a_kind_decides() {
    let p = RegionPolicy {
        rules: vec![
            rule("allow-1", true, &["a"], &["*"], &["*"]),
            rule("deny-1", false, &["*"], &["b"], &["*"]),
            rule("allow-2", true, &["*"], &["*"], &["*"]),
            rule("deny-2", false, &["a"], &["b"], &["*"]),
        ],
    };
    assert_eq!(p.decide("a", "b", "s").rule, "deny-1");
    assert_eq!(p.decide("a", "c", "s").rule, "allow-1");
    assert_eq!(p.decide("x", "c", "s").rule, "allow-2");
}

#[test]
fn explain_says_why_each_rule_matched_or_not() {
    let p = policy();
    let e = p.explain(
        &region("eu-west"),
        &region("us-east"),
        &region("eu-west"),
        &ServiceName::new("checkout").unwrap(),
    );
    assert!(e.allowed);
    assert_eq!(e.rule, "us-to-checkout");
    assert_eq!(e.seen_as, SeenAs::Arriving);
    let why: Vec<(&str, Option<&str>)> = e
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.mismatch.as_deref()))
        .collect();
    assert_eq!(
        why,
        [
            (
                "eu-out",
                Some("source region us-east not in from [\"eu-west\"]")
            ),
            ("us-to-checkout", None),
            (
                "no-ap",
                Some("source region us-east not in from [\"ap-south\"]")
            ),
            (
                "no-ledger",
                Some("service checkout not in services [\"ledger\"]")
            ),
            ("us-ap-to-web", None),
        ]
    );
    let text = render(&e);
    assert!(
        text.starts_with("decision: ALLOW by rule \"us-to-checkout\"\n"),
        "{text}"
    );
    assert!(
        text.contains("  rule[1]  Allow \"us-to-checkout\": MATCHED\n"),
        "{text}"
    );
    assert!(
        text.contains("  rule[2]  Deny \"no-ap\": no match: source region us-east not in from [\"ap-south\"]\n"),
        "{text}"
    );
    assert!(text.contains("as the stream arrives in eu-west"), "{text}");
}

#[test]
fn explain_names_the_field_that_failed_and_the_default() {
    let p = RegionPolicy {
        rules: vec![rule("only", true, &["a"], &["b"], &["api"])],
    };
    let why = |from: &str, to: &str, service: &str| {
        let e = p.explain(
            &region("a"),
            &region(from),
            &region(to),
            &ServiceName::new(service).unwrap(),
        );
        assert_eq!(e.rule, DEFAULT_DENY);
        assert!(!e.allowed);
        assert!(
            render(&e).starts_with("decision: DENY by rule \"default-deny\"\n"),
            "{}",
            render(&e)
        );
        e.rules[0].mismatch.clone().unwrap()
    };
    assert_eq!(why("x", "b", "api"), "source region x not in from [\"a\"]");
    assert_eq!(
        why("a", "x", "api"),
        "destination region x not in to [\"b\"]"
    );
    assert_eq!(
        why("a", "b", "web"),
        "service web not in services [\"api\"]"
    );
}

#[test]
fn explain_says_how_the_gateway_meets_the_stream() {
    let (a, b, c) = (region("a"), region("b"), region("c"));
    assert_eq!(SeenAs::of(&a, &a, &b), SeenAs::Leaving);
    assert_eq!(SeenAs::of(&a, &b, &a), SeenAs::Arriving);
    assert_eq!(SeenAs::of(&a, &b, &b), SeenAs::SameRegion);
    assert_eq!(SeenAs::of(&a, &a, &a), SeenAs::SameRegion);
    assert_eq!(SeenAs::of(&a, &b, &c), SeenAs::Elsewhere);
    let e = RegionPolicy::default().explain(&a, &b, &c, &ServiceName::new("s").unwrap());
    assert!(
        render(&e).contains("gateway a never sees this stream"),
        "{}",
        render(&e)
    );
}

/// Moved from `tunnel/config.rs` with the engine.
#[test]
fn deny_first_then_allow_then_default_deny() {
    fn rule(
        name: &str,
        allow: bool,
        from: Match<Region>,
        services: Match<ServiceName>,
    ) -> RegionRule {
        RegionRule {
            name: name.into(),
            allow,
            from,
            to: Match::Any,
            services,
        }
    }
    let p = RegionPolicy {
        rules: vec![
            rule(
                "any-to-web",
                true,
                Match::Any,
                Match::Names(vec![ServiceName::new("web").unwrap()]),
            ),
            rule("no-ap", false, Match::Names(vec![region("ap")]), Match::Any),
        ],
    };
    let d = |allowed, rule| RegionDecision { allowed, rule };
    assert_eq!(p.decide("eu", "us", "web"), d(true, "any-to-web"));
    assert_eq!(p.decide("ap", "us", "web"), d(false, "no-ap"));
    assert_eq!(p.decide("eu", "us", "db"), d(false, "default-deny"));
    assert_eq!(
        RegionPolicy::default().decide("eu", "us", "web"),
        d(false, "default-deny")
    );
}
