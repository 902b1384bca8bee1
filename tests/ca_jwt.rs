//! JWT-SVIDs from the CA: `POST /v1/jwt` over mTLS, signed with the region's own key, the
//! `region` claim, and every region's keys in each CA's SPIFFE bundle document, so a token of
//! region a validates in region b (and keeps validating there while a is cut off).

// Tokens are validated against the wall clock the CA signs them by (`Clock::system()`), so this
// file reads it too (clippy.toml bans it elsewhere).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, SystemTime};

use common::{id, start_ca_tuned, TD};
use trustline::ca::agents::AgentFile;
use trustline::clock::Clock;
use trustline::identity::{parse_id, parse_trust_domain};
use trustline::jwt::{parse_spiffe_bundle, validate, JwtBundles};
use trustline::lab::{Lab, LabOptions};
use trustline::region::Region;
use trustline::svid::ca_client::{CaClient, ClientError};

const HOUR: Duration = Duration::from_secs(3600);

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused { status, detail, .. } => (status.as_u16(), detail),
        other => panic!("expected a refusal, got {other}"),
    }
}

fn bundles_of(td: &str, doc: &[u8]) -> JwtBundles {
    let doc = parse_spiffe_bundle(&parse_trust_domain(td).unwrap(), doc).expect("bundle doc");
    let mut b = JwtBundles::default();
    b.insert(doc.jwt);
    b
}

#[tokio::test]
async fn a_workload_gets_jwt_svids_for_itself_and_an_agent_for_its_registered_ids() {
    let agent = parse_id(&format!("spiffe://{TD}/trustline/agent/n1")).unwrap();
    let ca = start_ca_tuned(HOUR, &[], |c| {
        c.agents = vec![AgentFile {
            id: agent.to_string(),
            workloads: vec![id("web").to_string()],
        }];
    })
    .await;
    let client = ca.client();
    let web = ca.issue(&id("web")).await;
    let aud = vec!["billing".to_string()];
    let (token, exp) = client
        .fetch_jwt(&web, &id("web"), &aud)
        .await
        .expect("own JWT");
    let doc = client.fetch_bundle_json(None).await.unwrap();
    let bundles = bundles_of(TD, &doc);
    let now = SystemTime::now();
    let v = validate(&token, &bundles, "billing", now).expect("valid");
    assert_eq!(v.sub, id("web"));
    assert_eq!(v.region.as_ref().map(|r| r.as_str()), Some("eu"));
    assert_eq!(v.exp, exp);
    let ttl = exp - v.iat.expect("iat");
    assert_eq!(ttl, 300, "5 minutes by default");
    // Wrong audience, and expiry.
    assert!(validate(&token, &bundles, "payroll", now).is_err());
    assert!(validate(&token, &bundles, "billing", now + Duration::from_secs(301)).is_err());
    // For another ID: refused, unless an agent registered for it asks.
    let (code, why) = status(client.fetch_jwt(&web, &id("db"), &aud).await.unwrap_err());
    assert_eq!(code, 403, "{why}");
    let n1 = ca.issue(&agent).await;
    let (t2, _) = client
        .fetch_jwt(&n1, &id("web"), &aud)
        .await
        .expect("agent for web");
    assert_eq!(
        validate(&t2, &bundles, "billing", now).unwrap().sub,
        id("web")
    );
    let (code, why) = status(client.fetch_jwt(&n1, &id("db"), &aud).await.unwrap_err());
    assert_eq!(code, 403);
    assert!(why.contains("not registered"), "{why}");
    // Bad audiences are refused with what is wrong.
    for (bad, says) in [
        (vec![], "at least one"),
        (vec![String::new()], "audience[0]"),
        (vec!["x".repeat(300)], "audience[0]"),
        ((0..17).map(|i| i.to_string()).collect(), "at most 16"),
    ] {
        let (code, why) = status(client.fetch_jwt(&web, &id("web"), &bad).await.unwrap_err());
        assert_eq!(code, 400, "{why}");
        assert!(why.contains(says), "{says}: {why}");
    }
    // A revoked SVID gets no token.
    ca.revoke(&web.info.serial).await;
    let (code, why) = status(client.fetch_jwt(&web, &id("web"), &aud).await.unwrap_err());
    assert_eq!(code, 401, "{why}");
}

#[tokio::test]
async fn without_a_client_certificate_there_is_no_jwt() {
    let ca = start_ca_tuned(HOUR, &[], |_| {}).await;
    let mut conn = ca.client().connect(None).await.unwrap();
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/jwt")
        .header("host", "ca")
        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
            r#"{{"spiffe_id":"{}","audience":["a"]}}"#,
            id("web")
        ))))
        .unwrap();
    let (status, body) = conn.send(req).await.unwrap();
    assert_eq!(status.as_u16(), 401, "{body:?}");
}

