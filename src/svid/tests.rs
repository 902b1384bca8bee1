//! The rotation task of the `ca` source against a fake CA, on tokio's paused time: hours of SVID
//! lifetime pass in milliseconds, and the wall clock ([`Clock::following_tokio`]) moves with the
//! timers, so every deadline is checked to the millisecond.
//!
//! The fake issues real certificates from a real root and intermediate (made with the CA's own
//! `authority` module: tests may use the CA, the rotation task never does).

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::ca::{ca_loop, refresh_loop};
use super::ca_client::ClientError;
use super::{
    renewal_delay, renewal_delay_with, Error, Identity, Issuer, Jitter, BACKOFF_CAP, RETRY_FLOOR,
};
use crate::ca::authority::{self, Authority, LeafUsage};
use crate::clock::Clock;
use crate::identity::{
    certs_from_pem, inspect_cert, parse_trust_domain, parse_workload_id, Bundle, Serial, SpiffeId,
    Svid, TrustDomain,
};

const HOUR: Duration = Duration::from_secs(3600);
/// Timers on paused time fire on the millisecond they were set for; wake-ups are checked to
/// within this.
const SLACK: Duration = Duration::from_millis(5);

/// A root and an intermediate in a temporary directory, and a second, unrelated root.
struct Pki {
    _dir: tempfile::TempDir,
    td: TrustDomain,
    authority: Authority,
    roots: Vec<CertificateDer<'static>>,
    other_root: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let td = parse_trust_domain("rotation.test").expect("trust domain");
        let year = 365 * 24 * HOUR;
        let root = dir.path().join("root");
        let region = dir.path().join("eu");
        authority::init_root(&td, &root, year, false).expect("root CA");
        authority::init_intermediate(&root, "eu", &region, year, false).expect("intermediate");
        let other = dir.path().join("other");
        authority::init_root(&td, &other, year, false).expect("second root");
        let read = |dir: &PathBuf| {
            let pem = std::fs::read(dir.join("bundle.pem")).expect("bundle.pem");
            certs_from_pem(&pem, "bundle.pem").expect("roots")
        };
        Pki {
            authority: Authority::load(&region).expect("intermediate loads"),
            roots: read(&root),
            other_root: read(&other)[0].clone(),
            td,
            _dir: dir,
        }
    }
}

/// What the fake CA was asked, and when (on the test's clock).
#[derive(Default)]
struct Calls {
    issue: Vec<(SystemTime, String)>,
    /// The time and whether the CA was up.
    renew: Vec<(SystemTime, bool)>,
    bundle: Vec<SystemTime>,
    revoked: Vec<SystemTime>,
}

struct FakeState {
    up: bool,
    calls: Calls,
    revoked: HashSet<Serial>,
    published_roots: Vec<CertificateDer<'static>>,
    region_checked: bool,
}

/// A CA that signs with a real intermediate, can be taken down and brought back, and records
/// every call.
#[derive(Clone)]
struct FakeCa {
    pki: Arc<Pki>,
    clock: Clock,
    ttl: Duration,
    state: Arc<Mutex<FakeState>>,
}

impl FakeCa {
    fn new(pki: Arc<Pki>, clock: Clock, ttl: Duration) -> Self {
        let state = FakeState {
            up: true,
            calls: Calls::default(),
            revoked: HashSet::new(),
            published_roots: pki.roots.clone(),
            region_checked: true,
        };
        FakeCa {
            pki,
            clock,
            ttl,
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake CA state")
    }

    fn set_up(&self, up: bool) {
        self.state().up = up;
    }

    fn down() -> Error {
        Error::Ca(ClientError::Connect {
            addr: "fake-ca:443".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        })
    }

    fn sign(&self, id: &SpiffeId) -> Svid {
        let key = rcgen::KeyPair::generate().expect("key");
        let issued = self
            .pki
            .authority
            .sign_leaf(id, &key, self.ttl, self.clock.now(), LeafUsage::Svid)
            .expect("leaf signed");
        let chain = self.pki.authority.chain_for(&issued.leaf);
        let info = inspect_cert(&chain[0]).expect("leaf parses");
        Svid {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            info,
        }
    }
}

impl Issuer for FakeCa {
    async fn issue(&self, id: &SpiffeId, token: &str) -> Result<Svid, Error> {
        let up = {
            let mut s = self.state();
            s.calls.issue.push((self.clock.now(), token.to_string()));
            s.up
        };
        if !up {
            return Err(Self::down());
        }
        Ok(self.sign(id))
    }

