//! Configuration of `trustline ca serve`: flags, or the same keys in a TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::agents::AgentFile;
use super::error::PeerConfigError;
use super::ledger::{LedgerUrl, PgOptions};
use crate::config::{load_toml, ConfigError};
use crate::region::Region;
use crate::util::parse_duration;

/// Shortest SVID lifetime accepted (tests of rotation use seconds).
pub const MIN_SVID_TTL: Duration = Duration::from_secs(2);
/// Longest SVID lifetime accepted.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The keys of a CA config file; every one is also a flag of `ca serve`, and a flag wins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaServeFile {
    /// The CA directory (`ca init --out`).
    pub ca: Option<PathBuf>,
    /// Where the ledger, the admin socket and the audit log live.
    pub data: Option<PathBuf>,
    /// HTTPS API address.
    pub listen: Option<String>,
    /// Lifetime of issued SVIDs, e.g. `24h`.
    pub svid_ttl: Option<String>,
    /// Extra DNS names or IPs for the server certificate.
    pub san: Option<Vec<String>>,
    /// Prometheus listener (`off` to disable).
    pub metrics_listen: Option<String>,
    /// Audit log file (default `DATA/audit.log`).
    pub audit_log: Option<PathBuf>,
    /// The SPIFFE bundle endpoint's address (none: not served).
    pub bundle_endpoint: Option<String>,
    /// `https_spiffe` (default) or `https_web`.
    pub bundle_endpoint_profile: Option<String>,
    /// `https_web`: certificate chain and key, PEM files.
    pub bundle_endpoint_cert: Option<PathBuf>,
    pub bundle_endpoint_key: Option<PathBuf>,
    /// SVID requests per second per client IP (0 = unlimited).
    pub rate_limit: Option<u32>,
    /// The other regions' CAs (`https://HOST:PORT`, or `REGION=https://HOST:PORT` to require
    /// that region's CA) whose revocations this CA pulls and serves with its own.
    pub peers: Option<Vec<String>>,
    /// How often each peer's list is pulled, e.g. `5s`.
    pub peer_refresh: Option<String>,
    /// The ledger: `redb:PATH` (default `redb:DATA/ledger.redb`) or a PostgreSQL URL shared by
    /// the region's replicas.
    pub ledger: Option<String>,
    /// How often a shared ledger's revocations and bans are re-read, e.g. `1s`.
    pub ledger_refresh: Option<String>,
    /// Connections a replica keeps to a shared ledger at most.
    pub ledger_pool: Option<usize>,
    /// `[limits]`: connection caps and timeouts of the API listener (file only).
    pub limits: Option<CaLimitsFile>,
    /// Lifetime of issued JWT-SVIDs, e.g. `5m`.
    pub jwt_ttl: Option<String>,
    /// `[[agent]]`: the IDs each `trustline agent` may obtain for its host (file only;
    /// [`super::agents`]).
    #[serde(default)]
    pub agent: Vec<AgentFile>,
}

/// The `[limits]` table of a CA config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaLimitsFile {
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub body_timeout: Option<String>,
}

/// Caps and timeouts of the API listener: what keeps one client (or a flood of anonymous
/// handshakes) from starving renewals.
#[derive(Clone, Copy, Debug)]
pub struct CaLimits {
    /// Open connections in total; more are closed at accept.
    pub max_connections: usize,
    /// Open connections per client address (IPv6: per /64).
    pub max_connections_per_client: usize,
    /// Longest wait for a request's headers, the first one and each next on a keep-alive
    /// connection (so it is also the idle bound of a connection).
    pub header_read_timeout: Duration,
    /// Longest a request body may take to arrive.
    pub body_timeout: Duration,
}

