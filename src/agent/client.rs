//! A small Workload API client over a Unix socket: what `trustline agent fetch` prints (like
//! `spire-agent api fetch`), and what the tests use to call the agent exactly as they mean to
//! (with or without the security metadata). Applications use a SPIFFE library instead.

use std::path::Path;

use rustls::pki_types::CertificateDer;

use tonic::codec::Streaming;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_prost::ProstCodec;

use super::pb;
use super::service::SECURITY_HEADER;

/// Why the socket could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the Workload API at {socket}: {source}")]
pub struct ConnectError {
    socket: String,
    source: spiffe::transport::TransportError,
}

/// A connection to a Workload API.
#[derive(Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
    metadata: bool,
}

impl Client {
    /// Connects to the Workload API at `socket`.
    pub async fn connect(socket: &Path) -> Result<Self, ConnectError> {
        let endpoint = spiffe::transport::Endpoint::Unix(socket.to_path_buf());
        let channel = spiffe::transport::connect(&endpoint)
            .await
            .map_err(|source| ConnectError {
                socket: socket.display().to_string(),
                source,
            })?;
        Ok(Client {
            grpc: tonic::client::Grpc::new(channel),
            metadata: true,
        })
    }

    /// Leaves out the `workload.spiffe.io` metadata, which every server must refuse (tests).
    pub fn without_metadata(mut self) -> Self {
        self.metadata = false;
        self
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if self.metadata {
            r.metadata_mut().insert(
                SECURITY_HEADER,
                tonic::metadata::MetadataValue::from_static("true"),
            );
        }
        r
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("the Workload API is not ready: {e}")))
    }

    /// The FetchX509SVID stream.
    pub async fn x509_svids(&mut self) -> Result<Streaming<pb::X509svidResponse>, Status> {
        self.ready().await?;
        let req = self.request(pb::X509svidRequest {});
        let path = PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509SVID");
        Ok(self
            .grpc
            .server_streaming(req, path, ProstCodec::default())
            .await?
            .into_inner())
    }

    /// The FetchX509Bundles stream.
    pub async fn x509_bundles(&mut self) -> Result<Streaming<pb::X509BundlesResponse>, Status> {
        self.ready().await?;
        let req = self.request(pb::X509BundlesRequest {});
        let path = PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509Bundles");
        Ok(self
            .grpc
            .server_streaming(req, path, ProstCodec::default())
            .await?
            .into_inner())
    }

    /// FetchJWTSVID for `audience`, for `spiffe_id` or (empty) every ID of the caller.
    pub async fn jwt_svids(
        &mut self,
        audience: Vec<String>,
        spiffe_id: String,
    ) -> Result<pb::JwtsvidResponse, Status> {
        self.ready().await?;
        let req = self.request(pb::JwtsvidRequest {
            audience,
            spiffe_id,
        });
        let path = PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchJWTSVID");
        Ok(self
            .grpc
            .unary(req, path, ProstCodec::default())
            .await?
            .into_inner())
    }

    /// The FetchJWTBundles stream.
    pub async fn jwt_bundles(&mut self) -> Result<Streaming<pb::JwtBundlesResponse>, Status> {
        self.ready().await?;
        let req = self.request(pb::JwtBundlesRequest {});
        let path = PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchJWTBundles");
        Ok(self
            .grpc
            .server_streaming(req, path, ProstCodec::default())
            .await?
            .into_inner())
    }

    /// ValidateJWTSVID of `svid` for `audience`.
    pub async fn validate_jwt(
        &mut self,
        audience: String,
        svid: String,
    ) -> Result<pb::ValidateJwtsvidResponse, Status> {
        self.ready().await?;
        let req = self.request(pb::ValidateJwtsvidRequest { audience, svid });
        let path = PathAndQuery::from_static("/SpiffeWorkloadAPI/ValidateJWTSVID");
        Ok(self
            .grpc
            .unary(req, path, ProstCodec::default())
            .await?
            .into_inner())
    }
}

/// The certificates of a Workload API DER field (one or more certificates, concatenated).
pub fn split_certs(der: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        let (tail, _) = x509_parser::parse_x509_certificate(rest)
            .map_err(|e| format!("certificate {} of the answer: {e}", certs.len() + 1))?;
        let len = rest.len() - tail.len();
        certs.push(CertificateDer::from(rest[..len].to_vec()));
        rest = tail;
    }
    Ok(certs)
}
