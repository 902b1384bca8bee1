//! Authorization in the sidecar: the policy file (hot-reloaded, last good kept), decisions at
//! connection time, the audit trail, per-rule counters, and re-authorising live connections
//! (see [`super::live`]) when the policy changes and while their time windows run.
//!
//! Impossible travel with `refuse_on_anomaly`: the serial refused is the one of the sighting
//! that revealed the anomaly (the serial seen in a second region; for a single-region ID, the
//! serial that turned up in another region while the ID's last sighting was recent). The ID's
//! established region is kept as it was, so the workload already seen there is not flagged in
//! turn when it calls again. A refusal lasts until that certificate's `not_after` (it cannot
//! be used after that anyway) and at most [`MAX_REFUSED`] serials are held.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use super::live::{close_audited, CloseReason, Entry, LiveConns};

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::audit::decision::DecisionEvent;
use crate::audit::AuditLog;
use crate::clock::{rfc3339, Clock};
use crate::policy::anomaly::TravelDetector;
use crate::policy::eval::Http;
use crate::policy::{evaluate, evaluate_with, Facts, JwtFacts, Outcome, Policy, ServicePolicy};
use crate::region::Region;
use crate::svid::Identity;

/// Impossible-travel settings.
#[derive(Clone, Debug)]
pub struct AnomalyConfig {
    /// Two regions within this long raise an anomaly.
    pub window: Duration,
    /// IDs that live in one region only: also tracked by ID, not just by serial.
    pub single_region: Vec<String>,
    /// Refuse the serial from then on.
    pub refuse: bool,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            window: Duration::from_secs(600),
            single_region: Vec::new(),
            refuse: false,
        }
    }
}

/// Per-rule decision counter labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
    pub outcome: &'static str,
    pub mode: &'static str,
}

/// Metrics of the policy.
#[derive(Clone, Default)]
pub struct AuthzMetrics {
    pub decisions: Family<RuleLabels, Counter>,
    pub reload_failures: Counter,
    pub reloads: Counter,
    /// 1 when the last reload attempt failed (the previous policy is still in force).
    pub stale: Gauge,
    pub closed_by_reload: Counter,
    pub anomalies: Counter,
}

impl AuthzMetrics {
    /// Registers the metrics.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "trustline_policy_decisions",
            "Authorization decisions by rule",
            self.decisions.clone(),
        );
        r.register(
            "trustline_policy_reload_failures",
            "Policy reloads refused (last good policy kept)",
            self.reload_failures.clone(),
        );
        r.register(
            "trustline_policy_reloads",
            "Policy reloads applied",
            self.reloads.clone(),
        );
        r.register(
            "trustline_policy_stale",
            "1 when the policy file on disk is invalid and the previous one is in force",
            self.stale.clone(),
        );
        r.register(
            "trustline_policy_closed_connections",
            "Live connections closed because a new policy denies them",
            self.closed_by_reload.clone(),
        );
    }
}

/// Why a policy file cannot be used (at start, or on a reload).
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// The file is missing or invalid.
    #[error(transparent)]
    Invalid(#[from] crate::policy::PolicyError),
    /// The file has no section for the service this sidecar protects (at start).
    #[error("{}: no [service.{service}] in the policy file", path.display())]
    NoService { path: PathBuf, service: String },
    /// A reloaded file no longer has the service's section.
    #[error("no [service.{0}] in the new policy")]
    ServiceGone(String),
}

/// Most serials refused after impossible travel held at once.
pub const MAX_REFUSED: usize = 10_000;

/// The sidecar's authorization state.
pub struct Authz {
    pub service: String,
    pub region: Option<Region>,
    path: PathBuf,
    policy: ArcSwap<Policy>,
    pub metrics: AuthzMetrics,
    audit: Arc<AuditLog>,
    clock: Clock,
    /// The sidecar's live connections, re-decided on reload.
    live: Arc<LiveConns>,
    /// Counts the policies applied (the first is 0): a live connection decided on an older one
    /// and denied now was closed by a reload, not by its time window.
    generation: AtomicU64,
    travel: Mutex<TravelDetector>,
    /// The file's (mtime, size) taken just before the first load, so an edit racing the
    /// start-up is still picked up by the watcher.
    loaded_stamp: Option<(SystemTime, u64)>,
    refuse_anomalous: bool,
    /// Serials refused after impossible travel, with their certificate's `not_after`.
    refused_serials: Mutex<HashMap<String, SystemTime>>,
    /// The identity whose JWT bundles verify requests' tokens ([`Authz::use_jwt_bundles_of`]).
    jwt_identity: OnceLock<Arc<Identity>>,
}