    async fn renew(&self, current: &Svid) -> Result<Svid, Error> {
        let up = {
            let mut s = self.state();
            let up = s.up;
            s.calls.renew.push((self.clock.now(), up));
            up
        };
        if !up {
            return Err(Self::down());
        }
        Ok(self.sign(current.id()))
    }

    async fn bundle(&self) -> Result<Vec<CertificateDer<'static>>, Error> {
        let mut s = self.state();
        s.calls.bundle.push(self.clock.now());
        if !s.up {
            return Err(Self::down());
        }
        Ok(s.published_roots.clone())
    }

    async fn revoked(&self) -> Result<HashSet<Serial>, Error> {
        let mut s = self.state();
        s.calls.revoked.push(self.clock.now());
        if !s.up {
            return Err(Self::down());
        }
        Ok(s.revoked.clone())
    }

    fn region_checked(&self) -> bool {
        self.state().region_checked
    }
}

/// An identity, a fake CA issuing `ttl` SVIDs, a join token file, all on one clock that follows
/// tokio's (paused) time.
struct Rig {
    clock: Clock,
    ca: FakeCa,
    identity: Arc<Identity>,
    token_file: PathBuf,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new(ttl: Duration) -> Self {
        let pki = Arc::new(Pki::new());
        let clock = Clock::following_tokio();
        let id = parse_workload_id("spiffe://rotation.test/ns/shop/sa/web").expect("id");
        let bundle = Bundle::new(pki.td.clone(), pki.roots.clone()).expect("bundle");
        let identity = Identity::new(id, bundle, clock.clone()).expect("identity");
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "join-token\n").expect("token file");
        Rig {
            ca: FakeCa::new(pki, clock.clone(), ttl),
            clock,
            identity,
            token_file,
            stop: watch::channel(false).0,
            _dir: dir,
        }
    }

    fn start_rotation(&self, jitter: Jitter) -> tokio::task::JoinHandle<()> {
        tokio::spawn(ca_loop(
            self.identity.clone(),
            self.ca.clone(),
            self.token_file.clone(),
            jitter,
            self.stop.subscribe(),
        ))
    }

    fn start_refresh(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(refresh_loop(
            self.identity.clone(),
            self.ca.clone(),
            every,
            self.stop.subscribe(),
        ))
    }

    /// Waits (on paused time: at once) until the clock reads `t`.
    async fn until(&self, t: SystemTime) {
        let d = t.duration_since(self.clock.now()).unwrap_or_default();
        tokio::time::sleep(d).await;
    }

    /// Waits for the next publication (or withdrawal) and returns the SVID then held.
    async fn next_rotation(&self, rx: &mut watch::Receiver<u64>) -> Option<Arc<Svid>> {
        rx.changed().await.expect("identity task running");
        self.identity.current()
    }

    fn serial(&self) -> Option<Serial> {
        self.identity.current().map(|s| s.info.serial.clone())
    }

    /// Stops the loops and checks they end.
    async fn stop(self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        let _ = self.stop.send(true);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(1), t)
                .await
                .expect("the loop ends on shutdown")
                .expect("the loop did not panic");
        }
    }
}

fn close_to(got: SystemTime, want: SystemTime) -> bool {
    let diff = got
        .duration_since(want)
        .or_else(|_| want.duration_since(got))
        .unwrap_or_default();
    diff <= SLACK
}

