//! A private PostgreSQL server for a test: a fresh cluster (initdb) in a temporary directory,
//! listening only on a Unix socket there, stopped and deleted on drop. Real server binaries
//! (Debian's `postgresql`), no mocks. As root the server runs as the `postgres` user (it refuses
//! root). Without the binaries the test fails and says how to get them; as root on Debian it
//! installs them itself first (`apt-get install -y postgresql`), as `.ci/run` does.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The database user the tests connect as (the cluster's superuser, trusted on the socket).
pub const USER: &str = "trustline";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// Set by [`Postgres::enable_tls`]: the TCP port it also listens on, TLS 1.3 only.
    tls_port: Mutex<Option<u16>>,
}

/// One install attempt per test binary.
static INSTALL: Mutex<bool> = Mutex::new(false);

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The newest `/usr/lib/postgresql/N/bin` holding `initdb`.
fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn bin_or_install() -> PathBuf {
    if let Some(b) = find_bin() {
        return b;
    }
    let mut tried = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !*tried && is_root() && Path::new("/usr/bin/apt-get").exists() {
        *tried = true;
        eprintln!("PostgreSQL server binaries missing: apt-get install -y postgresql");
        let ok = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "postgresql",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        // Debian starts a system cluster after installing; these tests never use it.
        let _ = Command::new("pg_ctlcluster")
            .args(["15", "main", "stop"])
            .status();
        if ok {
            if let Some(b) = find_bin() {
                return b;
            }
        }
    }
    panic!(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install them with \
         `sudo apt-get install -y postgresql` (the tests start their own private server)"
    );
}

impl Postgres {
    /// Makes and starts a fresh cluster.
    pub fn start() -> Self {
        let bin = bin_or_install();
        let dir = tempfile::Builder::new()
            .prefix("trustline-pg-")
            .tempdir()
            .expect("temporary directory");
        let as_postgres = is_root();
        // The server user must reach its socket directory and own its data directory.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let pg = Postgres {
            dir,
            bin,
            as_postgres,
            tls_port: Mutex::new(None),
        };
        std::fs::create_dir(pg.socket_dir()).unwrap();
        std::fs::create_dir(pg.data_dir()).unwrap();
        std::fs::set_permissions(pg.data_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
        if as_postgres {
            let st = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(pg.socket_dir())
                .arg(pg.data_dir())
                .status()
                .expect("chown");
            assert!(
                st.success(),
                "chown of the server's directories to postgres"
            );
        }
        let out = pg
            .run("initdb")
            .args([
                "--no-sync",
                "--auth=trust",
                "--username",
                USER,
                "--encoding=UTF8",
                "-D",
            ])
            .arg(pg.data_dir())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server();
        pg
    }

    fn run(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) {
        let mut opts = format!(
            "-c unix_socket_directories='{}' -c max_connections=200",
            self.socket_dir().display()
        );
        match *self.tls_port.lock().unwrap() {
            None => opts.push_str(" -c listen_addresses=''"),
            Some(port) => opts.push_str(&format!(
                " -c listen_addresses='127.0.0.1' -c port={port} -c ssl=on \
                 -c ssl_min_protocol_version=TLSv1.3 -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
            )),
        }
        let st = self
            .run("pg_ctl")
            .args(["-w", "-t", "30", "-l"])
            .arg(self.dir.path().join("sock/server.log"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-o", &opts, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl start");
        assert!(st.success(), "pg_ctl start failed:\n{}", self.server_log());
    }

    /// Restarts the server listening on 127.0.0.1 too, with TLS 1.3 and a certificate for
    /// `localhost` from a throw-away root; returns the port and the root's PEM file. Plain TCP
    /// connections are refused there (`hostssl` only). Unix-socket URLs stop working (the
    /// socket is named after the new port).
    pub fn enable_tls(&self) -> (u16, PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::new(Vec::new()).unwrap();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root, root_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let data = self.data_dir();
        std::fs::write(data.join("server.crt"), leaf.pem()).unwrap();
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        // TCP only with TLS; the socket stays trusted for the fixture's own tools.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        if self.as_postgres {
            let st = Command::new("chown")
                .arg("postgres:postgres")
                .args([
                    data.join("server.crt"),
                    data.join("server.key"),
                    data.join("pg_hba.conf"),
                ])
                .status()
                .unwrap();
            assert!(st.success());
        }
        let root_pem = self.dir.path().join("db-root.pem");
        std::fs::write(&root_pem, root_cert.pem()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        self.stop_server();
        *self.tls_port.lock().unwrap() = Some(port);
        self.start_server();
        (port, root_pem)
    }

    /// Stops the server at once (`immediate`: as if it crashed; it recovers from its WAL).
    pub fn stop_server(&self) {
        let _ = self
            .run("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The server's main process.
    pub fn postmaster_pid(&self) -> u32 {
        let pid =
            std::fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap_or_default();
        pid.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster.pid")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sock/server.log")).unwrap_or_default()
    }

    /// The URL of database `db` (created with [`Postgres::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}@/{db}?host={}",
            self.socket_dir().display()
        )
    }

    /// Creates database `db` and returns its URL.
    pub fn create_db(&self, db: &str) -> String {
        let port = self.tls_port.lock().unwrap().unwrap_or(5432).to_string();
        let out = self
            .run("createdb")
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &port])
            .args(["-U", USER, db])
            .output()
            .expect("createdb");
        assert!(
            out.status.success(),
            "createdb {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(db)
    }

    /// Runs one SQL statement with psql and returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.tls_port.lock().unwrap().unwrap_or(5432).to_string();
        let out = self
            .run("psql")
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &port])
            .args([
                "-U",
                USER,
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_server();
    }
}
