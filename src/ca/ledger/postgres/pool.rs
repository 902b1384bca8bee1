//! Connections to the ledger's PostgreSQL: the URL (what it may say, and what is refused), TLS
//! through our own rustls (TLS 1.3, aws-lc-rs, the server verified against a given root, with
//! `tls-server-end-point` channel binding for SCRAM), and a small bounded pool.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Client;

use crate::ca::ledger::LedgerError;

/// How long connecting to the database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `postgres://` ledger URL: the driver's configuration, and the TLS it asks for.
#[derive(Clone)]
pub struct PgUrl {
    pub(super) config: tokio_postgres::Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The URL with any password replaced by `***`: what logs and errors show.
    redacted: String,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PgUrl {
    /// Parses `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS]` (or `postgresql://`).
    ///
    /// TLS: `sslmode=require` or `sslmode=verify-full` with `sslrootcert=PEM_FILE` turn it on,
    /// and both verify the server's certificate and name against that root (trustline has no
    /// unverified TLS). Without `sslmode` (or with `disable`) the connection is plain, for a
    /// Unix socket (`host=/run/postgresql`) or loopback. `prefer` and `allow` are refused: they
    /// fall back to plain text when an attacker on the path says so.
    pub fn parse(url: &str) -> Result<Self, String> {
        let redacted = redact(url);
        let Some(rest) = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
        else {
            return Err(format!("{redacted}: not a postgres:// URL"));
        };
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut kept = Vec::new();
        let mut sslmode = None;
        let mut rootcert = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => sslmode = Some(v.to_string()),
                "sslrootcert" => rootcert = Some(percent_decode(v)),
                _ => kept.push(pair),
            }
        }
        let tls_wanted = match sslmode.as_deref() {
            None | Some("disable") => false,
            Some("require" | "verify-full" | "verify-ca") => true,
            Some(m @ ("prefer" | "allow")) => {
                return Err(format!(
                    "{redacted}: sslmode={m} falls back to plain text; use sslmode=verify-full with sslrootcert=FILE, or leave sslmode out for a Unix socket"
                ))
            }
            Some(m) => return Err(format!("{redacted}: unknown sslmode {m:?}")),
        };
        let mut driver = format!("postgres://{base}");
        if !kept.is_empty() {
            driver.push('?');
            driver.push_str(&kept.join("&"));
        }
        let mut config: tokio_postgres::Config =
            driver.parse().map_err(|e| format!("{redacted}: {e}"))?;
        if config.get_dbname().is_none() {
            return Err(format!(
                "{redacted}: no database name (postgres://USER@HOST/DB)"
            ));
        }
        if config.get_user().is_none() {
            return Err(format!(
                "{redacted}: no user name (postgres://USER@HOST/DB)"
            ));
        }
        config.application_name("trustline-ca");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let tls = if tls_wanted {
            let Some(path) = rootcert else {
                return Err(format!(
                    "{redacted}: sslmode={} needs sslrootcert=PEM_FILE (the root that signed the server's certificate)",
                    sslmode.unwrap_or_default()
                ));
            };
            config.ssl_mode(SslMode::Require);
            Some(tls_config(&path).map_err(|e| format!("{redacted}: sslrootcert: {e}"))?)
        } else {
            // Plain text only where no one is on the path: a Unix socket or loopback.
            use tokio_postgres::config::Host;
            let local = |h: &Host| match h {
                Host::Unix(_) => true,
                Host::Tcp(name) => {
                    name == "localhost"
                        || name
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
            };
            let addrs_local = config.get_hostaddrs().iter().all(|a| a.is_loopback());
            if !config.get_hosts().iter().all(local) || !addrs_local {
                return Err(format!(
                    "{redacted}: a database that is not on a Unix socket or loopback needs TLS: add sslmode=verify-full&sslrootcert=FILE"
                ));
            }
            config.ssl_mode(SslMode::Disable);
            None
        };
        Ok(PgUrl {
            config,
            tls,
            redacted,
        })
    }

    /// Opens one connection; its I/O runs on a task of its own until the client is dropped.
    pub(super) async fn connect(&self) -> Result<Client, LedgerError> {
        let tls = MakeRustls(self.tls.clone());
        let attempt = self.config.connect(tls);
        let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| {
                tracing::warn!(url = %self.redacted, "ledger database: no answer to connect");
                LedgerError::Db(format!(
                    "connecting to the database: no answer within {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| {
                // Errors reach clients (503 bodies): the URL goes to the log only.
                tracing::warn!(url = %self.redacted, error = %pg(&e), "ledger database: connect failed");
                LedgerError::Db(format!("connecting to the database: {}", pg(&e)))
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "ledger database connection closed");
            }
        });
        Ok(client)
    }
}

/// A driver error with the server's message and detail, when it sent one.
pub(super) fn pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The URL with its password (if any, in the user part or the query) replaced.
fn redact(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((base, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") || k == "sslpassword" => {
                        format!("{k}=***")
                    }
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", q.join("&"))
        }
        None => url.to_string(),
    };
    let url = url.as_str();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: &u8| (*c as char).to_digit(16);
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (b.get(i + 1).and_then(hex), b.get(i + 2).and_then(hex)) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// TLS 1.3 to the database, trusting only the roots in `path`.
fn tls_config(path: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{path}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{path}: a root is not usable: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{path}: no certificate in it"));
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(crate::crypto::TLS13_ONLY)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// tokio-postgres's TLS hook, on rustls. Without a config (plain URLs) it is never asked to
/// connect: the driver is told `sslmode=disable`.
#[derive(Clone)]
struct MakeRustls(Option<Arc<rustls::ClientConfig>>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    /// Called for every host of the URL, TLS or not (a Unix socket's "host" is a path), so
    /// what is wrong is only reported if a TLS connection is made.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{domain:?} is not a server name for TLS: {e}"),
            )
        });
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

