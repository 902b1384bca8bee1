//! L7 path normalisation and matching (src/policy/path.rs, src/policy/matchers.rs): every
//! request path on an HTTP port goes through `normalise` before a rule sees it.
//!
//! Input: one byte of options, then the request path, then (after the first `\n`) a path pattern
//! as a policy file would give it.
//!
//! Beyond "no panic":
//! - normalising is idempotent, and a normal path takes the fast path (comes back borrowed);
//! - a normal path is absolute, has no empty, `.` or `..` segment and no `\`;
//! - the strict options never accept what the lenient ones refuse, and where the strict ones
//!   accept, all four agree on the result;
//! - an accepted pattern prints to text that parses back to it, and an exact pattern matches
//!   exactly its own text.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use trustline::policy::matchers::PathPattern;
use trustline::policy::path::{normalise, PathOptions, Semicolons, Slashes};

fn options(bits: u8) -> PathOptions {
    PathOptions {
        slashes: if bits & 1 == 0 {
            Slashes::Refuse
        } else {
            Slashes::Decode
        },
        semicolons: if bits & 2 == 0 {
            Semicolons::Refuse
        } else {
            Semicolons::Keep
        },
    }
}

fn check_normal(n: &str, opts: &PathOptions) {
    assert!(n.starts_with('/'), "not absolute: {n:?}");
    assert!(!n.contains('\\'), "backslash in {n:?}");
    for seg in n[1..].split('/') {
        assert!(seg != "." && seg != "..", "dot segment in {n:?}");
    }
    assert!(
        !n[1..].split('/').rev().skip(1).any(str::is_empty),
        "empty segment in {n:?}"
    );
    match normalise(n, opts) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, n),
        Ok(Cow::Owned(again)) => panic!("normal form {n:?} normalises again to {again:?}"),
        Err(e) => panic!("normal form {n:?} is refused: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&bits, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (path, pattern) = text.split_once('\n').unwrap_or((text, ""));

    let strict = normalise(path, &options(0));
    let mut results = Vec::new();
    for b in 0..4 {
        let opts = options(b);
        let r = normalise(path, &opts);
        if let Ok(n) = &r {
            check_normal(n, &opts);
        }
        results.push(r);
    }
    if let Ok(s) = &strict {
        for r in &results {
            assert_eq!(r.as_ref().ok(), Some(s), "options disagree on {path:?}");
        }
    }

    let Ok(p) = PathPattern::parse(pattern) else {
        return;
    };
    let printed = p.to_string();
    assert_eq!(
        PathPattern::parse(&printed).ok(),
        Some(p.clone()),
        "{pattern:?}"
    );
    if let PathPattern::Exact(e) = &p {
        assert!(p.matches(e));
        assert!(!p.matches(&format!("{e}/")));
    }
    if let Ok(n) = results[(bits & 3) as usize].as_deref() {
        let m = p.matches(n);
        assert_eq!(m, p.matches(n), "matching is not deterministic");
        if let PathPattern::Exact(e) = &p {
            assert_eq!(m, e == n);
        }
    }
});
