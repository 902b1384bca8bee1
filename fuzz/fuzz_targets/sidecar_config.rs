//! The sidecar's config file (src/proxy/config.rs, src/svid/config.rs, ...), through the real
//! `SidecarConfig::load` on a file in a directory holding a real root CA bundle.
//!
//! Beyond "no panic": a refused file names the file, a field and a reason (and a line inside
//! the file when it gives one); an accepted one loads to the same config again.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use trustline::proxy::config::SidecarConfig;

fuzz_target!(|data: &[u8]| {
    let file = common::config_file("sidecar.toml", data);
    match SidecarConfig::load(&file) {
        Ok(c) => {
            let again = SidecarConfig::load(&file).expect("loads again");
            assert_eq!(format!("{again:?}"), format!("{c:?}"));
        }
        Err(e) => common::check_error(&e, &file, data),
    }
});