/// What a connection learns from an L4 decision.
pub struct Admission {
    pub allowed: bool,
    pub rule: String,
    /// The policy generation the decision was made on (see [`Authz::generation`]).
    pub generation: u64,
}

/// Connection facts handed to [`Authz::admit`].
pub struct Caller<'a> {
    pub peer: &'a str,
    pub serial: &'a str,
    pub region: Option<&'a str>,
    pub port: u16,
}

impl Authz {
    /// Loads the policy file (a bad file refuses to start) and checks `service` is in it.
    pub fn load(
        path: PathBuf,
        service: String,
        region: Option<Region>,
        audit: Arc<AuditLog>,
        clock: Clock,
        anomaly: AnomalyConfig,
    ) -> Result<Arc<Self>, AuthzError> {
        let loaded_stamp = crate::util::file_stamp(&path);
        let policy = crate::policy::load(&path)?;
        if policy.service(&service).is_none() {
            return Err(AuthzError::NoService { path, service });
        }
        Ok(Arc::new(Authz {
            service,
            region,
            path,
            policy: ArcSwap::from_pointee(policy),
            metrics: AuthzMetrics::default(),
            audit,
            clock,
            live: LiveConns::new(),
            generation: AtomicU64::new(0),
            loaded_stamp,
            travel: Mutex::new(TravelDetector::new(anomaly.window, anomaly.single_region)),
            refuse_anomalous: anomaly.refuse,
            refused_serials: Mutex::new(Default::default()),
            jwt_identity: OnceLock::new(),
        }))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// The registry of live connections this policy re-decides.
    pub fn live(&self) -> Arc<LiveConns> {
        self.live.clone()
    }

    /// How many reloads were applied: the generation of the policy in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a rule of this service has `hours`: decisions then change with time.
    pub fn has_time_windows(&self) -> bool {
        self.policy
            .load()
            .service(&self.service)
            .is_some_and(|s| s.rules.iter().any(|r| !r.hours.is_empty()))
    }

    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::try_from(self.clock.now()).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// Whether `port` is decided per HTTP request.
    pub fn is_http_port(&self, port: u16) -> bool {
        self.policy
            .load()
            .service(&self.service)
            .is_some_and(|s| s.http_ports.contains(&port))
    }

    /// Decides one connection (or, with `http`, one request), counts and audits it.
    pub fn decide(
        &self,
        c: &Caller<'_>,
        http: Option<Http<'_>>,
        audit_allow: bool,
    ) -> (Outcome, String) {
        self.decide_on(&self.policy.load(), c, http, None, audit_allow)
    }

    /// [`Authz::decide`] on `policy` (the one a request was read for), with what the request's
    /// token established when the service's rules read tokens.
    pub fn decide_on(
        &self,
        policy: &Policy,
        c: &Caller<'_>,
        http: Option<Http<'_>>,
        jwt: Option<&JwtFacts>,
        audit_allow: bool,
    ) -> (Outcome, String) {
        let Some(svc) = policy.service(&self.service) else {
            return (Outcome::Deny, "no-policy".into());
        };
        let facts = Facts {
            peer: c.peer,
            region: c.region,
            port: c.port,
            http,
            at: self.now(),
        };
        let d = match jwt {
            Some(j) => evaluate_with(svc, &facts, j),
            None => evaluate(svc, &facts),
        };
        let outcome = match d.outcome {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
        };
        self.count(d.rule, outcome, "enforced");
        let record = |o, rule: &str, mode| {
            let mut ev = self.event("decision", c, http);
            (ev.outcome, ev.rule, ev.mode) = (o, rule.to_string(), mode);
            ev.jwt = jwt.map(super::jwt::audit);
            self.audit.record(&ev);
        };
        if d.outcome == Outcome::Deny || audit_allow || d.audit {
            record(outcome, d.rule, "enforced");
        }
        for (rule, would) in &d.dry_run {
            let o = if *would == Outcome::Allow {
                "allow"
            } else {
                "deny"
            };
            self.count(rule, o, "dry-run");
            record(o, rule, "dry-run");
        }
        (d.outcome, d.rule.to_string())
    }

    /// Verifies requests' tokens with `identity`'s JWT bundles (the sidecar's own; without it,
    /// no token is valid).
    pub fn use_jwt_bundles_of(&self, identity: Arc<Identity>) {
        let _ = self.jwt_identity.set(identity);
    }

    /// What a request's bearer token (or why it has none) establishes for `svc`'s jwt rules:
    /// validated once, for one of the audiences its rules name.
    pub fn check_jwt(&self, svc: &ServicePolicy, token: Result<&str, &str>) -> JwtFacts {
        let token = match token {
            Ok(t) => t,
            Err(why) => return JwtFacts::Refused(why.to_string()),
        };
        let Some(identity) = self.jwt_identity.get() else {
            return JwtFacts::Refused("this sidecar has no JWT bundles".into());
        };
        super::jwt::validate_for(
            token,
            &identity.jwt_bundles(),
            &svc.jwt_audiences,
            self.clock.now(),
        )
    }

    /// Counts and audits a request refused before any rule saw it (a path or target no rule
    /// can decide on safely), as a deny by `bad-request`.
    pub fn refuse_request(&self, c: &Caller<'_>, http: Http<'_>, why: &str) {
        use crate::policy::path::REFUSED;
        self.count(REFUSED, "deny", "enforced");
        let detail = Some(why.to_string());
        self.record(c, Some(http), "deny", REFUSED, "enforced", detail);
    }

    /// Decides a new connection of a caller whose certificate is valid until `not_after`.
    /// The caller registers an allowed one in [`Authz::live`] with the returned generation.
    pub fn admit(&self, c: &Caller<'_>, not_after: SystemTime) -> Admission {
        // Read first: a reload after this point sees the connection as decided on the old one.
        let generation = self.generation();
        if let Some(rule) = self.travel_check(c, not_after) {
            return Admission {
                allowed: false,
                rule,
                generation,
            };
        }
        // On HTTP ports the decision is per request; the connection itself is let through,
        // unless no request of this caller could ever be allowed (then it is decided, and
        // refused, as a connection: it gets no connection to send denied request after
        // denied request on).
        let (outcome, rule) = if self.is_http_port(c.port) && self.could_admit(c) {
            (Outcome::Allow, "http-per-request".to_string())
        } else {
            self.decide(c, None, true)
        };
        Admission {
            allowed: outcome == Outcome::Allow,
            rule,
            generation,
        }
    }

    /// Whether some connection or request of `c` could be allowed at some time
    /// ([`crate::policy::reach::could_admit`]).
    pub fn could_admit(&self, c: &Caller<'_>) -> bool {
        let policy = self.policy.load();
        policy
            .service(&self.service)
            .is_some_and(|svc| crate::policy::reach::could_admit(svc, c.peer, c.region, c.port))
    }

    /// Whether `serial` is refused after impossible travel; forgets an expired refusal.
    fn is_refused(&self, serial: &str) -> bool {
        let mut refused = self
            .refused_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match refused.get(serial) {
            None => false,
            Some(until) if *until <= self.clock.now() => {
                refused.remove(serial);
                false
            }
            Some(_) => true,
        }
    }

    /// How many serials are refused after impossible travel now (expired refusals pruned).
    pub fn refused_serials(&self) -> usize {
        let mut refused = self
            .refused_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now();
        refused.retain(|_, t| *t > now);
        refused.len()
    }

    /// Refuses `serial` until `until`, within [`MAX_REFUSED`]: when full, expired refusals go
    /// first, then the one that expires soonest.
    fn refuse(&self, serial: &str, until: SystemTime) {
        let mut refused = self
            .refused_serials
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if refused.len() >= MAX_REFUSED && !refused.contains_key(serial) {
            let now = self.clock.now();
            refused.retain(|_, t| *t > now);
            if refused.len() >= MAX_REFUSED {
                let soonest = refused
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(s, _)| s.clone());
                if let Some(s) = soonest {
                    refused.remove(&s);
                }
            }
        }
        refused.insert(serial.to_string(), until);
    }

