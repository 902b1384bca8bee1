//! Criterion micro-benchmarks of the data path's and the CA's hot pieces, so that a regression in
//! one of them shows up on its own. Everything runs in this process, in memory, on one thread;
//! certificates come from the project's CA code (a root, a regional intermediate, leaves signed
//! by `Authority::sign_leaf`), and the TLS configurations are the sidecar's own
//! (`tls::mesh::server_config` / `client_config`).
//!
//! - `handshake`: a mutual TLS 1.3 handshake between a client and a server connection exchanging
//!   bytes through a `Vec` (no sockets), plus what the sidecar runs right after it: the re-check
//!   of a resumed peer on both ends and the inbound side's read-back of the caller's SPIFFE ID.
//!   With resumption off (full handshake) and on (resumed from a ticket; the new tickets the
//!   server sends are delivered too, as they are on a real connection), and, to show what the
//!   re-check costs, a resumed handshake without it. The peers' chains are remembered as verified
//!   after the first time (`tls::mesh::Trust`), as between two sidecars; "not seen before" empties
//!   that memory before each handshake (untimed), so both ends check the path again.
//! - `spiffe_verify`: the sidecar's certificate verifiers called directly on a peer's chain
//!   (leaf + intermediate; remembered, and not seen before), `inspect_cert` alone, and
//!   `identity::parse_id`.
//! - `splice`: 1 MiB in 16 KiB writes through one TLS 1.3 record layer, client to server:
//!   encryption, record framing, decryption and the copies in and out of rustls. No sockets and
//!   no kernel, so this is an upper bound on what a sidecar's splice can move per core.
//! - `csr_sign`: the CA's part of an issuance as `ca::api` runs it: `parse_csr` (with the CSR
//!   signature check), `Authority::sign_leaf`, and the PEM chain of the answer; keys and the CSR
//!   are made before timing. The ledger commit and HTTPS are not included (see `ca_issuance`).
//!
//! Run: `cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 3`; figures in
//! benches/RESULTS.md.

// Benchmarks measure wall time and drive blocking clients outside tokio: the OS clock and
// thread sleeps are what they are for (clippy.toml bans them elsewhere).
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rcgen::KeyPair;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, HandshakeKind, ServerConfig, ServerConnection,
};
use trustline::ca::authority::{self, parse_csr, Authority, LeafUsage};
use trustline::clock::Clock;
use trustline::crypto::provider;
use trustline::identity::{chain_to_pem, inspect_cert, parse_id, parse_trust_domain, SpiffeId};
use trustline::svid::ca_client::make_csr;
use trustline::tls::mesh::{self, MeshServerVerifier, PeerChecks, SpiffeClientVerifier, Trust};
use trustline::tls::ExpectedPeer;

const TRUST_DOMAIN: &str = "bench.test";
const CLIENT_ID: &str = "spiffe://bench.test/ns/shop/sa/web";
const SERVER_ID: &str = "spiffe://bench.test/ns/shop/sa/api";
const LEAF_TTL: Duration = Duration::from_secs(3600);
/// Bytes moved per `splice` iteration, and the size of each application write.
const SPLICE_TOTAL: usize = 1 << 20;
const SPLICE_CHUNK: usize = 16 << 10;

/// A root and a regional intermediate in a temporary directory, loaded as the CA loads them.
struct Pki {
    _dir: tempfile::TempDir,
    authority: Authority,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let td = parse_trust_domain(TRUST_DOMAIN).expect("trust domain");
        let year = Duration::from_secs(365 * 86400);
        let root = dir.path().join("root");
        let region = dir.path().join("eu");
        authority::init_root(&td, &root, year, false).expect("root CA");
        authority::init_intermediate(&root, "eu", &region, year, false).expect("intermediate CA");
        let authority = Authority::load(&region).expect("intermediate loads");
        Pki {
            _dir: dir,
            authority,
        }
    }

    /// A workload's chain (leaf, intermediate) and key, the leaf from the CA's own template.
    fn svid(&self, id: &SpiffeId) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("key pair");
        let issued = self
            .authority
            .sign_leaf(
                id,
                &key,
                LEAF_TTL,
                std::time::SystemTime::now(),
                LeafUsage::Svid,
            )
            .expect("leaf signed");
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        (self.authority.chain_for(&issued.leaf), der.into())
    }

    /// The resolver a sidecar holding `id`'s SVID hands to every handshake.
    fn resolver(&self, id: &SpiffeId) -> (Arc<mesh::SvidResolver>, Vec<CertificateDer<'static>>) {
        let (chain, key) = self.svid(id);
        let ck = CertifiedKey::from_der(chain.clone(), key, &provider()).expect("key matches");
        let resolver = mesh::SvidResolver::default();
        resolver.0.store(Some(Arc::new(ck)));
        (Arc::new(resolver), chain)
    }
}

