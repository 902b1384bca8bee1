//! The JWT bundle refresh against a scripted bundle source, on tokio's paused time.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::*;
use crate::clock::Clock;
use crate::identity::{certs_from_pem, parse_trust_domain, parse_workload_id, Bundle};
use crate::jwt::{spiffe_bundle_json, PublicKey, SigningKey};
use crate::region::Region;

const EVERY: Duration = Duration::from_secs(30);

/// Answers fetches from a script; once one answer is left, repeats it.
struct Script {
    answers: Mutex<VecDeque<Result<Bytes, String>>>,
    checked: bool,
    calls: AtomicU64,
}

impl BundleSource for Arc<Script> {
    async fn fetch(&self, _client: Option<&Svid>) -> Result<Bytes, ClientError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut a = self.answers.lock().unwrap();
        let next = if a.len() > 1 {
            a.pop_front()
        } else {
            a.front().cloned()
        };
        next.unwrap_or_else(|| Err("no answer".into()))
            .map_err(ClientError::Http)
    }

    fn region_checked(&self) -> bool {
        self.checked
    }
}

struct Rig {
    identity: Arc<Identity>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let td = parse_trust_domain("jwt.test").unwrap();
    let root = dir.path().join("root");
    crate::ca::authority::init_root(&td, &root, Duration::from_secs(86400), false).unwrap();
    let pem = std::fs::read(root.join("bundle.pem")).unwrap();
    let bundle = Bundle::new(td, certs_from_pem(&pem, "bundle.pem").unwrap()).unwrap();
    let id = parse_workload_id("spiffe://jwt.test/ns/a/sa/b").unwrap();
    let identity = Identity::new(id, bundle, Clock::following_tokio()).unwrap();
    Rig {
        identity,
        stop: watch::channel(false).0,
        _dir: dir,
    }
}

fn key(region: &str) -> PublicKey {
    SigningKey::generate()
        .unwrap()
        .public(Some(Region::new(region).unwrap()))
}

fn doc(keys: &[PublicKey], hint: u64) -> Result<Bytes, String> {
    Ok(Bytes::from(
        spiffe_bundle_json(&[], keys, 1, hint).to_string(),
    ))
}

impl Rig {
    fn start(&self, checked: bool, answers: Vec<Result<Bytes, String>>) -> Arc<Script> {
        let script = Arc::new(Script {
            answers: Mutex::new(answers.into()),
            checked,
            calls: AtomicU64::new(0),
        });
        let loop_ = refresh_loop(
            self.identity.clone(),
            script.clone(),
            EVERY,
            self.stop.subscribe(),
        );
        tokio::spawn(loop_);
        script
    }

    /// The kids and regions of our trust domain's bundle, sorted.
    fn keys(&self) -> Vec<(String, Option<String>)> {
        let all = self.identity.jwt_bundles();
        let Some(b) = all.get(self.identity.id().trust_domain()) else {
            return Vec::new();
        };
        let mut k: Vec<_> = b
            .keys()
            .map(|k| (k.kid().to_string(), k.region().map(|r| r.to_string())))
            .collect();
        k.sort();
        k
    }
}

async fn wait(d: Duration) {
    tokio::time::sleep(d).await;
}

fn kids(keys: &[&PublicKey]) -> Vec<(String, Option<String>)> {
    let mut k: Vec<_> = keys
        .iter()
        .map(|k| (k.kid().to_string(), k.region().map(|r| r.to_string())))
        .collect();
    k.sort();
    k
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_unusable_fetch_keeps_the_last_good_bundle() {
    let r = rig();
    let (eu, us, next) = (key("eu-west"), key("us-east"), key("eu-west"));
    let script = r.start(
        true,
        vec![
            doc(&[eu.clone(), us.clone()], 0),
            Err("connection refused".into()),
            Ok(Bytes::from_static(b"{\"keys\": 7}")),
            doc(&[next.clone(), us.clone()], 0),
        ],
    );
    wait(Duration::from_millis(1)).await;
    assert_eq!(r.keys(), kids(&[&eu, &us]), "the first fetch, at start");
    assert_eq!(r.identity.jwt_bundle_fetches(), 1);
    // The refused fetch and the document that does not parse leave the keys as they were.
    wait(EVERY).await;
    assert_eq!(script.calls.load(Ordering::Relaxed), 2);
    assert_eq!(r.keys(), kids(&[&eu, &us]));
    // Retried after the back-off (1 s, then 2 s), not a whole interval later.
    wait(Duration::from_secs(1)).await;
    assert_eq!(script.calls.load(Ordering::Relaxed), 3);
    assert_eq!(r.keys(), kids(&[&eu, &us]));
    wait(Duration::from_secs(2)).await;
    assert_eq!(script.calls.load(Ordering::Relaxed), 4);
    assert_eq!(
        r.keys(),
        kids(&[&next, &us]),
        "a rotated key replaces the old"
    );
    assert_eq!(r.identity.jwt_bundle_fetches(), 2);
    assert_eq!(r.identity.jwt_bundle_failures(), 2);
    let _ = r.stop.send(true);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_hint_shortens_the_interval() {
    let r = rig();
    let script = r.start(true, vec![doc(&[key("eu-west")], 5)]);
    wait(Duration::from_millis(1)).await;
    wait(Duration::from_secs(5)).await;
    assert_eq!(script.calls.load(Ordering::Relaxed), 2, "hint of 5 s");
    let _ = r.stop.send(true);

    let r = rig();
    let script = r.start(true, vec![doc(&[key("eu-west")], 0)]);
    wait(Duration::from_millis(1)).await;
    wait(EVERY - Duration::from_millis(2)).await;
    assert_eq!(
        script.calls.load(Ordering::Relaxed),
        1,
        "a hint of 0: the interval"
    );
    wait(Duration::from_millis(2)).await;
    assert_eq!(script.calls.load(Ordering::Relaxed), 2);
    let _ = r.stop.send(true);
}

#[tokio::test(start_paused = true)]
async fn key_regions_are_believed_only_from_a_ca_whose_region_was_checked() {
    let r = rig();
    let eu = key("eu-west");
    r.start(false, vec![doc(std::slice::from_ref(&eu), 0)]);
    wait(Duration::from_millis(1)).await;
    assert_eq!(r.keys(), vec![(eu.kid().to_string(), None)]);
    let _ = r.stop.send(true);
}

#[test]
fn setting_one_trust_domain_keeps_the_others() {
    let r = rig();
    let other = parse_trust_domain("other.test").unwrap();
    let mut b = JwtBundle::new(other.clone());
    b.insert(key("eu-west")).unwrap();
    r.identity.set_jwt_bundle(b);
    let mut ours = JwtBundle::new(r.identity.id().trust_domain().clone());
    ours.insert(key("eu-west")).unwrap();
    r.identity.set_jwt_bundle(ours);
    let all = r.identity.jwt_bundles();
    assert_eq!(all.get(&other).map(JwtBundle::len), Some(1));
    assert_eq!(r.keys().len(), 1);
}