fn since(t: SystemTime, t0: SystemTime) -> Duration {
    t.duration_since(t0).expect("later")
}

#[test]
fn renewal_delay_stays_between_40_and_60_percent_of_what_is_left() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let not_after = now + HOUR;
    assert_eq!(
        renewal_delay_with(Jitter::At(0.0), now, not_after),
        HOUR.mul_f64(0.4)
    );
    assert_eq!(
        renewal_delay_with(Jitter::At(0.5), now, not_after),
        HOUR / 2
    );
    assert_eq!(
        renewal_delay_with(Jitter::At(1.0), now, not_after),
        HOUR.mul_f64(0.6)
    );
    assert_eq!(
        renewal_delay_with(Jitter::At(7.0), now, not_after),
        HOUR.mul_f64(0.6),
        "clamped"
    );
    assert_eq!(
        renewal_delay(not_after, now),
        Duration::ZERO,
        "already expired"
    );
    let mut seen = HashSet::new();
    for _ in 0..500 {
        let d = renewal_delay(now, not_after);
        assert!(
            d >= HOUR.mul_f64(0.4) && d <= HOUR.mul_f64(0.6),
            "{d:?} outside 40-60 % of an hour"
        );
        seen.insert(d.as_secs());
    }
    assert!(seen.len() > 100, "the random jitter spreads renewals");
}

#[tokio::test(start_paused = true)]
async fn a_clock_following_tokio_moves_with_paused_time() {
    let clock = Clock::following_tokio();
    let t0 = clock.now();
    tokio::time::sleep(HOUR).await;
    assert_eq!(since(clock.now(), t0), HOUR);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(since(clock.now(), t0), HOUR + Duration::from_secs(5));
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        since(clock.now(), t0),
        HOUR + Duration::from_secs(65),
        "advance steps the wall time"
    );
}

/// Each SVID is renewed at the chosen point of 50 % ±10 % of its remaining lifetime, measured
/// from when it was received, for the window's earliest, middle and latest points.
#[tokio::test(start_paused = true)]
async fn renewal_happens_at_half_life_within_the_jitter_window() {
    for (at, fraction) in [(0.0, 0.4), (0.5, 0.5), (1.0, 0.6)] {
        let rig = Rig::new(HOUR);
        let mut rx = rig.identity.rotations();
        let task = rig.start_rotation(Jitter::At(at));
        let first = rig.next_rotation(&mut rx).await.expect("first SVID");
        let issued = rig.ca.state().calls.issue.clone();
        assert_eq!(issued.len(), 1, "one issuance");
        assert_eq!(issued[0].1, "join-token", "the token file's token, trimmed");
        rig.identity.ready().expect("ready with the first SVID");
        let mut received = rig.clock.now();
        let mut held = first;
        for n in 0..3 {
            let due = received
                + held
                    .info
                    .not_after
                    .duration_since(received)
                    .unwrap()
                    .mul_f64(fraction);
            let next = rig.next_rotation(&mut rx).await.expect("renewed");
            let renewals = rig.ca.state().calls.renew.clone();
            assert_eq!(renewals.len(), n + 1, "one renewal per rotation");
            let (when, _) = renewals[n];
            assert!(
                close_to(when, due),
                "jitter {at}: renewal {n} at {:?} after receipt, expected {:?}",
                since(when, received),
                since(due, received)
            );
            assert_ne!(next.info.serial, held.info.serial, "a new SVID");
            assert!(next.info.not_after > held.info.not_after);
            received = rig.clock.now();
            held = next;
        }
        assert_eq!(
            rig.ca.state().calls.issue.len(),
            1,
            "renewals, not new issuances"
        );
        rig.stop(vec![task]).await;
    }
}

