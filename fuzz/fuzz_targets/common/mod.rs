//! Shared by the config targets: a directory with a root CA and a regional intermediate (as
//! tests/config_examples.rs makes), and the fuzz input written there as the config file, so the
//! real loaders run as `trustline` runs them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use trustline::ca::authority;
use trustline::config::ConfigError;
use trustline::identity::parse_trust_domain;

/// The directory (made once per process under /dev/shm, else the temp dir).
pub fn world() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("trustline-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let td = parse_trust_domain("example.org").expect("trust domain");
        let root = dir.join("pki/root");
        authority::init_root(&td, &root, Duration::from_secs(86400), false).expect("root CA");
        authority::init_intermediate(
            &root,
            "eu-west",
            &dir.join("pki/eu-west"),
            Duration::from_secs(3600),
            false,
        )
        .expect("intermediate CA");
        std::fs::copy(root.join("bundle.pem"), dir.join("bundle.pem")).expect("bundle");
        for token in ["frontend.token", "gateway.token", "checkout.token"] {
            std::fs::write(dir.join(token), "t0ken\n").expect("token file");
        }
        dir
    })
}

/// Writes `data` as the config file `name` in the world; its path.
pub fn config_file(name: &str, data: &[u8]) -> PathBuf {
    let file = world().join(name);
    std::fs::write(&file, data).expect("write the config file");
    file
}

/// A refused config names the file, a field and a reason, and a line inside the file.
pub fn check_error(e: &ConfigError, file: &Path, data: &[u8]) {
    assert_eq!(e.file.as_deref(), Some(file), "error without its file: {e}");
    assert!(
        !e.field.is_empty() && !e.reason.is_empty(),
        "vague error: {e}"
    );
    if let Some(line) = e.line {
        let lines = data.iter().filter(|b| **b == b'\n').count() + 1;
        assert!((1..=lines).contains(&line), "line {line} of {lines}: {e}");
    }
}
