//! `trustline agent`: the SPIFFE Workload API for the processes of one host (or pod).
//!
//! The agent joins the CA once with a node token, as `spiffe://TD/trustline/agent/NODE` (its own
//! identity task, [`crate::svid::start`], renewing over mTLS), then serves the Workload API on a
//! Unix socket to local processes, which off-the-shelf SPIFFE clients (go-spiffe, py-spiffe,
//! the `spiffe` crate, trustline's own sidecar with `source = "workload-api"`) use unchanged.
//!
//! - **Attestation** ([`attest`]): a caller is who the kernel says (`SO_PEERCRED` uid, gid, pid,
//!   and `/proc/PID/exe`), matched against the config's `[[workload]]` entries; every selector an
//!   entry gives must match. No match: PermissionDenied ("no identity issued") and an audit line.
//!   Several matches: all their IDs, the first (in file order) being the default identity.
//! - **Delegated issuance** ([`workloads`]): the agent makes each workload's key, and obtains its
//!   SVID from the CA with its own SVID as client certificate. The CA grants only the IDs its
//!   `[[agent]]` registration lists for this agent and records which agent asked, so a host
//!   taken over obtains the identities registered to it and no others. SVIDs are obtained at
//!   start for every entry and renewed at half-life with jitter; while the CA is away the
//!   current ones are served until they expire, then withdrawn.
//! - **The API** ([`service`], [`jwt`]): FetchX509SVID and FetchX509Bundles stream the current
//!   state and a new message on every change; FetchJWTSVID, FetchJWTBundles and ValidateJWTSVID
//!   serve the JWT-SVID profile. Every call needs the `workload.spiffe.io: true` metadata.
//! - **Bounds**: connections are capped all together and per uid ([`socket`]), each connection
//!   to [`MAX_STREAMS_PER_CONNECTION`] concurrent calls, requests to [`MAX_REQUEST_BYTES`].
//! - **Operators**: `trustline agent fetch --socket PATH` prints what a caller gets ([`client`]);
//!   the optional `admin` listener serves `/metrics` (each SVID's expiry: how long the host's
//!   identities last if the CA stays down), `/readyz` (the agent holds its own SVID) and
//!   `/identity`.
//!
//! Keys stay in memory and are never logged; they leave the agent only in the answers to the
//! callers that attested for them.

pub mod attest;
pub mod client;
pub mod config;
pub mod jwt;
pub mod metrics;
#[allow(clippy::all, unreachable_pub, missing_docs)]
#[rustfmt::skip]
pub mod pb;
pub mod service;
pub mod socket;
pub mod uds_authority;
pub mod workloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::Instrument;

use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::identity::SpiffeId;
use crate::svid::ca_client::CaClient;
use crate::svid::{Identity, IdentitySource};
use config::AgentConfig;
use metrics::{AgentMetrics, IdLabels};
use pb::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use service::{Shared, WorkloadApi};
use workloads::Workloads;