/// The CA goes down before the first renewal: retries back off 1 s, 2 s, 4 s … up to
/// BACKOFF_CAP, the SVID keeps serving all along, and it is withdrawn exactly at not_after.
#[tokio::test(start_paused = true)]
async fn with_the_ca_down_renewal_backs_off_to_the_cap_and_the_svid_serves_until_not_after() {
    let rig = Rig::new(HOUR);
    let mut rx = rig.identity.rotations();
    let task = rig.start_rotation(Jitter::At(0.5));
    let first = rig.next_rotation(&mut rx).await.expect("first SVID");
    let received = rig.clock.now();
    let not_after = first.info.not_after;
    rig.ca.set_up(false);

    // Just before expiry: still the first SVID, still ready, and handshakes still get it.
    rig.until(not_after - Duration::from_millis(10)).await;
    assert_eq!(rig.serial(), Some(first.info.serial.clone()));
    rig.identity.ready().expect("the valid SVID keeps serving");
    assert!(rig.identity.resolver.0.load().is_some());
    let renewals = rig.ca.state().calls.renew.clone();
    assert!(renewals.iter().all(|(_, up)| !up));
    let due = received + since(not_after, received) / 2;
    assert!(close_to(renewals[0].0, due), "first attempt at half-life");
    let gaps: Vec<Duration> = renewals.windows(2).map(|w| since(w[1].0, w[0].0)).collect();
    let doubling: Vec<Duration> = (0..8).map(|i| Duration::from_secs(1 << i)).collect();
    for (i, (got, want)) in gaps.iter().zip(&doubling).enumerate() {
        assert!(
            got.abs_diff(*want) <= SLACK,
            "gap {i}: {got:?}, expected {want:?} (gaps {gaps:?})"
        );
    }
    // Then at the cap, and in the last 2 x cap before expiry at half the remaining lifetime.
    let capped = &renewals[doubling.len()..];
    assert!(capped.len() >= 10, "retries continue at the cap: {gaps:?}");
    let mut near_expiry = 0;
    for w in capped.windows(2) {
        let left = not_after.duration_since(w[0].0).unwrap();
        let want = BACKOFF_CAP.min((left / 2).max(RETRY_FLOOR)).min(left);
        near_expiry += usize::from(want < BACKOFF_CAP);
        let got = since(w[1].0, w[0].0);
        assert!(
            got.abs_diff(want) <= SLACK + Duration::from_millis(1),
            "{left:?} before expiry: retried after {got:?}, expected {want:?} (gaps {gaps:?})"
        );
    }
    assert!(
        near_expiry >= 3,
        "retries closer together near expiry: {gaps:?}"
    );
    // The task wakes at not_after to withdraw the SVID, even between two retries.
    rig.until(not_after + Duration::from_millis(2)).await;
    assert!(rig.identity.current().is_none(), "withdrawn at not_after");
    assert!(
        rig.identity.resolver.0.load().is_none(),
        "handshakes get no certificate"
    );
    assert_eq!(
        rig.identity.ready().map_err(|e| e.to_string()),
        Err("no SVID yet".to_string())
    );
    let expired = rig.ca.state().calls.renew.len();
    // Without an SVID the task asks for a new one with the join token, still backing off.
    rig.until(not_after + 2 * BACKOFF_CAP).await;
    let (renewals, issued) = {
        let s = rig.ca.state();
        (s.calls.renew.len(), s.calls.issue.len())
    };
    assert_eq!(renewals, expired, "nothing left to renew");
    assert!(issued >= 2, "first issuance retried");
    rig.stop(vec![task]).await;
}

