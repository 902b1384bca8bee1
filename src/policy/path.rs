//! HTTP request paths as the app will read them: normalised before any rule sees them, and
//! forwarded to the app in the same form, so a rule decides on the resource the app serves.
//!
//! This follows Istio's `DECODE_AND_MERGE_SLASHES`-style pipeline (Envoy's `normalize_path`,
//! `merge_slashes` and `path_with_escaped_slashes_action`), strict by default:
//!
//! 1. Percent-escapes are checked (`%` and two hex digits, or the request is refused) and decoded
//!    once, only for unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3); every other
//!    escape is kept with upper-case hex (`%2b` → `%2B`). `%00` and every other control
//!    character, escaped or raw, is refused, as are raw bytes a path may not hold (space, `"`,
//!    `<`, `>`, `{`, `|`, non-ASCII, ...).
//! 2. Encoded slashes and backslashes (`%2F`, `%2f`, `%5C`, `%5c`, and a raw `\`) are refused
//!    ([`Slashes::Refuse`], the default) or turned into `/` ([`Slashes::Decode`], Istio's
//!    `DECODE_AND_MERGE_SLASHES` plus Envoy's backslash conversion).
//! 3. `;` (path parameters, which Tomcat and Spring strip from a segment before routing, so
//!    `/admin;x/y` is `/admin/y` to them) is refused ([`Semicolons::Refuse`], the default) or
//!    kept as part of its segment ([`Semicolons::Keep`], as Istio does).
//! 4. Repeated slashes are merged and dot segments removed (RFC 3986 §5.2.4; `..` above the root
//!    stays at the root).
//!
//! Case is kept: `/Admin` and `/admin` are different paths, as RFC 3986 says and Istio matches.
//! Normalisation happens once: `%252e` stays `%252E` (no double decoding).
//!
//! [`normalise`] is pure and borrows when the path is already normal (the common case), so the
//! hot path does not allocate.

use std::borrow::Cow;

/// The rule name under which a request refused before any rule saw it is counted and audited.
pub const REFUSED: &str = "bad-request";

/// What to do with `%2F`, `%5C` and `\` in a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Slashes {
    /// Answer `400`: an app may read them as separators or not, so no rule can be sure.
    #[default]
    Refuse,
    /// Read each as `/`, then merge.
    Decode,
}

/// What to do with `;` in a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Semicolons {
    /// Answer `400`: Java servers cut `;...` out of each segment before routing.
    #[default]
    Refuse,
    /// Keep `;` as an ordinary character of its segment.
    Keep,
}

/// How a service's request paths are normalised (its policy file's `path_slashes` and
/// `path_semicolons`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathOptions {
    pub slashes: Slashes,
    pub semicolons: Semicolons,
}

/// Why a path was refused; `at` is the byte offset in the path as received.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("`%` at byte {at} is not followed by two hex digits")]
    BadEscape { at: usize },
    #[error("control character {byte:#04x} at byte {at}")]
    Control { byte: u8, at: usize },
    #[error("byte {byte:#04x} at byte {at} is not allowed in a path")]
    BadByte { byte: u8, at: usize },
    #[error("encoded slash or backslash at byte {at} (path_slashes = \"refuse\")")]
    EncodedSlash { at: usize },
    #[error("backslash at byte {at} (path_slashes = \"refuse\")")]
    Backslash { at: usize },
    #[error("`;` at byte {at} (path_semicolons = \"refuse\")")]
    Semicolon { at: usize },
    #[error(
        "dot segment with parameters {segment:?} (servers that cut `;params` read it as `..`)"
    )]
    DotSegmentParams { segment: String },
}

/// What one byte of a path is, before normalisation.
enum Class {
    /// Kept as is: unreserved, sub-delims other than `;`, `:`, `@`.
    Plain,
    Slash,
    Percent,
    Backslash,
    Semicolon,
    Control,
    Bad,
}

