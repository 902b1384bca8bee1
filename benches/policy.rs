//! Policy decision cost with large lists (criterion). Goal: ≤ 200 ns per decision with 10,000
//! rules or principals. Run: `cargo bench --bench policy`; figures in benches/RESULTS.md.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use trustline::policy::eval::Http;
use trustline::policy::{evaluate, parse, Facts, Policy};

/// 10,000 allow rules, one principal each, plus a deny rule and an L7 rule.
fn many_rules() -> Policy {
    let mut t = String::from("[service.s]\nhttp_ports = [8080]\n");
    t.push_str("[[service.s.rule]]\nname = \"deny-legacy\"\naction = \"deny\"\nfrom = [\"spiffe://example.org/ns/legacy/*\"]\n");
    for i in 0..10_000 {
        t.push_str(&format!(
            "[[service.s.rule]]\nname = \"r{i}\"\naction = \"allow\"\nfrom = [\"spiffe://example.org/ns/n{i}/sa/app\"]\nports = [8080]\n"
        ));
    }
    parse(&t, Path::new("bench.toml")).expect("valid policy")
}

/// One allow rule listing 10,000 principals, with methods, paths and a time window.
fn many_principals() -> Policy {
    let ids: Vec<String> = (0..10_000)
        .map(|i| format!("\"spiffe://example.org/ns/n{i}/sa/app\""))
        .collect();
    let t = format!(
        "[service.s]\nhttp_ports = [8080]\n[[service.s.rule]]\nname = \"big\"\naction = \"allow\"\nfrom = [{}]\nports = [8080]\nmethods = [\"GET\"]\npaths = [\"/api/*\"]\nhours = [\"Mon-Sun 00:00-24:00 Europe/Berlin\"]\n",
        ids.join(",")
    );
    parse(&t, Path::new("bench.toml")).expect("valid policy")
}

fn bench(c: &mut Criterion) {
    let at = jiff::Timestamp::now();
    let rules = many_rules();
    let svc = rules.service("s").expect("service");
    let facts = |peer: &'static str| Facts {
        peer,
        region: Some("eu-west"),
        port: 8080,
        http: Some(Http {
            method: "GET",
            path: "/api/orders",
        }),
        at,
    };
    let hit = facts("spiffe://example.org/ns/n7777/sa/app");
    let miss = facts("spiffe://example.org/ns/unknown/sa/app");
    let denied = facts("spiffe://example.org/ns/legacy/sa/old");
    c.bench_function("10k rules: allow (match)", |b| {
        b.iter(|| evaluate(black_box(svc), black_box(&hit)))
    });
    c.bench_function("10k rules: default deny (no match)", |b| {
        b.iter(|| evaluate(black_box(svc), black_box(&miss)))
    });
    c.bench_function("10k rules: deny rule", |b| {
        b.iter(|| evaluate(black_box(svc), black_box(&denied)))
    });
    let principals = many_principals();
    let svc = principals.service("s").expect("service");
    c.bench_function("10k principals, L7 + time window: allow", |b| {
        b.iter(|| evaluate(black_box(svc), black_box(&hit)))
    });
    c.bench_function("10k principals: default deny", |b| {
        b.iter(|| evaluate(black_box(svc), black_box(&miss)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