/// A CA that comes back during the back-off is used on the next retry; the back-off resets, so
/// the next failure is retried after 1 s again, and the new SVID is renewed at its own half-life.
#[tokio::test(start_paused = true)]
async fn a_ca_that_recovers_before_expiry_is_used_again_and_the_backoff_resets() {
    let rig = Rig::new(HOUR);
    let mut rx = rig.identity.rotations();
    let task = rig.start_rotation(Jitter::At(0.5));
    let first = rig.next_rotation(&mut rx).await.expect("first SVID");
    let received = rig.clock.now();
    rig.ca.set_up(false);
    // Half-life, then five failed retries (1+2+4+8 s after the first attempt), then up.
    let half = received + since(first.info.not_after, received) / 2;
    rig.until(half + Duration::from_secs(16)).await;
    assert_eq!(rig.ca.state().calls.renew.len(), 5);
    rig.ca.set_up(true);
    let second = rig
        .next_rotation(&mut rx)
        .await
        .expect("renewed after recovery");
    let recovered = rig.clock.now();
    assert!(
        close_to(recovered, half + Duration::from_secs(31)),
        "renewed on the retry 16 s after the last failure, at {:?} after half-life",
        since(recovered, half)
    );
    assert_ne!(second.info.serial, first.info.serial);
    // The next renewal is due at the new SVID's half-life; it fails and is retried after 1 s.
    rig.ca.set_up(false);
    let half2 = recovered + since(second.info.not_after, recovered) / 2;
    rig.until(half2 + Duration::from_millis(1500)).await;
    let renewals = rig.ca.state().calls.renew.clone();
    let tail: Vec<SystemTime> = renewals[6..].iter().map(|(t, _)| *t).collect();
    assert_eq!(tail.len(), 2, "attempts after recovery: {tail:?}");
    assert!(
        close_to(tail[0], half2),
        "renewed at the new SVID's half-life"
    );
    assert!(
        since(tail[1], tail[0]).abs_diff(Duration::from_secs(1)) <= SLACK,
        "the back-off started again at 1 s"
    );
    assert_eq!(rig.serial(), Some(second.info.serial.clone()));
    rig.stop(vec![task]).await;
}

/// The CA is down from the first renewal until shortly before expiry, later than the last
/// doubling back-off would retry (at 555 s of a 600 s SVID, then 150 s later): the retries come
/// at half the remaining lifetime, so the CA back at 560 s renews the SVID before it expires,
/// and the spent join token is never needed again.
#[tokio::test(start_paused = true)]
async fn a_ca_back_shortly_before_expiry_is_retried_in_time() {
    let ttl = Duration::from_secs(600);
    let rig = Rig::new(ttl);
    let mut rx = rig.identity.rotations();
    let task = rig.start_rotation(Jitter::At(0.5));
    let first = rig.next_rotation(&mut rx).await.expect("first SVID");
    let received = rig.clock.now();
    rig.ca.set_up(false);
    rig.until(received + Duration::from_secs(560)).await;
    assert_eq!(
        rig.serial(),
        Some(first.info.serial.clone()),
        "still serving"
    );
    rig.ca.set_up(true);
    let next = rig
        .next_rotation(&mut rx)
        .await
        .expect("renewed, not withdrawn");
    assert_ne!(next.info.serial, first.info.serial);
    assert!(
        rig.clock.now() < first.info.not_after,
        "renewed {:?} after the CA came back, after the SVID expired",
        since(rig.clock.now(), received + Duration::from_secs(560))
    );
    assert_eq!(rig.ca.state().calls.issue.len(), 1, "no new join needed");
    rig.stop(vec![task]).await;
}

/// After expiry with the CA down, the sidecar is not ready; when the CA comes back it gets a
/// new SVID with its join token and is ready again.
#[tokio::test(start_paused = true)]
async fn a_ca_that_recovers_after_expiry_issues_a_new_svid_and_readiness_returns() {
    let ttl = Duration::from_secs(600);
    let rig = Rig::new(ttl);
    let mut rx = rig.identity.rotations();
    let task = rig.start_rotation(Jitter::At(0.5));
    let first = rig.next_rotation(&mut rx).await.expect("first SVID");
    rig.ca.set_up(false);
    rig.until(first.info.not_after + Duration::from_secs(60))
        .await;
    assert!(rig.identity.ready().is_err());
    rx.borrow_and_update(); // the withdrawal
    rig.ca.set_up(true);
    let back = rig.next_rotation(&mut rx).await.expect("a new SVID");
    assert!(
        since(rig.clock.now(), first.info.not_after) <= Duration::from_secs(60) + BACKOFF_CAP,
        "within one capped back-off"
    );
    rig.identity.ready().expect("ready again");
    assert_ne!(back.info.serial, first.info.serial);
    let issued = rig.ca.state().calls.issue.clone();
    assert!(issued.len() >= 2 && issued.iter().all(|(_, t)| t == "join-token"));
    rig.stop(vec![task]).await;
}

