//! `policy suggest` and `policy replay` on a recorded audit log (src/policy/flows.rs): the log
//! is a file an operator hands in, so its lines are outside input.
//!
//! Beyond "no panic": a suggested policy that reads back as a policy file allows every recorded
//! flow to its service that it claims to cover (its header says "every observed flow is
//! allowed"); `replay` on it does not panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use trustline::identity::parse_id;
use trustline::policy::eval::{evaluate, Facts, Http, Outcome};
use trustline::policy::file::parse;
use trustline::policy::flows::{parse_flows, replay, suggest};
use trustline::policy::path::REFUSED;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (flows, _bad) = parse_flows(text);
    let mut services: Vec<&str> = flows
        .iter()
        .map(|f| f.destination_service.as_str())
        .collect();
    services.sort_unstable();
    services.dedup();
    for service in services.into_iter().take(3) {
        let suggested = suggest(&flows, service);
        let Ok(policy) = parse(&suggested, Path::new("suggested.toml")) else {
            continue;
        };
        let Some(svc) = policy.service(service) else {
            continue;
        };
        // The sidecar logs the verified caller in canonical form; a policy file's `from` is
        // read into that form (`spiffe://Example.org/..` is `spiffe://example.org/..`).
        let canonical = |id: &str| parse_id(id).is_ok_and(|p| p.to_string() == id);
        let mine = flows.iter().filter(|f| {
            f.destination_service == service && f.rule != REFUSED && canonical(&f.source_id)
        });
        for f in mine {
            // A plain connection on a port the suggestion makes an HTTP port is covered per
            // request there, not as a connection (see `suggest`).
            // (A flow is a request when it has both a method and a path, as in `suggest`.)
            let request = f.method.is_some() && f.path.is_some();
            if !request && svc.http_ports.contains(&f.port) {
                continue;
            }
            // No rule can allow a method that is not upper case (allows match exactly, files
            // hold upper-case methods), so `suggest` leaves such requests out.
            if f.method
                .as_ref()
                .is_some_and(|m| *m != m.to_ascii_uppercase())
            {
                continue;
            }
            let http = f
                .method
                .as_deref()
                .zip(f.path.as_deref())
                .map(|(method, path)| Http { method, path });
            let facts = Facts {
                peer: &f.source_id,
                region: f.source_region.as_deref(),
                port: f.port,
                http,
                at: jiff::Timestamp::UNIX_EPOCH,
            };
            let d = evaluate(svc, &facts);
            assert_eq!(
                d.outcome,
                Outcome::Allow,
                "suggested policy denies {f:?}:\n{suggested}"
            );
        }
        // Exercised for panics only: flows of other services and time windows make its
        // counts depend on more than this service's suggestion.
        let _ = replay(&flows, &policy);
    }
});