impl Default for CaLimits {
    fn default() -> Self {
        CaLimits {
            max_connections: 4096,
            max_connections_per_client: 128,
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

impl CaLimits {
    fn from_file(f: Option<CaLimitsFile>, file: Option<&Path>) -> Result<Self, ConfigError> {
        let d = CaLimits::default();
        let Some(f) = f else { return Ok(d) };
        let count = |key: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(ConfigError::field(
                file,
                &format!("limits.{key}"),
                "must be at least 1",
            )),
            v => Ok(v.unwrap_or(default)),
        };
        let time = |key: &str, v: Option<&str>, default: Duration| match v {
            None => Ok(default),
            Some(v) => match parse_duration(v) {
                Ok(t) if t.is_zero() => Err(ConfigError::field(
                    file,
                    &format!("limits.{key}"),
                    "must be more than 0",
                )),
                Ok(t) => Ok(t),
                Err(e) => Err(ConfigError::field(
                    file,
                    &format!("limits.{key}"),
                    e.to_string(),
                )),
            },
        };
        Ok(CaLimits {
            max_connections: count("max_connections", f.max_connections, d.max_connections)?,
            max_connections_per_client: count(
                "max_connections_per_client",
                f.max_connections_per_client,
                d.max_connections_per_client,
            )?,
            header_read_timeout: time(
                "header_read_timeout",
                f.header_read_timeout.as_deref(),
                d.header_read_timeout,
            )?,
            body_timeout: time("body_timeout", f.body_timeout.as_deref(), d.body_timeout)?,
        })
    }
}

/// Peer CAs whose revocations this CA republishes ([`super::peers`]).
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Each peer CA: `https://HOST:PORT` or `REGION=https://HOST:PORT` ([`PeerSpec`]).
    pub urls: Vec<String>,
    /// Pull interval.
    pub refresh: Duration,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            urls: Vec::new(),
            refresh: DEFAULT_PEER_REFRESH,
        }
    }
}

/// Default pull interval of peer CAs' revocation lists: short, since a sidecar's own refresh
/// comes on top of it.
pub const DEFAULT_PEER_REFRESH: Duration = Duration::from_secs(5);
/// Accepted pull intervals.
pub const PEER_REFRESH_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct CaServeConfig {
    pub ca_dir: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub svid_ttl: Duration,
    pub san: Vec<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub audit_log: Option<PathBuf>,
    /// The SPIFFE bundle endpoint, if served.
    pub bundle_endpoint: Option<super::bundle_endpoint::BundleEndpointConfig>,
    pub rate_limit: u32,
    pub peers: PeerConfig,
    /// Connection caps and timeouts of the API listener.
    pub limits: CaLimits,
    /// Where the ledger lives; `None` is `redb:DATA/ledger.redb`.
    pub ledger: Option<LedgerUrl>,
    /// How a shared ledger is used (ignored for redb).
    pub ledger_options: PgOptions,
    /// Lifetime of issued JWT-SVIDs.
    pub jwt_ttl: Duration,
    /// The `[[agent]]` tables as written, checked against the CA's trust domain when it loads
    /// ([`super::agents::AgentRegistry::from_file`]).
    pub agents: Vec<AgentFile>,
    /// The config file, for the agents' error messages.
    pub file: Option<PathBuf>,
}

/// Defaults of `ca serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_METRICS: &str = "127.0.0.1:15021";
pub const DEFAULT_SVID_TTL: &str = "24h";
pub const DEFAULT_RATE_LIMIT: u32 = 50;
pub const DEFAULT_JWT_TTL: &str = "5m";
/// Accepted JWT-SVID lifetimes: short enough that a stolen token is soon useless.
pub const JWT_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(2)..=Duration::from_secs(24 * 3600);

impl CaServeConfig {
    /// Where the ledger lives.
    pub fn ledger_url(&self) -> LedgerUrl {
        self.ledger
            .clone()
            .unwrap_or_else(|| LedgerUrl::Redb(self.data_dir.join("ledger.redb")))
    }

