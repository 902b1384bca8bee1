//! `trustline demo`: the main job out of the box, on loopback only.
//!
//! A root CA and a regional intermediate are made in a temporary directory; a CA server issues
//! SVIDs from join tokens (keys made in memory, CSR flow); one workload renews over mTLS with its
//! current SVID and a reused token is refused. Then three sample services run, each with its
//! sidecar (explicit mode): `frontend` may call `checkout`, `batch` may not.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::ca::admin;
use crate::ca::authority;
use crate::ca::config::CaServeConfig;
use crate::clock::{rfc3339, Clock};
use crate::identity::{parse_trust_domain, parse_workload_id, region_of_chain, Bundle, Svid};
use crate::region::{Region, ServiceName};
use crate::svid::ca_client::CaClient;

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
    admin::token(&data.join("admin.sock"), id, 900)
        .await
        .map_err(anyhow::Error::msg)
}

fn show(who: &str, svid: &Svid) {
    println!(
        "  {who:<9} {}\n            serial {}  expires {}  region {}",
        svid.id(),
        svid.info.serial,
        rfc3339(svid.info.not_after),
        region_of_chain(&svid.chain).map_or_else(|| "-".to_string(), |r| r.to_string())
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
        bundle_endpoint: None,
        rate_limit: 50,
        peers: Default::default(),
        limits: Default::default(),
        ledger: None,
        ledger_options: Default::default(),
        jwt_ttl: std::time::Duration::from_secs(300),
        agents: Vec::new(),
        file: None,
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
    let client = CaClient::new(&format!("https://{}", ca.api), bundle, Clock::system())?
        .expect_region(Region::new("eu-west")?);
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
    let issued = ca.state.ledger.issued().await?.len();
    println!("\nledger: {issued} certificates issued (CA server certificate not counted); audit log {}/audit.log", data.display());
    ca.shutdown();
    ca.state.audit.flush();
    Ok(())
}

/// A tiny app: answers every connection with one line naming itself.
/// A tiny HTTP app: answers each request with one line naming itself and the request line.
async fn app(name: &'static str) -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                loop {
                    let mut first = String::new();
                    if s.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut line = String::new();
                    let mut close = false;
                    while s.read_line(&mut line).await.unwrap_or(0) > 2 {
                        close |= line.trim().eq_ignore_ascii_case("connection: close");
                        line.clear();
                    }
                    let body = format!("{name} got {:?}\n", first.trim());
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.get_mut().write_all(resp.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
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

/// The inbound side of a demo sidecar: its app and its policy file.
struct InboundSpec {
    app: std::net::SocketAddr,
    policy: std::path::PathBuf,
    service: String,
}

async fn sidecar(
    site: &Site<'_>,
    name: &str,
    inbound: Option<InboundSpec>,
    services: Vec<crate::proxy::config::Service>,
) -> anyhow::Result<crate::proxy::Bound> {
    use crate::proxy::config::{Inbound, Listener, SidecarConfig};
    use crate::svid::{IdentityConfig, IdentitySource};
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
        federation: Vec::new(),
        trust_domain: td.clone(),
        identity: IdentityConfig {
            id,
            bundle,
            source: IdentitySource::Ca {
                url: format!("https://{ca_url}"),
                token_file,
                region: Some(Region::new("eu-west")?),
            },
            refresh: Duration::from_secs(30),
            jitter: Default::default(),
        },
        region: Some(Region::new("eu-west")?),
        resumption: true,
        pooling: true,
        pool_idle_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(5),
        workers: 1,
        audit_log: Some(dir.join(format!("{name}-audit.log"))),
        admin: "127.0.0.1:0".parse()?,
        outbound: None,
        inbound: inbound.map(|i| Inbound {
            listen: "127.0.0.1:0".parse().expect("address"),
            allow: vec![],
            app_address: Some(i.app),
            ports: vec![],
            policy: Some((i.policy, i.service)),
            reload_interval: Duration::from_secs(2),
            anomaly: Default::default(),
            sessions: Default::default(),
        }),
        services,
        listeners,
        tunnel: None,
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

/// One HTTP request over a plain connection to a sidecar listener; the status line and body.
async fn call(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return "connection failed".into();
    };
    let req = format!("{method} {path} HTTP/1.1\r\nhost: checkout\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out)).await;
    let status = out.lines().next().unwrap_or("").trim().to_string();
    let body = out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    if out.is_empty() {
        "connection closed without an answer".into()
    } else {
        format!("{status} | {body}")
    }
}

fn write_policy(
    dir: &Path,
    td: &crate::identity::TrustDomain,
    port: u16,
) -> anyhow::Result<std::path::PathBuf> {
    let text = format!(
        r#"[service.checkout]
http_ports = [{port}]

[[service.checkout.rule]]
name = "no-batch"
action = "deny"
from = ["spiffe://{td}/ns/shop/sa/batch"]

[[service.checkout.rule]]
name = "frontend-orders"
action = "allow"
from = ["spiffe://{td}/ns/shop/sa/frontend"]
methods = ["GET", "POST"]
paths = ["/orders/*"]
"#
    );
    let path = dir.join("checkout-policy.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn mesh(site: &Site<'_>) -> anyhow::Result<()> {
    use crate::proxy::config::Service;
    let td = site.td;
    println!("\n6. Three services with sidecars (mTLS 1.3, SPIFFE IDs checked on both ends):");
    let checkout_app = app("checkout").await?;
    let policy = write_policy(site.dir, td, checkout_app.port())?;
    println!("  checkout's policy ({}):", policy.display());
    println!("    deny  no-batch:        from .../sa/batch");
    println!("    allow frontend-orders: from .../sa/frontend, GET|POST /orders/*");
    println!("    default deny");
    let spec = InboundSpec {
        app: checkout_app,
        policy,
        service: "checkout".into(),
    };
    let checkout = sidecar(site, "checkout", Some(spec), vec![]).await?;
    let svc = Service {
        name: ServiceName::new("checkout")?,
        region: None,
        addresses: vec![checkout.inbound.expect("inbound")],
        spiffe_ids: vec![checkout.identity.id().clone()],
    };
    let frontend = sidecar(site, "frontend", None, vec![svc.clone()]).await?;
    let batch = sidecar(site, "batch", None, vec![svc]).await?;
    for (who, sc, method, path) in [
        ("frontend", &frontend, "GET", "/orders/42"),
        ("frontend", &frontend, "DELETE", "/orders/42"),
        ("batch", &batch, "GET", "/orders/42"),
    ] {
        let reply = call(sc.listeners[0], method, path).await;
        println!(
            "\n  {who} ({}) -> checkout: {method} {path}\n    {reply}",
            sc.identity.id()
        );
    }
    for s in [&frontend, &batch, &checkout] {
        s.drain(Duration::from_millis(200)).await;
    }
    println!("\n7. checkout's audit trail (one JSON line per decision):");
    let log = std::fs::read_to_string(site.dir.join("checkout-audit.log")).unwrap_or_default();
    for line in log.lines() {
        println!("  {line}");
    }
    regions(&site.dir.join("regions")).await
}

/// Part two: two regions 150 ms apart, each with its own CA and gateway.
async fn regions(dir: &Path) -> anyhow::Result<()> {
    use crate::lab::{Lab, LabOptions, TD};
    use tokio::time::Instant;
    std::fs::create_dir_all(dir)?;
    let options = LabOptions::default();
    println!(
        "\n8. Two regions, a and b, {} ms apart (userspace WAN relay): one root, an intermediate and a CA per region,",
        (options.one_way_delay * 2).as_millis()
    );
    println!("   a gateway per region; gateways keep a warm QUIC (mTLS 1.3) tunnel to each other.");
    let mut lab = Lab::new(dir, options.clone()).await?;
    let app = app("api").await?;
    let policy = dir.join("api-policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[service.api]\n\n[[service.api.rule]]\nname = \"web-from-a\"\naction = \"allow\"\n\
             from = [\"spiffe://{TD}/ns/shop/sa/web\"]\nregions = [\"a\"]\n"
        ),
    )?;
    let api = lab
        .sidecar(
            "b",
            "api",
            &format!("[inbound]\nlisten = \"127.0.0.1:0\"\napp_address = \"{app}\"\npolicy = {policy:?}\nservice = \"api\"\n"),
        )
        .await?;
    let api_addr = api.inbound.context("api inbound")?;
    lab.start_gateways(
        "b",
        &format!(
            "[[expose]]\nservice = \"api\"\naddresses = [\"{api_addr}\"]\n\n\
             [[expose]]\nservice = \"admin\"\naddresses = [\"127.0.0.1:9\"]\n\n\
             [[rule]]\nname = \"a-to-api\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"api\"]\n"
        ),
    )
    .await?;
    lab.start_gateways(
        "a",
        "[[rule]]\nname = \"a-out\"\nfrom = [\"a\"]\nto = [\"b\"]\nservices = [\"*\"]\n",
    )
    .await?;
    lab.wait_paths_up().await?;
    println!("   gateway b exposes api (allowed from region a by rule a-to-api) and admin (no rule: refused)");
    let web = lab
        .sidecar(
            "a",
            "web",
            &format!(
                "prewarm = false\n\n\
                 [[service]]\nname = \"api\"\nregion = \"b\"\naddresses = [\"{api_addr}\"]\nspiffe_ids = [\"spiffe://{TD}/ns/shop/sa/api\"]\n\n\
                 [[listener]]\nlisten = \"127.0.0.1:0\"\nservice = \"api\"\n\n\
                 [[service]]\nname = \"admin\"\nregion = \"b\"\naddresses = [\"127.0.0.1:9\"]\nspiffe_ids = [\"spiffe://{TD}/ns/shop/sa/api\"]\n\n\
                 [[listener]]\nlisten = \"127.0.0.1:0\"\nservice = \"admin\"\n"
            ),
        )
        .await?;
    let rtt = options.one_way_delay * 2;
    for what in [
        "first call (opens the sidecar-to-sidecar session)",
        "second call (new connection, warm session)",
        "third call (new connection, warm session)",
    ] {
        let started = Instant::now();
        let reply = call(web.listeners[0], "GET", "/orders/7").await;
        let took = started.elapsed(); // the app answers and closes at once: about the first byte
        println!(
            "\n   web (region a) -> api (region b), {what}:\n    {reply}\n    {:.0} ms = {:.2} RTT (plain TCP + TLS 1.3 needs 3 RTT)",
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() / rtt.as_secs_f64()
        );
    }
    let reply = call(web.listeners[1], "GET", "/").await;
    println!("\n   web -> admin (region b): {reply}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The audit lines are written by each log's own thread: out before reading them.
    api.audit.flush();
    for gw in lab.regions.iter().flat_map(|r| r.gateways.iter().flatten()) {
        gw.audit.flush();
    }
    println!("\n9. api's sidecar decided on web's own identity and region (its audit line):");
    let log = std::fs::read_to_string(dir.join("api-audit.log")).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("\"decision\"")).take(1) {
        println!("  {line}");
    }
    println!("\n   gateway b refused the admin stream (its audit line):");
    let log = std::fs::read_to_string(dir.join("gateway-b0-audit.log")).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("stream_refused")).take(1) {
        println!("  {line}");
    }
    for s in [&web, &api] {
        s.drain(Duration::from_millis(200)).await;
    }
    for r in ["a", "b"] {
        lab.stop_gateway(r, 0).await;
    }
    Ok(())
}
