//! The certificate authority proper: making the root and regional intermediates, loading them,
//! checking CSRs and signing leaves from the CA's own template (never from the CSR).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::identity::{
    certs_from_pem, inspect_cert, parse_trust_domain, Bundle, Serial, SpiffeId, TrustDomain,
    REGION_PATH_PREFIX,
};
use crate::region::Region;
use crate::util::{write_public, write_secret};

pub use super::error::{AuthorityError, CsrError, WorkloadIdError};
pub use crate::identity::BACKDATE;

/// A verified CSR: the only two things trustline takes from it.
pub struct Csr {
    /// The requester's public key.
    pub public_key: SubjectPublicKeyInfo,
    /// The SPIFFE ID it asks for.
    pub requested: SpiffeId,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Parses a PEM CSR, verifies its signature, checks the key type and reads the requested SPIFFE
/// ID. Everything else in the request (subject, other SANs, basic constraints, key usages) is
/// ignored.
pub fn parse_csr(pem: &[u8]) -> Result<Csr, CsrError> {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateSigningRequestDer::from_pem_slice(pem)
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    let (rest, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    let spki = &req.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = (alg == OID_EC_PUBLIC_KEY)
        .then(|| spki.algorithm.parameters.as_ref()?.as_oid().ok())
        .flatten()
        .map(|o| o.to_id_string());
    match (alg.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256 | OID_P384)) | (OID_ED25519, None) => {}
        (OID_RSA, _) => return Err(CsrError::UnsupportedKey("RSA".into())),
        (OID_EC_PUBLIC_KEY, c) => {
            return Err(CsrError::UnsupportedKey(format!(
                "ECDSA on curve {}",
                c.unwrap_or("(unnamed)")
            )))
        }
        (a, _) => return Err(CsrError::UnsupportedKey(format!("algorithm {a}"))),
    }
    req.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let mut uris = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            uris.extend(san.general_names.iter().filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            }));
        }
    }
    if uris.len() != 1 {
        return Err(CsrError::UriCount(uris.len()));
    }
    let requested =
        crate::identity::parse_id(&uris[0]).map_err(|_| CsrError::BadUri(uris[0].clone()))?;
    let public_key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
    Ok(Csr {
        public_key,
        requested,
    })
}

/// Files of a CA directory.
#[derive(Debug, Clone)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    pub chain: PathBuf,
}

