//! `policy suggest` and `policy replay` on audit logs recorded by the sidecar's own authorization
//! component: a suggested policy allows every recorded flow and nothing else.

// Certificates for the peers under test are minted against the wall clock the sidecars run on
// (`Clock::system()`), so this file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use trustline::audit::AuditLog;
use trustline::clock::Clock;
use trustline::policy::eval::Http;
use trustline::policy::flows::{parse_flows, replay, suggest};
use trustline::policy::{evaluate, parse, Facts, Outcome};
use trustline::proxy::authz::{Authz, Caller};

const WEB: &str = "spiffe://example.org/ns/shop/sa/web";
const JOB: &str = "spiffe://example.org/ns/batch/sa/job";

/// (caller, port, method, path)
const FLOWS: &[(&str, u16, Option<&str>, Option<&str>)] = &[
    (WEB, 8080, Some("GET"), Some("/orders/1")),
    (WEB, 8080, Some("GET"), Some("/orders/2")),
    (WEB, 8080, Some("POST"), Some("/orders")),
    (JOB, 8080, Some("GET"), Some("/export")),
    (JOB, 5432, None, None),
];

/// Records FLOWS through an `Authz` in audit mode, as a sidecar mapping traffic would.
fn record(dir: &Path) -> std::path::PathBuf {
    let policy = dir.join("audit-mode.toml");
    std::fs::write(
        &policy,
        "[service.checkout]\ndefault = \"audit\"\nhttp_ports = [8080]\n",
    )
    .unwrap();
    let log = dir.join("audit.log");
    let audit = Arc::new(AuditLog::open(&log).unwrap());
    let authz = Authz::load(
        policy,
        "checkout".into(),
        Some(trustline::region::Region::new("eu-west").unwrap()),
        audit,
        Clock::system(),
        Default::default(),
    )
    .unwrap();
    for (peer, port, method, path) in FLOWS {
        let caller = Caller {
            peer,
            serial: "0a",
            region: Some("eu-west"),
            port: *port,
        };
        let http = method
            .zip(*path)
            .map(|(method, path)| Http { method, path });
        let (outcome, rule) = authz.decide(&caller, http, true);
        assert_eq!((outcome, rule.as_str()), (Outcome::Allow, "default"));
    }
    log
}

fn facts<'a>(peer: &'a str, port: u16, http: Option<(&'a str, &'a str)>) -> Facts<'a> {
    Facts {
        peer,
        region: Some("eu-west"),
        port,
        http: http.map(|(method, path)| Http { method, path }),
        at: jiff::Timestamp::now(),
    }
}

