//! The Workload API's Unix socket: creating it safely, and accepting connections within the
//! caps (all callers together, and per uid), each tagged with its peer credentials.
//!
//! The socket file: its directory is created if missing; a socket left by a previous run is
//! removed unless something still answers on it (then the agent refuses to start rather than
//! steal a live agent's socket); any other file at the path is refused, never removed. The mode
//! is set after `bind` (until then the umask applies, which is stricter than 0666 by default).
//!
//! A connection over a cap is closed at once, before any byte is read (the client sees the
//! connection end and retries); the caps bound the agent's memory and file descriptors against
//! a local user opening connections in a loop, and the per-uid cap keeps one user from taking
//! every slot from the others.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::attest::PeerCred;
use super::config::SocketMode;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("creating the socket's directory {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{}: another process is serving on this socket (another agent?)", path.display())]
    InUse { path: PathBuf },
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// Binds the Workload API socket at `path` with `mode` (and `group`, if given).
pub async fn bind(
    path: &Path,
    mode: SocketMode,
    group: Option<u32>,
) -> Result<UnixListener, SocketError> {
    let io_err = |what| {
        move |source| SocketError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(socket = %path.display(), "removing a stale socket");
            std::fs::remove_file(path).map_err(io_err("removing the stale socket"))?;
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting the path")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err("binding"))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err("setting the group"))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.bits()))
        .map_err(io_err("setting the mode"))?;
    Ok(listener)
}

/// Open-connection counts against the caps.
#[derive(Debug)]
pub struct Slots {
    max_total: usize,
    max_per_uid: usize,
    state: Mutex<SlotState>,
    /// Open connections, exported.
    open: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    /// At most `max_total` keys: a uid's entry goes when its count drops to 0.
    per_uid: HashMap<u32, usize>,
}

/// Why a connection got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    Total,
    Uid,
}

impl Slots {
    pub fn new(
        max_total: usize,
        max_per_uid: usize,
        open: prometheus_client::metrics::gauge::Gauge,
    ) -> Arc<Self> {
        Arc::new(Slots {
            max_total,
            max_per_uid,
            state: Mutex::default(),
            open,
        })
    }

    /// A slot for a connection of `uid`, or which cap is reached.
    pub fn acquire(self: &Arc<Self>, uid: u32) -> Result<Slot, Full> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.total >= self.max_total {
            return Err(Full::Total);
        }
        let n = s.per_uid.entry(uid).or_default();
        if *n >= self.max_per_uid {
            return Err(Full::Uid);
        }
        *n += 1;
        s.total += 1;
        self.open.set(s.total as i64);
        Ok(Slot {
            slots: self.clone(),
            uid,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// A held slot; dropping it frees it.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_sub(1);
        self.slots.open.set(s.total as i64);
        if let Some(n) = s.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_uid.remove(&self.uid);
            }
        }
    }
}

/// An accepted connection: the stream, its peer's credentials, and its slot (freed when the
/// connection is dropped).
pub struct Conn {
    /// With the `:authority` gRPC C-core clients send fixed ([`super::uds_authority`]).
    io: super::uds_authority::UdsAuthority<UnixStream>,
    cred: PeerCred,
    _slot: Slot,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerCred;

    fn connect_info(&self) -> PeerCred {
        self.cred
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Counts of connections refused at the caps.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    pub total_cap: prometheus_client::metrics::counter::Counter,
    pub uid_cap: prometheus_client::metrics::counter::Counter,
}

/// Accepts connections on `listener` until `shutdown` changes, giving each a slot or closing
/// it; the stream `serve_with_incoming` takes.
pub fn incoming(
    listener: UnixListener,
    slots: Arc<Slots>,
    refusals: Refusals,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Conn>> {
    // A short queue: the server takes connections as fast as they come.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "Workload API accept failed; pausing");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let cred = match stream.peer_cred() {
                Ok(c) => PeerCred {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "no peer credentials on a Workload API connection; closed");
                    continue;
                }
            };
            let slot = match slots.acquire(cred.uid) {
                Ok(s) => s,
                Err(full) => {
                    let (counter, cap) = match full {
                        Full::Total => (&refusals.total_cap, "max_connections"),
                        Full::Uid => (&refusals.uid_cap, "max_connections_per_uid"),
                    };
                    // Logged for the first refusal of a run only (a loop would flood the log).
                    if counter.inc() == 0 || counter.get().is_power_of_two() {
                        tracing::warn!(uid = cred.uid, pid = ?cred.pid, cap, refused = counter.get(), "Workload API connection refused at a cap");
                    }
                    continue;
                }
            };
            let conn = Conn {
                io: super::uds_authority::UdsAuthority::new(stream),
                cred,
                _slot: slot,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_the_total_and_each_uid_and_are_freed_on_drop() {
        let slots = Slots::new(3, 2, Default::default());
        let a1 = slots.acquire(1).unwrap();
        let _a2 = slots.acquire(1).unwrap();
        assert_eq!(slots.acquire(1).unwrap_err(), Full::Uid);
        let _b1 = slots.acquire(2).unwrap();
        assert_eq!(slots.acquire(3).unwrap_err(), Full::Total);
        drop(a1);
        assert_eq!(slots.open(), 2);
        let _c1 = slots.acquire(3).unwrap();
        assert_eq!(slots.state.lock().unwrap().per_uid.len(), 3);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path, SocketMode::World, None).await.unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_is_not_and_the_mode_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/trustline/agent.sock");
        let live = bind(&path, SocketMode::Group, None).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = bind(&path, SocketMode::World, None).await.unwrap_err();
        assert!(matches!(e, SocketError::InUse { .. }), "{e}");
        drop(live); // the file stays: a stale socket
        assert!(path.exists());
        let _again = bind(&path, SocketMode::World, None).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
    }
}
