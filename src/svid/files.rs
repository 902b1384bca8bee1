//! The `files` source: PEM files written by something else (cert-manager, spiffe-helper),
//! reloaded when they change; a half-written pair is retried on the next poll.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::watch;

use super::handle::{expire_if_due, Identity};
use super::{sleep_or_stop, Error};
use crate::identity::{certs_from_pem, Svid};

/// Loads an SVID from PEM files (chain, leaf first; PKCS#8/SEC1 key).
pub fn load_svid_files(cert: &Path, key: &Path) -> Result<Svid, Error> {
    let chain_pem = std::fs::read(cert).map_err(|source| Error::ReadFile {
        path: cert.to_path_buf(),
        source,
    })?;
    let chain = certs_from_pem(&chain_pem, &cert.display().to_string()).map_err(Error::CertFile)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| Error::KeyFile {
        path: key.to_path_buf(),
        source,
    })?;
    let info = crate::identity::inspect_cert(&chain[0]).map_err(|source| Error::LeafFile {
        path: cert.to_path_buf(),
        source,
    })?;
    Ok(Svid { chain, key, info })
}

fn stamp(paths: [&PathBuf; 2]) -> Option<Vec<(SystemTime, u64)>> {
    paths.iter().map(|p| crate::util::file_stamp(p)).collect()
}

/// Polls `cert` and `key` every `poll` and publishes the pair when it changed and is usable.
pub(super) async fn files_loop(
    identity: Arc<Identity>,
    cert: PathBuf,
    key: PathBuf,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen = None;
    loop {
        let now = stamp([&cert, &key]);
        if now.is_some() && now != seen {
            match load_svid_files(&cert, &key).and_then(|s| identity.publish(s)) {
                Ok(()) => {
                    seen = now;
                    tracing::info!(cert = %cert.display(), "SVID loaded from files");
                }
                // A half-written pair is retried on the next poll.
                Err(e) => {
                    tracing::warn!(error = %e, "SVID files not usable; keeping the current SVID")
                }
            }
        }
        expire_if_due(&identity);
        if !sleep_or_stop(poll, &mut shutdown).await {
            return;
        }
    }
}