#[test]
fn a_suggested_policy_allows_every_recorded_flow_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let log = record(dir.path());
    let (flows, bad) = parse_flows(&std::fs::read_to_string(&log).unwrap());
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(flows.len(), FLOWS.len());
    let text = suggest(&flows, "checkout");
    let policy =
        parse(&text, Path::new("suggested.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(policy.warnings.is_empty(), "{:?}", policy.warnings);
    let svc = policy.service("checkout").unwrap();
    for (peer, port, method, path) in FLOWS {
        let d = evaluate(svc, &facts(peer, *port, method.zip(*path)));
        assert_eq!(
            d.outcome,
            Outcome::Allow,
            "{peer} {port} {method:?} {path:?}\n{text}"
        );
    }
    let not_recorded = [
        facts(WEB, 8080, Some(("DELETE", "/orders/1"))),
        facts(WEB, 8080, Some(("GET", "/admin"))),
        facts(WEB, 8080, Some(("POST", "/orders/1"))), // POST only on /orders
        facts(JOB, 8080, Some(("GET", "/orders/1"))),
        facts(WEB, 5432, None),
        facts("spiffe://example.org/ns/x/sa/y", 5432, None),
    ];
    for f in &not_recorded {
        assert_eq!(evaluate(svc, f).outcome, Outcome::Deny, "{f:?}\n{text}");
    }
}

#[test]
fn replay_reports_what_a_candidate_changes_per_rule() {
    let dir = tempfile::tempdir().unwrap();
    let log = record(dir.path());
    let (flows, _) = parse_flows(&std::fs::read_to_string(&log).unwrap());
    let candidate = parse(
        &format!(
            "[service.checkout]\nhttp_ports = [8080]\n[[service.checkout.rule]]\nname = \"web-reads\"\naction = \"allow\"\nfrom = [\"{WEB}\"]\nmethods = [\"GET\"]\npaths = [\"/orders/*\"]\n"
        ),
        Path::new("candidate.toml"),
    )
    .unwrap();
    let r = replay(&flows, &candidate);
    assert_eq!(r.flows, 5);
    assert_eq!(r.unchanged, 2, "the two GETs stay allowed");
    let by_default = &r.by_rule["checkout/default"];
    assert_eq!((by_default.newly_denied, by_default.newly_allowed), (3, 0));
    assert!(by_default
        .examples
        .iter()
        .any(|e| e.contains("POST /orders")));

    // The same through the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_trustline"))
        .args([
            "policy",
            "suggest",
            "--audit",
            log.to_str().unwrap(),
            "--service",
            "checkout",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let suggested = dir.path().join("suggested.toml");
    std::fs::write(&suggested, &out.stdout).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trustline"))
        .args([
            "policy",
            "replay",
            "--audit",
            log.to_str().unwrap(),
            "--policy",
            suggested.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("5 recorded flows: 5 unchanged"), "{text}");
}

#[test]
fn impossible_travel_is_audited_and_can_refuse_the_serial() {
    use trustline::proxy::authz::AnomalyConfig;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "[service.checkout]\ndefault = \"allow\"\n").unwrap();
    let log = dir.path().join("audit.log");
    let audit = Arc::new(AuditLog::open(&log).unwrap());
    let anomaly = AnomalyConfig {
        window: std::time::Duration::from_secs(600),
        single_region: vec![JOB.to_string()],
        refuse: true,
    };
    let authz = Authz::load(
        policy,
        "checkout".into(),
        None,
        audit.clone(),
        Clock::system(),
        anomaly,
    )
    .unwrap();
    let far = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let at = |serial, region| Caller {
        peer: WEB,
        serial,
        region: Some(region),
        port: 5432,
    };
    assert!(authz.admit(&at("aa", "eu-west"), far).allowed);
    assert!(
        authz.admit(&at("bb", "us-east"), far).allowed,
        "another serial may live elsewhere"
    );
    let second = authz.admit(&at("aa", "us-east"), far);
    assert!(
        !second.allowed,
        "the same serial from a second region is refused"
    );
    assert!(
        !authz.admit(&at("aa", "eu-west"), far).allowed,
        "and stays refused"
    );
    // A single-region identity with two different serials.
    let job = |serial, region| Caller {
        peer: JOB,
        serial,
        region: Some(region),
        port: 5432,
    };
    assert!(authz.admit(&job("c1", "eu-west"), far).allowed);
    assert!(!authz.admit(&job("c2", "us-east"), far).allowed);
    assert_eq!(authz.metrics.anomalies.get(), 2);
    audit.flush();
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let anomalies: Vec<_> = events.iter().filter(|e| e["event"] == "anomaly").collect();
    assert_eq!(anomalies.len(), 2);
    assert_eq!(anomalies[0]["source_serial"], "aa");
    assert!(anomalies[0]["detail"]
        .as_str()
        .unwrap()
        .contains("eu-west then us-east"));
}

/// A sidecar that refuses on anomalies, with a single-region `JOB`, on an injected clock.
fn refusing_authz(dir: &Path, clock: Clock) -> Arc<Authz> {
    use trustline::proxy::authz::AnomalyConfig;
    let policy = dir.join("p.toml");
    std::fs::write(&policy, "[service.checkout]\ndefault = \"allow\"\n").unwrap();
    let audit = Arc::new(AuditLog::open(&dir.join("audit.log")).unwrap());
    let anomaly = AnomalyConfig {
        window: std::time::Duration::from_secs(600),
        single_region: vec![JOB.to_string()],
        refuse: true,
    };
    Authz::load(policy, "checkout".into(), None, audit, clock, anomaly).unwrap()
}

/// F19: the serial refused is the one that turned up in a second region; the workload seen
/// first keeps working (its ID is not moved to the other region by the refused sighting), and
/// the refusal ends with the refused certificate.
#[test]
fn an_anomaly_refuses_the_travelling_serial_until_it_expires_not_the_first_one() {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let authz = refusing_authz(dir.path(), clock.clone());
    let hour = clock.now() + Duration::from_secs(3600);
    let job = |serial, region| Caller {
        peer: JOB,
        serial,
        region: Some(region),
        port: 5432,
    };
    assert!(authz.admit(&job("c1", "eu-west"), hour).allowed);
    assert!(
        !authz.admit(&job("c2", "us-east"), hour).allowed,
        "the serial seen in a second region is refused"
    );
    assert!(
        authz.admit(&job("c1", "eu-west"), hour).allowed,
        "the serial seen first, in the ID's region, still works"
    );
    assert!(!authz.admit(&job("c2", "us-east"), hour).allowed);
    assert_eq!(authz.refused_serials(), 1);
    // After the refused certificate's not_after (and the anomaly window) the refusal is gone.
    clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(authz.refused_serials(), 0);
    let later = clock.now() + Duration::from_secs(3600);
    assert!(
        authz.admit(&job("c2", "eu-west"), later).allowed,
        "a refusal does not outlive its certificate"
    );
}

/// F19: the refused serials are bounded, whatever an attacker makes travel.
#[test]
fn refused_serials_are_bounded() {
    use std::time::{Duration, SystemTime};
    use trustline::proxy::authz::MAX_REFUSED;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let authz = refusing_authz(dir.path(), clock.clone());
    let until = clock.now() + Duration::from_secs(3600);
    for n in 0..MAX_REFUSED + 50 {
        let serial = format!("{n:x}");
        let at = |region| Caller {
            peer: WEB,
            serial: &serial,
            region: Some(region),
            port: 5432,
        };
        authz.admit(&at("eu-west"), until);
        assert!(!authz.admit(&at("us-east"), until).allowed);
    }
    assert_eq!(authz.refused_serials(), MAX_REFUSED);
}
