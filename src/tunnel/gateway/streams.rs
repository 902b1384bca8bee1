//! One tunnel stream: its header, the region-level policy, and the forwarding of its bytes, to
//! a destination of this region (`arriving`) or over a path to another region (`leaving`).

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{Gateway, Role};
use crate::audit::tunnel::TunnelEvent;
use crate::policy::region::RegionDecision;
use crate::refusal::Refusal;
use crate::tunnel::header::StreamHeader;
use crate::tunnel::metrics::{PathLabels, Refused};
use crate::tunnel::paths::PathStream;
use crate::tunnel::quic::{reset, reset_code, QuicIo};
use crate::tunnel::{code, HEADER_TIMEOUT};

/// How long a leaving stream waits for a path to the other region: shorter than the sidecar's
/// own [`crate::tunnel::PATH_WAIT`], so the sidecar hears the refusal rather than timing out.
const REMOTE_PATH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a stream is refused: the QUIC error code sent back, the reason (its metric label), the
/// deciding gateway rule when there is one, and the details.
struct StreamRefusal {
    code: u32,
    reason: Refusal,
    rule: Option<String>,
    detail: String,
}

/// Why a stream the policy allowed could not be carried: the refusal's detail.
#[derive(Debug, thiserror::Error)]
enum CarryError {
    /// The exposed destination refused or failed the connection.
    #[error("{addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The exposed destination did not answer within the connect timeout.
    #[error("{addr}: connect timed out")]
    ConnectTimeout { addr: SocketAddr },
    /// The path to the other region broke before the stream's header was out.
    #[error("forwarding the header: {0}")]
    ForwardHeader(quinn::WriteError),
}

fn refusal(code: u32, reason: Refusal, rule: Option<&str>, detail: String) -> StreamRefusal {
    StreamRefusal {
        code,
        reason,
        rule: rule.map(str::to_string),
        detail,
    }
}

/// Refuses one stream (the tunnel stays up), with an audit event and a metric.
fn refuse(
    gw: &Gateway,
    mut io: QuicIo,
    remote: SocketAddr,
    role: &Role,
    header: Option<&StreamHeader>,
    r: StreamRefusal,
) {
    let region = gw.region_of(role);
    let StreamRefusal {
        code,
        reason,
        rule,
        detail,
    } = r;
    let label = reason.label();
    tracing::warn!(%remote, reason = label, %detail, "stream refused");
    gw.metrics
        .refused
        .get_or_create(&Refused::from(reason))
        .inc();
    let mut ev = TunnelEvent::new(
        &gw.clock,
        "stream_refused",
        remote,
        Some(region),
        format!("{label}: {detail}"),
    );
    if let Role::Workload { id } = role {
        ev.peer_id = Some(id.clone());
    }
    if let Some(h) = header {
        ev.destination_region = Some(h.region.to_string());
        ev.destination_service = Some(h.service.to_string());
        ev.destination_address = Some(h.addr.to_string());
    }
    ev.rule = rule;
    gw.audit.record(&ev);
    reset(&mut io, code);
}

/// Reads a stream's header, then carries the stream in the direction its peer's role says.
pub(super) async fn handle_stream(
    gw: &Gateway,
    role: Role,
    mut io: QuicIo,
    remote: SocketAddr,
    labels: Option<PathLabels>,
) {
    let header =
        match tokio::time::timeout(HEADER_TIMEOUT, StreamHeader::read(io.reader_mut())).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let r = refusal(code::BAD_HEADER, Refusal::BadHeader, None, e.to_string());
                return refuse(gw, io, remote, &role, None, r);
            }
            Err(_) => {
                let r = refusal(
                    code::BAD_HEADER,
                    Refusal::HeaderTimeout,
                    None,
                    format!("no header within {HEADER_TIMEOUT:?}"),
                );
                return refuse(gw, io, remote, &role, None, r);
            }
        };
    let carried = match &role {
        Role::Gateway { region } => arriving(gw, region, &header, &mut io, labels.as_ref()).await,
        Role::Workload { id } => leaving(gw, id, &header, &mut io).await,
    };
    if let Err(r) = carried {
        refuse(gw, io, remote, &role, Some(&header), r);
    }
}