/// Two sidecars' TLS ends, configured as `proxy::build` configures them: the server (`api`)
/// verifies callers with [`SpiffeClientVerifier`], the client (`web`) expects `api`.
struct Mesh {
    /// Both verifiers' trust: its memory of verified chains is emptied by `forget_chains`.
    trust: Arc<Trust>,
    client_verifier: Arc<SpiffeClientVerifier>,
    server_verifier: Arc<MeshServerVerifier>,
    client_svid: Arc<mesh::SvidResolver>,
    server_svid: Arc<mesh::SvidResolver>,
    client_chain: Vec<CertificateDer<'static>>,
    server_chain: Vec<CertificateDer<'static>>,
    clock: Clock,
    pki: Pki,
}

impl Mesh {
    /// Makes every chain new to the verifiers again (a bundle change does that), so the next
    /// verification runs the full path check: the cost of a peer not seen before.
    fn forget_chains(&self) {
        let bundle = (*self.trust.bundle()).clone();
        self.trust.set_bundle(bundle).expect("same bundle");
    }

    fn new() -> Self {
        let pki = Pki::new();
        let trust = Trust::new(pki.authority.bundle.clone()).expect("trust");
        let checks = PeerChecks {
            trust_domain: pki.authority.trust_domain.clone(),
            revoked: Default::default(),
        };
        let client_verifier = Arc::new(SpiffeClientVerifier::new(trust.clone(), checks.clone()));
        let expected = ExpectedPeer::AnyOf(vec![server_id()]);
        let server_verifier = Arc::new(MeshServerVerifier::new(trust.clone(), expected, checks));
        let (client_svid, client_chain) = pki.resolver(&client_id());
        let (server_svid, server_chain) = pki.resolver(&server_id());
        Mesh {
            trust,
            client_verifier,
            server_verifier,
            client_svid,
            server_svid,
            client_chain,
            server_chain,
            clock: Clock::system(),
            pki,
        }
    }

    /// A connected pair's configurations, with or without TLS 1.3 resumption.
    fn configs(&self, resumption: bool) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let server = mesh::server_config(
            self.client_verifier.clone(),
            self.server_svid.clone(),
            resumption,
            &self.clock,
        )
        .expect("server config");
        let client = mesh::client_config(
            self.server_verifier.clone(),
            self.client_svid.clone(),
            resumption,
            &self.clock,
        )
        .expect("client config");
        (Arc::new(client), Arc::new(server))
    }
}

fn client_id() -> SpiffeId {
    parse_id(CLIENT_ID).expect("client ID")
}

fn server_id() -> SpiffeId {
    parse_id(SERVER_ID).expect("server ID")
}

/// Moves everything `from` has to send into `to` and lets `to` process it.
fn pump<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>, wire: &mut Vec<u8>) {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).expect("write_tls into a Vec");
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls from a slice");
        to.process_new_packets()
            .unwrap_or_else(|e| panic!("TLS error: {e}"));
    }
}

/// A completed handshake, with the post-handshake tickets delivered to the client.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    wire: &mut Vec<u8>,
) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from("api.mesh.invalid").expect("server name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client connection");
    let mut s = ServerConnection::new(server.clone()).expect("server connection");
    // Full handshake: 3 flights; a few more rounds are allowed, a stuck exchange is not.
    for _ in 0..8 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        pump(&mut c, &mut s, wire);
        pump(&mut s, &mut c, wire);
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake did not complete"
    );
    pump(&mut s, &mut c, wire);
    (c, s)
}

