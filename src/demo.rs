//! `trustline demo`: the main job out of the box, on loopback only.
//!
//! Today it shows the identity layer: a root CA and a regional intermediate are made in a temporary
//! directory, a CA server issues SVIDs from join tokens to two workloads (keys made in memory, CSR
//! flow), one renews over mTLS with its current SVID, and a reused token is refused.

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
    let issued = ca.state.ledger.issued()?.len();
    println!("\nledger: {issued} certificates issued (CA server certificate not counted); audit log {}/audit.log", data.display());
    ca.shutdown();
    Ok(())
}
