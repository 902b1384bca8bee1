//! A two-region mesh on loopback, built from the real components: one root, one intermediate
//! and one `ca serve` per region, gateways per region, and a userspace WAN relay
//! ([`crate::wan`]) in front of every gateway so the regions are a chosen RTT apart. Used by
//! `trustline demo`, the cross-region tests and the time-to-first-byte benchmark. Every piece
//! is configured from the same TOML files a user would write.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::ca::admin;
use crate::ca::config::CaServeConfig;
use crate::clock::Clock;
use crate::identity::{parse_trust_domain, TrustDomain};
use crate::proxy::config::SidecarConfig;
use crate::tunnel::config::GatewayConfig;
use crate::wan::{RelayHandle, WanSpec};

/// The lab's trust domain.
pub const TD: &str = "mesh.example";

/// How the lab is laid out.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// One-way delay between the regions (half the RTT).
    pub one_way_delay: Duration,
    /// Gateways per region.
    pub gateways: usize,
    /// Lifetime of the SVIDs the regional CAs issue.
    pub svid_ttl: Duration,
    /// How often sidecars and gateways refresh revocations and bundle from their CA, and the
    /// CAs pull each other's revocations.
    pub refresh_interval: Duration,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            one_way_delay: Duration::from_millis(75),
            gateways: 1,
            svid_ttl: Duration::from_secs(3600),
            // Short: a lab lives on loopback, and its tests wait for revocations to arrive.
            refresh_interval: Duration::from_secs(1),
        }
    }
}

/// One region: its CA and its gateways.
pub struct Region {
    pub name: String,
    pub ca: crate::ca::server::Bound,
    /// Gateway slots; `None` once stopped.
    pub gateways: Vec<Option<crate::tunnel::gateway::Bound>>,
    /// The QUIC address of each gateway (fixed, so a restarted gateway keeps it).
    pub gateway_addrs: Vec<SocketAddr>,
    /// What the other region dials to reach each gateway (its WAN relay).
    pub relayed_addrs: Vec<SocketAddr>,
    /// The gateways' `[[expose]]` and `[[rule]]` tables, kept to restart gateways.
    gateway_sections: String,
}

/// The whole lab. Dropping it stops the relays; [`Lab::stop_gateway`] closes a gateway cleanly.
pub struct Lab {
    pub dir: PathBuf,
    pub td: TrustDomain,
    pub root: PathBuf,
    pub regions: Vec<Region>,
    refresh_interval: Duration,
    /// Held to keep the relays running.
    _relays: Vec<RelayHandle>,
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?)
}

impl Lab {
    /// Makes the PKI (root, intermediates `a` and `b`) in `dir` and starts both CAs and the
    /// relays. Gateways start with [`Lab::start_gateways`] once the exposed services are known.
    pub async fn new(dir: &Path, options: LabOptions) -> anyhow::Result<Lab> {
        let td = parse_trust_domain(TD)?;
        let year = Duration::from_secs(365 * 86400);
        let root = dir.join("root");
        crate::ca::authority::init_root(&td, &root, year, true)?;
        let mut regions = Vec::new();
        let mut relays = Vec::new();
        for name in ["a", "b"] {
            let ca_dir = dir.join(format!("ca-{name}"));
            crate::ca::authority::init_intermediate(&root, name, &ca_dir, year, true)?;
            let ca = crate::ca::server::build(
                CaServeConfig {
                    ca_dir: ca_dir.clone(),
                    data_dir: dir.join(format!("ca-{name}-data")),
                    listen: "127.0.0.1:0".parse()?,
                    svid_ttl: options.svid_ttl,
                    san: vec![],
                    metrics_listen: None,
                    audit_log: Some(dir.join(format!("ca-{name}-audit.log"))),
                    bundle_endpoint: None,
                    rate_limit: 0,
                    peers: crate::ca::config::PeerConfig {
                        urls: Vec::new(),
                        refresh: options.refresh_interval,
                    },
                    limits: Default::default(),
                    ledger: None,
                    ledger_options: Default::default(),
                    jwt_ttl: std::time::Duration::from_secs(300),
                    agents: Vec::new(),
                    file: None,
                },
                Clock::system(),
            )
            .await
            .with_context(|| format!("CA of region {name}"))?;
            let mut gateway_addrs = Vec::new();
            let mut relayed_addrs = Vec::new();
            for _ in 0..options.gateways {
                let gw = free_udp_port()?;
                let relay = crate::wan::spawn_udp(
                    "127.0.0.1:0".parse()?,
                    gw,
                    WanSpec {
                        delay: options.one_way_delay,
                        udp_loss: 0.0,
                        seed: 1,
                    },
                )
                .await?;
                gateway_addrs.push(gw);
                relayed_addrs.push(relay.local_addr());
                relays.push(relay);
            }
            regions.push(Region {
                name: name.to_string(),
                ca,
                gateways: Vec::new(),
                gateway_addrs,
                relayed_addrs,
                gateway_sections: String::new(),
            });
        }
        // Each CA republishes the other's revocations; their ports are known only now.
        for (i, region) in regions.iter().enumerate() {
            let other = format!("{}=https://{}", regions[1 - i].name, regions[1 - i].ca.api);
            region
                .ca
                .set_peers(&[other])
                .map_err(|e| anyhow::anyhow!("peering CA {}: {e}", region.name))?;
        }
        Ok(Lab {
            dir: dir.to_path_buf(),
            td,
            root,
            regions,
            refresh_interval: options.refresh_interval,
            _relays: relays,
        })
    }

    /// The region named `name` (`a` or `b`).
    pub fn region(&self, name: &str) -> &Region {
        &self.regions[self.index(name)]
    }