/// What each end of the sidecar does right after a handshake: re-check a resumed peer, and on
/// the inbound side read the caller's SPIFFE ID back for the policy decision.
fn after_handshake(mesh: &Mesh, c: &ClientConnection, s: &ServerConnection) -> SpiffeId {
    mesh::recheck_resumed_client(s, &mesh.client_verifier, &mesh.clock).expect("client recheck");
    mesh::recheck_resumed_server(c, &mesh.server_verifier, &mesh.clock).expect("server recheck");
    let leaf = s
        .peer_certificates()
        .and_then(<[_]>::first)
        .expect("client certificate");
    inspect_cert(leaf).expect("caller's SVID").id
}

/// Checks, before any timing, that a handshake completes as `kind` with both identities right.
fn assert_handshake(
    mesh: &Mesh,
    cfg: &(Arc<ClientConfig>, Arc<ServerConfig>),
    kind: HandshakeKind,
) {
    let (c, s) = handshake(&cfg.0, &cfg.1, &mut Vec::new());
    assert_eq!(after_handshake(mesh, &c, &s), client_id());
    let server_leaf = &c.peer_certificates().expect("server certificate")[0];
    assert_eq!(
        inspect_cert(server_leaf).expect("server SVID").id,
        server_id()
    );
    assert_eq!(
        c.negotiated_cipher_suite().map(|s| s.version()),
        Some(&rustls::version::TLS13)
    );
    assert_eq!(c.alpn_protocol(), Some(mesh::MESH_ALPN));
    assert_eq!(c.handshake_kind(), Some(kind));
    assert_eq!(s.handshake_kind(), Some(kind));
}

