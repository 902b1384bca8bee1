//! Property tests (proptest) of the invariants users rely on:
//!
//! - policy: any matching enforced deny denies, no matching allow denies under `default =
//!   "deny"`, the order of the rules in the file never changes the outcome, and the indexed
//!   evaluation agrees with a plain reading of the rules written here from the README;
//! - prefixes match whole segments only (`from` principals and `paths` patterns);
//! - L7 path normalisation is idempotent and never widens a match against a conservative
//!   reference reading of the path (what a lenient app serves);
//! - SPIFFE IDs: parse/print round trip, and the parser agrees with the grammar of the SPIFFE-ID
//!   spec on arbitrary input, without panicking;
//! - the CA ledger never records a serial twice, nor spends a join token twice, through random
//!   sequences of issue / renew / revoke / ban / lift / reopen.
//!
//! Case counts are in each `ProptestConfig`; together they run in a few seconds in release and
//! well under a minute in debug on two cores. Failing inputs are shrunk and printed; to replay
//! one, add it as a plain `#[test]`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use jiff::Timestamp;
use proptest::prelude::*;
use proptest::sample::select;
use trustline::ca::ledger::{
    token_hash, Authorisation, IssuedRecord, Ledger, RedbLedger, TokenRecord, TokenSpend,
};
use trustline::identity::{parse_id, Serial};
use trustline::policy::eval::Http;
use trustline::policy::matchers::{PathPattern, Principal};
use trustline::policy::path::{normalise, PathOptions, Semicolons, Slashes};
use trustline::policy::{evaluate, Facts, Outcome};

// ---------------------------------------------------------------------------------------------
// Policy: deny precedence, default deny, order independence.

/// Callers, chosen so that prefixes that share characters but not segments sit side by side
/// (`ns/web` and `ns/webx`, `ns/we`).
const PEERS: &[&str] = &[
    "spiffe://example.org/ns/web/sa/portal",
    "spiffe://example.org/ns/web/sa/legacy",
    "spiffe://example.org/ns/webx/sa/portal",
    "spiffe://example.org/ns/we/sa/portal",
    "spiffe://example.org/ns/web",
    "spiffe://example.org/ns/shop/sa/frontend",
    "spiffe://example.org/ns/ops/sa/admin",
    "spiffe://other.org/ns/web/sa/portal",
];

const PRINCIPALS: &[&str] = &[
    "*",
    "spiffe://example.org/*",
    "spiffe://example.org/ns/web/*",
    "spiffe://example.org/ns/we/*",
    "spiffe://example.org/ns/web/sa/*",
    "spiffe://other.org/*",
    "spiffe://example.org/ns/web/sa/portal",
    "spiffe://example.org/ns/web/sa/legacy",
    "spiffe://example.org/ns/shop/sa/frontend",
    "spiffe://example.org/ns/web",
];

const PATTERNS: &[&str] = &[
    "*",
    "/admin",
    "/admin/*",
    "/adm*",
    "/api/*",
    "/api/orders",
    "/public/*",
    "/",
];

const PATHS: &[&str] = &[
    "/",
    "/admin",
    "/admin/",
    "/admin/users",
    "/adminx",
    "/administrator/x",
    "/api",
    "/api/orders",
    "/api/orders/1",
    "/apix/orders",
    "/public/index.html",
    "/publicx",
];

const METHODS: &[&str] = &["GET", "POST", "DELETE", "delete", "get"];

/// The service's HTTP port; 9090 is a TCP port of the same service.
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 9090;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Act {
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Debug)]
struct GenRule {
    action: Act,
    dry_run: bool,
    from: Vec<&'static str>,
    not_from: Vec<&'static str>,
    ports: Vec<u16>,
    methods: Vec<&'static str>,
    paths: Vec<&'static str>,
}

