//! The example configurations in `config/` are valid, and bad sidecar configs are refused with
//! the file, the field and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use spiffe::transport::Endpoint;
use trustline::ca::authority;
use trustline::ca::config::{CaServeConfig, CaServeFile};
use trustline::identity::parse_trust_domain;
use trustline::policy::region::RegionDecision;
use trustline::proxy::config::SidecarConfig;
use trustline::svid::IdentitySource;

fn example(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A temp dir with a root CA, its bundle copied to `bundle.pem` beside the configs.
fn world() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let td = parse_trust_domain("example.org").unwrap();
    let root = dir.path().join("pki/root");
    authority::init_root(&td, &root, Duration::from_secs(86400), false).unwrap();
    authority::init_intermediate(
        &root,
        "eu-west",
        &dir.path().join("pki/eu-west"),
        Duration::from_secs(3600),
        false,
    )
    .unwrap();
    std::fs::copy(root.join("bundle.pem"), dir.path().join("bundle.pem")).unwrap();
    let p = dir.path().to_path_buf();
    (dir, p)
}

#[test]
fn example_ca_config_is_valid() {
    let (_keep, dir) = world();
    let file = dir.join("ca.toml");
    std::fs::write(&file, example("ca.toml")).unwrap();
    let c = CaServeConfig::resolve(CaServeFile::default(), Some(&file)).unwrap();
    assert_eq!(c.ca_dir, dir.join("pki/eu-west"));
    assert_eq!(c.svid_ttl, Duration::from_secs(24 * 3600));
    let peers = trustline::ca::config::parse_peers(&c.peers.urls).unwrap();
    assert_eq!(peers[0].region.as_deref(), Some("us-east"));
    assert_eq!(c.jwt_ttl, Duration::from_secs(300));
    let td = trustline::identity::parse_trust_domain("example.org").unwrap();
    let agents =
        trustline::ca::agents::AgentRegistry::from_file(c.agents, &td, c.file.as_deref()).unwrap();
    let node =
        trustline::identity::parse_id("spiffe://example.org/trustline/agent/node-1").unwrap();
    let job = trustline::identity::parse_id("spiffe://example.org/ns/batch/sa/job").unwrap();
    assert!(agents.allows(&node, &job));
}

#[test]
fn example_sidecar_config_is_valid() {
    let (_keep, dir) = world();
    let file = dir.join("sidecar.toml");
    std::fs::write(&file, example("sidecar-explicit.toml")).unwrap();
    let c = SidecarConfig::load(&file).unwrap();
    assert_eq!(
        c.identity.id.to_string(),
        "spiffe://example.org/ns/shop/sa/frontend"
    );
    assert_eq!(c.services[0].name, "checkout");
    assert_eq!(c.listeners[0].listen.port(), 7001);
    assert_eq!(c.inbound.unwrap().allow.len(), 1);
}

#[test]
fn example_spire_sidecar_config_is_valid() {
    let (_keep, dir) = world();
    let file = dir.join("sidecar.toml");
    std::fs::write(&file, example("sidecar-spire.toml")).unwrap();
    let c = SidecarConfig::load(&file).unwrap();
    match c.identity.source {
        IdentitySource::WorkloadApi { endpoint } => {
            assert_eq!(endpoint, Endpoint::Unix("/run/spire/agent.sock".into()))
        }
        other => panic!("source {other:?}"),
    }
}

fn refused(dir: &Path, text: &str) -> String {
    let file = dir.join("bad.toml");
    std::fs::write(&file, text).unwrap();
    SidecarConfig::load(&file).unwrap_err().to_string()
}