#[tokio::test]
async fn the_jwt_key_file_is_private_and_kept_across_restarts() {
    let ca = start_ca_tuned(HOUR, &[], |_| {}).await;
    let path = ca.pki.region.join("jwt.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let kid = ca.bound.state.jwt.signer().key.kid().to_string();
    let again = trustline::ca::jwt::JwtSigner::open(&ca.pki.region, None).unwrap();
    assert_eq!(again.key.kid(), kid);
    std::fs::write(&path, "not a key").unwrap();
    let e = trustline::ca::jwt::JwtSigner::open(&ca.pki.region, None).unwrap_err();
    assert!(e.to_string().contains("jwt.key"), "{e}");
}

#[tokio::test]
async fn a_token_of_region_a_validates_in_region_b_and_still_does_when_a_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(
        dir.path(),
        LabOptions {
            refresh_interval: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let td = lab.td.to_string();
    let web = parse_id(&format!("spiffe://{td}/ns/shop/sa/web")).unwrap();
    let bundle = trustline::identity::Bundle::from_pem(
        lab.td.clone(),
        &std::fs::read(lab.bundle()).unwrap(),
        "bundle",
    )
    .unwrap();
    let client = |r: &str| {
        CaClient::new(
            &format!("https://{}", lab.region(r).ca.api),
            bundle.clone(),
            Clock::system(),
        )
        .unwrap()
    };
    let token = lab.token("a", &web.to_string()).await.unwrap();
    let svid = client("a").issue_with_token(&web, &token).await.unwrap();
    let (jwt, _) = client("a")
        .fetch_jwt(&svid, &web, &["inventory".to_string()])
        .await
        .unwrap();
    // Region b's bundle document learns a's key from CA a within a pull or two.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let in_b = loop {
        let doc = client("b").fetch_bundle_json(None).await.unwrap();
        let bundles = bundles_of(&td, &doc);
        if let Ok(v) = validate(&jwt, &bundles, "inventory", SystemTime::now()) {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never learned a's key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(in_b.region, Some(Region::new("a").unwrap()));
    assert_eq!(in_b.sub, web);
    // Each key in b's document is labelled with the region of the CA that holds it.
    let doc = client("b").fetch_bundle_json(None).await.unwrap();
    let parsed = parse_spiffe_bundle(&lab.td, &doc).unwrap();
    let regions: Vec<_> = parsed
        .jwt
        .keys()
        .map(|k| k.region().unwrap().to_string())
        .collect();
    assert_eq!(regions.len(), 2, "{regions:?}");
    assert!(regions.contains(&"a".into()) && regions.contains(&"b".into()));
    // Region a's CA goes away: b keeps its last good keys, so a's tokens still validate there.
    let Lab { regions: rs, .. } = lab;
    let mut rs = rs.into_iter();
    let a = rs.next().unwrap();
    let b = rs.next().unwrap();
    a.ca.drain(Duration::from_secs(1)).await;
    drop(a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_client =
        CaClient::new(&format!("https://{}", b.ca.api), bundle, Clock::system()).unwrap();
    let doc = b_client.fetch_bundle_json(None).await.unwrap();
    let v = validate(&jwt, &bundles_of(&td, &doc), "inventory", SystemTime::now())
        .expect("a's token still validates in b");
    assert_eq!(v.region, Some(Region::new("a").unwrap()));
    // ... and says that its peer is failing.
    let status = b.ca.state.peers.status_json();
    assert!(status["peers"][0]["error"].is_string(), "{status}");
}

#[tokio::test]
async fn the_jwt_key_rotates_without_a_token_failing_validation() {
    use trustline::ca::admin::{self, AdminRequest};
    let ca = start_ca_tuned(HOUR, &[], |_| {}).await;
    let client = ca.client();
    let web = ca.issue(&id("web")).await;
    let aud = vec!["a".to_string()];
    let kid_of = |t: &str| {
        use base64::Engine as _;
        let head = t.split('.').next().unwrap();
        let h: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(head)
                .unwrap(),
        )
        .unwrap();
        h["kid"].as_str().unwrap().to_string()
    };
    let (old_token, _) = client.fetch_jwt(&web, &id("web"), &aud).await.unwrap();
    let old_kid = kid_of(&old_token);
    let call = |req| {
        let sock = ca.bound.admin_socket.clone();
        async move { admin::call(&sock, &req).await.unwrap() }
    };
    let r = call(AdminRequest::JwtActivate).await;
    assert!(!r.ok && r.error.unwrap().contains("no next key"));
    let r = call(AdminRequest::JwtPrepare { wait_secs: 2 }).await;
    assert!(r.ok, "{:?}", r.error);
    let next_kid = r.jwt.unwrap().next_kid.unwrap();
    // Published at once, not signing yet; activation is refused before the wait is over.
    let doc = client.fetch_bundle_json(None).await.unwrap();
    let b = bundles_of(TD, &doc);
    assert!(b.iter().next().unwrap().get(&next_kid).is_some());
    let (t, _) = client.fetch_jwt(&web, &id("web"), &aud).await.unwrap();
    assert_eq!(kid_of(&t), old_kid);
    let r = call(AdminRequest::JwtActivate).await;
    assert!(
        !r.ok && r.error.as_ref().unwrap().contains("may sign"),
        "{:?}",
        r.error
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = call(AdminRequest::JwtActivate).await;
    assert!(r.ok, "{:?}", r.error);
    let (new_token, _) = client.fetch_jwt(&web, &id("web"), &aud).await.unwrap();
    assert_eq!(kid_of(&new_token), next_kid);
    // Both tokens validate against the published bundle: the old key stays until its last
    // token expired.
    let doc = client.fetch_bundle_json(None).await.unwrap();
    let b = bundles_of(TD, &doc);
    let now = SystemTime::now();
    validate(&old_token, &b, "a", now).expect("old token");
    validate(&new_token, &b, "a", now).expect("new token");
    // A restart over the same CA directory keeps it all.
    let again = trustline::ca::jwt::JwtKeys::open(
        &ca.pki.region,
        None,
        Duration::from_secs(300),
        trustline::clock::unix_secs(now),
    )
    .unwrap();
    let st = again.status();
    assert_eq!(st.active_kid, next_kid);
    assert_eq!(st.retired.len(), 1);
    assert_eq!(st.retired[0].0, old_kid);
    assert!(ca.pki.region.join("jwt-rotation.json").exists());
}