impl CaPaths {
    /// The file names inside `dir`.
    pub fn new(dir: &Path) -> Self {
        CaPaths {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
            bundle: dir.join("bundle.pem"),
            chain: dir.join("chain.pem"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthorityError> {
    fs::read(path).map_err(io_err(path))
}

fn ca_params(
    td: &TrustDomain,
    cn: String,
    uri: String,
    ttl: Duration,
    constraints: BasicConstraints,
) -> Result<CertificateParams, AuthorityError> {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.to_string());
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = now - BACKDATE;
    p.not_after = now + ttl;
    p.serial_number = Some(random_serial());
    p.is_ca = IsCa::Ca(constraints);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

fn refuse_overwrite(paths: &CaPaths, force: bool) -> Result<(), AuthorityError> {
    if !force && paths.key.exists() {
        return Err(AuthorityError::Exists(paths.key.clone()));
    }
    Ok(())
}

fn prepare_dir(dir: &Path) -> Result<(), AuthorityError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

/// `trustline ca init --trust-domain TD --out DIR`: a self-signed root (ECDSA P-256).
pub fn init_root(
    td: &TrustDomain,
    out: &Path,
    ttl: Duration,
    force: bool,
) -> Result<CaPaths, AuthorityError> {
    let paths = CaPaths::new(out);
    refuse_overwrite(&paths, force)?;
    prepare_dir(out)?;
    let key = KeyPair::generate()?;
    let params = ca_params(
        td,
        format!("trustline root CA {td}"),
        format!("spiffe://{td}"),
        ttl,
        BasicConstraints::Unconstrained,
    )?;
    let cert = params.self_signed(&key)?;
    write_secret(&paths.key, key.serialize_pem().as_bytes()).map_err(io_err(&paths.key))?;
    write_public(&paths.cert, cert.pem().as_bytes()).map_err(io_err(&paths.cert))?;
    write_public(&paths.bundle, cert.pem().as_bytes()).map_err(io_err(&paths.bundle))?;
    let _ = fs::remove_file(&paths.chain);
    Ok(paths)
}

/// Checks a region name with the rule every role uses ([`Region`]).
pub fn validate_region(region: &str) -> Result<Region, AuthorityError> {
    Region::new(region).map_err(|why| AuthorityError::BadRegion(format!("{region:?}: {why}")))
}

/// `trustline ca init --root ROOTDIR --region NAME --out DIR`: a regional intermediate signed by
/// the root, carrying `spiffe://TD/trustline/region/NAME` as its URI SAN.
pub fn init_intermediate(
    root_dir: &Path,
    region: &str,
    out: &Path,
    ttl: Duration,
    force: bool,
) -> Result<CaPaths, AuthorityError> {
    let region = validate_region(region)?;
    let root = Authority::load(root_dir)?;
    let paths = CaPaths::new(out);
    refuse_overwrite(&paths, force)?;
    prepare_dir(out)?;
    let td = root.trust_domain.clone();
    let key = KeyPair::generate()?;
    // Never outlive the root.
    let ttl = ttl.min(
        root.not_after
            .duration_since(crate::clock::Clock::system().now())
            .unwrap_or_default(),
    );
    let params = ca_params(
        &td,
        format!("trustline {region} intermediate CA {td}"),
        crate::identity::ids::region_ca_uri(&td, &region),
        ttl,
        // pathLenConstraint 0: a regional CA signs leaves only, never a CA below it (webpki
        // enforces it). URI name constraints for the trust domain would be the other half, but
        // webpki refuses every chain carrying them (RUSTSEC-2026-0098), so the verifiers check
        // the trust domain of the leaf and of its issuer instead.
        BasicConstraints::Constrained(0),
    )?;
    let cert = params.signed_by(&key, &root.issuer)?;
    let root_pem = root.bundle.to_pem();
    write_secret(&paths.key, key.serialize_pem().as_bytes()).map_err(io_err(&paths.key))?;
    write_public(&paths.cert, cert.pem().as_bytes()).map_err(io_err(&paths.cert))?;
    write_public(
        &paths.chain,
        format!("{}{}", cert.pem(), root_pem).as_bytes(),
    )
    .map_err(io_err(&paths.chain))?;
    write_public(&paths.bundle, root_pem.as_bytes()).map_err(io_err(&paths.bundle))?;
    Ok(paths)
}

/// A loaded CA: its signing key, its certificate, what it sends above each leaf, and the roots.
pub struct Authority {
    /// The trust domain, from the CA certificate's URI SAN.
    pub trust_domain: TrustDomain,
    /// The region of an intermediate; `None` for a root.
    pub region: Option<Region>,
    /// The CA's own certificate.
    pub cert: CertificateDer<'static>,
    /// Certificates sent after the leaf: the intermediate(s), never the root.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// The trust roots handed to workloads.
    pub bundle: Bundle,
    /// End of the CA certificate's validity: no leaf outlives it.
    pub not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// Loads `ca.crt`, `ca.key`, `bundle.pem` and (for an intermediate) `chain.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, AuthorityError> {
        let paths = CaPaths::new(dir);
        let cert_pem = read(&paths.cert)?;
        let key_pem = read(&paths.key)?;
        let bad = |path: &Path, reason: String| AuthorityError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let cert = certs_from_pem(&cert_pem, &paths.cert.display().to_string())?
            .into_iter()
            .next()
            .ok_or_else(|| bad(&paths.cert, "no certificate".into()))?;
        let info = inspect_cert(&cert).map_err(|e| bad(&paths.cert, e.to_string()))?;
        if !info.is_ca {
            return Err(bad(&paths.cert, "not a CA certificate (CA:FALSE)".into()));
        }
        let trust_domain = parse_trust_domain(info.id.trust_domain_name())?;
        let region = info
            .id
            .path()
            .strip_prefix(REGION_PATH_PREFIX)
            .map(|r| Region::new(r).map_err(|e| bad(&paths.cert, format!("region {r:?}: {e}"))))
            .transpose()?;
        let key_str =
            std::str::from_utf8(&key_pem).map_err(|_| bad(&paths.key, "not PEM text".into()))?;
        let key = KeyPair::from_pem(key_str).map_err(|e| bad(&paths.key, e.to_string()))?;
        let cert_str =
            std::str::from_utf8(&cert_pem).map_err(|_| bad(&paths.cert, "not PEM text".into()))?;
        if key.public_key_raw() != public_key_raw(&cert) {
            return Err(bad(
                &paths.key,
                format!("key does not match {}", paths.cert.display()),
            ));
        }
        let issuer =
            Issuer::from_ca_cert_pem(cert_str, key).map_err(|e| bad(&paths.cert, e.to_string()))?;
        let bundle = Bundle::from_pem(
            trust_domain.clone(),
            &read(&paths.bundle)?,
            &paths.bundle.display().to_string(),
        )?;
        let intermediates = if region.is_some() || paths.chain.exists() {
            let chain = certs_from_pem(&read(&paths.chain)?, &paths.chain.display().to_string())?;
            chain
                .into_iter()
                .filter(|c| !bundle.roots.contains(c))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Authority {
            trust_domain,
            region,
            cert,
            intermediates,
            bundle,
            not_after: info.not_after,
            issuer,
        })
    }

    /// Signs a leaf for `id` over `public_key` from the CA's own template: a positive serial of
    /// issuance time and 88 random bits ([`leaf_serial`]), not-before [`BACKDATE`] (5 minutes)
    /// back, not-after `now + ttl` capped at the CA's own expiry,
    /// exactly one URI SAN, CA:FALSE, digitalSignature, serverAuth + clientAuth, SKI/AKI.
    /// `dns` adds DNS/IP SANs (only for the CA server's own certificate).
    pub fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
        now: SystemTime,
        usage: LeafUsage<'_>,
    ) -> Result<Issued, AuthorityError> {
        let serial = leaf_serial(now);
        let not_after = (now + ttl).min(self.not_after);
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.not_before = OffsetDateTime::from(now - BACKDATE);
        p.not_after = OffsetDateTime::from(not_after);
        p.serial_number = Some(serial.clone());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        match usage {
            LeafUsage::Svid => {
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            LeafUsage::Server { names } => {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                for n in names {
                    p.subject_alt_names
                        .push(match n.parse::<std::net::IpAddr>() {
                            Ok(ip) => SanType::IpAddress(ip),
                            Err(_) => SanType::DnsName(n.clone().try_into()?),
                        });
                }
            }
        }
        let cert = p.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            leaf: cert.der().clone(),
            serial: Serial::from_bytes(&serial.to_bytes()),
            not_after,
        })
    }

    /// The chain returned to a workload: leaf first, then the intermediates.
    pub fn chain_for(&self, leaf: &CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(leaf.clone());
        chain.extend(self.intermediates.iter().cloned());
        chain
    }
}

/// What decides which IDs a CA may issue: its trust domain and region (a loaded [`Authority`],
/// or the rotatable keys of a serving CA, whose trust domain and region never change).
pub trait CaScope {
    fn trust_domain(&self) -> &TrustDomain;
    fn region(&self) -> Option<&Region>;
}

impl CaScope for Authority {
    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    fn region(&self) -> Option<&Region> {
        self.region.as_ref()
    }
}

impl CaScope for super::rotation::CaKeys {
    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    fn region(&self) -> Option<&Region> {
        self.region.as_ref()
    }
}

/// Whether a SPIFFE ID may hold a workload SVID from this CA.
pub fn check_workload_id(authority: &impl CaScope, id: &SpiffeId) -> Result<(), WorkloadIdError> {
    if !id.is_member_of(authority.trust_domain()) {
        return Err(WorkloadIdError::OtherTrustDomain {
            id: id.clone(),
            trust_domain: authority.trust_domain().clone(),
        });
    }
    if id.path().is_empty() {
        return Err(WorkloadIdError::NoPath(id.clone()));
    }
    check_role_id(authority, id)
}

/// IDs under `/trustline/` name trustline's own roles and are issued only for them: the CA's
/// server ID and the region IDs of CA certificates never to a workload, and a gateway ID
/// (`/trustline/gateway/REGION`) only by that region's CA, so that a gateway's region binding
/// (ID and issuing CA agree) cannot be forged by another region's CA or its admin.
fn check_role_id(authority: &impl CaScope, id: &SpiffeId) -> Result<(), WorkloadIdError> {
    let Some(role) = id
        .path()
        .strip_prefix(crate::identity::ids::RESERVED_PREFIX)
    else {
        return Ok(());
    };
    if id.path().starts_with(REGION_PATH_PREFIX) || role == "ca" || role.starts_with("ca/") {
        return Err(WorkloadIdError::ReservedForCas(id.clone()));
    }
    match (
        role.strip_prefix("gateway/"),
        authority.region().map(|r| r.as_str()),
    ) {
        (Some(r), Some(ours)) if r == ours => Ok(()),
        (Some(r), _) => Err(WorkloadIdError::OtherRegionsGateway {
            id: id.clone(),
            region: r.to_string(),
            ours: authority.region().cloned(),
        }),
        // A host's agent (`/trustline/agent/NODE`), which joins like a workload and then
        // obtains only what `[[agent]]` registers for it (super::agents).
        (None, _) if super::agents::is_agent_id(id) => Ok(()),
        (None, _) => Err(WorkloadIdError::ReservedForRoles(id.clone())),
    }
}

/// What a leaf is for.
pub enum LeafUsage<'a> {
    /// A workload X.509-SVID (serverAuth + clientAuth).
    Svid,
    /// The CA server's own HTTPS certificate (serverAuth only, with DNS/IP SANs).
    Server { names: &'a [String] },
}

/// A freshly signed leaf.
pub struct Issued {
    pub leaf: CertificateDer<'static>,
    pub serial: Serial,
    pub not_after: SystemTime,
}

/// 16 random bytes, the top bit cleared (positive) and the lowest bit of the first byte set (the
/// encoding keeps 16 bytes): 126 random bits, well above the 64 CA/B requires.
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("system random generator failed");
    b[0] &= 0x7f;
    b[0] |= 0x01; // keep 16 bytes so the encoding length is stable
    SerialNumber::from_slice(&b)
}