/// Largest request message accepted (the requests are a few IDs and audiences, or one token).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most concurrent calls (HTTP/2 streams) on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Longest the server waits for open calls to end when the agent stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("identity: {0}")]
    Identity(#[from] crate::svid::Error),
    #[error("CA client: {0}")]
    Ca(#[from] crate::svid::ca_client::ClientError),
    #[error("Workload API socket: {0}")]
    Socket(#[from] socket::SocketError),
    #[error("federation: {0}")]
    Federation(crate::federation::FederationError),
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin listener on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running agent.
pub struct Bound {
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The admin listener's address, if configured.
    pub admin: Option<SocketAddr>,
    /// The agent's own identity.
    pub identity: Arc<Identity>,
    /// The workloads' SVIDs.
    pub workloads: Arc<Workloads>,
    audit: Arc<AuditLog>,
    shutdown: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Bound {
    /// Stops: open streams end, the listener closes, the socket file goes, the audit log is
    /// flushed.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            if tokio::time::timeout(STOP_TIMEOUT, server).await.is_err() {
                tracing::warn!(
                    "Workload API calls still open after {STOP_TIMEOUT:?}; stopping anyway"
                );
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        self.audit.flush();
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Starts the agent: its own identity, its workloads' SVIDs, the admin listener and the
/// Workload API socket.
pub async fn build(config: AgentConfig, clock: Clock) -> Result<Bound, AgentError> {
    let (shutdown, stop) = watch::channel(false);
    let identity = crate::svid::start(config.identity.clone(), clock.clone(), stop.clone())?;
    let IdentitySource::Ca { url, region, .. } = &config.identity.source else {
        unreachable!("the config refuses other sources")
    };
    let client = CaClient::new(url, config.identity.bundle.clone(), clock.clone())?
        .with_trust(identity.trust());
    let client = match region {
        Some(r) => client.expect_region(r.clone()),
        None => client,
    };
    let mut ids: Vec<SpiffeId> = Vec::new();
    for e in &config.workloads {
        if !ids.contains(&e.spiffe_id) {
            ids.push(e.spiffe_id.clone());
        }
    }
    let workloads = Workloads::start(
        &ids,
        &identity,
        client.clone(),
        config.identity.jitter,
        stop.clone(),
    );
    let audit = Arc::new(match &config.audit_log {
        Some(p) => AuditLog::open(p).map_err(|source| AgentError::Audit {
            path: p.clone(),
            source,
        })?,
        None => AuditLog::disabled(),
    });
    let mut registry = Registry::default();
    let metrics = AgentMetrics::new(&mut registry);
    identity.register(&mut registry);
    tokio::spawn(watch_expiry(
        identity.clone(),
        workloads.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let admin = match config.admin {
        None => None,
        Some(addr) => {
            let state = admin_state(registry, &identity, &workloads);
            Some(
                crate::admin::serve(addr, state, stop.clone())
                    .await
                    .map_err(|source| AgentError::Admin { addr, source })?,
            )
        }
    };
    let listener = socket::bind(&config.socket, config.socket_mode, config.socket_group).await?;
    let slots = socket::Slots::new(
        config.max_connections,
        config.max_connections_per_uid,
        metrics.connections.clone(),
    );
    let incoming = socket::incoming(listener, slots, metrics.refusals.clone(), stop.clone());
    // Federated trust domains: fetched from their bundle endpoints, handed to callers.
    let federation = crate::federation::Federation::new(
        config.federation.clone(),
        None,
        identity.clock().clone(),
    )
    .map_err(AgentError::Federation)?;
    federation.spawn(stop.clone());
    workloads.follow(federation.changes(), stop.clone());
    let api = WorkloadApi {
        shared: Arc::new(Shared {
            entries: config.workloads.clone(),
            workloads: workloads.clone(),
            agent: identity.clone(),
            audit: audit.clone(),
            metrics,
            allow_unauthenticated_verifiers: config.allow_unauthenticated_verifiers,
            shutdown: stop.clone(),
            proc_root: PathBuf::from("/proc"),
            federation,
            jwt: jwt::JwtService::new(
                client,
                identity.clone(),
                config.identity.refresh,
                stop.clone(),
            ),
        }),
    };
    let service = SpiffeWorkloadApiServer::new(api)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(4 << 20);
    let mut server_stop = stop.clone();
    let socket_path = config.socket.clone();
    let server = tokio::spawn(
        async move {
            let r = tonic::transport::Server::builder()
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .http2_max_header_list_size(16 * 1024)
                .serve_with_incoming_shutdown(service, incoming, async move {
                    let _ = server_stop.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "the Workload API server stopped");
            }
        }
        .instrument(tracing::info_span!("workload_api", socket = %socket_path.display())),
    );
    tracing::info!(
        socket = %config.socket.display(),
        id = %identity.id(),
        workloads = ids.len(),
        "Workload API serving"
    );
    Ok(Bound {
        socket: config.socket,
        admin,
        identity,
        workloads,
        audit,
        shutdown,
        server: Some(server),
    })
}

/// Publishes the expiry of every SVID held (0 when none) on every change, until `stop`.
async fn watch_expiry(
    agent: Arc<Identity>,
    workloads: Arc<Workloads>,
    metrics: AgentMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = workloads.changes();
    let mut own = agent.rotations();
    loop {
        for i in std::iter::once(&agent).chain(workloads.all()) {
            let expiry = i
                .current()
                .map_or(0, |s| crate::clock::unix_secs(s.info.not_after));
            metrics
                .svid_expiry
                .get_or_create(&IdLabels {
                    spiffe_id: i.id().to_string(),
                })
                .set(expiry as i64);
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = own.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// `/identity`: the agent's SVID and each workload's, with how long each lasts if the CA
/// stayed down from now.
fn identity_json(agent: &Identity, workloads: &Workloads) -> serde_json::Value {
    let now = agent.clock().now();
    let one = |i: &Identity| match i.current() {
        None => serde_json::json!({"spiffe_id": i.id().to_string(), "ready": false}),
        Some(s) => {
            let left = workloads::seconds_left(&s, now);
            serde_json::json!({
                "spiffe_id": i.id().to_string(),
                "serial": s.info.serial.to_string(),
                "not_after": crate::clock::rfc3339(s.info.not_after),
                "seconds_left_if_ca_down": left,
                "ready": left > 0,
            })
        }
    };
    serde_json::json!({
        "agent": one(agent),
        "workloads": workloads.all().iter().map(|i| one(i)).collect::<Vec<_>>(),
    })
}

fn admin_state(
    registry: Registry,
    agent: &Arc<Identity>,
    workloads: &Arc<Workloads>,
) -> Arc<crate::admin::AdminState> {
    let ready = agent.clone();
    let (a, w) = (agent.clone(), workloads.clone());
    Arc::new(crate::admin::AdminState {
        registry,
        ready: Box::new(move || ready.ready()),
        json: vec![("/identity", Box::new(move || identity_json(&a, &w)))],
    })
}