fn bench_handshake(c: &mut Criterion, mesh: &Mesh) {
    let full = mesh.configs(false);
    assert_handshake(mesh, &full, HandshakeKind::Full);
    let resumed = mesh.configs(true);
    // The first handshake is full and leaves tickets with the client; every later one resumes.
    assert_handshake(mesh, &resumed, HandshakeKind::Full);
    assert_handshake(mesh, &resumed, HandshakeKind::Resumed);

    let mut g = c.benchmark_group("handshake");
    let mut wire = Vec::with_capacity(16 << 10);
    for (name, cfg) in [("full (resumption off)", &full), ("resumed", &resumed)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let (c, s) = handshake(&cfg.0, &cfg.1, &mut wire);
                black_box(after_handshake(mesh, &c, &s))
            })
        });
    }
    // A peer whose chain the sidecar has not verified before (its first connection, or the first
    // after the peer rotated): the path and its signatures are checked on both ends.
    g.bench_function("full, peer chains not seen before", |b| {
        b.iter_batched(
            || mesh.forget_chains(),
            |()| {
                let (c, s) = handshake(&full.0, &full.1, &mut wire);
                black_box(after_handshake(mesh, &c, &s))
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // For attribution only: the sidecar never skips the re-check of a resumed peer.
    g.bench_function("resumed, without the sidecar's re-check", |b| {
        b.iter(|| black_box(handshake(&resumed.0, &resumed.1, &mut wire)))
    });
    g.finish();
}

fn bench_spiffe_verify(c: &mut Criterion, mesh: &Mesh) {
    let now = UnixTime::now();
    let name = ServerName::try_from("api.mesh.invalid").expect("server name");
    let (client_leaf, client_rest) = mesh.client_chain.split_first().expect("client chain");
    let (server_leaf, server_rest) = mesh.server_chain.split_first().expect("server chain");
    mesh.client_verifier
        .verify_client_cert(client_leaf, client_rest, now)
        .expect("client SVID verifies");
    mesh.server_verifier
        .verify_server_cert(server_leaf, server_rest, &name, &[], now)
        .expect("server SVID verifies");

    let mut g = c.benchmark_group("spiffe_verify");
    g.bench_function("verify_client_cert (inbound)", |b| {
        b.iter(|| {
            mesh.client_verifier
                .verify_client_cert(black_box(client_leaf), black_box(client_rest), now)
                .is_ok()
        })
    });
    g.bench_function("verify_server_cert (outbound)", |b| {
        b.iter(|| {
            mesh.server_verifier
                .verify_server_cert(
                    black_box(server_leaf),
                    black_box(server_rest),
                    &name,
                    &[],
                    now,
                )
                .is_ok()
        })
    });
    g.bench_function("verify_client_cert, chain not seen before", |b| {
        b.iter_batched(
            || mesh.forget_chains(),
            |()| {
                mesh.client_verifier
                    .verify_client_cert(black_box(client_leaf), black_box(client_rest), now)
                    .is_ok()
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.bench_function("inspect_cert (leaf facts only)", |b| {
        b.iter(|| inspect_cert(black_box(client_leaf)).is_ok())
    });
    g.bench_function("parse_id", |b| {
        b.iter(|| parse_id(black_box(CLIENT_ID)).is_ok())
    });
    g.finish();
}

/// Sends `data` from `c` to `s` in `SPLICE_CHUNK` writes and reads it all back out of `s`.
fn splice(
    c: &mut ClientConnection,
    s: &mut ServerConnection,
    data: &[u8],
    wire: &mut Vec<u8>,
    out: &mut [u8],
) -> usize {
    let mut received = 0;
    for chunk in data.chunks(SPLICE_CHUNK) {
        c.writer().write_all(chunk).expect("plaintext in");
        pump(c, s, wire);
        loop {
            match s.reader().read(out) {
                Ok(0) => break,
                Ok(n) => received += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("plaintext out: {e}"),
            }
        }
    }
    received
}

fn bench_splice(c: &mut Criterion, mesh: &Mesh) {
    let (client, server) = mesh.configs(false);
    let mut wire = Vec::with_capacity(SPLICE_CHUNK + 1024);
    let (mut cc, mut sc) = handshake(&client, &server, &mut wire);
    let suite = cc.negotiated_cipher_suite().expect("cipher suite").suite();
    let data = vec![0x5a_u8; SPLICE_TOTAL];
    let mut out = vec![0u8; SPLICE_CHUNK];
    assert_eq!(
        splice(&mut cc, &mut sc, &data, &mut wire, &mut out),
        SPLICE_TOTAL
    );

    let mut g = c.benchmark_group("splice");
    g.throughput(Throughput::Bytes(SPLICE_TOTAL as u64));
    g.bench_function(format!("1 MiB in 16 KiB writes, {suite:?}"), |b| {
        b.iter(|| splice(&mut cc, &mut sc, black_box(&data), &mut wire, &mut out))
    });
    g.finish();
}

fn bench_csr_sign(c: &mut Criterion, mesh: &Mesh) {
    let ca = &mesh.pki.authority;
    let id = client_id();
    let (_key, pem) = make_csr(&id).expect("CSR");
    let csr = parse_csr(pem.as_bytes()).expect("CSR parses");
    assert_eq!(csr.requested, id);
    let sign = |csr: &authority::Csr| {
        let now = std::time::SystemTime::now();
        ca.sign_leaf(
            &csr.requested,
            &csr.public_key,
            LEAF_TTL,
            now,
            LeafUsage::Svid,
        )
        .expect("leaf signed")
    };

    let mut g = c.benchmark_group("csr_sign");
    g.bench_function("parse_csr (with signature check)", |b| {
        b.iter(|| parse_csr(black_box(pem.as_bytes())).is_ok())
    });
    g.bench_function("sign_leaf", |b| b.iter(|| sign(black_box(&csr)).serial));
    g.bench_function("parse_csr + sign_leaf + PEM chain (as ca::api)", |b| {
        b.iter(|| {
            let csr = parse_csr(black_box(pem.as_bytes())).expect("CSR parses");
            let issued = sign(&csr);
            chain_to_pem(&ca.chain_for(&issued.leaf))
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let mesh = Mesh::new();
    bench_handshake(c, &mesh);
    bench_spiffe_verify(c, &mesh);
    bench_splice(c, &mesh);
    bench_csr_sign(c, &mesh);
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