/// The revocation list and the bundle are fetched at start and then every interval; a change
/// is applied and announced, a failed refresh keeps the last list, and roots the CA publishes
/// are taken only from a CA whose region was checked.
#[tokio::test(start_paused = true)]
async fn the_revocation_list_and_bundle_refresh_every_interval() {
    let every = Duration::from_secs(30);
    let rig = Rig::new(HOUR);
    let mut revocations = rig.identity.revocations();
    let t0 = rig.clock.now();
    let task = rig.start_refresh(every);
    rig.until(t0 + 3 * every + Duration::from_secs(1)).await;
    {
        let s = rig.ca.state();
        for calls in [&s.calls.revoked, &s.calls.bundle] {
            assert_eq!(calls.len(), 4, "at 0, 30, 60 and 90 s");
            for (n, t) in calls.iter().enumerate() {
                assert!(close_to(*t, t0 + every * n as u32), "call {n}: {calls:?}");
            }
        }
    }
    assert_eq!(rig.identity.bundle_fetches(), 4);
    assert!(rig.identity.revoked.load().is_empty());
    assert_eq!(
        rig.identity.revocation_refreshed.get(),
        crate::clock::unix_secs(t0 + 3 * every) as i64
    );

    // A revocation arrives with the next refresh and is announced.
    let serial = Serial::parse_hex("0badc0de").expect("serial");
    rig.ca.state().revoked.insert(serial.clone());
    revocations.borrow_and_update();
    rig.until(t0 + 4 * every + Duration::from_secs(1)).await;
    assert!(rig.identity.revoked.load().contains(&serial));
    assert!(revocations.has_changed().expect("sender alive"));

    // The CA goes down: the list stays, its freshness stops moving.
    rig.ca.set_up(false);
    rig.until(t0 + 6 * every + Duration::from_secs(1)).await;
    assert!(
        rig.identity.revoked.load().contains(&serial),
        "last list kept"
    );
    assert_eq!(
        rig.identity.revocation_refreshed.get(),
        crate::clock::unix_secs(t0 + 4 * every) as i64,
        "the freshness gauge shows the last good refresh"
    );

    // Back up, publishing a new root: taken from a CA whose region was checked ...
    let other = rig.ca.pki.other_root.clone();
    {
        let mut s = rig.ca.state();
        s.up = true;
        s.published_roots.push(other.clone());
    }
    rig.until(t0 + 7 * every + Duration::from_secs(1)).await;
    assert!(rig.identity.bundle().roots.contains(&other));
    assert!(rig
        .ca
        .pki
        .roots
        .iter()
        .all(|r| rig.identity.bundle().roots.contains(r)));
    rig.stop(vec![task]).await;

    // ... and not from one whose region was not.
    let rig = Rig::new(HOUR);
    {
        let mut s = rig.ca.state();
        s.region_checked = false;
        s.published_roots = vec![other.clone()];
    }
    let task = rig.start_refresh(every);
    rig.until(rig.clock.now() + Duration::from_secs(1)).await;
    assert_eq!(rig.identity.bundle_fetches(), 1);
    assert!(!rig.identity.bundle().roots.contains(&other));
    assert_eq!(
        rig.identity.bundle().roots,
        rig.ca.pki.roots,
        "configured roots kept"
    );
    rig.stop(vec![task]).await;
}