#[test]
fn bad_sidecar_configs_name_file_field_and_reason() {
    let (_keep, dir) = world();
    let good = example("sidecar-explicit.toml");
    let cases = [
        (
            good.replace("drain_timeout", "drain_timout"),
            "drain_timout",
        ),
        (
            good.replace(
                "spiffe://example.org/ns/shop/sa/frontend",
                "spiffe://example.org/ns//sa/x",
            ),
            "spiffe_id",
        ),
        (
            good.replace(
                "spiffe://example.org/ns/shop/sa/gateway",
                "spiffe://other.org/ns/a/sa/b",
            ),
            "inbound.allow[0]",
        ),
        (good.replace("127.0.0.1:16006", "nowhere"), "addresses[0]"),
        (
            good.replace("service = \"checkout\"", "service = \"nope\""),
            "listener[0].service",
        ),
        (
            good.replace("source = \"ca\"", "source = \"magic\""),
            "identity.source",
        ),
        (
            good.replace("bundle = \"bundle.pem\"", "bundle = \"missing.pem\""),
            "bundle",
        ),
        (good.replace("workers = 1", "workers = 0"), "workers"),
        // An explicit listener's port is the sidecar's, not the app's (a confused deputy).
        (
            good.replace("[inbound]\n", "[inbound]\nports = [8080, 7001]\n"),
            "inbound.ports[1]",
        ),
        (
            good.replace("[inbound]\n", "[inbound]\nports = [15006]\n"),
            "inbound.ports[0]",
        ),
    ];
    for (text, field) in cases {
        let err = refused(&dir, &text);
        assert!(
            err.contains("bad.toml") && err.contains(field),
            "{field}: {err}"
        );
    }
}

#[test]
fn example_gateway_and_cross_region_configs_are_valid() {
    let (_keep, dir) = world();
    let file = dir.join("gateway.toml");
    std::fs::write(&file, example("gateway.toml")).unwrap();
    let g = trustline::tunnel::config::GatewayConfig::load(&file).unwrap();
    assert_eq!(
        g.identity.id.to_string(),
        "spiffe://example.org/trustline/gateway/eu-west"
    );
    assert_eq!(g.peers[0].addresses.len(), 2);
    // The gateway's CA must be its own region's (the region check of the CA client).
    assert!(matches!(
        &g.identity.source,
        trustline::svid::IdentitySource::Ca { region: Some(r), .. } if r == "eu-west"
    ));
    assert_eq!(
        g.policy.decide("us-east", "eu-west", "checkout"),
        RegionDecision {
            allowed: true,
            rule: "us-to-checkout"
        }
    );
    assert_eq!(
        g.policy.decide("ap-south", "eu-west", "checkout"),
        RegionDecision {
            allowed: false,
            rule: "no-ap"
        }
    );
    let file = dir.join("sidecar-cross-region.toml");
    std::fs::write(&file, example("sidecar-cross-region.toml")).unwrap();
    let s = SidecarConfig::load(&file).unwrap();
    assert_eq!(s.services[0].region.as_deref(), Some("eu-west"));
    assert!(matches!(
        &s.identity.source,
        trustline::svid::IdentitySource::Ca { region: Some(r), .. } if r == "us-east"
    ));
    assert_eq!(s.tunnel.unwrap().gateways.len(), 2);
}

#[test]
fn bad_gateway_and_tunnel_configs_name_file_field_and_reason() {
    let (_keep, dir) = world();
    let gw = example("gateway.toml");
    let file = dir.join("bad-gateway.toml");
    for (text, field) in [
        (
            gw.replace("region = \"us-east\"", "region = \"eu-west\""),
            "peer[0].region",
        ),
        (
            gw.replace("region = \"eu-west\"\nbundle", "region = \"EU\"\nbundle"),
            "region",
        ),
        (
            gw.replace("services = [\"checkout\"]", "services = []"),
            "rule[1] (us-to-checkout).services",
        ),
        (
            gw.replace("action = \"deny\"", "action = \"maybe\""),
            "rule[2] (no-ap).action",
        ),
        (
            gw.replace("idle_timeout = \"1500ms\"", "idle_timeout = \"100ms\""),
            "tunnel.keepalive",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let e = trustline::tunnel::config::GatewayConfig::load(&file)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(field) && e.contains("bad-gateway.toml"),
            "{field}: {e}"
        );
    }
    let sc = example("sidecar-cross-region.toml");
    let file = dir.join("bad-sidecar.toml");
    for (text, field) in [
        (
            sc.replace(
                "gateways = [\"127.0.0.1:15443\", \"127.0.0.1:15444\"]",
                "gateways = []",
            ),
            "tunnel.gateways",
        ),
        (
            sc.replace("region = \"us-east\"", "# no region"),
            "service[0] (checkout).region",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let e = SidecarConfig::load(&file).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}
