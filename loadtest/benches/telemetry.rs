//! The per-request cost of a tenant's peer metadata (issue #21): the header values are encoded
//! once per config generation, so a request only clones two prebuilt values into its header
//! map. A counting allocator checks that this adds no allocation per request (it panics if it
//! does), and criterion times it next to the trace-context check every request also gets.
//! `cargo bench -p meshgate-loadtest --bench telemetry`

use std::alloc::System;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use meshgate::config::Telemetry;
use meshgate::telemetry::{ensure_trace_context, PeerMetadata, PEER_METADATA, PEER_METADATA_ID};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn names() -> Telemetry {
    Telemetry {
        workload: "billing-batch".into(),
        namespace: "billing".into(),
        app: "billing".into(),
        version: Some("v2".into()),
        canonical_service: "billing".into(),
        canonical_revision: "v2".into(),
        cluster_id: Some("vm-network".into()),
        labels: vec![("team".into(), "payments".into())],
    }
}

/// A request's headers as they are when the metadata goes in: what a client sent, after the
/// mesh-only names were removed (so the two inserts are new keys).
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::with_capacity(32);
    for (k, v) in [
        ("host", "reviews.bookinfo.svc.cluster.local:9080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-for", "10.20.0.5"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5f1c2c4e-8d7f-4a53-9b6e-2f0c5d8e9a10"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn add_metadata(h: &mut HeaderMap, m: &PeerMetadata) {
    h.insert(&PEER_METADATA, m.header.clone());
    h.insert(&PEER_METADATA_ID, m.id.clone());
}

fn benches(c: &mut Criterion) {
    let m = PeerMetadata::new(&names());
    // A first clone turns each value's buffer into a shared one (bytes does this lazily, once
    // per buffer, not per request); the counting starts after it.
    drop((m.header.clone(), m.id.clone()));

    const N: usize = 10_000;
    let mut maps: Vec<HeaderMap> = (0..N).map(|_| request_headers()).collect();
    let region = Region::new(GLOBAL);
    for h in &mut maps {
        add_metadata(h, &m);
        ensure_trace_context(h, 0.01);
    }
    let per_request = region.change().allocations as f64 / N as f64;
    println!("allocations per request for peer metadata + trace check: {per_request}");
    assert_eq!(per_request, 0.0, "peer metadata must cost no allocation per request");
    assert_eq!(maps[0][&PEER_METADATA], m.header);

    c.bench_function("peer metadata: two prebuilt header values into a request", |b| {
        b.iter_batched_ref(
            request_headers,
            |h| add_metadata(black_box(h), black_box(&m)),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("trace context: valid traceparent kept", |b| {
        b.iter_batched_ref(
            request_headers,
            |h| ensure_trace_context(black_box(h), 0.01),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("peer metadata: encode once per tenant and generation", |b| {
        b.iter(|| PeerMetadata::new(black_box(&names())))
    });
}

criterion_group!(telemetry, benches);
criterion_main!(telemetry);
