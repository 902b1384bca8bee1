//! One tunnel connection: who its peer is (a sidecar of this region or another region's
//! gateway), the workload's connection and stream quotas, and the re-checks of the peer's
//! certificate while the connection lasts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use super::{refuse_over_quota, streams, Gateway, Role};
use crate::audit::tunnel::TunnelEvent;
use crate::identity::CertInfo;
use crate::limits::Permit;
use crate::refusal::Refusal;
use crate::tunnel::metrics::{PathLabels, Refused};
use crate::tunnel::quic::{quic_io, reset};
use crate::tunnel::{code, gateway_id, Error, TunnelPeer};

/// The other end of an accepted connection, as its streams need it.
pub(super) struct Peer {
    pub(super) role: Role,
    /// A workload's key for its quotas, shared by its streams (no allocation per stream).
    workload: Option<Arc<str>>,
    pub(super) remote: SocketAddr,
    /// A peer gateway's path labels (its bytes are counted on them).
    pub(super) labels: Option<PathLabels>,
}

/// Serves an accepted connection: decides its peer's role (or closes it), holds a workload's
/// connection quota, and accepts streams until the connection ends, the gateway stops or the
/// peer's certificate lapses.
pub(super) async fn serve(gw: Arc<Gateway>, conn: quinn::Connection, stop: watch::Receiver<bool>) {
    let remote = conn.remote_address();
    let role = match role_of(&gw, &conn) {
        Ok(r) => r,
        Err(why) => return refuse(&gw, &conn, why),
    };
    let labels = announce(&gw, &role, remote);
    let workload: Option<Arc<str>> = match &role {
        Role::Workload { id } => Some(Arc::from(id.as_str())),
        Role::Gateway { .. } => None,
    };
    let _conn_place = match &workload {
        Some(id) => match gw.quotas.conns_by_id.enter(id.clone()) {
            Ok(p) => Some(p),
            Err(_) => {
                refuse_over_quota(
                    &gw,
                    remote,
                    Some(id),
                    Refusal::ConnectionQuota,
                    "too many connections of one workload",
                );
                conn.close(quinn::VarInt::from_u32(code::REFUSED), b"connection quota");
                return;
            }
        },
        None => None,
    };
    // Several gateways of a region share the label set: the gauge counts their connections.
    if let Some(l) = &labels {
        gw.metrics.up.get_or_create(l).inc();
    }
    let peer = Peer {
        role,
        workload,
        remote,
        labels,
    };
    accept_streams(&gw, &conn, &peer, stop).await;
    if let Some(l) = &peer.labels {
        gw.metrics.up.get_or_create(l).dec();
    }
}

/// Decides the role of an accepted connection, or why it is refused.
fn role_of(gw: &Gateway, conn: &quinn::Connection) -> Result<Role, Error> {
    let peer = TunnelPeer::of(conn)?;
    let own = &gw.config.region;
    if let Some(r) = peer.gateway_of() {
        if own == r {
            return Err(Error::SameRegionGateway { id: peer.id });
        }
        return Ok(Role::Gateway {
            region: r.to_string(),
        });
    }
    if peer.issued_in.as_deref() != Some(own.as_str()) {
        return Err(Error::NotWorkloadOfRegion {
            id: peer.id,
            issued_in: peer.issued_in,
            region: own.clone(),
        });
    }
    Ok(Role::Workload {
        id: peer.id.to_string(),
    })
}

/// Closes a connection whose peer may not use this gateway, audited.
fn refuse(gw: &Gateway, conn: &quinn::Connection, why: Error) {
    let remote = conn.remote_address();
    let why = why.to_string();
    tracing::warn!(%remote, %why, "tunnel connection refused");
    gw.metrics
        .refused
        .get_or_create(&Refused::from(Refusal::BadPeer))
        .inc();
    let ev = TunnelEvent::new(&gw.clock, "tunnel_refused", remote, None, why.clone());
    gw.audit.record(&ev);
    conn.close(quinn::VarInt::from_u32(code::REFUSED), why.as_bytes());
}

/// Logs (and for a peer gateway, audits) an accepted connection and records its peer in the
/// connection's span; returns a peer gateway's path labels.
fn announce(gw: &Gateway, role: &Role, remote: SocketAddr) -> Option<PathLabels> {
    match role {
        Role::Gateway { region } => {
            let peer = gateway_id(gw.identity.id().trust_domain(), region).to_string();
            tracing::Span::current().record("peer", peer.as_str());
            let mut ev = TunnelEvent::new(&gw.clock, "tunnel_up", remote, Some(region), "accepted");
            ev.peer_id = Some(peer.clone());
            gw.audit.record(&ev);
            tracing::info!(%remote, %region, "gateway of another region connected");
            // Labelled by the peer's identity, never its ip:port: every reconnection would add
            // new series.
            Some(PathLabels {
                peer,
                region: region.clone(),
            })
        }
        Role::Workload { id } => {
            tracing::Span::current().record("peer", id.as_str());
            tracing::debug!(%remote, %id, "sidecar connected");
            None
        }
    }
}

