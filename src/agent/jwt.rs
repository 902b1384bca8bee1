//! The JWT-SVID profile (placeholder until `crate::jwt` lands).

use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb;
use super::service::Shared;

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The JWT side of the service.
pub struct JwtService {}

impl JwtService {
    pub(super) fn new(
        _client: crate::svid::ca_client::CaClient,
        _agent: Arc<crate::svid::Identity>,
        _stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        JwtService {}
    }

    pub(super) async fn fetch_jwtsvid(
        &self,
        shared: &Arc<Shared>,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        shared.entitled(&request, "FetchJWTSVID")?;
        Err(Status::unimplemented("JWT-SVIDs are not served by this agent yet"))
    }

    pub(super) fn fetch_jwt_bundles(
        &self,
        shared: &Arc<Shared>,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Stream<pb::JwtBundlesResponse>>, Status> {
        shared.verifier(&request, "FetchJWTBundles")?;
        Err(Status::unimplemented("JWT bundles are not served by this agent yet"))
    }

    pub(super) fn validate_jwtsvid(
        &self,
        shared: &Arc<Shared>,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        shared.verifier(&request, "ValidateJWTSVID")?;
        Err(Status::unimplemented("JWT-SVID validation is not served by this agent yet"))
    }
}
