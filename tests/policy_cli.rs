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
