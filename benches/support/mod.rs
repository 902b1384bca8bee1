//! Helpers shared by the benchmarks that drive the real `trustline` binary.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

/// Runs a `trustline` subcommand to completion; panics with its stderr if it fails.
pub fn run_cli(cmd: &mut Command) {
    let out = cmd.output().expect("running trustline");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
}
