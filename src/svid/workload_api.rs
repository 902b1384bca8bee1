//! The `workload-api` source: follows a SPIFFE Workload API's X.509 stream (a SPIRE agent).
//!
//! Each update is taken whole or not at all: the SVID whose SPIFFE ID is ours (others are
//! refused, loudly), checked against the agent's bundle for our trust domain plus the roots
//! configured locally, then the bundle and the SVID are swapped in. When the socket goes away the
//! last good SVID keeps serving while reconnections back off up to [`RECONNECT_CAP`]; at its
//! expiry it is withdrawn like with every other source. Keys stay in memory and are never logged.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::transport::Endpoint;
use spiffe::{WorkloadApiClient, X509Context};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use super::handle::{expire_if_due, Identity};
use super::Error;
use crate::clock::rfc3339;
use crate::identity::{inspect_cert, Svid};

/// First wait before reconnecting to the Workload API; doubles on each failure.
const RECONNECT_START: Duration = Duration::from_millis(500);
/// Longest wait between reconnections (the agent is local; coming back quickly matters).
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// How long connecting and opening the stream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one connection to the Workload API ended.
enum Ended {
    Shutdown,
    /// Lost, with the reason and whether any update had arrived on it.
    Lost(String, bool),
}

/// The source's task: connect, follow the stream, reconnect with backoff; ends on `shutdown`.
pub(super) async fn run(
    identity: Arc<Identity>,
    endpoint: Endpoint,
    mut shutdown: watch::Receiver<bool>,
) {
    let socket = describe(&endpoint);
    let mut backoff = RECONNECT_START;
    loop {
        match follow(&identity, &endpoint, &mut shutdown).await {
            Ended::Shutdown => return,
            Ended::Lost(error, had_updates) => {
                if had_updates {
                    backoff = RECONNECT_START;
                }
                tracing::warn!(%socket, %error, retry_in = ?backoff, "Workload API unavailable; the current SVID (if any) keeps serving");
            }
        }
        let wait = backoff;
        backoff = (backoff * 2).min(RECONNECT_CAP);
        // Wake at the current SVID's expiry to withdraw it even while the agent is away.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let step = identity.until_expiry().map_or(wait, |e| e.min(wait));
            let step = step.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if !super::sleep_or_stop(step, &mut shutdown).await {
                return;
            }
            expire_if_due(&identity);
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
}

/// One connection: open the X.509 stream and apply its updates until it fails.
async fn follow(
    identity: &Identity,
    endpoint: &Endpoint,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let open = async {
        let client = WorkloadApiClient::connect(endpoint.clone()).await?;
        client.stream_x509_contexts().await
    };
    let mut stream = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, open) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Ended::Lost(e.to_string(), false),
            Err(_) => return Ended::Lost(format!("no answer within {CONNECT_TIMEOUT:?}"), false),
        },
        _ = shutdown.changed() => return Ended::Shutdown,
    };
    tracing::debug!("Workload API X.509 stream open");
    let mut had_updates = false;
    loop {
        let expiry = identity.until_expiry();
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(ctx)) => {
                    had_updates = true;
                    match apply(identity, &ctx) {
                        Ok(Some(svid)) => tracing::info!(
                            serial = %svid.info.serial,
                            not_after = %rfc3339(svid.info.not_after),
                            "SVID published from the Workload API"
                        ),
                        Ok(None) => tracing::debug!("Workload API update without a new SVID"),
                        Err(e) => tracing::error!(
                            error = %e,
                            "Workload API update refused; the current SVID (if any) keeps serving"
                        ),
                    }
                }
                Some(Err(e)) => return Ended::Lost(e.to_string(), had_updates),
                None => return Ended::Lost("the agent closed the stream".into(), had_updates),
            },
            _ = sleep_opt(expiry) => {}
            _ = shutdown.changed() => return Ended::Shutdown,
        }
        expire_if_due(identity);
    }
}

/// Applies one update: picks our SVID, checks it against the agent's bundle for our trust
/// domain plus the configured roots, then swaps the bundle and the SVID. Returns the SVID when
/// it is new (an unchanged one is not re-published, so rotation counts stay true).
fn apply(identity: &Identity, ctx: &X509Context) -> Result<Option<Arc<Svid>>, Error> {
    let ours = identity.id();
    let Some(offered) = ctx.svids().iter().find(|s| s.spiffe_id() == ours) else {
        let ids: Vec<String> = ctx
            .svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        return Err(Error::NotOffered {
            offered: ids,
            ours: ours.clone(),
        });
    };
    let chain: Vec<CertificateDer<'static>> = offered
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        offered.private_key().as_bytes().to_vec(),
    ));
    let leaf = chain.first().ok_or(Error::EmptyChain)?;
    let info = inspect_cert(leaf).map_err(Error::AgentLeaf)?;
    let svid = Svid { chain, key, info };
    let agent_roots = ctx
        .bundle_set()
        .get(ours.trust_domain())
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    let bundle = identity.with_configured_roots(agent_roots)?;
    crate::tls::verify_svid_chain(&bundle, &svid.chain, identity.clock.now()).map_err(
        |source| Error::AgentUnverified {
            serial: svid.info.serial.clone(),
            source,
        },
    )?;
    if bundle.roots != identity.bundle().roots {
        identity
            .trust
            .set_bundle(bundle)
            .map_err(Error::SetBundle)?;
        tracing::info!("trust bundle updated from the Workload API");
    }
    if identity.current().is_some_and(|c| c.chain == svid.chain) {
        return Ok(None);
    }
    identity.publish(svid)?;
    Ok(identity.current())
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The endpoint as users write it, for logs.
fn describe(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Unix(path) => format!("unix://{}", path.display()),
        Endpoint::Tcp { host, port } => {
            format!("tcp://{}", std::net::SocketAddr::new(*host, *port))
        }
        other => format!("{other:?}"),
    }
}
