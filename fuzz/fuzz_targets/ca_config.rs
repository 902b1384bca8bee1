//! The CA's config file (src/ca/config.rs) through the real `CaServeConfig::resolve` (no flags)
//! on a file beside a real regional CA, then `parse_peers` on the peers it accepted.
//!
//! Beyond "no panic": a refused file names the file, a field and a reason; accepted peer URLs
//! parse to specs (check_peer_urls and parse_peers agree).
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use trustline::ca::config::{parse_peers, CaServeConfig, CaServeFile};

fuzz_target!(|data: &[u8]| {
    let file = common::config_file("ca.toml", data);
    match CaServeConfig::resolve(CaServeFile::default(), Some(&file)) {
        Ok(c) => {
            parse_peers(&c.peers.urls).expect("peers accepted by resolve parse");
        }
        Err(e) => common::check_error(&e, &file, data),
    }
});
