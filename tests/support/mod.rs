//! A fake SPIFFE agent: the Workload API's X.509 stream on a Unix socket, serving whatever the
//! test pushes. Like a real agent it refuses calls without the `workload.spiffe.io: true`
//! metadata and records who called (the peer credentials of the socket).
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

pub use trustline::agent::pb;

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// One X.509-SVID as the agent hands it out.
pub struct Offer<'a> {
    /// Leaf first.
    pub chain: &'a [CertificateDer<'static>],
    /// PKCS#8 DER.
    pub key: &'a [u8],
    /// The bundle of the SVID's trust domain.
    pub bundle: &'a [CertificateDer<'static>],
}

/// An `X509SVIDResponse` holding `offers` in order (the first is the "default" SVID).
pub fn response(offers: &[Offer<'_>]) -> pb::X509svidResponse {
    let concat = |certs: &[CertificateDer<'static>]| -> Vec<u8> {
        certs.iter().flat_map(|c| c.as_ref().to_vec()).collect()
    };
    pb::X509svidResponse {
        svids: offers
            .iter()
            .map(|o| {
                let leaf = trustline::identity::inspect_cert(&o.chain[0]).expect("SVID leaf");
                pb::X509svid {
                    spiffe_id: leaf.id.to_string(),
                    x509_svid: concat(o.chain),
                    x509_svid_key: o.key.to_vec(),
                    bundle: concat(o.bundle),
                    hint: String::new(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

#[derive(Clone)]
struct Service {
    current: watch::Receiver<Option<pb::X509svidResponse>>,
    stop: watch::Receiver<bool>,
    log: Arc<Mutex<Log>>,
}

/// What the agent saw.
#[derive(Clone, Debug, Default)]
pub struct Log {
    /// Calls with the security metadata, by peer UID.
    pub accepted_uids: Vec<u32>,
    /// Calls refused for lack of the metadata.
    pub refused: u64,
    /// X.509 responses written to streams.
    pub sent: u64,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Stream<pb::X509svidResponse>;
    type FetchX509BundlesStream = Stream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let uid = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        let header = request.metadata().get("workload.spiffe.io");
        if header.and_then(|v| v.to_str().ok()) != Some("true") {
            self.log.lock().unwrap().refused += 1;
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let Some(uid) = uid else {
            return Err(Status::permission_denied("caller could not be attested"));
        };
        self.log.lock().unwrap().accepted_uids.push(uid);
        let (tx, rx) = mpsc::channel(4);
        let (mut current, mut stop, log) =
            (self.current.clone(), self.stop.clone(), self.log.clone());
        tokio::spawn(async move {
            current.mark_changed();
            loop {
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return },
                    _ = stop.changed() => return, // ends the stream, as a dying agent would
                }
                let next = current.borrow_and_update().clone();
                if let Some(next) = next {
                    if tx.send(Ok(next)).await.is_err() {
                        return;
                    }
                    log.lock().unwrap().sent += 1;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("not in this fake agent"))
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        Err(Status::unimplemented("not in this fake agent"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("not in this fake agent"))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("not in this fake agent"))
    }
}

/// A running fake agent.
pub struct Agent {
    pub socket: PathBuf,
    current: watch::Sender<Option<pb::X509svidResponse>>,
    stop: watch::Sender<bool>,
    log: Arc<Mutex<Log>>,
    server: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Listens on `socket` (which must not exist) and serves `first` to every caller.
    pub fn start(socket: &Path, first: Option<pb::X509svidResponse>) -> Agent {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind agent socket");
        let (current, current_rx) = watch::channel(first);
        let (stop, stop_rx) = watch::channel(false);
        let log = Arc::new(Mutex::new(Log::default()));
        let service = Service {
            current: current_rx,
            stop: stop_rx.clone(),
            log: log.clone(),
        };
        let mut shutdown = stop_rx;
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(
                    SpiffeWorkloadApiServer::new(service),
                    UnixListenerStream::new(listener),
                    async move {
                        let _ = shutdown.changed().await;
                    },
                )
                .await;
        });
        Agent {
            socket: socket.to_path_buf(),
            current,
            stop,
            log,
            server,
        }
    }

    /// Streams `update` to every connected caller (and serves it to new ones).
    pub fn push(&self, update: pb::X509svidResponse) {
        self.current.send_replace(Some(update));
    }

    /// What the agent saw so far.
    pub fn log(&self) -> Log {
        self.log.lock().unwrap().clone()
    }

    /// Stops like a dying agent: open streams end, the listener closes, the socket file goes.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(5), self.server)
            .await
            .expect("agent stops")
            .expect("agent task");
        let _ = std::fs::remove_file(&self.socket);
    }
}