impl GenRule {
    fn is_l7(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    let action = prop_oneof![4 => Just(Act::Allow), 4 => Just(Act::Deny), 1 => Just(Act::Audit)];
    let l7 = prop_oneof![
        2 => Just((vec![], vec![])),
        1 => (
            prop::collection::vec(select(&METHODS[..3]), 0..3),
            prop::collection::vec(select(PATTERNS), 0..3),
        ),
    ];
    (
        action,
        prop::bool::weighted(0.15),
        prop::collection::vec(select(PRINCIPALS), 0..3),
        prop::collection::vec(select(&PRINCIPALS[6..]), 0..2),
        prop_oneof![
            Just(vec![]),
            Just(vec![HTTP_PORT]),
            Just(vec![TCP_PORT]),
            Just(vec![HTTP_PORT, TCP_PORT]),
        ],
        l7,
    )
        .prop_map(
            |(action, dry_run, from, not_from, ports, (methods, paths))| {
                let mut r = GenRule {
                    action,
                    dry_run,
                    from,
                    not_from,
                    ports,
                    methods,
                    paths,
                };
                // An L7 rule must name an HTTP port, or the file is refused (it could never match).
                if r.is_l7() && !r.ports.is_empty() && !r.ports.contains(&HTTP_PORT) {
                    r.ports.push(HTTP_PORT);
                }
                r
            },
        )
}

fn toml_list<T: std::fmt::Display>(items: &[T], quote: bool) -> String {
    let q = if quote { "\"" } else { "" };
    let v: Vec<String> = items.iter().map(|i| format!("{q}{i}{q}")).collect();
    format!("[{}]", v.join(", "))
}

/// The policy file for `rules` (in this order), each rule named `r<index in `names`>`.
fn policy_text(rules: &[(usize, GenRule)], default: Option<&str>) -> String {
    let mut t = String::from("[service.svc]\nhttp_ports = [8080]\n");
    if let Some(d) = default {
        t.push_str(&format!("default = \"{d}\"\n"));
    }
    for (i, r) in rules {
        t.push_str("\n[[service.svc.rule]]\n");
        t.push_str(&format!("name = \"r{i}\"\n"));
        let action = match r.action {
            Act::Allow => "allow",
            Act::Deny => "deny",
            Act::Audit => "audit",
        };
        t.push_str(&format!("action = \"{action}\"\n"));
        if r.dry_run {
            t.push_str("mode = \"dry-run\"\n");
        }
        for (field, list) in [
            ("from", &r.from),
            ("not_from", &r.not_from),
            ("methods", &r.methods),
            ("paths", &r.paths),
        ] {
            if !list.is_empty() {
                t.push_str(&format!("{field} = {}\n", toml_list(list, true)));
            }
        }
        if !r.ports.is_empty() {
            t.push_str(&format!("ports = {}\n", toml_list(&r.ports, false)));
        }
    }
    t
}

/// Reference: a principal by SPIFFE ID segments. `P/*` covers IDs with more segments whose
/// first ones are P's; `spiffe://td/*` every ID of td with a path.
fn ref_principal(pattern: &str, id: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let split = |s: &str| -> (String, Vec<String>) {
        let rest = s.strip_prefix("spiffe://").unwrap_or(s);
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default().to_string();
        (td, parts.map(str::to_string).collect())
    };
    let (itd, iseg) = split(id);
    match pattern.strip_suffix("/*") {
        Some(base) => {
            let (ptd, pseg) = split(base);
            ptd == itd && iseg.len() > pseg.len() && iseg[..pseg.len()] == pseg[..]
        }
        None => pattern == id,
    }
}

/// Reference: a path pattern on a normalised path, by segments for `/dir/*`.
fn ref_path(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix("/*") {
        // The directory itself, with or without its slash, and everything under it.
        Some(dir) => path == dir || path.starts_with(&format!("{dir}/")),
        None => match pattern.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => pattern == path,
        },
    }
}

#[derive(Clone, Copy, Debug)]
struct Req {
    peer: &'static str,
    port: u16,
    http: Option<(&'static str, &'static str)>,
}

fn gen_req() -> impl Strategy<Value = Req> {
    (
        select(PEERS),
        prop::bool::ANY,
        select(METHODS),
        select(PATHS),
    )
        .prop_map(|(peer, on_http, m, p)| Req {
            peer,
            port: if on_http { HTTP_PORT } else { TCP_PORT },
            http: on_http.then_some((m, p)),
        })
}

