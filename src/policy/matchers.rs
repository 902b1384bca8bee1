//! The matchers a rule is made of: principals, paths and time windows. Parsed once, matched
//! without allocating.

use std::fmt;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;

use super::path::PathError;
use crate::identity::IdentityError;

/// Why a matcher of a rule (`from`, `paths`, `hours`) was refused. The text starts with the
/// value as written, except for a SPIFFE ID, whose own error names it.
#[derive(Debug, thiserror::Error)]
pub enum MatcherError {
    /// A principal that is not a SPIFFE ID (or, before a trailing `/*`, not an ID prefix).
    #[error(transparent)]
    BadId(#[from] IdentityError),
    /// A principal with a `*` somewhere other than alone or as a trailing `/*`.
    #[error("{0:?}: `*` is only allowed alone or as a trailing `/*` segment")]
    PrincipalWildcard(String),
    /// A path pattern that does not start with `/`.
    #[error("{0:?}: a path starts with `/`")]
    PathNotAbsolute(String),
    /// A path pattern with a `*` before its end.
    #[error("{0:?}: `*` is only allowed at the end")]
    PathWildcard(String),
    /// A path pattern no normalised request path can match.
    #[error("{pattern:?}: {why}")]
    PathNeverMatches { pattern: String, why: NeverMatches },
    /// A time window that does not parse.
    #[error("{window:?}: {why}")]
    Window { window: String, why: WindowError },
}

/// Why no normalised request path can match a path pattern.
#[derive(Debug, thiserror::Error)]
pub enum NeverMatches {
    /// The pattern is not in normal form; `0` is the form to write instead.
    #[error("requests are matched in normal form, so this never matches; write {0:?}")]
    NotNormal(String),
    /// Normalising the pattern fails, so a request path like it is refused.
    #[error("no request path can match this: {0}")]
    Refused(PathError),
}

/// What is wrong with a time window (the window's text is in [`MatcherError::Window`]).
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// Not two or three words (days, a time range, an optional zone).
    #[error("expected \"Mon-Fri 07:00-19:00 Europe/Berlin\"")]
    Shape,
    /// A day (of a range or a list) that is not `Mon`..`Sun`.
    #[error("{0:?} is not a weekday (Mon..Sun)")]
    NotWeekday(String),
    /// The time range has no `-`.
    #[error("expected a time range like 07:00-19:00")]
    NoRange,
    /// A start or end that is not two numbers around a `:`.
    #[error("{0:?} is not HH:MM")]
    NotHhmm(String),
    /// A start or end past 24:00 or 23:59.
    #[error("{0:?} is not a time of day")]
    NotTimeOfDay(String),
    /// The start equals the end.
    #[error("the window is empty (start equals end)")]
    Empty,
    /// A zone the time zone database does not know.
    #[error("unknown time zone {zone:?}: {error}")]
    UnknownZone { zone: String, error: jiff::Error },
}

/// A principal pattern of `from` / `not_from`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// Any caller with a verified identity: `*`.
    Any,
    /// One SPIFFE ID, exactly.
    Exact(String),
    /// Every ID under a path prefix, written `spiffe://td/ns/shop/*` and stored as
    /// `spiffe://td/ns/shop/`. `spiffe://td/*` is the whole trust domain.
    Prefix(String),
}

impl Principal {
    /// Parses `*`, an exact SPIFFE ID, or one with a trailing `/*`.
    pub fn parse(s: &str) -> Result<Self, MatcherError> {
        if s == "*" {
            return Ok(Principal::Any);
        }
        if let Some(base) = s.strip_suffix("/*") {
            // The part before `/*` must itself be a valid SPIFFE ID (trust domain or path).
            let id = crate::identity::parse_id(base)?;
            return Ok(Principal::Prefix(format!("{id}/")));
        }
        if s.contains('*') {
            return Err(MatcherError::PrincipalWildcard(s.to_string()));
        }
        let id = crate::identity::parse_workload_id(s)?;
        Ok(Principal::Exact(id.to_string()))
    }