/// The texts operators grep the logs for, as they read before `Error` replaced the strings.
#[test]
fn error_messages_read_as_they_always_have() {
    let ours = parse_workload_id("spiffe://rotation.test/ns/shop/sa/web").expect("id");
    let other = parse_workload_id("spiffe://rotation.test/ns/shop/sa/db").expect("id");
    let cases = [
        (
            Error::NotOffered {
                offered: vec![other.to_string(), "spiffe://rotation.test/x".into()],
                ours: ours.clone(),
            },
            "the agent offers SVIDs for [spiffe://rotation.test/ns/shop/sa/db, \
             spiffe://rotation.test/x], none for this sidecar's spiffe_id \
             spiffe://rotation.test/ns/shop/sa/web; check the registration entry",
        ),
        (
            Error::NotOurs {
                got: other,
                ours: ours.clone(),
            },
            "SVID is for spiffe://rotation.test/ns/shop/sa/db, this sidecar is \
             spiffe://rotation.test/ns/shop/sa/web",
        ),
        (
            Error::TokenFile {
                path: "/run/token".into(),
                source: io::Error::new(io::ErrorKind::NotFound, "gone"),
            },
            "join token file /run/token: gone",
        ),
        (
            Error::RevokedStatus(hyper::StatusCode::SERVICE_UNAVAILABLE),
            "CA answered 503 Service Unavailable",
        ),
        (
            Error::BadSerial(serde_json::json!({"serial": 7})),
            r#"bad serial in revocation list: {"serial":7}"#,
        ),
        (Error::NoRevokedList, "no revoked list in answer"),
        (Error::EmptyChain, "the agent sent an empty chain"),
        (
            FakeCa::down(),
            "connecting to the CA at fake-ca:443: connection refused",
        ),
    ];
    for (e, want) in cases {
        assert_eq!(e.to_string(), want);
    }
}

/// The end of a root rotation: a configured root our own region's CA published and then
/// withdrew is no longer trusted, and trusted again when republished; a refresh that would
/// leave no root of our trust domain is refused and the bundle kept.
#[tokio::test(start_paused = true)]
async fn a_configured_root_the_ca_withdrew_is_no_longer_trusted() {
    let rig = Rig::new(HOUR);
    let every = Duration::from_secs(30);
    let other = rig.ca.pki.other_root.clone();
    let configured = rig.ca.pki.roots[0].clone();
    rig.ca.state().published_roots = vec![configured.clone(), other.clone()];
    let task = rig.start_refresh(every);
    let t0 = rig.clock.now();
    rig.until(t0 + Duration::from_secs(1)).await;
    assert!(rig.identity.bundle().roots.contains(&other));
    assert!(rig.identity.bundle().roots.contains(&configured));

    rig.ca.state().published_roots = vec![other.clone()];
    rig.until(t0 + every + Duration::from_secs(1)).await;
    assert_eq!(
        rig.identity.bundle().roots,
        vec![other.clone()],
        "withdrawn"
    );

    // Withdrawing every root of our trust domain is refused: the last bundle stays.
    let foreign = {
        let dir = tempfile::tempdir().unwrap();
        let td = parse_trust_domain("elsewhere.test").unwrap();
        authority::init_root(&td, dir.path(), HOUR, false).unwrap();
        let pem = std::fs::read(dir.path().join("bundle.pem")).unwrap();
        certs_from_pem(&pem, "bundle.pem").unwrap().remove(0)
    };
    rig.ca.state().published_roots = vec![foreign];
    rig.until(t0 + 2 * every + Duration::from_secs(1)).await;
    assert_eq!(rig.identity.bundle().roots, vec![other.clone()], "kept");

    rig.ca.state().published_roots = vec![configured.clone()];
    rig.until(t0 + 3 * every + Duration::from_secs(1)).await;
    assert!(
        rig.identity.bundle().roots.contains(&configured),
        "republished"
    );
    rig.stop(vec![task]).await;
}
