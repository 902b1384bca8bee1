//! `trustline policy check` and `policy explain` on the example policies, as a user runs them.

mod common;

use common::trustline;

#[test]
fn the_example_policy_checks_clean() {
    let (ok, out) = trustline(&["policy", "check", "config/policy.toml"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok (2 services, 4 rules, 0 warnings)"),
        "{out}"
    );
}

#[test]
fn check_fails_with_every_error_located() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "[service.a]\n\n[[service.a.rule]]\nname = \"x\"\naction = \"allow\"\nfrom = [\"spiffe://bad//x\"]\nhours = [\"Mon 9-5\"]\n",
    )
    .unwrap();
    let (ok, out) = trustline(&["policy", "check", f.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("bad.toml:3: error: service a, rule \"x\", from[0]"),
        "{out}"
    );
    assert!(out.contains("hours[0]: \"Mon 9-5\""), "{out}");
    assert!(!out.contains("no rules"), "{out}");
}

#[test]
fn explain_names_the_deciding_rule_and_the_dry_run() {
    let base = [
        "policy",
        "explain",
        "--policy",
        "config/policy.toml",
        "--to",
        "checkout",
        "--port",
        "8080",
        "--at",
        "2026-11-23T10:00:00Z",
    ];
    let mut args = base.to_vec();
    args.extend([
        "--from",
        "spiffe://example.org/ns/shop/sa/frontend",
        "--method",
        "POST",
        "--path",
        "/api/pay",
    ]);
    let (ok, out) = trustline(&args);
    assert!(ok, "{out}");
    assert!(
        out.starts_with("decision: ALLOW by rule \"frontend-api\""),
        "{out}"
    );
    assert!(
        out.contains("dry-run: rule \"trial-no-post\" would Deny"),
        "{out}"
    );

    let mut args = base.to_vec();
    args.extend([
        "--from",
        "spiffe://example.org/ns/web/sa/legacy",
        "--method",
        "GET",
        "--path",
        "/api/x",
    ]);
    let (_, out) = trustline(&args);
    assert!(
        out.starts_with("decision: DENY by rule \"no-legacy\""),
        "{out}"
    );

    let mut args = base.to_vec();
    args.extend([
        "--from",
        "spiffe://example.org/ns/shop/sa/frontend",
        "--method",
        "GET",
        "--path",
        "/admin",
    ]);
    let (_, out) = trustline(&args);
    assert!(
        out.starts_with("decision: DENY by rule \"default\""),
        "{out}"
    );
    assert!(out.contains("path /admin not in"), "{out}");
}

/// `policy explain --gateway` on the example gateway config (eu-west), whose bundle and identity
/// files do not exist: only the region and the `[[rule]]` tables are read.
fn explain_gateway(from: &str, to: &str, service: &str) -> (bool, String) {
    explain_gateway_in("config/gateway.toml", from, to, service, &[])
}

/// `policy explain --gateway FILE` for one stream, with `extra` flags after.
fn explain_gateway_in(
    file: &str,
    from: &str,
    to: &str,
    service: &str,
    extra: &[&str],
) -> (bool, String) {
    let mut args = vec![
        "policy",
        "explain",
        "--gateway",
        file,
        "--from-region",
        from,
        "--to-region",
        to,
        "--service",
        service,
    ];
    args.extend_from_slice(extra);
    trustline(&args)
}

#[test]
fn explain_gateway_names_the_deciding_rule_and_why_each_rule_matched() {
    let (ok, out) = explain_gateway("us-east", "eu-west", "checkout");
    assert!(ok, "{out}");
    assert!(
        out.starts_with("decision: ALLOW by rule \"us-to-checkout\"\n"),
        "{out}"
    );
    assert!(out.contains("as the stream arrives in eu-west"), "{out}");
    assert!(out.contains("Allow \"us-to-checkout\": MATCHED"), "{out}");
    assert!(
        out.contains("Allow \"eu-out\": no match: source region us-east not in from [\"eu-west\"]"),
        "{out}"
    );

    let (ok, out) = explain_gateway("eu-west", "us-east", "anything");
    assert!(ok, "{out}");
    assert!(
        out.starts_with("decision: ALLOW by rule \"eu-out\"\n"),
        "{out}"
    );
    assert!(out.contains("as the stream leaves eu-west"), "{out}");

    // The deny rule is last in the file and still decides first.
    let (ok, out) = explain_gateway("ap-south", "eu-west", "checkout");
    assert!(ok, "{out}");
    assert!(
        out.starts_with("decision: DENY by rule \"no-ap\"\n"),
        "{out}"
    );
    assert!(out.contains("Deny \"no-ap\": MATCHED"), "{out}");

    let (ok, out) = explain_gateway("us-east", "eu-west", "ledger");
    assert!(ok, "{out}");
    assert!(
        out.starts_with("decision: DENY by rule \"default-deny\"\n"),
        "{out}"
    );
    assert!(
        out.contains("no match: service ledger not in services [\"checkout\"]"),
        "{out}"
    );
}

#[test]
fn explain_gateway_refuses_bad_configs_and_flags_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad-gateway.toml");
    let good = std::fs::read_to_string("config/gateway.toml").unwrap();
    let bad = good.replace("from = [\"us-east\"]", "from = [\"US_East\"]");
    assert_ne!(good, bad);
    std::fs::write(&f, bad).unwrap();
    let (ok, out) = explain_gateway_in(f.to_str().unwrap(), "us-east", "eu-west", "checkout", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("bad-gateway.toml: rule[1] (us-to-checkout).from[0]: \"US_East\""),
        "{out}"
    );

    let missing = dir.path().join("missing.toml");
    let (ok, out) = explain_gateway_in(
        missing.to_str().unwrap(),
        "us-east",
        "eu-west",
        "checkout",
        &[],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("missing.toml"), "{out}");

    // A policy file is not a gateway config.
    let (ok, out) = explain_gateway_in("config/policy.toml", "us-east", "eu-west", "checkout", &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("config/policy.toml:"), "{out}");

    // Names are checked at the flag by the one rule for regions.
    let (ok, out) = explain_gateway("EU", "eu-west", "checkout");
    assert!(!ok, "{out}");
    assert!(out.contains("--from-region"), "{out}");
    // The two kinds of rules take their own flags.
    let (ok, out) = explain_gateway_in(
        "config/gateway.toml",
        "us-east",
        "eu-west",
        "checkout",
        &["--port", "8080"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("cannot be used with"), "{out}");
}