    /// Whether the caller `id` (canonical SPIFFE ID text) matches.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            Principal::Any => true,
            Principal::Exact(e) => e == id,
            Principal::Prefix(p) => id.starts_with(p.as_str()),
        }
    }

    /// Whether every ID this pattern matches is also matched by `other`.
    pub fn within(&self, other: &Principal) -> bool {
        match (self, other) {
            (_, Principal::Any) => true,
            (Principal::Any, _) => false,
            (Principal::Exact(a), o) => o.matches(a),
            (Principal::Prefix(a), Principal::Prefix(b)) => a.starts_with(b.as_str()),
            (Principal::Prefix(_), Principal::Exact(_)) => false,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Any => f.write_str("*"),
            Principal::Exact(e) => f.write_str(e),
            Principal::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// An HTTP path pattern: exact, or a prefix written with a trailing `*` (`/api/*`).
///
/// Patterns are matched against the normalised path (see [`super::path`]), case-sensitively, so
/// they must themselves be normal: `/api/../x`, `//x`, `/%61pi` or `/a%2fb` are refused when the
/// file is read, since no request could ever match them.
///
/// A prefix ending in `/` covers its directory too: `/admin/*` matches `/admin`, `/admin/` and
/// everything under `/admin/`. (Istio's `/admin/*` does not match `/admin`; here a deny on
/// `/admin/*` is not escaped by asking for `/admin`, which most servers answer like `/admin/`.)
/// Any other prefix is a plain string prefix: `/adm*` matches `/admin` and `/admx`. An exact
/// pattern matches exactly one path: `/admin` does not match `/admin/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    /// Parses `/exact` or `/prefix/*` (also `*` for any path).
    pub fn parse(s: &str) -> Result<Self, MatcherError> {
        if s == "*" {
            return Ok(PathPattern::Prefix(String::new()));
        }
        if !s.starts_with('/') {
            return Err(MatcherError::PathNotAbsolute(s.to_string()));
        }
        let pattern = match s.strip_suffix('*') {
            Some(p) if !p.contains('*') => PathPattern::Prefix(p.to_string()),
            Some(_) => return Err(MatcherError::PathWildcard(s.to_string())),
            None if s.contains('*') => return Err(MatcherError::PathWildcard(s.to_string())),
            None => PathPattern::Exact(s.to_string()),
        };
        pattern
            .check_normal()
            .map_err(|why| MatcherError::PathNeverMatches {
                pattern: s.to_string(),
                why,
            })?;
        Ok(pattern)
    }

    /// A pattern no normalised path can match is an error, with the form to write instead.
    fn check_normal(&self) -> Result<(), NeverMatches> {
        use super::path::{normalise, PathOptions, Semicolons, Slashes};
        // `;` can be matched when a service keeps it; encoded slashes never reach a rule.
        let opts = PathOptions {
            slashes: Slashes::Refuse,
            semicolons: Semicolons::Keep,
        };
        // A prefix may end inside a segment (`/api/.*` covers `/api/.well-known`): complete it.
        let (text, filler) = match self {
            PathPattern::Exact(e) => (e.clone(), ""),
            PathPattern::Prefix(p) => (format!("{p}x"), "x"),
        };
        match normalise(&text, &opts) {
            Ok(n) if n == text => Ok(()),
            Ok(n) => Err(NeverMatches::NotNormal(format!(
                "{}{}",
                n.strip_suffix(filler).unwrap_or(&n),
                if filler.is_empty() { "" } else { "*" }
            ))),
            Err(e) => Err(NeverMatches::Refused(e)),
        }
    }

    /// Whether the normalised `path` (without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(e) => e == path,
            PathPattern::Prefix(p) => {
                path.starts_with(p.as_str())
                    || (p.len() > 1 && p.ends_with('/') && path == &p[..p.len() - 1])
            }
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(e) => f.write_str(e),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// A weekly time window in a time zone: `Mon-Fri 07:00-19:00 Europe/Berlin`.
/// Days: `Mon`..`Sun`, ranges (`Mon-Fri`) and lists (`Sat,Sun`). The end is exclusive; an end
/// before the start wraps past midnight (the day is the start's day).
#[derive(Clone, Debug)]
pub struct TimeWindow {
    /// Bit i set: weekday i (Monday = 0) included.
    days: u8,
    start: Time,
    end: Time,
    tz: TimeZone,
    text: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day_index(s: &str) -> Result<u8, WindowError> {
    let l = s.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| l.starts_with(d) && l.len() >= 3)
        .map(|i| i as u8)
        .ok_or_else(|| WindowError::NotWeekday(s.to_string()))
}

fn parse_days(s: &str) -> Result<u8, WindowError> {
    let mut bits = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day_index(a)?, day_index(b)?);
                let mut d = a;
                loop {
                    bits |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << day_index(part)?,
        }
    }
    Ok(bits)
}

fn parse_hhmm(s: &str) -> Result<Time, WindowError> {
    let not_hhmm = || WindowError::NotHhmm(s.to_string());
    let (h, m) = s.split_once(':').ok_or_else(not_hhmm)?;
    let h: i8 = h.parse().map_err(|_| not_hhmm())?;
    let m: i8 = m.parse().map_err(|_| not_hhmm())?;
    if h == 24 && m == 0 {
        return Ok(Time::MAX);
    }
    Time::new(h, m, 0, 0).map_err(|_| WindowError::NotTimeOfDay(s.to_string()))
}

impl TimeWindow {
    /// Parses `DAYS HH:MM-HH:MM [ZONE]` (zone defaults to UTC).
    pub fn parse(s: &str) -> Result<Self, MatcherError> {
        Self::parse_parts(s).map_err(|why| MatcherError::Window {
            window: s.to_string(),
            why,
        })
    }

    fn parse_parts(s: &str) -> Result<Self, WindowError> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let (days, range, zone) = match parts.as_slice() {
            [d, r] => (*d, *r, "UTC"),
            [d, r, z] => (*d, *r, *z),
            _ => return Err(WindowError::Shape),
        };
        let days = parse_days(days)?;
        let (a, b) = range.split_once('-').ok_or(WindowError::NoRange)?;
        let (start, end) = (parse_hhmm(a)?, parse_hhmm(b)?);
        if start == end {
            return Err(WindowError::Empty);
        }
        let tz = TimeZone::get(zone).map_err(|error| WindowError::UnknownZone {
            zone: zone.to_string(),
            error,
        })?;
        Ok(TimeWindow {
            days,
            start,
            end,
            tz,
            text: s.to_string(),
        })
    }

    /// Whether the instant `at` falls in the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        let local = self.tz.to_datetime(at);
        let t = local.time();
        let day = |w: Weekday| self.days & (1 << (w.to_monday_zero_offset() as u8)) != 0;
        if self.start < self.end {
            day(local.weekday()) && t >= self.start && t < self.end
        } else {
            // Overnight: the part after midnight belongs to the previous day's window.
            (day(local.weekday()) && t >= self.start)
                || (day(local.weekday().previous()) && t < self.end)
        }
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