    /// Merges flags (`flags`) over the optional file, then validates.
    pub fn resolve(flags: CaServeFile, file: Option<&Path>) -> Result<Self, ConfigError> {
        let from_file = read_file(file)?;
        let ledger_options = ledger_options(&flags, &from_file, file)?;
        let bundle_endpoint = bundle_endpoint(&flags, &from_file, file)?;
        // Where each value came from, for error messages.
        let src = |flag_set: bool| if flag_set { None } else { file };
        let ca_src = src(flags.ca.is_some());
        let ca_dir = flags.ca.or(from_file.ca).ok_or_else(|| {
            ConfigError::field(file, "ca", "missing: give --ca DIR or `ca = \"DIR\"`")
        })?;
        let data_dir = flags.data.or(from_file.data).ok_or_else(|| {
            ConfigError::field(file, "data", "missing: give --data DIR or `data = \"DIR\"`")
        })?;
        if !ca_dir.join("ca.crt").exists() {
            return Err(ConfigError::field(
                ca_src,
                "ca",
                format!(
                    "{} has no ca.crt (make one with `trustline ca init`)",
                    ca_dir.display()
                ),
            ));
        }
        let listen_src = src(flags.listen.is_some());
        let listen = parse_listen(flags.listen.or(from_file.listen), listen_src)?;
        let ttl_src = src(flags.svid_ttl.is_some());
        let svid_ttl = parse_svid_ttl(flags.svid_ttl.or(from_file.svid_ttl), ttl_src)?;
        let jwt_src = src(flags.jwt_ttl.is_some());
        let metrics_src = src(flags.metrics_listen.is_some());
        let metrics_listen = parse_metrics(
            flags.metrics_listen.or(from_file.metrics_listen),
            metrics_src,
        )?;
        let mut san = from_file.san.unwrap_or_default();
        san.extend(flags.san.unwrap_or_default());
        check_san(&san, file)?;
        let peers_src = src(flags.peers.is_some());
        let urls = flags.peers.or(from_file.peers).unwrap_or_default();
        check_peer_urls(&urls)
            .map_err(|e| ConfigError::field(peers_src, "peers", e.to_string()))?;
        let refresh_src = src(flags.peer_refresh.is_some());
        let refresh = parse_refresh(flags.peer_refresh.or(from_file.peer_refresh), refresh_src)?;
        let ledger_src = src(flags.ledger.is_some());
        let ledger = match flags.ledger.or(from_file.ledger) {
            None => None,
            Some(text) => Some(
                LedgerUrl::parse(&text).map_err(|e| ConfigError::field(ledger_src, "ledger", e))?,
            ),
        };
        Ok(CaServeConfig {
            ca_dir,
            data_dir,
            listen,
            svid_ttl,
            san,
            metrics_listen,
            audit_log: flags.audit_log.or(from_file.audit_log),
            bundle_endpoint,
            rate_limit: flags
                .rate_limit
                .or(from_file.rate_limit)
                .unwrap_or(DEFAULT_RATE_LIMIT),
            peers: PeerConfig { urls, refresh },
            limits: CaLimits::from_file(from_file.limits, file)?,
            ledger,
            ledger_options,
            jwt_ttl: parse_jwt_ttl(flags.jwt_ttl.or(from_file.jwt_ttl), jwt_src)?,
            agents: from_file.agent,
            file: file.map(Path::to_path_buf),
        })
    }
}

fn parse_jwt_ttl(text: Option<String>, file: Option<&Path>) -> Result<Duration, ConfigError> {
    let text = text.unwrap_or_else(|| DEFAULT_JWT_TTL.to_string());
    let ttl =
        parse_duration(&text).map_err(|e| ConfigError::field(file, "jwt_ttl", e.to_string()))?;
    if !JWT_TTL_RANGE.contains(&ttl) {
        return Err(ConfigError::field(
            file,
            "jwt_ttl",
            format!(
                "{text} is outside {:?}..={:?}",
                JWT_TTL_RANGE.start(),
                JWT_TTL_RANGE.end()
            ),
        ));
    }
    Ok(ttl)
}

/// Accepted refresh intervals of a shared ledger's revocations.
pub const LEDGER_REFRESH_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);
/// Most connections one replica may keep (PostgreSQL's default `max_connections` is 100).
pub const MAX_LEDGER_POOL: usize = 256;

fn ledger_options(
    flags: &CaServeFile,
    from_file: &CaServeFile,
    file: Option<&Path>,
) -> Result<PgOptions, ConfigError> {
    let d = PgOptions::default();
    let refresh = match (&flags.ledger_refresh, &from_file.ledger_refresh) {
        (Some(t), _) | (None, Some(t)) => {
            let src = flags.ledger_refresh.is_none().then_some(file).flatten();
            let r = parse_duration(t)
                .map_err(|e| ConfigError::field(src, "ledger_refresh", e.to_string()))?;
            if !LEDGER_REFRESH_RANGE.contains(&r) {
                return Err(ConfigError::field(
                    src,
                    "ledger_refresh",
                    format!("{t} is outside 100ms..60s"),
                ));
            }
            r
        }
        (None, None) => d.refresh,
    };
    let pool = match flags.ledger_pool.or(from_file.ledger_pool) {
        None => d.pool,
        Some(n) if (1..=MAX_LEDGER_POOL).contains(&n) => n,
        Some(n) => {
            let src = flags.ledger_pool.is_none().then_some(file).flatten();
            return Err(ConfigError::field(
                src,
                "ledger_pool",
                format!("{n} is outside 1..={MAX_LEDGER_POOL}"),
            ));
        }
    };
    Ok(PgOptions { pool, refresh })
}

