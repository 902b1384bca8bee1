//! Policy files and their evaluation (src/policy/file.rs, src/policy/eval.rs): parse a policy,
//! then decide facts made from the fuzz input against every service in it.
//!
//! Input: the policy TOML, then a NUL byte, then bytes that choose the facts (caller ID, region,
//! port, method, path, time), mostly from values the policy itself names so that rules match.
//!
//! Beyond "no panic", the indexed `evaluate` agrees with a plain reading of the documented order
//! built from `explain`'s per-rule verdicts: the first matching enforced deny rule (file order),
//! else the first matching enforced allow rule, else the default (deny precedence, default deny);
//! `audit` and the dry-run list agree too, and deciding twice gives the same decision.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use trustline::identity::parse_id;
use trustline::policy::eval::{evaluate, explain, Facts, Http, Outcome};
use trustline::policy::file::parse;
use trustline::policy::matchers::{PathPattern, Principal};
use trustline::policy::path::normalise;
use trustline::policy::{Action, DefaultAction, Mode, ServicePolicy};

/// Takes bytes from the tail to pick facts.
struct Picker<'a>(&'a [u8]);

impl Picker<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    /// A short string of the raw input (up to the next 0xff).
    fn raw(&mut self) -> String {
        let n = self
            .0
            .iter()
            .position(|b| *b == 0xff)
            .unwrap_or(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest.get(1..).unwrap_or_default();
        String::from_utf8_lossy(s).into_owned()
    }
    /// One of `options`, or (for an index past them) a raw string.
    fn pick(&mut self, options: &[String]) -> String {
        let i = self.byte() as usize;
        match options.get(i % (options.len() + 1)) {
            Some(s) => s.clone(),
            None => self.raw(),
        }
    }
}

/// Values a service's rules name: callers, regions, ports, methods, paths.
#[derive(Default)]
struct Names {
    peers: Vec<String>,
    regions: Vec<String>,
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<String>,
}

fn names(p: &ServicePolicy) -> Names {
    let mut n = Names::default();
    n.ports.extend(&p.http_ports);
    for r in &p.rules {
        for pr in r.from.iter().chain(&r.not_from) {
            match pr {
                Principal::Any => {}
                Principal::Exact(e) => n.peers.push(e.clone()),
                Principal::Prefix(pre) => {
                    n.peers.push(format!("{pre}x"));
                    n.peers.push(format!("{pre}x/y"));
                    n.peers.push(pre.trim_end_matches('/').to_string());
                }
            }
        }
        n.regions.extend(r.regions.iter().map(|x| x.to_string()));
        n.ports.extend(&r.ports);
        n.methods.extend(r.methods.iter().cloned());
        n.methods
            .extend(r.methods.iter().map(|m| m.to_ascii_lowercase()));
        for path in &r.paths {
            match path {
                PathPattern::Exact(e) => n.paths.push(e.clone()),
                PathPattern::Prefix(pre) => {
                    n.paths.push(format!("{pre}x"));
                    n.paths.push(pre.clone());
                    n.paths.push(pre.trim_end_matches('/').to_string());
                }
            }
        }
    }
    n
}

/// The documented order, read off `explain`'s per-rule verdicts (no index).
fn reference(
    p: &ServicePolicy,
    facts: &Facts<'_>,
) -> (Outcome, String, bool, Vec<(String, Outcome)>) {
    let e = explain(p, facts);
    let matched: Vec<_> = p
        .rules
        .iter()
        .zip(&e.rules)
        .filter(|(_, v)| v.mismatch.is_none())
        .map(|(r, _)| r)
        .collect();
    let first = |action| {
        matched
            .iter()
            .find(|r| r.mode == Mode::Enforce && r.action == action)
            .map(|r| r.name.clone())
    };
    let (outcome, rule) = if let Some(r) = first(Action::Deny) {
        (Outcome::Deny, r)
    } else if let Some(r) = first(Action::Allow) {
        (Outcome::Allow, r)
    } else if p.default == DefaultAction::Deny {
        (Outcome::Deny, "default".to_string())
    } else {
        (Outcome::Allow, "default".to_string())
    };
    let audit = (rule == "default" && p.default == DefaultAction::Audit)
        || matched.iter().any(|r| r.action == Action::Audit);
    let dry_run = matched
        .iter()
        .filter(|r| r.mode == Mode::DryRun)
        .filter_map(|r| match r.action {
            Action::Allow => Some((r.name.clone(), Outcome::Allow)),
            Action::Deny => Some((r.name.clone(), Outcome::Deny)),
            Action::Audit => None,
        })
        .collect();
    (outcome, rule, audit, dry_run)
}

fn decide(p: &ServicePolicy, pick: &mut Picker<'_>) {
    let n = names(p);
    // The caller's ID as the sidecar has it: a verified SPIFFE ID in canonical form.
    let Ok(peer) = parse_id(&pick.pick(&n.peers)) else {
        return;
    };
    let peer = peer.to_string();
    let region = match pick.byte() % 3 {
        0 => None,
        _ => Some(pick.pick(&n.regions)),
    };
    let port = match n.ports.get(pick.byte() as usize) {
        Some(p) => *p,
        None => pick.u16(),
    };
    let method = pick.pick(&n.methods);
    let raw_path = pick.pick(&n.paths);
    let path = normalise(&raw_path, &p.paths).ok();
    let http = match (&path, p.http_ports.contains(&port)) {
        (Some(path), true) => Some(Http {
            method: &method,
            path,
        }),
        _ => None,
    };
    let secs = i64::from(u32::from_be_bytes([
        pick.byte(),
        pick.byte(),
        pick.byte(),
        pick.byte(),
    ]));
    let at = jiff::Timestamp::from_second(1_700_000_000 + secs).expect("in range");
    let facts = Facts {
        peer: &peer,
        region: region.as_deref(),
        port,
        http,
        at,
    };
    let d = evaluate(p, &facts);
    assert_eq!(evaluate(p, &facts), d, "evaluate is not deterministic");
    let (outcome, rule, audit, dry_run) = reference(p, &facts);
    let got: Vec<(String, Outcome)> = d.dry_run.iter().map(|(n, o)| (n.to_string(), *o)).collect();
    assert_eq!(
        (d.outcome, d.rule, d.audit, &got),
        (outcome, rule.as_str(), audit, &dry_run),
        "index and reference disagree for {facts:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let Ok(text) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let policy = match parse(text, Path::new("fuzz.toml")) {
        Ok(p) => p,
        Err(e) => {
            // A refused file says where: the file, and a line inside it.
            let lines = text.lines().count() + 1;
            for i in &e.issues {
                assert_eq!(i.file, Path::new("fuzz.toml"));
                assert!(i.line <= lines, "line {} of {lines}: {i}", i.line);
            }
            return;
        }
    };
    let mut pick = Picker(data.get(split + 1..).unwrap_or_default());
    for p in policy.services.values().take(4) {
        for _ in 0..4 {
            decide(p, &mut pick);
        }
    }
});