/// Reference: whether an enforced-or-not rule matches, read from the README's semantics.
fn ref_matches(r: &GenRule, q: &Req) -> bool {
    if !r.from.is_empty() && !r.from.iter().any(|p| ref_principal(p, q.peer)) {
        return false;
    }
    if r.not_from.iter().any(|p| ref_principal(p, q.peer)) {
        return false;
    }
    if !r.ports.is_empty() && !r.ports.contains(&q.port) {
        return false;
    }
    if !r.is_l7() {
        return true;
    }
    match q.http {
        // An allow about requests never vouches for a connection it cannot read; a deny
        // about requests refuses the whole connection (fail closed).
        None => r.action != Act::Allow,
        Some((method, path)) => {
            let method_ok = r.methods.is_empty()
                || r.methods.iter().any(|m| match r.action {
                    Act::Allow => *m == method,
                    _ => m.eq_ignore_ascii_case(method),
                });
            let path_ok = r.paths.is_empty() || r.paths.iter().any(|p| ref_path(p, path));
            method_ok && path_ok
        }
    }
}

/// Reference outcome: enforced deny, then enforced allow, then the default.
fn ref_outcome(rules: &[(usize, GenRule)], default: Option<&str>, q: &Req) -> Outcome {
    let enforced = |a: Act| {
        rules
            .iter()
            .any(|(_, r)| r.action == a && !r.dry_run && ref_matches(r, q))
    };
    if enforced(Act::Deny) {
        return Outcome::Deny;
    }
    if enforced(Act::Allow) {
        return Outcome::Allow;
    }
    let has_allow = rules
        .iter()
        .any(|(_, r)| r.action == Act::Allow && !r.dry_run);
    match default {
        Some("deny") => Outcome::Deny,
        Some(_) => Outcome::Allow,
        None if has_allow => Outcome::Deny,
        None => Outcome::Allow,
    }
}