fn class(b: u8) -> Class {
    match b {
        b'/' => Class::Slash,
        b'%' => Class::Percent,
        b'\\' => Class::Backslash,
        b';' => Class::Semicolon,
        0..=0x1f | 0x7f => Class::Control,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => Class::Plain,
        b'-' | b'.' | b'_' | b'~' => Class::Plain,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' => {
            Class::Plain
        }
        _ => Class::Bad,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte a `%XX` at `at` stands for.
fn escaped(p: &[u8], at: usize) -> Result<u8, PathError> {
    match (
        p.get(at + 1).copied().and_then(hex),
        p.get(at + 2).copied().and_then(hex),
    ) {
        (Some(h), Some(l)) => Ok(h << 4 | l),
        _ => Err(PathError::BadEscape { at }),
    }
}

/// The normal form of `path` (without the query), or why it is refused. Borrows `path` when it
/// is already normal.
pub fn normalise<'a>(path: &'a str, opts: &PathOptions) -> Result<Cow<'a, str>, PathError> {
    if is_normal(path.as_bytes(), opts) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path.as_bytes(), opts)?;
    if let Some(segment) = decoded
        .split('/')
        .find(|s| is_dot_with_params(s.as_bytes()))
    {
        return Err(PathError::DotSegmentParams {
            segment: segment.to_string(),
        });
    }
    Ok(Cow::Owned(remove_dots(&decoded)))
}

/// Whether `p` is valid and already in normal form (a quick scan, no allocation). `false` also
/// for every invalid path: [`decode`] then says why.
fn is_normal(p: &[u8], opts: &PathOptions) -> bool {
    if p.first() != Some(&b'/') {
        return false;
    }
    let mut i = 0;
    // Start of the current segment (just after its `/`).
    let mut seg = 1;
    while i < p.len() {
        match class(p[i]) {
            Class::Plain => i += 1,
            Class::Semicolon if opts.semicolons == Semicolons::Keep => i += 1,
            Class::Slash => {
                if i > 0 && (p[i - 1] == b'/' || is_dot_segment(&p[seg..i])) {
                    return false;
                }
                seg = i + 1;
                i += 1;
            }
            Class::Percent => {
                let upper = |b: Option<&u8>| matches!(b, Some(b'0'..=b'9' | b'A'..=b'F'));
                if !upper(p.get(i + 1)) || !upper(p.get(i + 2)) {
                    return false;
                }
                match escaped(p, i) {
                    Ok(b) if is_unreserved(b) || b < 0x20 || b == 0x7f => return false,
                    Ok(b'/' | b'\\') => return false,
                    Ok(_) => i += 3,
                    Err(_) => return false,
                }
            }
            _ => return false,
        }
    }
    !is_dot_segment(&p[seg..])
}

/// A dot segment, or (only possible with `path_semicolons = "keep"`) one with parameters.
fn is_dot_segment(s: &[u8]) -> bool {
    s == b"." || s == b".." || is_dot_with_params(s)
}

/// `.;x` or `..;x`: a dot segment to a server that cuts `;params` out of segments (Tomcat,
/// Spring: `/api/..;/admin` is `/admin` to them), an ordinary name to RFC 3986. Read either
/// way it would decide one path and serve another, so it is refused.
fn is_dot_with_params(s: &[u8]) -> bool {
    let base = s.split(|b| *b == b';').next().unwrap_or_default();
    base.len() < s.len() && (base == b"." || base == b"..")
}