/// Leaf serials: 19 bytes, `0x40`, then the issuance time in microseconds since the epoch (7
/// bytes, big-endian, kept strictly increasing within the process), then 11 bytes (88 bits) from
/// the CSPRNG.
///
/// Why not all random: the ledger keys its records by serial, and random keys made every group
/// commit rewrite a different B-tree leaf per SVID. Time-ordered serials append at the right edge.
/// What the time prefix gives away is the issuance time, which `notBefore` already shows to the
/// second. The unpredictable part, which is what stops a chosen-prefix collision on the signed
/// bytes, is 88 bits, above the CA/Browser Forum's 64. The fixed first byte is even and the older
/// all-random serials (and CA certificates, [`random_serial`]) start with an odd one, so the two
/// never collide and the new ones form one range of the key space.
fn leaf_serial(now: SystemTime) -> SerialNumber {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    // Strictly increasing even when the (injected) clock stands still or steps back.
    let prev = LAST
        .fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |last| Some(micros.max(last + 1)),
        )
        .unwrap_or_else(|last| last);
    let stamp = micros.max(prev + 1) & ((1 << 56) - 1);
    let mut b = [0u8; 19];
    b[0] = 0x40;
    b[1..8].copy_from_slice(&stamp.to_be_bytes()[1..]);
    aws_lc_rs::rand::fill(&mut b[8..]).expect("system random generator failed");
    SerialNumber::from_slice(&b)
}

fn public_key_raw(cert: &CertificateDer<'_>) -> Vec<u8> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
        .unwrap_or_default()
}