fn decide(text: &str, q: &Req) -> Option<(Outcome, String)> {
    let policy = trustline::policy::parse(text, Path::new("prop.toml")).ok()?;
    let svc = policy.service("svc")?;
    let facts = Facts {
        peer: q.peer,
        region: None,
        port: q.port,
        http: q.http.map(|(method, path)| Http { method, path }),
        at: Timestamp::UNIX_EPOCH,
    };
    let d = evaluate(svc, &facts);
    Some((d.outcome, d.rule.to_string()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Deny precedence, default deny and the whole decision, against the reference; then the
    /// same rules in another order give the same outcome, named by a rule that matches.
    #[test]
    fn policy_decisions_follow_deny_first_default_deny_and_ignore_rule_order(
        rules in prop::collection::vec(gen_rule(), 0..8),
        default in prop_oneof![Just(None), Just(Some("deny")), Just(Some("allow"))],
        reqs in prop::collection::vec(gen_req(), 1..8),
        shuffle in any::<prop::sample::Index>(),
        rotate in any::<prop::sample::Index>(),
    ) {
        let named: Vec<(usize, GenRule)> = rules.into_iter().enumerate().collect();
        let text = policy_text(&named, default);
        // A rule whose every `from` is excluded by its `not_from` is refused as dead; skip.
        prop_assume!(trustline::policy::parse(&text, Path::new("p.toml")).is_ok());
        // Another order: reversed, then rotated by a random amount, then one swap.
        let mut other = named.clone();
        other.reverse();
        if !other.is_empty() {
            let k = rotate.index(other.len());
            other.rotate_left(k);
            let j = shuffle.index(other.len());
            other.swap(0, j);
        }
        let other_text = policy_text(&other, default);
        for q in &reqs {
            let (outcome, rule) = decide(&text, q).expect("the policy parses");
            let want = ref_outcome(&named, default, q);
            prop_assert_eq!(outcome, want, "request {:?} under\n{}", q, text);
            let deny_hit = named
                .iter()
                .any(|(_, r)| r.action == Act::Deny && !r.dry_run && ref_matches(r, q));
            if deny_hit {
                prop_assert_eq!(outcome, Outcome::Deny, "a matching deny must deny");
            }
            // The rule named is one that matches with that action, or the default.
            if rule != "default" {
                let i: usize = rule[1..].parse().expect("rule names are r<index>");
                let r = &named[i].1;
                prop_assert!(ref_matches(r, q) && !r.dry_run, "{} does not match {:?}", rule, q);
                let act = if outcome == Outcome::Deny { Act::Deny } else { Act::Allow };
                prop_assert_eq!(&r.action, &act);
            } else if default == Some("deny") {
                prop_assert_eq!(outcome, Outcome::Deny, "no rule decided: default deny");
            }
            let (o2, _) = decide(&other_text, q).expect("the reordered policy parses");
            prop_assert_eq!(o2, outcome, "order changed the outcome of {:?}", q);
        }
    }

    /// `from` prefixes match whole segments: `P/*` covers `P/x...`, never `Px...` nor another
    /// trust domain; the rule index finds exactly what a linear scan of the principals finds.
    #[test]
    fn principal_prefixes_match_whole_segments(
        segs in prop::collection::vec("[a-z0-9]{1,4}", 1..4),
        extra in "[a-z0-9]{1,4}",
        tail in prop::collection::vec("[a-z0-9]{1,4}", 0..3),
    ) {
        let base = format!("spiffe://example.org/{}", segs.join("/"));
        let prefix = Principal::parse(&format!("{base}/*")).expect("a valid prefix");
        let mut under = format!("{base}/{extra}");
        for t in &tail {
            under.push('/');
            under.push_str(t);
        }
        let under_ok = prefix.matches(&under);
        prop_assert!(under_ok, "{} under {}", under, base);
        // The same characters without a segment boundary.
        let glued = format!("{base}{extra}");
        prop_assert!(!prefix.matches(&glued), "{} is not under {}", glued, base);
        prop_assert!(!prefix.matches(&base), "{} itself is not under {}/*", base, base);
        let other_td = under.replacen("example.org", "example.org.evil", 1);
        prop_assert!(!prefix.matches(&other_td));
        // Through the evaluator's index: an allow for the prefix, default deny.
        let text = format!(
            "[service.svc]\n[[service.svc.rule]]\nname = \"p\"\naction = \"allow\"\nfrom = [\"{base}/*\"]\n"
        );
        let policy = trustline::policy::parse(&text, Path::new("p.toml")).expect("parses");
        let svc = policy.service("svc").expect("svc");
        for (peer, want) in [(&under, Outcome::Allow), (&glued, Outcome::Deny), (&base, Outcome::Deny)] {
            let f = Facts { peer, region: None, port: 1, http: None, at: Timestamp::UNIX_EPOCH };
            prop_assert_eq!(evaluate(svc, &f).outcome, want, "{}", peer);
        }
    }

    /// `paths` patterns: `/a/b/*` covers `/a/b`, `/a/b/` and `/a/b/...`, never `/a/bc`; an exact
    /// pattern one path only.
    #[test]
    fn path_prefixes_match_whole_segments(
        segs in prop::collection::vec("[a-z0-9]{1,4}", 1..4),
        extra in "[a-z0-9]{1,4}",
    ) {
        let dir = format!("/{}", segs.join("/"));
        let prefix = PathPattern::parse(&format!("{dir}/*")).expect("a normal pattern");
        let exact = PathPattern::parse(&dir).expect("a normal pattern");
        let slash = format!("{dir}/");
        let under = format!("{dir}/{extra}");
        let glued = format!("{dir}{extra}");
        for (path, by_prefix, by_exact) in [
            (&dir, true, true),
            (&slash, true, false),
            (&under, true, false),
            (&glued, false, false),
        ] {
            prop_assert_eq!(prefix.matches(path), by_prefix, "{}/* on {}", dir, path);
            prop_assert_eq!(exact.matches(path), by_exact, "{} on {}", dir, path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// L7 path normalisation.

/// Pieces attackers combine: dot segments raw and encoded, encoded and doubled slashes,
/// backslashes, `;` parameters, escapes of unreserved letters, double encoding, bad escapes,
/// controls, non-ASCII, characters a path may not hold.
const PIECES: &[&str] = &[
    "/",
    "//",
    "a",
    "b",
    "admin",
    "public",
    "api",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2e.",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    ";",
    ";x",
    ";jsessionid=1",
    "%3b",
    "%3B",
    "%61",
    "%41",
    "%7e",
    "%7E",
    "~",
    "%2b",
    "+",
    "%25",
    "%252e",
    "%252f",
    "%00",
    "%0a",
    "%",
    "%zz",
    "%4",
    " ",
    "\t",
    "\u{e9}",
    "%c3%a9",
    "?",
    "#",
    "x.y",
    "..;",
    ".;",
    "%20",
    "@",
    ":",
];

fn gen_path() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(select(PIECES), 0..12),
        prop::bool::weighted(0.95),
    )
        .prop_map(|(pieces, rooted)| {
            let mut p = String::from(if rooted { "/" } else { "" });
            for x in pieces {
                p.push_str(x);
            }
            p
        })
}

fn hexval(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The conservative reference: what a lenient app may serve for a raw path. Every escape is
/// decoded once (also `%2F` and `%5C`), `\` read as `/`, `;params` cut from each segment
/// (before decoding, as Tomcat and Spring do: `%3B` is a character of its segment), slashes
/// merged, dot segments removed.
/// `None` for what no app can read as a path (controls, bad escapes).
fn app_reads(raw: &str) -> Option<String> {
    let cut: Vec<&str> = raw
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or_default())
        .collect();
    let cut = cut.join("/");
    let b = cut.as_bytes();
    let mut bytes = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1).copied().and_then(hexval)?;
            let l = b.get(i + 2).copied().and_then(hexval)?;
            bytes.push(h << 4 | l);
            i += 3;
        } else {
            bytes.push(b[i]);
            i += 1;
        }
    }
    if bytes.iter().any(|c| *c < 0x20 || *c == 0x7f) {
        return None;
    }
    let s = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in s.split('/').skip(1) {
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            seg => segments.push(seg),
        }
    }
    let mut out = String::new();
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Patterns over unreserved characters only (see `normalisation_never_widens_a_match`).
const RULE_PATTERNS: &[&str] = &[
    "/admin",
    "/admin/*",
    "/adm*",
    "/public/*",
    "/a/*",
    "/a/b",
    "/api/*",
    "/",
    "/b/*",
    "*",
];

const ALL_OPTIONS: [PathOptions; 4] = [
    PathOptions {
        slashes: Slashes::Refuse,
        semicolons: Semicolons::Refuse,
    },
    PathOptions {
        slashes: Slashes::Decode,
        semicolons: Semicolons::Refuse,
    },
    PathOptions {
        slashes: Slashes::Refuse,
        semicolons: Semicolons::Keep,
    },
    PathOptions {
        slashes: Slashes::Decode,
        semicolons: Semicolons::Keep,
    },
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// norm(norm(p)) == norm(p) under every option set, and a normal path is borrowed as is.
    #[test]
    fn normalisation_is_idempotent(p in gen_path(), o in 0usize..4) {
        let opts = ALL_OPTIONS[o];
        if let Ok(n) = normalise(&p, &opts) {
            let again = normalise(&n, &opts);
            prop_assert_eq!(again.as_deref(), Ok(&*n), "{:?} under {:?}", p, opts);
            prop_assert!(matches!(again, Ok(std::borrow::Cow::Borrowed(_))));
            prop_assert!(n.starts_with('/') && !n.contains("//"));
        }
    }

    /// Never widening. With the safe default (`;` refused) a path the normaliser accepts names
    /// the resource the conservative reference serves: every pattern (over unreserved
    /// characters, as `policy check` makes them) decides the normalised path exactly as it
    /// decides what the app serves for the raw path, so a deny on `/admin/*` cannot be escaped
    /// by `/public/..%2fadmin`, `/%61dmin`, `//admin` or `\admin`. Escapes of reserved
    /// characters (`%2B`) stay escaped, as RFC 3986 and Istio keep them: there the rules see
    /// the escape and the app is forwarded the same bytes (`app_reads` of both agree).
    #[test]
    fn normalisation_never_widens_a_match(p in gen_path(), decode in any::<bool>()) {
        let opts = PathOptions {
            slashes: if decode { Slashes::Decode } else { Slashes::Refuse },
            semicolons: Semicolons::Refuse,
        };
        let Ok(n) = normalise(&p, &opts) else { return Ok(()); };
        let served = app_reads(&p).expect("an accepted path is readable");
        // Forwarding the normalised path does not change what the app serves.
        let forwarded = app_reads(&n);
        prop_assert_eq!(forwarded.as_deref(), Some(&*served), "forwarding {:?} for {:?}", n, p);
        let reserved_escape = n.contains('%');
        for pat in RULE_PATTERNS {
            let pattern = PathPattern::parse(pat).expect("normal pattern");
            if !reserved_escape {
                prop_assert_eq!(
                    pattern.matches(&n),
                    ref_path(pat, &served),
                    "pattern {} on {:?}: rules see {:?}, the app serves {:?}", pat, p, n, served
                );
            }
        }
        // Nothing the reference would read as a separator or a parameter survives encoded.
        for bad in ["%2F", "%5C", "%2E", "%00"] {
            prop_assert!(!n.contains(bad), "{:?} keeps {}", n, bad);
        }
        prop_assert!(!n.contains('\\') && !n.contains(';'));
    }

    /// With `path_semicolons = "keep"` the rules see `;` inside its segment (documented: Java
    /// servers cut it), but a dot segment is never hidden behind parameters: whatever the app
    /// cuts, the segments it then resolves are the ones the rules saw, bar the parameters.
    #[test]
    fn kept_semicolons_never_hide_a_dot_segment(p in gen_path()) {
        let opts = PathOptions { slashes: Slashes::Decode, semicolons: Semicolons::Keep };
        let Ok(n) = normalise(&p, &opts) else { return Ok(()); };
        for seg in n.split('/') {
            let base = seg.split(';').next().unwrap_or_default();
            prop_assert!(base != "." && base != "..", "{:?} -> {:?} hides a dot segment", p, n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SPIFFE IDs.

/// The SPIFFE-ID grammar (SPIFFE-ID spec §2): `spiffe://` in lower case, a trust domain of
/// `[a-z0-9._-]+`, then zero or more `/segment` of `[a-zA-Z0-9._-]+`, no `.`/`..` segment, no
/// trailing slash, nothing else (no port, user info, query or fragment), at most 2048 bytes.
fn spec_valid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    if s.len() > 2048 {
        return false;
    }
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let td_ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'));
    td_ok
        && (path.is_empty()
            || path.split('/').skip(1).all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            }))
}

fn gen_valid_id() -> impl Strategy<Value = String> {
    (
        "[a-z0-9._-]{1,30}",
        prop::collection::vec("[a-zA-Z0-9._-]{1,12}", 0..6),
    )
        .prop_filter_map("dot segments are not IDs", |(td, segs)| {
            if segs.iter().any(|s| s == "." || s == "..") {
                return None;
            }
            let mut id = format!("spiffe://{td}");
            for s in segs {
                id.push('/');
                id.push_str(&s);
            }
            Some(id)
        })
}

/// Near misses: valid IDs with one mutation at a random place.
fn gen_mutated_id() -> impl Strategy<Value = String> {
    const INSERTS: &[&str] = &[
        "/", "//", "/.", "/..", "%2F", "%41", "A", "Z", ":", ":443", "@", "?", "#", " ", "*",
        "\u{e9}", "\0", "\n", "\\", "+", "~", "!",
    ];
    (
        gen_valid_id(),
        select(INSERTS),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(id, ins, at)| {
            let mut s = id;
            let i = at.index(s.len() + 1);
            let i = (0..=i).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
            s.insert_str(i, ins);
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// Every valid ID parses and prints back to itself; printing then parsing is the identity.
    #[test]
    fn spiffe_id_parse_print_round_trip(s in gen_valid_id()) {
        let id = parse_id(&s).expect("a valid SPIFFE ID");
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert_eq!(parse_id(&id.to_string()).expect("reparse"), id.clone());
        let td = id.trust_domain().to_string();
        prop_assert!(s.strip_prefix("spiffe://").is_some_and(|r| r.starts_with(&td)));
        prop_assert_eq!(format!("spiffe://{td}{}", id.path()), s);
    }

    /// The parser agrees with the spec's grammar on near misses and on arbitrary text, and
    /// never panics.
    #[test]
    fn spiffe_id_parser_agrees_with_the_spec_grammar(
        s in prop_oneof![gen_mutated_id(), "spiffe://[ -~]{0,40}", any::<String>()],
    ) {
        let parsed = parse_id(&s);
        prop_assert_eq!(parsed.is_ok(), spec_valid(&s), "{:?}: {:?}", s, parsed);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.to_string(), s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CA ledger.

#[derive(Clone, Debug)]
enum LedgerOp {
    /// Mint join token `t` for ID `id`.
    AddToken {
        t: usize,
        id: usize,
    },
    /// Record serial `s` for ID `id`, bought with token `t`.
    IssueWithToken {
        s: usize,
        id: usize,
        t: usize,
    },
    /// Record serial `s` for ID `id` as a renewal of serial `parent`.
    Renew {
        s: usize,
        id: usize,
        parent: usize,
    },
    Revoke {
        s: usize,
    },
    Ban {
        id: usize,
    },
    Lift {
        id: usize,
    },
    /// Close the ledger and open the file again.
    Reopen,
}

const SERIAL_POOL: usize = 24;
const ID_POOL: usize = 4;
const TOKEN_POOL: usize = 8;

fn gen_ledger_op() -> impl Strategy<Value = LedgerOp> {
    let s = 0..SERIAL_POOL;
    let id = 0..ID_POOL;
    let t = 0..TOKEN_POOL;
    prop_oneof![
        3 => (t.clone(), id.clone()).prop_map(|(t, id)| LedgerOp::AddToken { t, id }),
        5 => (s.clone(), id.clone(), t).prop_map(|(s, id, t)| LedgerOp::IssueWithToken { s, id, t }),
        5 => (s.clone(), id.clone(), s.clone()).prop_map(|(s, id, parent)| LedgerOp::Renew { s, id, parent }),
        2 => s.prop_map(|s| LedgerOp::Revoke { s }),
        1 => id.clone().prop_map(|id| LedgerOp::Ban { id }),
        1 => id.prop_map(|id| LedgerOp::Lift { id }),
        1 => Just(LedgerOp::Reopen),
    ]
}

fn serial(i: usize) -> Serial {
    // Distinct non-zero big-endian values with a high byte, like the CA's random serials.
    Serial::from_bytes(&[0x40, 0x00, i as u8 + 1, 0x5a])
}

fn ledger_id(i: usize) -> String {
    format!("spiffe://ledger.test/ns/prop/sa/w{i}")
}

fn token_text(t: usize) -> String {
    format!("tlj_prop_{t}")
}

const NOW: u64 = 1_800_000_000;
const NOT_AFTER: u64 = NOW + 3_600;

/// Scratch space for a ledger file: tmpfs if there is one (fsyncs are the cost), else /tmp.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The ledger never records a serial twice and never sells a token twice, across reopens:
    /// a serial already recorded is refused as a duplicate, a spent token is refused, and what
    /// was accepted is exactly what `issued()` lists after the last reopen.
    #[test]
    fn the_ledger_never_issues_a_serial_twice(ops in prop::collection::vec(gen_ledger_op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let dir = scratch();
        let path = dir.path().join("ledger.redb");
        let mut ledger = Some(RedbLedger::open(&path).expect("open"));
        // The model: what the ledger accepted.
        let mut issued: HashMap<usize, usize> = HashMap::new();
        let mut minted: HashSet<usize> = HashSet::new();
        let mut spent: HashSet<usize> = HashSet::new();
        for op in &ops {
            let l = ledger.as_ref().expect("open ledger");
            match *op {
                LedgerOp::AddToken { t, id } => {
                    if minted.contains(&t) {
                        continue; // one record per token text
                    }
                    let rec = TokenRecord {
                        spiffe_id: ledger_id(id),
                        expires_at: NOT_AFTER,
                        created_at: NOW,
                        used: None,
                        voided_at: None,
                    };
                    if rt.block_on(l.add_token(token_hash(&token_text(t)), rec)).is_ok() {
                        minted.insert(t);
                    }
                }
                LedgerOp::IssueWithToken { s, id, t } => {
                    let rec = IssuedRecord {
                        spiffe_id: ledger_id(id),
                        not_after: NOT_AFTER,
                        issued_at: NOW,
                        authorisation: Authorisation::Token { token_hash: format!("t{t}") },
                    };
                    let spend = TokenSpend {
                        hash: token_hash(&token_text(t)),
                        spiffe_id: ledger_id(id),
                        now: NOW,
                    };
                    let r = rt.block_on(l.record_issue(serial(s), rec, Some(spend)));
                    if issued.contains_key(&s) {
                        prop_assert!(r.is_err(), "serial {} recorded twice", s);
                    }
                    if spent.contains(&t) {
                        prop_assert!(r.is_err(), "token {} spent twice", t);
                    }
                    if r.is_ok() {
                        prop_assert!(minted.contains(&t), "an unknown token bought a serial");
                        issued.insert(s, id);
                        spent.insert(t);
                    }
                }
                LedgerOp::Renew { s, id, parent } => {
                    let rec = IssuedRecord {
                        spiffe_id: ledger_id(id),
                        not_after: NOT_AFTER,
                        issued_at: NOW,
                        authorisation: Authorisation::Svid { serial: serial(parent).to_string() },
                    };
                    let r = rt.block_on(l.record_issue(serial(s), rec, None));
                    if issued.contains_key(&s) {
                        prop_assert!(r.is_err(), "serial {} recorded twice", s);
                    }
                    if issued.contains_key(&parent) && l.is_revoked(&serial(parent)) {
                        prop_assert!(r.is_err(), "renewed from revoked {}", parent);
                    }
                    if r.is_ok() {
                        issued.insert(s, id);
                    }
                }
                LedgerOp::Revoke { s } => {
                    let r = rt.block_on(l.revoke(serial(s), NOW));
                    if r.is_ok() {
                        prop_assert!(issued.contains_key(&s), "revoked an unknown serial");
                        prop_assert!(l.is_revoked(&serial(s)));
                    }
                }
                LedgerOp::Ban { id } => {
                    let _ = rt.block_on(l.ban(&ledger_id(id), NOW));
                }
                LedgerOp::Lift { id } => {
                    let _ = rt.block_on(l.lift(&ledger_id(id)));
                }
                LedgerOp::Reopen => {
                    let revoked: Vec<usize> =
                        issued.keys().copied().filter(|s| l.is_revoked(&serial(*s))).collect();
                    drop(ledger.take());
                    let l = RedbLedger::open(&path).expect("reopen");
                    for s in revoked {
                        prop_assert!(l.is_revoked(&serial(s)), "revocation of {} lost", s);
                    }
                    ledger = Some(l);
                }
            }
        }
        drop(ledger.take());
        let l = RedbLedger::open(&path).expect("final reopen");
        let all = l.issued().expect("issued");
        let mut seen = HashSet::new();
        for (s, rec) in &all {
            prop_assert!(seen.insert(s.clone()), "serial {} listed twice", s);
            let i = (0..SERIAL_POOL).find(|i| serial(*i) == *s).expect("a serial of the pool");
            prop_assert_eq!(Some(&ledger_id(issued[&i])), Some(&rec.spiffe_id));
        }
        prop_assert_eq!(all.len(), issued.len(), "accepted and recorded serials differ");
        // Each spent token names exactly one serial, and only spent tokens are used.
        let tokens = l.tokens().expect("tokens");
        let used: Vec<_> = tokens.iter().filter_map(|t| t.used.as_ref()).collect();
        prop_assert_eq!(used.len(), spent.len());
        let bought: HashSet<&str> = used.iter().map(|u| u.serial.as_str()).collect();
        prop_assert_eq!(bought.len(), used.len(), "two tokens name one serial");
    }
}