    /// Impossible travel: records the sighting, audits anomalies, and with `refuse` set denies
    /// the serial from then on (see the module docs). Returns the refusal reason when refused.
    fn travel_check(&self, c: &Caller<'_>, not_after: SystemTime) -> Option<String> {
        if self.is_refused(c.serial) {
            self.record(
                c,
                None,
                "deny",
                "anomaly-refused",
                "enforced",
                Some("serial refused after impossible travel".into()),
            );
            return Some("anomaly-refused".into());
        }
        let found = self
            .travel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(c.peer, c.serial, c.region, self.clock.now());
        for t in &found {
            self.metrics.anomalies.inc();
            tracing::warn!(kind = t.kind, key = %t.key, from = %t.previous_region, to = %t.region, "impossible travel");
            let mut ev = self.event("anomaly", c, None);
            ev.outcome = if self.refuse_anomalous {
                "deny"
            } else {
                "allow"
            };
            ev.rule = "impossible-travel".into();
            ev.detail = Some(format!(
                "same {} seen in {} then {}",
                t.kind, t.previous_region, t.region
            ));
            self.audit.record(&ev);
        }
        if !found.is_empty() && self.refuse_anomalous {
            // The refused sighting does not move the ID or serial to its region.
            let mut travel = self.travel.lock().unwrap_or_else(|e| e.into_inner());
            for t in &found {
                travel.restore(t, self.clock.now());
            }
            drop(travel);
            self.refuse(c.serial, not_after);
            return Some("anomaly-refused".into());
        }
        None
    }