/// The config file, if any, with its relative paths made relative to the file (as in the
/// sidecar's config).
fn read_file(file: Option<&Path>) -> Result<CaServeFile, ConfigError> {
    let Some(path) = file else {
        return Ok(CaServeFile::default());
    };
    let mut f = load_toml::<CaServeFile>(path)?;
    if let Some(dir) = path.parent() {
        for p in [&mut f.ca, &mut f.data, &mut f.audit_log]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
    Ok(f)
}

/// `bundle_endpoint` with its profile, flags over the file: `https_web` needs a certificate and
/// key, `https_spiffe` (the CA's own server SVID) takes neither.
fn bundle_endpoint(
    flags: &CaServeFile,
    from_file: &CaServeFile,
    file: Option<&Path>,
) -> Result<Option<super::bundle_endpoint::BundleEndpointConfig>, ConfigError> {
    use super::bundle_endpoint::{BundleEndpointConfig, BundleEndpointProfile};
    let pick = |f: &Option<String>, g: &Option<String>| {
        f.clone()
            .map(|v| (v, None))
            .or_else(|| g.clone().map(|v| (v, file)))
    };
    let pick_path = |f: &Option<PathBuf>, g: &Option<PathBuf>| f.clone().or_else(|| g.clone());
    let cert = pick_path(&flags.bundle_endpoint_cert, &from_file.bundle_endpoint_cert);
    let key = pick_path(&flags.bundle_endpoint_key, &from_file.bundle_endpoint_key);
    let Some((listen, src)) = pick(&flags.bundle_endpoint, &from_file.bundle_endpoint) else {
        if cert.is_some()
            || key.is_some()
            || pick(
                &flags.bundle_endpoint_profile,
                &from_file.bundle_endpoint_profile,
            )
            .is_some()
        {
            return Err(ConfigError::field(
                file,
                "bundle_endpoint",
                "missing: the bundle endpoint's profile, cert or key is set but not its address",
            ));
        }
        return Ok(None);
    };
    let listen = listen.parse().map_err(|_| {
        ConfigError::field(
            src,
            "bundle_endpoint",
            format!("{listen:?} is not an address like 0.0.0.0:8444"),
        )
    })?;
    let profile = pick(
        &flags.bundle_endpoint_profile,
        &from_file.bundle_endpoint_profile,
    );
    let profile = match profile.as_ref().map(|(p, src)| (p.as_str(), *src)) {
        None | Some(("https_spiffe", _)) => {
            if cert.is_some() || key.is_some() {
                return Err(ConfigError::field(
                    file,
                    "bundle_endpoint_cert",
                    "only for bundle_endpoint_profile = \"https_web\" (https_spiffe serves the CA's own server certificate)",
                ));
            }
            BundleEndpointProfile::HttpsSpiffe
        }
        Some(("https_web", src)) => match (cert, key) {
            (Some(cert), Some(key)) => BundleEndpointProfile::HttpsWeb { cert, key },
            _ => {
                return Err(ConfigError::field(
                    src,
                    "bundle_endpoint_cert",
                    "https_web needs bundle_endpoint_cert and bundle_endpoint_key (a WebPKI certificate chain for the endpoint's DNS name, and its key, PEM)",
                ))
            }
        },
        Some((other, src)) => {
            return Err(ConfigError::field(
                src,
                "bundle_endpoint_profile",
                format!("{other:?}: expected \"https_spiffe\" or \"https_web\""),
            ))
        }
    };
    Ok(Some(BundleEndpointConfig { listen, profile }))
}

fn parse_listen(text: Option<String>, src: Option<&Path>) -> Result<SocketAddr, ConfigError> {
    let listen = text.unwrap_or_else(|| DEFAULT_LISTEN.into());
    listen.parse().map_err(|_| {
        ConfigError::field(
            src,
            "listen",
            format!("{listen:?} is not an address like 127.0.0.1:8443"),
        )
    })
}

fn parse_svid_ttl(text: Option<String>, src: Option<&Path>) -> Result<Duration, ConfigError> {
    let ttl = text.unwrap_or_else(|| DEFAULT_SVID_TTL.into());
    let svid_ttl =
        parse_duration(&ttl).map_err(|e| ConfigError::field(src, "svid_ttl", e.to_string()))?;
    if !(MIN_SVID_TTL..=MAX_SVID_TTL).contains(&svid_ttl) {
        return Err(ConfigError::field(
            src,
            "svid_ttl",
            format!("{ttl} is outside 2s..90d"),
        ));
    }
    Ok(svid_ttl)
}

fn parse_metrics(
    text: Option<String>,
    src: Option<&Path>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let metrics = text.unwrap_or_else(|| DEFAULT_METRICS.into());
    if metrics == "off" {
        return Ok(None);
    }
    metrics.parse().map(Some).map_err(|_| {
        ConfigError::field(
            src,
            "metrics_listen",
            format!("{metrics:?} is not an address (or `off`)"),
        )
    })
}

/// Each extra name of the server certificate is a DNS name or an IP address.
fn check_san(san: &[String], file: Option<&Path>) -> Result<(), ConfigError> {
    for name in san {
        let ok = name.parse::<std::net::IpAddr>().is_ok()
            || (!name.is_empty()
                && name.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }));
        if !ok {
            return Err(ConfigError::field(
                file,
                "san",
                format!("{name:?} is not a DNS name or IP address"),
            ));
        }
    }
    Ok(())
}

