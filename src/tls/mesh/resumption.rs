//! TLS 1.3 resumption state that lasts no longer than our SVID.
//!
//! A resumed session carries the certificates of the full handshake it descends from. Each
//! resumption hands out new tickets for the same session, so a chain of resumptions can present
//! a peer certificate from several rotations ago. After that certificate expires, the re-check of
//! a resumed session (`recheck_resumed_*`) refuses it, and every new connection on the chain fails.
//! Both stores here start over whenever our own certificate changes. A rotation on either side
//! therefore sends the next connection through a full handshake with both current certificates.
//! What a store is offered during [`QUARANTINE`] after a change from one certificate to another
//! is dropped: it may come from a handshake that began, with the old certificate, before the
//! rotation. (The first certificate has no predecessor, so no quarantine.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};
use rustls::pki_types::ServerName;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::NamedGroup;

use super::SvidResolver;
use crate::clock::Clock;

/// How long after our certificate changes nothing new is stored: longer than a handshake that
/// straddles the rotation takes, short beside any SVID lifetime.
pub(super) const QUARANTINE: Duration = Duration::from_secs(2);

/// The certificate a store's contents were made with, until when it takes nothing new, and the
/// contents.
struct Epoch<S> {
    key: Option<Arc<CertifiedKey>>,
    quarantine_until: Option<SystemTime>,
    store: Arc<S>,
}

/// A store of type `S` that starts over when the resolver's certificate changes.
struct PerCertificate<S> {
    resolver: Arc<SvidResolver>,
    clock: Clock,
    make: fn(usize) -> Arc<S>,
    size: usize,
    epoch: Mutex<Epoch<S>>,
}

impl<S> PerCertificate<S> {
    fn new(
        resolver: Arc<SvidResolver>,
        clock: Clock,
        size: usize,
        make: fn(usize) -> Arc<S>,
    ) -> Self {
        let epoch = Epoch {
            key: resolver.0.load_full(),
            quarantine_until: None,
            store: make(size),
        };
        PerCertificate {
            resolver,
            clock,
            make,
            size,
            epoch: Mutex::new(epoch),
        }
    }

    /// The store for our certificate in force, and whether it may take new entries yet.
    fn current(&self) -> (Arc<S>, bool) {
        let key = self.resolver.0.load_full();
        let now = self.clock.now();
        let mut e = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        // Holding the old key keeps its address from being reused by a new one.
        let same = match (&e.key, &key) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            // A replaced certificate may still be finishing handshakes; a first one is not.
            let quarantine_until = e.key.is_some().then(|| now + QUARANTINE);
            *e = Epoch {
                key,
                quarantine_until,
                store: (self.make)(self.size),
            };
        }
        let open = e.quarantine_until.is_none_or(|t| now >= t);
        (e.store.clone(), open)
    }
}

/// The server's session cache (stateful resumption), per certificate of ours.
pub(super) struct ServerSessions(PerCertificate<ServerSessionMemoryCache>);

impl ServerSessions {
    pub fn new(resolver: Arc<SvidResolver>, clock: Clock, size: usize) -> Arc<Self> {
        Arc::new(ServerSessions(PerCertificate::new(
            resolver,
            clock,
            size,
            ServerSessionMemoryCache::new,
        )))
    }
}

impl std::fmt::Debug for ServerSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSessions")
    }
}

impl StoresServerSessions for ServerSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let (store, open) = self.0.current();
        open && store.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.current().0.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.current().0.take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The client's tickets and key-exchange hints, per certificate of ours.
pub(super) struct ClientSessions(PerCertificate<ClientSessionMemoryCache>);

impl ClientSessions {
    pub fn new(resolver: Arc<SvidResolver>, clock: Clock, size: usize) -> Arc<Self> {
        Arc::new(ClientSessions(PerCertificate::new(
            resolver,
            clock,
            size,
            |n| Arc::new(ClientSessionMemoryCache::new(n)),
        )))
    }
}

impl std::fmt::Debug for ClientSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSessions")
    }
}

impl ClientSessionStore for ClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.0.current().0.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.current().0.kx_hint(server_name)
    }

    // TLS 1.2 is never negotiated (TLS13_ONLY); these only keep the trait whole.
    fn set_tls12_session(
        &self,
        _server_name: ServerName<'static>,
        _value: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(
        &self,
        _server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let (store, open) = self.0.current();
        if open {
            store.insert_tls13_ticket(server_name, value);
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.0.current().0.take_tls13_ticket(server_name)
    }
}