/// A stream from another region's gateway (`from`): this region, allowed, exposed, reachable;
/// then its bytes go to the destination address.
async fn arriving(
    gw: &Gateway,
    from: &str,
    header: &StreamHeader,
    io: &mut QuicIo,
    labels: Option<&PathLabels>,
) -> Result<(), StreamRefusal> {
    let own = gw.config.region.as_str();
    if header.region != own {
        let detail = format!("stream for region {} reached region {own}", header.region);
        return Err(refusal(code::NO_ROUTE, Refusal::WrongRegion, None, detail));
    }
    let RegionDecision { allowed, rule } = gw.config.policy.decide(from, own, &header.service);
    if !allowed {
        let detail = format!("region {from} may not reach {}", header.service);
        return Err(refusal(
            code::REFUSED,
            Refusal::PolicyDenied,
            Some(rule),
            detail,
        ));
    }
    let exposed = gw
        .config
        .exposed
        .iter()
        .find(|e| e.service == header.service)
        .is_some_and(|e| e.addresses.contains(&header.addr));
    if !exposed {
        let detail = format!(
            "{} at {} is not exposed by this gateway",
            header.service, header.addr
        );
        return Err(refusal(
            code::REFUSED,
            Refusal::NotExposed,
            Some(rule),
            detail,
        ));
    }
    let mut tcp = connect(gw, header.addr).await.map_err(|e| {
        let detail = e.to_string();
        refusal(code::UNREACHABLE, Refusal::Unreachable, Some(rule), detail)
    })?;
    tracing::debug!(%from, service = %header.service, addr = %header.addr, %rule, "stream in");
    match crate::copy::splice(&mut tcp, io).await {
        Ok((to_tunnel, from_tunnel)) => {
            if let Some(l) = labels {
                gw.metrics.count_bytes(l, to_tunnel, from_tunnel);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "inbound stream broke");
            reset(io, code::BROKEN);
        }
    }
    Ok(())
}

/// Connects to an exposed destination within the connect timeout.
async fn connect(gw: &Gateway, addr: SocketAddr) -> Result<TcpStream, CarryError> {
    match tokio::time::timeout(gw.config.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(error)) => Err(CarryError::Connect { addr, error }),
        Err(_) => Err(CarryError::ConnectTimeout { addr }),
    }
}

/// A stream from a sidecar of this region (`id`): another region, allowed, a path up; then it
/// rides a new stream on the best path to that region.
async fn leaving(
    gw: &Gateway,
    id: &str,
    header: &StreamHeader,
    io: &mut QuicIo,
) -> Result<(), StreamRefusal> {
    let own = gw.config.region.as_str();
    if header.region == own {
        let detail = "same region: the sidecar connects directly".to_string();
        return Err(refusal(code::NO_ROUTE, Refusal::SameRegion, None, detail));
    }
    let RegionDecision { allowed, rule } =
        gw.config
            .policy
            .decide(own, &header.region, &header.service);
    if !allowed {
        let detail = format!(
            "{id} may not leave for {} in {}",
            header.service, header.region
        );
        return Err(refusal(
            code::REFUSED,
            Refusal::PolicyDenied,
            Some(rule),
            detail,
        ));
    }
    let Some(paths) = gw.peers.get(&header.region) else {
        let detail = format!("no [[peer]] for region {}", header.region);
        return Err(refusal(
            code::NO_ROUTE,
            Refusal::NoRoute,
            Some(rule),
            detail,
        ));
    };
    let out = paths
        .open(REMOTE_PATH_WAIT)
        .await
        .map_err(|e| refusal(code::NO_ROUTE, Refusal::NoPath, Some(rule), e.to_string()))?;
    ride(io, id, header, out)
        .await
        .map_err(|e| refusal(code::BROKEN, Refusal::PathLost, Some(rule), e.to_string()))
}

/// Sends a leaving stream's header on its path stream, then copies its bytes both ways and
/// counts them on the path. Fails only when the path broke before the header was out.
async fn ride(
    io: &mut QuicIo,
    id: &str,
    header: &StreamHeader,
    out: PathStream,
) -> Result<(), CarryError> {
    let PathStream { io: mut up, load } = out;
    // A header that parsed encodes again to the same bytes (see the header's tests).
    if let Err(e) = up.writer_mut().write_all(&header.encode()).await {
        return Err(CarryError::ForwardHeader(e));
    }
    tracing::debug!(%id, region = %header.region, service = %header.service, path = %load.path.addr, "stream out");
    match crate::copy::splice(io, &mut up).await {
        Ok((tx, rx)) => load.count(tx, rx),
        Err(e) => {
            // Carry the far side's reset code back to the sidecar.
            let c = reset_code(&e).unwrap_or(code::BROKEN);
            tracing::debug!(error = %e, code = c, "outbound stream broke");
            reset(io, c);
            reset(&mut up, code::BROKEN);
        }
    }
    Ok(())
}
