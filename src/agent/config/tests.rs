use std::path::Path;

use super::*;

/// A directory with a root bundle and a token file, and a config written there.
fn load(body: &str) -> Result<AgentConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let td = parse_trust_domain("example.org").unwrap();
    let root = dir.path().join("root");
    crate::ca::authority::init_root(&td, &root, std::time::Duration::from_secs(3600), false)
        .unwrap();
    std::fs::copy(root.join("bundle.pem"), dir.path().join("bundle.pem")).unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!("trust_domain = \"example.org\"\nbundle = \"bundle.pem\"\nnode = \"n1\"\n{body}"),
    )
    .unwrap();
    AgentConfig::load(&file)
}

const IDENTITY: &str =
    "[identity]\nsource = \"ca\"\nca_url = \"https://127.0.0.1:8443\"\ntoken_file = \"n1.token\"\n";

fn err(body: &str) -> String {
    load(body).unwrap_err().to_string()
}

#[test]
fn a_whole_config_loads_with_its_defaults() {
    let c = load(&format!(
        "{IDENTITY}\n[[workload]]\nspiffe_id = \"spiffe://example.org/ns/shop/sa/web\"\nuid = 1000\n\n\
         [[workload]]\nspiffe_id = \"spiffe://example.org/ns/shop/sa/db\"\ngid = 50\npath = \"/usr/bin/db\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.identity.id.to_string(),
        "spiffe://example.org/trustline/agent/n1"
    );
    assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
    assert_eq!(c.socket_mode, SocketMode::World);
    assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(c.max_connections_per_uid, DEFAULT_MAX_CONNECTIONS_PER_UID);
    assert!(!c.allow_unauthenticated_verifiers);
    assert_eq!(c.workloads.len(), 2);
    assert_eq!(c.workloads[0].uid, Some(1000));
    assert_eq!(
        c.workloads[1].path.as_deref(),
        Some(Path::new("/usr/bin/db"))
    );
}

#[test]
fn an_entry_without_a_selector_is_refused_with_its_place() {
    let e = err(&format!(
        "{IDENTITY}\n[[workload]]\nspiffe_id = \"spiffe://example.org/ns/shop/sa/web\"\n"
    ));
    assert!(e.contains("agent.toml: workload[0]: "), "{e}");
    assert!(e.contains("no selector"), "{e}");
}

#[test]
fn bad_values_are_refused_with_the_file_the_key_and_the_reason() {
    let w = |extra: &str| {
        format!(
            "{IDENTITY}\n[[workload]]\nspiffe_id = \"spiffe://example.org/ns/a/sa/b\"\n{extra}\n"
        )
    };
    for (body, key, why) in [
        (w("uid = 1\npath = \"bin/x\""), "workload[0].path", "absolute"),
        (w("path = \"/usr/bin/x\""), "workload[0].path", "give uid or gid too"),
        (w("uid = 1\ncolour = 3"), "colour", "unknown field"),
        (
            format!("{IDENTITY}\n[[workload]]\nspiffe_id = \"spiffe://other.org/x\"\nuid = 1\n"),
            "workload[0].spiffe_id",
            "not in trust domain",
        ),
        (
            format!("{IDENTITY}\n[[workload]]\nspiffe_id = \"spiffe://example.org/trustline/ca\"\nuid = 1\n"),
            "workload[0].spiffe_id",
            "trustline's own",
        ),
        (format!("socket_mode = \"0777\"\n{IDENTITY}"), "socket_mode", "expected"),
        (
            format!("socket_group = 5\n{IDENTITY}"),
            "socket_group",
            "0660",
        ),
        (format!("max_connections = 0\n{IDENTITY}"), "max_connections", "at least 1"),
        (
            format!("max_connections = 4\nmax_connections_per_uid = 5\n{IDENTITY}"),
            "max_connections_per_uid",
            "more than",
        ),
        (
            "[identity]\nsource = \"files\"\ncert = \"a\"\nkey = \"b\"\n".to_string(),
            "identity.source",
            "source = \"ca\"",
        ),
    ] {
        let e = err(&body);
        assert!(e.contains(key) && e.contains(why), "{body}\n=> {e}");
    }
}

#[test]
fn the_node_names_one_path_segment() {
    let td = parse_trust_domain("example.org").unwrap();
    assert_eq!(
        agent_id(&td, "web-1.eu").unwrap().to_string(),
        "spiffe://example.org/trustline/agent/web-1.eu"
    );
    assert!(agent_id(&td, "a/b").is_err());
    assert!(agent_id(&td, "").is_err());
    assert!(agent_id(&td, "sp ace").is_err());
}