/// Step 1–3: checks every byte, decodes unreserved escapes, upper-cases the others, applies the
/// slash and semicolon options.
fn decode(p: &[u8], opts: &PathOptions) -> Result<String, PathError> {
    if p.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        let b = p[i];
        match class(b) {
            Class::Plain | Class::Slash => out.push(b as char),
            Class::Semicolon => match opts.semicolons {
                Semicolons::Keep => out.push(';'),
                Semicolons::Refuse => return Err(PathError::Semicolon { at: i }),
            },
            Class::Backslash => match opts.slashes {
                Slashes::Decode => out.push('/'),
                Slashes::Refuse => return Err(PathError::Backslash { at: i }),
            },
            Class::Control => return Err(PathError::Control { byte: b, at: i }),
            Class::Bad => return Err(PathError::BadByte { byte: b, at: i }),
            Class::Percent => {
                let v = escaped(p, i)?;
                match v {
                    0..=0x1f | 0x7f => return Err(PathError::Control { byte: v, at: i }),
                    b'/' | b'\\' => match opts.slashes {
                        Slashes::Decode => out.push('/'),
                        Slashes::Refuse => return Err(PathError::EncodedSlash { at: i }),
                    },
                    v if is_unreserved(v) => out.push(v as char),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(HEX[usize::from(v >> 4)] as char);
                        out.push(HEX[usize::from(v & 0xf)] as char);
                    }
                }
                i += 3;
                continue;
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Step 4: merges slashes and removes dot segments. `p` starts with `/`.
fn remove_dots(p: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    // A path ending in `/`, `/.` or `/..` names a directory: keep the trailing slash.
    let mut trailing = false;
    for s in p.split('/').skip(1) {
        trailing = matches!(s, "" | "." | "..");
        match s {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(p.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: PathOptions = PathOptions {
        slashes: Slashes::Refuse,
        semicolons: Semicolons::Refuse,
    };
    const LENIENT: PathOptions = PathOptions {
        slashes: Slashes::Decode,
        semicolons: Semicolons::Keep,
    };

    fn norm(p: &str, o: &PathOptions) -> Result<String, PathError> {
        normalise(p, o).map(Cow::into_owned)
    }

    /// The classic bypass strings of F3 and Istio's CVE-2021-31920 advisory.
    #[test]
    fn attack_strings_normalise_to_what_the_app_serves() {
        let ok: &[(&str, &str)] = &[
            ("/api/../secret.txt", "/secret.txt"),
            ("/api/%2e%2e/secret.txt", "/secret.txt"),
            ("/api/%2E%2E/secret.txt", "/secret.txt"),
            ("/api/.%2e/secret.txt", "/secret.txt"),
            ("/api/%2e./secret.txt", "/secret.txt"),
            ("//admin/x", "/admin/x"),
            ("/./admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/%41dmin/x", "/Admin/x"),
            ("/orders/../admin/x", "/admin/x"),
            ("/api/./../admin//x", "/admin/x"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/", "/"),
            ("///", "/"),
            ("/a%2bb", "/a%2Bb"),
            ("/a%2Bb", "/a%2Bb"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%252e%252e/admin", "/%252e%252e/admin"),
            ("/%7e/user", "/~/user"),
            ("/a%3Bb", "/a%3Bb"),
        ];
        for (raw, want) in ok {
            assert_eq!(norm(raw, &STRICT).as_deref(), Ok(*want), "{raw}");
        }
        let refused: &[(&str, PathError)] = &[
            ("/admin%2fx", PathError::EncodedSlash { at: 6 }),
            ("/admin%2Fx", PathError::EncodedSlash { at: 6 }),
            ("/admin%5cx", PathError::EncodedSlash { at: 6 }),
            ("/admin%5Cx", PathError::EncodedSlash { at: 6 }),
            ("/api/..%2fadmin", PathError::EncodedSlash { at: 7 }),
            ("/admin\\x", PathError::Backslash { at: 6 }),
            ("/api/..\\admin", PathError::Backslash { at: 7 }),
            ("/admin;x/y", PathError::Semicolon { at: 6 }),
            ("/a%00b", PathError::Control { byte: 0, at: 2 }),
            ("/a%0d%0aHost:x", PathError::Control { byte: 0x0d, at: 2 }),
            ("/a%7fb", PathError::Control { byte: 0x7f, at: 2 }),
            ("/a\tb", PathError::Control { byte: 9, at: 2 }),
            ("/a%zzb", PathError::BadEscape { at: 2 }),
            ("/a%4", PathError::BadEscape { at: 2 }),
            ("/a%", PathError::BadEscape { at: 2 }),
            ("/a b", PathError::BadByte { byte: b' ', at: 2 }),
            ("/a\"b", PathError::BadByte { byte: b'"', at: 2 }),
            ("/a#b", PathError::BadByte { byte: b'#', at: 2 }),
            ("/caf\u{e9}", PathError::BadByte { byte: 0xc3, at: 4 }),
            ("admin", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
        ];
        for (raw, want) in refused {
            assert_eq!(norm(raw, &STRICT).as_ref(), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn lenient_options_decode_slashes_and_keep_semicolons() {
        let table: &[(&str, &str)] = &[
            ("/admin%2fx", "/admin/x"),
            ("/api/..%2fadmin", "/admin"),
            ("/api/..%5Cadmin", "/admin"),
            ("/api\\..\\admin", "/admin"),
            ("\\admin", "/admin"),
            ("/%2F%2fadmin", "/admin"),
            ("/admin;x/y", "/admin;x/y"),
        ];
        // `..;` is `..` to Tomcat and Spring: refused even when semicolons are kept.
        for raw in [
            "/api/..;/admin",
            "/api/..;x/admin",
            "/api/.;/x",
            "/api/%2e%2e;/admin",
        ] {
            assert!(
                matches!(norm(raw, &LENIENT), Err(PathError::DotSegmentParams { .. })),
                "{raw:?}: {:?}",
                norm(raw, &LENIENT)
            );
        }
        for (raw, want) in table {
            // `\admin` does not start with `/`: still refused, decoding happens after.
            if raw.starts_with('\\') {
                assert_eq!(norm(raw, &LENIENT), Err(PathError::NotAbsolute));
                continue;
            }
            assert_eq!(norm(raw, &LENIENT).as_deref(), Ok(*want), "{raw}");
        }
        // Controls and bad escapes stay refused whatever the options.
        assert!(norm("/a%00", &LENIENT).is_err());
        assert!(norm("/a%g0", &LENIENT).is_err());
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        for p in [
            "/",
            "/api/orders/1",
            "/a%2Bb/c",
            "/a/",
            "/x.y/..z/.z",
            "/~user:1@x",
        ] {
            assert!(
                matches!(normalise(p, &STRICT), Ok(Cow::Borrowed(_))),
                "{p} should be normal"
            );
        }
    }

    /// A lenient app's reading of a path: `\` as `/`, `;params` cut from each segment (before
    /// decoding, as Tomcat does), every escape decoded once, slashes merged, dots resolved (what
    /// nginx, Tomcat or Python do between them). A rule decides on [`normalise`]'s output; this
    /// is the resource the app serves.
    fn app_reads(p: &str) -> String {
        let raw = p.replace('\\', "/");
        let cut: Vec<&str> = raw
            .split('/')
            .map(|s| s.split(';').next().unwrap_or(""))
            .collect();
        let cut = cut.join("/");
        let b = cut.as_bytes();
        let mut bytes = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match (b[i], escaped(b, i)) {
                (b'%', Ok(v)) => {
                    bytes.push(v);
                    i += 3;
                }
                (c, _) => {
                    bytes.push(c);
                    i += 1;
                }
            }
        }
        remove_dots(&String::from_utf8_lossy(&bytes).replace('\\', "/"))
    }

    /// Deterministic pseudo-random paths from pieces attackers combine.
    fn paths(n: usize) -> Vec<String> {
        const PIECES: &[&str] = &[
            "/", "//", "a", "admin", "api", ".", "..", "%2e", "%2E", "%2f", "%5c", "\\", ";x",
            "%61", "%41", "%7E", "%2b", "%25", "%252e", "~", "-", "%c3%a9", "x.y", "%3B",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        (0..n)
            .map(|_| {
                let len = 1 + (next() % 8) as usize;
                let mut p = String::from("/");
                for _ in 0..len {
                    p.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
                }
                p
            })
            .collect()
    }

    /// Idempotent, and never widening: the normalised path names the resource a lenient app
    /// serves for the raw one, so a rule matching one matches the other, and forwarding the
    /// normalised path does not change what the app serves. (With `;` kept, Java servers cut
    /// parameters the rules saw: documented, and only checked for idempotence.)
    #[test]
    fn normalisation_is_idempotent_and_names_what_the_app_serves() {
        const DECODE: PathOptions = PathOptions {
            slashes: Slashes::Decode,
            semicolons: Semicolons::Refuse,
        };
        let mut accepted = 0;
        for (opts, exact) in [(STRICT, true), (DECODE, true), (LENIENT, false)] {
            for p in paths(20_000) {
                let Ok(n) = normalise(&p, &opts) else {
                    continue;
                };
                accepted += 1;
                assert_eq!(normalise(&n, &opts).as_deref(), Ok(&*n), "idempotent: {p}");
                assert!(matches!(normalise(&n, &opts), Ok(Cow::Borrowed(_))), "{p}");
                if !exact {
                    continue;
                }
                assert_eq!(app_reads(&n), app_reads(&p), "forwarding {n} for {p}");
                // What the rules saw is what the app serves, up to the escapes of reserved and
                // non-ASCII bytes, which RFC 3986 (and Istio) keep as they are.
                if !n.contains('%') {
                    assert_eq!(app_reads(&p), *n, "rules see {n}, the app serves");
                }
                let b = n.as_bytes();
                for (i, _) in n.match_indices('%') {
                    let v = escaped(b, i).expect("a valid escape");
                    assert!(!is_unreserved(v) && v != b'/' && v != b'\\', "{n}");
                }
            }
        }
        assert!(
            accepted > 5_000,
            "only {accepted} accepted: the generator is too hostile"
        );
    }
}