fn parse_refresh(text: Option<String>, src: Option<&Path>) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(DEFAULT_PEER_REFRESH);
    };
    let d = parse_duration(&text)
        .map_err(|e| ConfigError::field(src, "peer_refresh", e.to_string()))?;
    if !PEER_REFRESH_RANGE.contains(&d) {
        return Err(ConfigError::field(
            src,
            "peer_refresh",
            format!("{text} is outside 1s..1h"),
        ));
    }
    Ok(d)
}

/// One `peers` entry: `https://HOST:PORT`, or `REGION=https://HOST:PORT` to require that the
/// peer's certificate be issued by that region's CA. Without a region the peer may be any CA of
/// the trust domain but one of this CA's own region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// The region whose CA the peer must be.
    pub region: Option<Region>,
    /// `https://HOST:PORT`.
    pub url: String,
}

/// Parses `peers` entries ([`PeerSpec`]): each URL `https://HOST:PORT`, each once, at most
/// [`super::peers::MAX_PEERS`].
pub fn parse_peers(entries: &[String]) -> Result<Vec<PeerSpec>, PeerConfigError> {
    if entries.len() > super::peers::MAX_PEERS {
        return Err(PeerConfigError::TooMany {
            count: entries.len(),
            max: super::peers::MAX_PEERS,
        });
    }
    let mut specs: Vec<PeerSpec> = Vec::with_capacity(entries.len());
    for entry in entries {
        let spec = parse_peer(entry)?;
        if specs.iter().any(|s| s.url == spec.url) {
            return Err(PeerConfigError::Twice(spec.url));
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// One `peers` entry.
fn parse_peer(entry: &str) -> Result<PeerSpec, PeerConfigError> {
    // A CA URL never holds `=`, so it separates a region from the URL.
    let (region, url) = match entry.split_once('=') {
        Some((r, u)) => {
            let region = Region::new(r).map_err(|why| PeerConfigError::Region {
                entry: entry.to_string(),
                region: r.to_string(),
                why,
            })?;
            (Some(region), u)
        }
        None => (None, entry),
    };
    let ok = url
        .strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'))
        .and_then(|r| r.rsplit_once(':'))
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !ok {
        return Err(PeerConfigError::Url(entry.to_string()));
    }
    Ok(PeerSpec {
        region,
        url: url.to_string(),
    })
}

/// Checks `peers` entries ([`parse_peers`]).
pub fn check_peer_urls(urls: &[String]) -> Result<(), PeerConfigError> {
    parse_peers(urls).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::check_peer_urls;

    #[test]
    fn peer_urls_must_be_https_host_port_each_once() {
        let ok = [
            "https://ca.us-east:8443".to_string(),
            "https://[::1]:8443/".into(),
        ];
        assert!(check_peer_urls(&ok).is_ok());
        for bad in [
            "http://ca:8443",
            "https://ca",
            "https://:8443",
            "https://ca:99999",
        ] {
            let e = check_peer_urls(&[bad.to_string()]).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let twice = ["https://ca:1".to_string(), "https://ca:1".into()];
        assert!(check_peer_urls(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let twice = ["https://ca:1".to_string(), "b=https://ca:1".into()];
        assert!(check_peer_urls(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn a_peer_may_name_its_region() {
        let specs = super::parse_peers(&[
            "us-east=https://ca.us-east:8443".to_string(),
            "https://ca.eu:8443".into(),
        ])
        .unwrap();
        assert_eq!(specs[0].region.as_deref(), Some("us-east"));
        assert_eq!(specs[0].url, "https://ca.us-east:8443");
        assert_eq!(specs[1].region, None);
        let e = check_peer_urls(&["US=https://ca:1".to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("region \"US\""), "{e}");
        assert!(check_peer_urls(&["=https://ca:1".to_string()]).is_err());
    }
}
