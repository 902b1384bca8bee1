//! Authorization in the sidecar: the policy file (hot-reloaded, last good kept), decisions at
//! connection time, the audit trail, per-rule counters, and re-authorising live connections
//! when the policy changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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
use crate::policy::{evaluate, Facts, Outcome, Policy};

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

/// The facts of a live connection, kept to re-authorise it on reload.
struct Live {
    peer: String,
    serial: String,
    region: Option<String>,
    port: u16,
    close: watch::Sender<bool>,
}

/// The sidecar's authorization state.
pub struct Authz {
    pub service: String,
    pub region: Option<String>,
    path: PathBuf,
    policy: ArcSwap<Policy>,
    pub metrics: AuthzMetrics,
    audit: Arc<AuditLog>,
    clock: Clock,
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
    travel: Mutex<TravelDetector>,
    /// The file's (mtime, size) taken just before the first load, so an edit racing the
    /// start-up is still picked up by the watcher.
    loaded_stamp: Option<(SystemTime, u64)>,
    refuse_anomalous: bool,
    refused_serials: Mutex<std::collections::HashSet<String>>,
}

/// What a connection learns from an L4 decision.
pub struct Admission {
    pub allowed: bool,
    pub rule: String,
    /// Dropping it unregisters the connection; `closed` fires if a reload denies it.
    pub ticket: Option<Ticket>,
}

/// Registration of a live connection.
pub struct Ticket {
    authz: Arc<Authz>,
    id: u64,
    /// Changes to `true` when a policy reload no longer allows this connection.
    pub closed: watch::Receiver<bool>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.authz
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
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
        region: Option<String>,
        audit: Arc<AuditLog>,
        clock: Clock,
        anomaly: AnomalyConfig,
    ) -> Result<Arc<Self>, String> {
        let loaded_stamp = crate::util::file_stamp(&path);
        let policy = crate::policy::load(&path).map_err(|e| e.to_string())?;
        if policy.service(&service).is_none() {
            return Err(format!(
                "{}: no [service.{service}] in the policy file",
                path.display()
            ));
        }
        Ok(Arc::new(Authz {
            service,
            region,
            path,
            policy: ArcSwap::from_pointee(policy),
            metrics: AuthzMetrics::default(),
            audit,
            clock,
            live: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            loaded_stamp,
            travel: Mutex::new(TravelDetector::new(anomaly.window, anomaly.single_region)),
            refuse_anomalous: anomaly.refuse,
            refused_serials: Mutex::new(Default::default()),
        }))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
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
        let policy = self.policy.load();
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
        let d = evaluate(svc, &facts);
        let outcome = match d.outcome {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
        };
        self.count(d.rule, outcome, "enforced");
        if d.outcome == Outcome::Deny || audit_allow || d.audit {
            self.record(c, http, outcome, d.rule, "enforced", None);
        }
        for (rule, would) in &d.dry_run {
            let o = if *would == Outcome::Allow {
                "allow"
            } else {
                "deny"
            };
            self.count(rule, o, "dry-run");
            self.record(c, http, o, rule, "dry-run", None);
        }
        (d.outcome, d.rule.to_string())
    }

    /// Counts and audits a request refused before any rule saw it (a path or target no rule
    /// can decide on safely), as a deny by `bad-request`.
    pub fn refuse_request(&self, c: &Caller<'_>, http: Http<'_>, why: &str) {
        use crate::policy::path::REFUSED;
        self.count(REFUSED, "deny", "enforced");
        let detail = Some(why.to_string());
        self.record(c, Some(http), "deny", REFUSED, "enforced", detail);
    }

    /// Decides a new connection and, if allowed, registers it for re-authorisation on reload.
    pub fn admit(self: &Arc<Self>, c: &Caller<'_>) -> Admission {
        if let Some(rule) = self.travel_check(c) {
            return Admission {
                allowed: false,
                rule,
                ticket: None,
            };
        }
        let http = self.is_http_port(c.port);
        // On HTTP ports the decision is per request; the connection itself is let through.
        let (outcome, rule) = if http {
            (Outcome::Allow, "http-per-request".to_string())
        } else {
            self.decide(c, None, true)
        };
        if outcome == Outcome::Deny {
            return Admission {
                allowed: false,
                rule,
                ticket: None,
            };
        }
        let (tx, rx) = watch::channel(false);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if !http {
            self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
                id,
                Live {
                    peer: c.peer.to_string(),
                    serial: c.serial.to_string(),
                    region: c.region.map(str::to_string),
                    port: c.port,
                    close: tx,
                },
            );
        }
        Admission {
            allowed: true,
            rule,
            ticket: Some(Ticket {
                authz: self.clone(),
                id,
                closed: rx,
            }),
        }
    }

    /// Impossible travel: records the sighting, audits anomalies, and with `refuse` set denies
    /// the serial from then on. Returns the refusal reason when refused.
    fn travel_check(&self, c: &Caller<'_>) -> Option<String> {
        let lock = |m: &Mutex<std::collections::HashSet<String>>| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(c.serial)
        };
        if lock(&self.refused_serials) {
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
            self.refused_serials
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(c.serial.to_string());
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
            destination_region: self.region.clone(),
            port: c.port,
            method: http.map(|h| h.method.to_string()),
            path: http.map(|h| h.path.to_string()),
            outcome: "allow",
            rule: String::new(),
            mode: "enforced",
            detail: None,
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
    pub fn reload(&self) -> Result<usize, String> {
        let fresh = match crate::policy::load(&self.path) {
            Ok(p) if p.service(&self.service).is_some() => p,
            Ok(_) => Err(format!("no [service.{}] in the new policy", self.service))
                .map_err(|e| self.reload_failed(e))?,
            Err(e) => return Err(self.reload_failed(e.to_string())),
        };
        self.policy.store(Arc::new(fresh));
        self.metrics.reloads.inc();
        self.metrics.stale.set(0);
        tracing::info!(policy = %self.path.display(), "policy reloaded");
        Ok(self.reauthorise())
    }

    fn reload_failed(&self, why: String) -> String {
        self.metrics.reload_failures.inc();
        self.metrics.stale.set(1);
        tracing::error!(policy = %self.path.display(), error = %why, "policy reload refused; keeping the last good policy");
        why
    }

    fn reauthorise(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for l in live.values() {
            let c = Caller {
                peer: &l.peer,
                serial: &l.serial,
                region: l.region.as_deref(),
                port: l.port,
            };
            let (outcome, rule) = self.decide(&c, None, false);
            if outcome == Outcome::Deny {
                closed += 1;
                self.metrics.closed_by_reload.inc();
                tracing::warn!(peer_id = %l.peer, port = l.port, %rule, "closing a live connection the new policy denies");
                let _ = l.close.send(true);
            }
        }
        closed
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