/// Accepts the connection's streams until it ends or the gateway stops. The peer's certificate
/// is re-checked while the connection lasts: on every change of the revocation list, at its
/// expiry, and at least every refresh interval.
async fn accept_streams(
    gw: &Arc<Gateway>,
    conn: &quinn::Connection,
    peer: &Peer,
    mut stop: watch::Receiver<bool>,
) {
    let peer_cert = crate::tunnel::peer_chain(conn)
        .first()
        .and_then(|c| crate::identity::inspect_cert(c).ok());
    let mut revocations = gw.identity.revocations();
    let recheck = tokio::time::sleep(next_recheck(gw, peer_cert.as_ref()));
    tokio::pin!(recheck);
    loop {
        let lapsed = tokio::select! {
            _ = &mut recheck => true,
            r = revocations.changed() => r.is_ok(),
            s = conn.accept_bi() => match s {
                Ok(bi) => {
                    accept_stream(gw, bi, peer);
                    continue;
                }
                Err(e) => {
                    if let Role::Gateway { region } = &peer.role {
                        let ev = TunnelEvent::new(&gw.clock, "tunnel_down", peer.remote, Some(region), e.to_string());
                        gw.audit.record(&ev);
                        tracing::warn!(remote = %peer.remote, %region, error = %e, "gateway of another region disconnected");
                    }
                    return;
                }
            },
            _ = stop.changed() => return,
        };
        if lapsed {
            if let Some(reason) = peer_cert_lapsed(gw, peer_cert.as_ref()) {
                return close_lapsed(gw, conn, &peer.role, reason);
            }
            recheck
                .as_mut()
                .reset(tokio::time::Instant::now() + next_recheck(gw, peer_cert.as_ref()));
        }
    }
}

/// Serves one stream of a tunnel connection, or resets it when the workload is over its quota.
fn accept_stream(gw: &Arc<Gateway>, bi: (quinn::SendStream, quinn::RecvStream), peer: &Peer) {
    let place = match stream_place(gw, peer.workload.as_ref()) {
        Ok(p) => p,
        Err(id) => {
            let why = "too many open streams of one workload";
            refuse_over_quota(gw, peer.remote, Some(id), Refusal::StreamQuota, why);
            reset(&mut quic_io(bi), code::REFUSED);
            return;
        }
    };
    // Created inside the connection's span, which is its parent.
    let span = tracing::info_span!("stream", id = bi.0.id().index());
    let (gw, role, remote, labels) = (
        gw.clone(),
        peer.role.clone(),
        peer.remote,
        peer.labels.clone(),
    );
    let stream = async move {
        let _place = place;
        let io = quic_io(bi);
        streams::handle_stream(&gw, role, io, remote, labels).await;
    };
    tokio::spawn(stream.instrument(span));
}

/// A place for one more stream of `workload` (none needed for a peer gateway's streams), or the
/// workload that is at its quota.
fn stream_place<'a>(
    gw: &Gateway,
    workload: Option<&'a Arc<str>>,
) -> Result<Option<Permit<Arc<str>>>, &'a str> {
    match workload {
        None => Ok(None),
        Some(id) => gw
            .quotas
            .streams_by_id
            .enter(id.clone())
            .map(Some)
            .map_err(|_| id.as_ref()),
    }
}

/// Until the next re-check of a connection's peer certificate: the refresh interval, or its
/// expiry if that is sooner.
fn next_recheck(gw: &Gateway, cert: Option<&CertInfo>) -> Duration {
    let every = gw.config.identity.refresh;
    let Some(c) = cert else { return every };
    let left = c
        .not_after
        .duration_since(gw.clock.now())
        .unwrap_or_default();
    every.min(left + Duration::from_millis(1))
}

/// Why a connection's peer certificate no longer passes (`revoked`, `expired_certificate`).
fn peer_cert_lapsed(gw: &Gateway, cert: Option<&CertInfo>) -> Option<Refusal> {
    let Some(c) = cert else {
        return Some(Refusal::NoCertificate);
    };
    if gw.identity.revoked.load().contains(&c.serial) {
        Some(Refusal::Revoked)
    } else if gw.clock.now() >= c.not_after {
        Some(Refusal::ExpiredCertificate)
    } else {
        None
    }
}

/// Closes a tunnel connection (and its streams) whose peer certificate lapsed, audited.
fn close_lapsed(gw: &Gateway, conn: &quinn::Connection, role: &Role, reason: Refusal) {
    let remote = conn.remote_address();
    let region = gw.region_of(role);
    let label = reason.label();
    tracing::warn!(%remote, reason = label, "closing a tunnel connection: its peer's certificate no longer passes");
    gw.metrics
        .refused
        .get_or_create(&Refused::from(reason))
        .inc();
    let mut ev = TunnelEvent::new(&gw.clock, "tunnel_closed", remote, Some(region), label);
    if let Role::Workload { id } = role {
        ev.peer_id = Some(id.clone());
    }
    gw.audit.record(&ev);
    conn.close(quinn::VarInt::from_u32(code::REFUSED), label.as_bytes());
}
