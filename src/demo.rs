//! `trustline demo`: the main job out of the box, on loopback only.
//!
//! A root CA and a regional intermediate are made in a temporary directory; a CA server issues
//! SVIDs from join tokens (keys made in memory, CSR flow); one workload renews over mTLS with its
//! current SVID and a reused token is refused. Then three sample services run, each with its
//! sidecar (explicit mode): `frontend` may call `checkout`, `batch` may not.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::ca::admin::{self, AdminRequest};
use crate::ca::authority;
use crate::ca::client::CaClient;
use crate::ca::config::CaServeConfig;
use crate::clock::{rfc3339, Clock};
use crate::identity::{parse_trust_domain, parse_workload_id, region_of_chain, Bundle, Svid};

/// Runs the demo and prints what happens.
pub async fn run() -> anyhow::Result<()> {
    let dir = tempdir()?;
    let result = run_in(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let mut b = [0u8; 6];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow::anyhow!("random generator failed"))?;
    let dir = std::env::temp_dir().join(format!("trustline-demo-{}", crate::util::hex(&b)));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn token(data: &Path, id: &str) -> anyhow::Result<String> {
    let r = admin::call(
        &data.join("admin.sock"),
        &AdminRequest::Token {
            spiffe_id: id.into(),
            ttl_secs: 900,
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    r.token
        .ok_or_else(|| anyhow::anyhow!(r.error.unwrap_or_default()))
}

fn show(who: &str, svid: &Svid) {
    println!(
        "  {who:<9} {}\n            serial {}  expires {}  region {}",
        svid.id(),
        svid.info.serial,
        rfc3339(svid.info.not_after),
        region_of_chain(&svid.chain).unwrap_or_else(|| "-".into())
    );
}

async fn run_in(dir: &Path) -> anyhow::Result<()> {
    println!(
        "trustline demo: a mesh on loopback (temporary files in {})",
        dir.display()
    );
    let td = parse_trust_domain("demo.trustline.dev")?;
    let root = dir.join("root");
    let region = dir.join("eu-west");
    authority::init_root(&td, &root, Duration::from_secs(3650 * 86400), false)?;
    authority::init_intermediate(
        &root,
        "eu-west",
        &region,
        Duration::from_secs(365 * 86400),
        false,
    )?;
    println!("\n1. PKI: root CA for trust domain {td}, intermediate for region eu-west");

    let data = dir.join("ca-data");
    let config = CaServeConfig {
        ca_dir: region.clone(),
        data_dir: data.clone(),
        listen: "127.0.0.1:0".parse()?,
        svid_ttl: Duration::from_secs(3600),
        san: vec![],
        metrics_listen: None,
        audit_log: None,
        rate_limit: 50,
    };
    let ca = crate::ca::server::build(config, Clock::system()).await?;
    println!(
        "2. CA serving https://{} (TLS 1.3, ledger {}/ledger.redb)",
        ca.api,
        data.display()
    );

    let bundle = Bundle::from_pem(
        td.clone(),
        &std::fs::read(root.join("bundle.pem"))?,
        "bundle.pem",
    )?;
    let client = CaClient::new(&format!("https://{}", ca.api), bundle, Clock::system())?;
    println!("\n3. Two workloads join with single-use tokens (keys never leave them):");
    let mut svids = Vec::new();
    for (who, id) in [
        (
            "frontend",
            "spiffe://demo.trustline.dev/ns/shop/sa/frontend",
        ),
        (
            "checkout",
            "spiffe://demo.trustline.dev/ns/shop/sa/checkout",
        ),
    ] {
        let id = parse_workload_id(id)?;
        let t = token(&data, &id.to_string()).await?;
        let svid = client
            .issue_with_token(&id, &t)
            .await
            .with_context(|| format!("issuing for {who}"))?;
        show(who, &svid);
        svids.push((t, svid));
    }

    println!("\n4. frontend renews with its current SVID over mTLS:");
    let renewed = client.renew(&svids[0].1).await?;
    show("frontend", &renewed);

    println!("\n5. Reusing frontend's join token is refused:");
    match client.issue_with_token(svids[0].1.id(), &svids[0].0).await {
        Err(e) => println!("  refused: {e}"),
        Ok(_) => anyhow::bail!("a used token was accepted"),
    }
    let ca_url = ca.api.to_string();
    mesh(&Site {
        dir,
        td: &td,
        root: &root,
        ca_url: &ca_url,
        data: &data,
    })
    .await?;
    let issued = ca.state.ledger.issued()?.len();
    println!("\nledger: {issued} certificates issued (CA server certificate not counted); audit log {}/audit.log", data.display());
    ca.shutdown();
    Ok(())
}

/// A tiny app: answers every connection with one line naming itself.
async fn app(name: &'static str) -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                let _ = s
                    .write_all(format!("{name} got {req:?}\n").as_bytes())
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Where the demo's PKI and CA live.
struct Site<'a> {
    dir: &'a Path,
    td: &'a crate::identity::TrustDomain,
    root: &'a Path,
    ca_url: &'a str,
    data: &'a Path,
}

async fn sidecar(
    site: &Site<'_>,
    name: &str,
    inbound: Option<(std::net::SocketAddr, Vec<crate::identity::SpiffeId>)>,
    services: Vec<crate::proxy::config::Service>,
) -> anyhow::Result<crate::proxy::Bound> {
    use crate::identity::manager::{IdentityConfig, IdentitySource};
    use crate::proxy::config::{Inbound, Listener, SidecarConfig};
    let Site {
        dir,
        td,
        root,
        ca_url,
        data,
    } = *site;
    let id = parse_workload_id(&format!("spiffe://{td}/ns/shop/sa/{name}"))?;
    let token_file = dir.join(format!("{name}.token"));
    crate::util::write_secret(&token_file, token(data, &id.to_string()).await?.as_bytes())?;
    let bundle = Bundle::from_pem(
        td.clone(),
        &std::fs::read(root.join("bundle.pem"))?,
        "bundle.pem",
    )?;
    let listeners = services
        .iter()
        .enumerate()
        .map(|(i, s)| Listener {
            listen: "127.0.0.1:0".parse().expect("address"),
            service: i,
            address: s.addresses[0],
        })
        .collect();
    let config = SidecarConfig {
        trust_domain: td.clone(),
        identity: IdentityConfig {
            id,
            bundle,
            source: IdentitySource::Ca {
                url: format!("https://{ca_url}"),
                token_file,
            },
            refresh: Duration::from_secs(30),
        },
        region: Some("eu-west".into()),
        resumption: true,
        drain_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(5),
        workers: 1,
        audit_log: None,
        admin: "127.0.0.1:0".parse()?,
        outbound: None,
        inbound: inbound.map(|(app, allow)| Inbound {
            listen: "127.0.0.1:0".parse().expect("address"),
            allow,
            app_address: Some(app),
            policy: None,
            reload_interval: Duration::from_secs(2),
        }),
        services,
        listeners,
    };
    let bound = crate::proxy::build(config, Clock::system()).await?;
    for _ in 0..200 {
        if bound.identity.ready().is_ok() {
            return Ok(bound);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("sidecar {name} did not become ready")
}

async fn call(addr: std::net::SocketAddr, msg: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return "connection failed".into();
    };
    let _ = s.write_all(msg.as_bytes()).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out)).await;
    if out.is_empty() {
        "connection closed without an answer".into()
    } else {
        out.trim().to_string()
    }
}

async fn mesh(site: &Site<'_>) -> anyhow::Result<()> {
    use crate::proxy::config::Service;
    let td = site.td;
    println!("\n6. Three services with sidecars (mTLS 1.3, SPIFFE IDs checked on both ends):");
    let checkout_app = app("checkout").await?;
    let frontend_id = parse_workload_id(&format!("spiffe://{td}/ns/shop/sa/frontend"))?;
    let checkout = sidecar(
        site,
        "checkout",
        Some((checkout_app, vec![frontend_id])),
        vec![],
    )
    .await?;
    let checkout_in = checkout.inbound.expect("inbound");
    let svc = Service {
        name: "checkout".into(),
        addresses: vec![checkout_in],
        spiffe_ids: vec![checkout.identity.id().clone()],
    };
    let frontend = sidecar(site, "frontend", None, vec![svc.clone()]).await?;
    let batch = sidecar(site, "batch", None, vec![svc]).await?;
    println!(
        "  checkout sidecar: inbound {checkout_in}, allows only {}/ns/shop/sa/frontend",
        td
    );
    let reply = call(frontend.listeners[0], "order #1").await;
    println!(
        "\n  frontend ({}) -> checkout ({}):\n    allowed, app replied: {reply}",
        frontend.identity.id(),
        checkout.identity.id()
    );
    let reply = call(batch.listeners[0], "order #2").await;
    let denied = checkout.metrics.failures("inbound", "not_allowed");
    println!("  batch ({}) -> checkout:\n    refused by checkout's sidecar (not in its allow list; denials counted: {denied}); caller saw: {reply}", batch.identity.id());
    for s in [&frontend, &batch, &checkout] {
        s.drain(Duration::from_millis(200)).await;
    }
    Ok(())
}