    fn index(&self, name: &str) -> usize {
        self.regions
            .iter()
            .position(|r| r.name == name)
            .expect("region a or b")
    }

    /// The root bundle every workload trusts.
    pub fn bundle(&self) -> PathBuf {
        self.root.join("bundle.pem")
    }

    /// A join token from `region`'s CA.
    pub async fn token(&self, region: &str, id: &str) -> anyhow::Result<String> {
        admin::token(&self.region(region).ca.admin_socket, id, 900)
            .await
            .map_err(|e| anyhow::anyhow!("no token for {id}: {e}"))
    }

    /// The top-level keys and the `[identity]`/`[admin]` tables of a config file of `region`
    /// for `id`, with a fresh token.
    async fn head(&self, region: &str, name: &str, id: &str) -> anyhow::Result<(String, String)> {
        let token_file = self.dir.join(format!("{name}.token"));
        crate::util::write_secret(&token_file, self.token(region, id).await?.as_bytes())?;
        let top = format!(
            "trust_domain = \"{td}\"\nregion = \"{region}\"\nbundle = {bundle:?}\naudit_log = {audit:?}\n",
            td = self.td,
            bundle = self.bundle(),
            audit = self.dir.join(format!("{name}-audit.log")),
        );
        let tables = format!(
            "\n[identity]\nsource = \"ca\"\nca_url = \"https://{ca}\"\ntoken_file = {token_file:?}\n\
             refresh_interval = \"{refresh}ms\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n",
            ca = self.region(region).ca.api,
            refresh = self.refresh_interval.as_millis(),
        );
        Ok((top, tables))
    }

    /// Starts the gateways of `region`; `sections` holds its `[[expose]]` and `[[rule]]`
    /// tables. Each gateway peers with all gateways of the other region, through the relays.
    pub async fn start_gateways(&mut self, region: &str, sections: &str) -> anyhow::Result<()> {
        let i = self.index(region);
        self.regions[i].gateway_sections = sections.to_string();
        for n in 0..self.regions[i].gateway_addrs.len() {
            self.start_gateway(region, n).await?;
        }
        Ok(())
    }

    /// (Re)starts gateway `n` of `region` on its fixed address.
    pub async fn start_gateway(&mut self, region: &str, n: usize) -> anyhow::Result<()> {
        let i = self.index(region);
        let other = &self.regions[1 - i];
        let id = crate::tunnel::gateway_id(&self.td, region).to_string();
        let name = format!("gateway-{region}{n}");
        let (top, tables) = self.head(region, &name, &id).await?;
        let peers: Vec<String> = other.relayed_addrs.iter().map(|a| a.to_string()).collect();
        let text = format!(
            "{top}listen = \"{listen}\"\n{tables}[[peer]]\nregion = \"{other}\"\naddresses = {peers:?}\n\n{sections}",
            listen = self.regions[i].gateway_addrs[n],
            other = other.name,
            sections = self.regions[i].gateway_sections,
        );
        let file = self.dir.join(format!("{name}.toml"));
        std::fs::write(&file, text)?;
        let cfg = GatewayConfig::load(&file)?;
        let bound = crate::tunnel::gateway::build(cfg, Clock::system())
            .await
            .map_err(anyhow::Error::msg)?;
        let slots = &mut self.regions[i].gateways;
        if slots.len() <= n {
            slots.resize_with(n + 1, || None);
        }
        slots[n] = Some(bound);
        Ok(())
    }

    /// Stops gateway `n` of `region` (its peers see the connection close).
    pub async fn stop_gateway(&mut self, region: &str, n: usize) {
        let i = self.index(region);
        if let Some(g) = self.regions[i].gateways.get_mut(n).and_then(Option::take) {
            g.shutdown().await;
        }
    }

    /// Writes and loads the config of sidecar `name` (`spiffe://TD/ns/shop/sa/NAME`) of
    /// `region`; `sections` holds its `[inbound]`, `[[service]]`, `[[listener]]` tables. A
    /// `[tunnel]` table with the region's gateways is added when a service is remote.
    pub async fn sidecar_config(
        &self,
        region: &str,
        name: &str,
        sections: &str,
    ) -> anyhow::Result<SidecarConfig> {
        let id = format!("spiffe://{}/ns/shop/sa/{name}", self.td);
        let (top, tables) = self.head(region, name, &id).await?;
        let gateways: Vec<String> = self
            .region(region)
            .gateway_addrs
            .iter()
            .map(|a| a.to_string())
            .collect();
        let text = format!(
            "spiffe_id = \"{id}\"\n{top}{tables}[tunnel]\ngateways = {gateways:?}\n\n{sections}",
        );
        let file = self.dir.join(format!("{name}.toml"));
        std::fs::write(&file, text)?;
        Ok(SidecarConfig::load(&file)?)
    }

    /// Starts a sidecar and waits (up to 10 s) until it holds an SVID.
    pub async fn sidecar(
        &self,
        region: &str,
        name: &str,
        sections: &str,
    ) -> anyhow::Result<crate::proxy::Bound> {
        let cfg = self.sidecar_config(region, name, sections).await?;
        let bound = crate::proxy::build(cfg, Clock::system()).await?;
        for _ in 0..1000 {
            if bound.identity.ready().is_ok() {
                return Ok(bound);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("sidecar {name} got no SVID: {:?}", bound.identity.ready())
    }

    /// Waits (up to 10 s) until every gateway path of both regions is up.
    pub async fn wait_paths_up(&self) -> anyhow::Result<()> {
        for _ in 0..1000 {
            let all = self.regions.iter().all(|r| {
                r.gateways
                    .iter()
                    .flatten()
                    .all(|g| g.peers.values().all(|p| p.up() == p.all().len()))
            });
            if all {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("gateway paths did not all come up")
    }
}
