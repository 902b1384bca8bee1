//! Host agents on the CA: an agent joins with a token for `spiffe://TD/trustline/agent/NODE`,
//! then obtains SVIDs (and JWT-SVIDs) for the workloads its `[[agent]]` registration names, with
//! its own SVID as client certificate. Real CA, real TLS 1.3, real certificates.

mod common;

use std::time::Duration;

use common::{id, start_ca_tuned, Ca, TD};
use trustline::ca::agents::AgentFile;
use trustline::ca::ledger::Authorisation;
use trustline::identity::{parse_id, SpiffeId, Svid};
use trustline::svid::ca_client::ClientError;

const HOUR: Duration = Duration::from_secs(3600);

fn agent_id(node: &str) -> SpiffeId {
    parse_id(&format!("spiffe://{TD}/trustline/agent/{node}")).unwrap()
}

/// A CA on which agent `n1` may obtain `web` and everything under `ns/batch/`, and agent `n2`
/// only `db`.
async fn ca_with_agents() -> Ca {
    start_ca_tuned(HOUR, &[], |c| {
        c.agents = vec![
            AgentFile {
                id: agent_id("n1").to_string(),
                workloads: vec![id("web").to_string(), format!("spiffe://{TD}/ns/batch/*")],
            },
            AgentFile {
                id: agent_id("n2").to_string(),
                workloads: vec![id("db").to_string()],
            },
        ];
    })
    .await
}

fn refusal(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused { status, detail, .. } => (status.as_u16(), detail),
        other => panic!("expected a refusal, got {other}"),
    }
}

async fn agent(ca: &Ca, node: &str) -> Svid {
    ca.issue(&agent_id(node)).await
}

#[tokio::test]
async fn an_agent_obtains_the_workload_ids_registered_to_it_and_the_ledger_names_it() {
    let ca = ca_with_agents().await;
    let n1 = agent(&ca, "n1").await;
    let client = ca.client();
    let web = client.issue_for(&n1, &id("web")).await.expect("web for n1");
    assert_eq!(web.id(), &id("web"));
    assert_ne!(web.info.serial, n1.info.serial);
    let job = parse_id(&format!("spiffe://{TD}/ns/batch/sa/job")).unwrap();
    client
        .issue_for(&n1, &job)
        .await
        .expect("a batch ID for n1");
    // The ledger records which agent asked, and the SVID starts a lineage of its own.
    let all = ca.bound.state.ledger.issued().await.unwrap();
    let (_, rec) = all
        .into_iter()
        .find(|(s, _)| *s == web.info.serial)
        .expect("in the ledger");
    match rec.authorisation {
        Authorisation::Agent { agent, serial } => {
            assert_eq!(agent, agent_id("n1").to_string());
            assert_eq!(serial, n1.info.serial.to_string());
        }
        other => panic!("recorded as {other:?}"),
    }
    // The workload's SVID renews like any other (it is a workload SVID, not an agent's).
    client.renew(&web).await.expect("renewal of web");
}

#[tokio::test]
async fn an_agent_gets_nothing_it_is_not_registered_for() {
    let ca = ca_with_agents().await;
    let n1 = agent(&ca, "n1").await;
    let n2 = agent(&ca, "n2").await;
    let client = ca.client();
    let (status, why) = refusal(client.issue_for(&n1, &id("db")).await.unwrap_err());
    assert_eq!(status, 403);
    assert!(
        why.contains("not registered for") && why.contains("sa/db"),
        "{why}"
    );
    client.issue_for(&n2, &id("db")).await.expect("db for n2");
    // No agent obtains trustline's own IDs, another agent's ID, or a gateway's.
    for other in [
        agent_id("n2"),
        parse_id(&format!("spiffe://{TD}/trustline/gateway/eu")).unwrap(),
        parse_id(&format!("spiffe://{TD}/trustline/ca")).unwrap(),
    ] {
        let (status, why) = refusal(client.issue_for(&n1, &other).await.unwrap_err());
        assert_eq!(status, 403, "{other}: {why}");
    }
    // An agent with no registration at all is told so.
    let n3 = agent(&ca, "n3").await;
    let (status, why) = refusal(client.issue_for(&n3, &id("web")).await.unwrap_err());
    assert_eq!(status, 403);
    assert!(why.contains("no registration"), "{why}");
    // A workload's SVID is not an agent's: it cannot ask for another ID.
    let web = client.issue_for(&n1, &id("web")).await.unwrap();
    let e = client.issue_for(&web, &id("api")).await.unwrap_err();
    assert!(
        e.to_string().contains("mismatch") || e.to_string().contains("sa/web"),
        "{e}"
    );
}

#[tokio::test]
async fn a_revoked_agent_is_cut_off() {
    let ca = ca_with_agents().await;
    let n1 = agent(&ca, "n1").await;
    let client = ca.client();
    let web = client.issue_for(&n1, &id("web")).await.unwrap();
    ca.revoke(&n1.info.serial).await;
    let (status, why) = refusal(client.issue_for(&n1, &id("web")).await.unwrap_err());
    assert_eq!(status, 401, "{why}");
    assert!(why.contains("revoked"), "{why}");
    assert!(client.renew(&n1).await.is_err(), "nor can it renew itself");
    // What it obtained before lives on until its expiry (revoke it, or ban the ID, to end it).
    client.renew(&web).await.expect("web's own renewal");
}

#[tokio::test]
async fn the_audit_log_names_the_agent_behind_each_issuance_and_refusal() {
    let ca = ca_with_agents().await;
    let n1 = agent(&ca, "n1").await;
    let client = ca.client();
    client.issue_for(&n1, &id("web")).await.unwrap();
    client.issue_for(&n1, &id("db")).await.unwrap_err();
    ca.bound.state.audit.flush();
    let log = std::fs::read_to_string(ca.pki.dir.path().join("data/audit.log")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["agent"] == agent_id("n1").to_string())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "issue" && e["spiffe_id"] == id("web").to_string()),
        "{log}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "deny"
            && e["spiffe_id"] == id("db").to_string()
            && e["reason"].as_str().unwrap().contains("not registered")),
        "{log}"
    );
}
