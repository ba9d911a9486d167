//! Routing with many services (issue #20): the decision per request with 10,000 listed services
//! and with 100 host patterns stays flat (hash lookups per label of the host, not a scan), and
//! what loading 10,000 services costs: parse + validate time, and the bytes the snapshot and its
//! route table hold (a counting allocator measures them and the bench prints them).
//! `cargo bench -p meshgate-loadtest --bench services`

use std::alloc::System;
use std::hint::black_box;
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use meshgate::route::{Route, RouteTable};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A config with `listed` services (100 namespaces of listed/100 each) and `patterns` host
/// patterns (one per namespace `p0`…), all allowed to one tenant.
fn config_text(listed: usize, patterns: usize) -> String {
    let mut s = String::from(
        "listeners:\n  - name: vm\n    bind: 127.0.0.1:0\n    protocol: http\n\
mesh:\n  trust_domain: cluster.local\n  gateway: eastwest.example.com:15443\n  identity:\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\nservices:\n",
    );
    for i in 0..listed {
        s += &format!(
            "  svc{i}:\n    host: svc{i}.ns{}.svc.cluster.local\n    port: 8080\n    protocol: http2\n",
            i % 100
        );
    }
    for i in 0..patterns {
        s += &format!("  pat{i}:\n    host: \"*.p{i}.svc.cluster.local\"\n    ports: [8080, 9080]\n");
    }
    s += "tenants:\n  all:\n    sources: [10.0.0.0/8]\n    allow: [\"*\"]\n";
    s
}

fn load(dir: &std::path::Path, text: &str) -> meshgate::config::Snapshot {
    let path = dir.join("meshgate.yaml");
    std::fs::write(&path, text).unwrap();
    meshgate::config::parse(&path, text, SystemTime::now()).unwrap()
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca = meshsim::MeshCa::new("cluster.local").unwrap();
    ca.issue("meshgate", "meshgate")
        .unwrap()
        .write_files(dir.path(), &ca.root_pem())
        .unwrap();

    // Loading 10,000 services: time and the bytes the result holds.
    let text = config_text(10_000, 0);
    let started = Instant::now();
    let region = Region::new(GLOBAL);
    let snap = load(dir.path(), &text);
    let routes = RouteTable::for_services(&snap.services);
    let held = region.change();
    let took = started.elapsed();
    let bytes = held.bytes_allocated as i64 - held.bytes_deallocated as i64;
    println!(
        "load 10,000 services: {:.0} ms (parse + validate + route table), {:.1} MiB held ({} B per service)",
        took.as_secs_f64() * 1e3,
        bytes as f64 / (1 << 20) as f64,
        bytes / 10_000
    );

    let small = load(dir.path(), &config_text(40, 0));
    let small_routes = RouteTable::for_services(&small.services);
    let allowed = |_: usize| true;
    c.bench_function("route/40_listed", |b| {
        b.iter(|| small_routes.resolve(black_box("svc33.ns33.svc.cluster.local:8080"), allowed))
    });
    c.bench_function("route/10000_listed", |b| {
        b.iter(|| routes.resolve(black_box("svc9933.ns33.svc.cluster.local:8080"), allowed))
    });

    // Patterns: a host matched by the 100th pattern, and one matched by none.
    let one = load(dir.path(), &config_text(40, 1));
    let one_routes = RouteTable::for_services(&one.services);
    let hundred = load(dir.path(), &config_text(40, 100));
    let hundred_routes = RouteTable::for_services(&hundred.services);
    assert!(matches!(
        hundred_routes.resolve("ratings.p99.svc.cluster.local:9080", allowed),
        Ok(Route::Pattern { .. })
    ));
    c.bench_function("route/1_pattern", |b| {
        b.iter(|| one_routes.resolve(black_box("ratings.p0.svc.cluster.local:9080"), allowed))
    });
    c.bench_function("route/100_patterns", |b| {
        b.iter(|| hundred_routes.resolve(black_box("ratings.p99.svc.cluster.local:9080"), allowed))
    });
    c.bench_function("route/100_patterns_no_match", |b| {
        b.iter(|| hundred_routes.resolve(black_box("ratings.elsewhere.svc.cluster.local:9080"), allowed))
    });
}

criterion_group!(name = group; config = Criterion::default().sample_size(30); targets = benches);
criterion_main!(group);