struct RustlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    name: io::Result<ServerName<'static>>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS asked for without sslmode=verify-full"))?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(self.name?, stream)
                .await?;
            Ok(RustlsStream(s))
        })
    }
}

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// RFC 5929 `tls-server-end-point`: the hash of the server's certificate, with the hash of
    /// its signature algorithm (SHA-256 for SHA-1 and MD5 too).
    fn channel_binding(&self) -> ChannelBinding {
        use aws_lc_rs::digest;
        let Some(cert) = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        else {
            return ChannelBinding::none();
        };
        let alg = match x509_parser::parse_x509_certificate(cert.as_ref()) {
            Ok((_, c)) => match c.signature_algorithm.algorithm.to_id_string().as_str() {
                "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" => &digest::SHA384,
                "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" => &digest::SHA512,
                _ => &digest::SHA256,
            },
            Err(_) => return ChannelBinding::none(),
        };
        ChannelBinding::tls_server_end_point(digest::digest(alg, cert.as_ref()).as_ref().to_vec())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// At most `size` connections, opened on demand and kept while they work. A connection whose
/// operation did not finish (an error, a timeout, a cancelled request) is dropped rather than
/// returned: it may be inside a transaction, which the server rolls back when it goes.
pub(super) struct Pool {
    url: PgUrl,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

impl Pool {
    pub(super) fn new(url: PgUrl, size: usize) -> Self {
        Pool {
            url,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1)),
        }
    }

    pub(super) fn url(&self) -> &PgUrl {
        &self.url
    }

    /// A connection, waiting for a free one when all are busy.
    pub(super) async fn get(&self) -> Result<Conn<'_>, LedgerError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| LedgerError::Closed)?;
        let reused = loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(c) if c.is_closed() => continue,
                other => break other,
            }
        };
        let client = match reused {
            Some(c) => c,
            None => self.url.connect().await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            done: false,
            _permit: permit,
        })
    }

    /// Drops every idle connection (after the database went away, say).
    pub(super) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A pooled connection; [`Conn::done`] marks it fit to be used again.
pub(super) struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    done: bool,
    _permit: SemaphorePermit<'a>,
}

impl Conn<'_> {
    pub(super) fn client(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("a pooled connection holds a client until dropped")
    }

    /// The operation finished (committed, or rolled back on a refusal): the connection is clean.
    pub(super) fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if self.done && !c.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PgUrl;

    #[test]
    fn urls_say_what_is_wrong_and_never_show_the_password() {
        let ok = PgUrl::parse("postgres://ca@127.0.0.1:5432/ledger").unwrap();
        assert_eq!(ok.to_string(), "postgres://ca@127.0.0.1:5432/ledger");
        let secret = PgUrl::parse("postgres://ca:hunter2@localhost:5432/ledger").unwrap();
        assert_eq!(
            format!("{secret} {secret:?}"),
            "postgres://ca:***@localhost:5432/ledger postgres://ca:***@localhost:5432/ledger"
        );
        let in_query = PgUrl::parse("postgres://ca@localhost/ledger?password=hunter2").unwrap();
        assert_eq!(
            in_query.to_string(),
            "postgres://ca@localhost/ledger?password=***"
        );
        // Plain text to a host on the network is refused: someone on the path would read the
        // password and rewrite answers.
        for remote in [
            "postgres://ca:hunter2@db.internal/ledger",
            "postgres://ca@10.0.0.5:5432/ledger?sslmode=disable",
            "postgres://ca@localhost/ledger?host=db.internal",
        ] {
            let e = PgUrl::parse(remote).unwrap_err();
            assert!(e.contains("needs TLS"), "{remote}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let sock = PgUrl::parse("postgres://ca@localhost/ledger?host=/run/postgresql").unwrap();
        assert_eq!(sock.config.get_dbname(), Some("ledger"));
        for (bad, says) in [
            ("mysql://ca@db/ledger", "not a postgres:// URL"),
            (
                "postgres://ca:pw@db:5432/ledger?sslmode=prefer",
                "falls back to plain text",
            ),
            (
                "postgres://ca@db/ledger?sslmode=allow",
                "falls back to plain text",
            ),
            (
                "postgres://ca@db/ledger?sslmode=require",
                "needs sslrootcert",
            ),
            ("postgres://ca@db/ledger?sslmode=bogus", "unknown sslmode"),
            ("postgres://ca@db:5432", "no database name"),
            ("postgres://db:5432/ledger", "no user name"),
            ("postgres://ca@db:notaport/ledger", "invalid"),
            (
                "postgres://ca@db/ledger?sslmode=verify-full&sslrootcert=/nonexistent.pem",
                "/nonexistent.pem",
            ),
        ] {
            let e = PgUrl::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }
}
