//! The gateway's config file (src/tunnel/config.rs) through the real `GatewayConfig::load` and
//! `load_rules` (what `policy explain --gateway` reads), then the region rules' decision
//! (src/policy/region.rs) on names the file uses.
//!
//! Beyond "no panic": refused files name the file, a field and a reason; `load_rules` accepts
//! every file `load` accepts, with the same region; deciding twice gives the same decision.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use trustline::tunnel::config::GatewayConfig;

fuzz_target!(|data: &[u8]| {
    let file = common::config_file("gateway.toml", data);
    let rules = GatewayConfig::load_rules(&file);
    match GatewayConfig::load(&file) {
        Ok(c) => {
            let r = rules
                .as_ref()
                .expect("load_rules accepts what load accepts");
            assert_eq!(r.region, c.region);
        }
        Err(e) => common::check_error(&e, &file, data),
    }
    let r = match rules {
        Ok(r) => r,
        Err(e) => return common::check_error(&e, &file, data),
    };
    // Every pair of words in the file as (from, to, service).
    let text = String::from_utf8_lossy(data);
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'))
        .filter(|w| !w.is_empty())
        .take(12)
        .collect();
    for from in &words {
        for to in words.iter().take(4) {
            let d = r.policy.decide(from, to, words[0]);
            assert_eq!(
                format!("{d:?}"),
                format!("{:?}", r.policy.decide(from, to, words[0]))
            );
        }
    }
});
