//! Helpers shared by the benchmarks that drive the real `trustline` binary.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A real `trustline ca serve` process (root and regional intermediate "r1" made by `ca init`
/// in a fresh temporary directory), killed on drop. Its output goes to `DIR/ca.log`.
pub struct CaProcess {
    child: Option<Child>,
    pub pid: u32,
    pub api: SocketAddr,
    /// The server's `--data` directory (ledger, admin socket).
    pub data: PathBuf,
    pub dir: tempfile::TempDir,
    /// `--ledger URL`, when given: what a replica repeats.
    #[allow(dead_code)] // only benches/ca_issuance.rs starts replicas
    ledger_args: Vec<String>,
}

impl CaProcess {
    /// Makes the PKI for `trust_domain`, starts the server with `--metrics-listen off --svid-ttl
    /// 1h` plus `extra_args` (and `RUST_LOG=rust_log` if given), and waits up to `up_within`
    /// until its API port and admin socket answer.
    pub fn start(
        bin: &Path,
        trust_domain: &str,
        prefix: &str,
        extra_args: &[&str],
        rust_log: Option<&str>,
        up_within: Duration,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("making a temporary directory");
        let d = dir.path();
        run_cli(
            Command::new(bin)
                .args(["ca", "init", "--trust-domain", trust_domain, "--out"])
                .arg(d.join("root")),
        );
        run_cli(
            Command::new(bin)
                .args(["ca", "init", "--root"])
                .arg(d.join("root"))
                .args(["--region", "r1", "--out"])
                .arg(d.join("r1")),
        );
        let ledger_args = extra_args
            .windows(2)
            .find(|w| w[0] == "--ledger")
            .map(|w| vec![w[0].to_string(), w[1].to_string()])
            .unwrap_or_default();
        let ca_dir = d.join("r1");
        Self::serve(
            bin,
            &ca_dir,
            dir,
            &[],
            extra_args,
            ledger_args,
            rust_log,
            up_within,
        )
    }

    /// Another `ca serve` replica of the same CA on the same `--ledger` (the other
    /// `extra_args` of the first start are not repeated: give them here), with its own data
    /// directory and port, killed on drop.
    #[allow(dead_code)] // only benches/ca_issuance.rs starts replicas
    pub fn replica(
        &self,
        bin: &Path,
        extra_args: &[&str],
        rust_log: Option<&str>,
        up_within: Duration,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trustline-replica-")
            .tempdir()
            .expect("making a temporary directory");
        let ledger: Vec<&str> = self.ledger_args.iter().map(String::as_str).collect();
        let ca_dir = self.dir.path().join("r1");
        let ledger_args = self.ledger_args.clone();
        Self::serve(
            bin,
            &ca_dir,
            dir,
            &ledger,
            extra_args,
            ledger_args,
            rust_log,
            up_within,
        )
    }

    /// Starts `ca serve --ca CA_DIR --data DIR/data` on a free port, logging to `DIR/ca.log`.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        bin: &Path,
        ca_dir: &Path,
        dir: tempfile::TempDir,
        ledger: &[&str],
        extra_args: &[&str],
        ledger_args: Vec<String>,
        rust_log: Option<&str>,
        up_within: Duration,
    ) -> Self {
        let api = free_port();
        let data = dir.path().join("data");
        let log = File::create(dir.path().join("ca.log")).expect("creating ca.log");
        let mut cmd = Command::new(bin);
        cmd.args(["ca", "serve", "--ca"])
            .arg(ca_dir)
            .arg("--data")
            .arg(&data)
            .args(["--listen", &api.to_string()])
            .args(["--metrics-listen", "off", "--svid-ttl", "1h"])
            .args(ledger)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating the log handle"))
            .stderr(log);
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let child = cmd.spawn().expect("starting `trustline ca serve`");
        let mut ca = CaProcess {
            pid: child.id(),
            child: Some(child),
            api,
            data,
            dir,
            ledger_args,
        };
        ca.wait_until_up(up_within);
        ca
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data.join("admin.sock")
    }

    /// The server's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("ca.log")
    }

    /// Polls until both the API port and the admin socket answer.
    fn wait_until_up(&mut self, up_within: Duration) {
        let deadline = Instant::now() + up_within;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("CA exited early ({status}):\n{}", self.log_tail());
            }
            let api_up = TcpStream::connect(self.api).is_ok();
            if api_up && UnixStream::connect(self.admin_socket()).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CA did not come up in {up_within:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last 20 lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the server (SIGKILL: whatever was answered 200 must already be durable).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