    fn count(&self, rule: &str, outcome: &'static str, mode: &'static str) {
        self.metrics
            .decisions
            .get_or_create(&RuleLabels {
                rule: rule.to_string(),
                outcome,
                mode,
            })
            .inc();
    }

    /// An audit event about caller `c` (and its request, on HTTP ports) at this service, as
    /// an enforced allow by no rule until the caller says otherwise.
    fn event(&self, event: &'static str, c: &Caller<'_>, http: Option<Http<'_>>) -> DecisionEvent {
        DecisionEvent {
            time: rfc3339(self.clock.now()),
            event,
            source_id: c.peer.to_string(),
            source_serial: c.serial.to_string(),
            source_region: c.region.map(str::to_string),
            destination_service: self.service.clone(),
            destination_region: self.region.as_ref().map(Region::to_string),
            port: c.port,
            method: http.map(|h| h.method.to_string()),
            path: http.map(|h| h.path.to_string()),
            outcome: "allow",
            rule: String::new(),
            mode: "enforced",
            detail: None,
            jwt: None,
        }
    }

    fn record(
        &self,
        c: &Caller<'_>,
        http: Option<Http<'_>>,
        outcome: &'static str,
        rule: &str,
        mode: &'static str,
        detail: Option<String>,
    ) {
        let mut ev = self.event("decision", c, http);
        ev.outcome = outcome;
        ev.rule = rule.to_string();
        ev.mode = mode;
        ev.detail = detail;
        self.audit.record(&ev);
    }

    /// Reloads the file: on success swaps it in and closes live connections it denies; on
    /// failure keeps the last good policy, logs why and flags the metric.
    pub fn reload(&self) -> Result<usize, AuthzError> {
        let fresh = match crate::policy::load(&self.path) {
            Ok(p) if p.service(&self.service).is_some() => p,
            Ok(_) => return Err(self.reload_failed(AuthzError::ServiceGone(self.service.clone()))),
            Err(e) => return Err(self.reload_failed(e.into())),
        };
        self.policy.store(Arc::new(fresh));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.metrics.reloads.inc();
        self.metrics.stale.set(0);
        tracing::info!(policy = %self.path.display(), "policy reloaded");
        Ok(self.reauthorise())
    }

    fn reload_failed(&self, why: AuthzError) -> AuthzError {
        self.metrics.reload_failures.inc();
        self.metrics.stale.set(1);
        tracing::error!(policy = %self.path.display(), error = %why, "policy reload refused; keeping the last good policy");
        why
    }

    /// Closes the live connections the policy in force denies; returns how many.
    fn reauthorise(&self) -> usize {
        let closed = self.live.recheck(|e| self.recheck(e));
        let n = closed.len();
        for c in closed {
            if c.reason == CloseReason::PolicyReload {
                self.metrics.closed_by_reload.inc();
            }
            close_audited(
                c,
                &self.audit,
                &self.service,
                self.region.as_deref(),
                &self.clock,
            );
        }
        n
    }

    /// Re-decides a live L4 connection (those without a policy generation are not decided
    /// here): the deciding rule and why, when the policy in force denies it now.
    pub(crate) fn recheck(&self, e: &mut Entry) -> Option<(CloseReason, String)> {
        let decided_on = e.policy.as_ref()?.generation;
        let policy = self.policy.load();
        let svc = policy.service(&self.service)?;
        let cert = e.peer.load();
        let peer = cert.info.id.to_string();
        let facts = Facts {
            peer: &peer,
            region: cert.region.as_deref(),
            port: e.port,
            http: None,
            at: self.now(),
        };
        let d = evaluate(svc, &facts);
        if d.outcome == Outcome::Allow {
            // Allowed by the policy in force: a later denial is this policy's (its windows).
            if let Some(p) = e.policy.as_mut() {
                p.generation = self.generation();
                if p.rule != d.rule {
                    p.rule = d.rule.to_string();
                }
            }
            return None;
        }
        self.count(d.rule, "deny", "enforced");
        let reason = if decided_on != self.generation() {
            CloseReason::PolicyReload
        } else {
            CloseReason::TimeWindowClosed
        };
        Some((reason, d.rule.to_string()))
    }

    /// Watches the file and reloads it when it changes, until `stop` changes.
    pub async fn watch(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut seen = self.loaded_stamp;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let now = crate::util::file_stamp(&self.path);
            if now != seen {
                seen = now;
                let _ = self.reload();
            }
        }
    }
}
