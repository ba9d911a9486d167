//! Micro-benchmarks of the per-request work that is not I/O: tenant authorization, route
//! resolution, SNI construction, API-key hashing and the upstream pool checkout.
//! `cargo bench -p meshgate-loadtest --bench hot_path`

use std::hint::black_box;
use std::net::IpAddr;
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, Criterion};
use meshsim::{Mesh, MeshSpec, PodSpec, ServiceSpec};

/// A config the size of a real fleet's: 40 services, 200 source tenants, 50 key tenants.
fn config_text(gateway: &str) -> String {
    let mut s = format!(
        "listeners:\n  - name: vm\n    bind: 127.0.0.1:0\n    protocol: http\n\
mesh:\n  trust_domain: cluster.local\n  gateway: {gateway}\n  identity:\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n\
services:\n  reviews:\n    host: reviews.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http2\n"
    );
    for i in 0..40 {
        s += &format!(
            "  svc{i}:\n    host: svc{i}.ns{i}.svc.cluster.local\n    port: 8080\n    protocol: http2\n    aliases: [svc{i}.internal]\n"
        );
    }
    s += "tenants:\n";
    for i in 0..200 {
        s += &format!(
            "  net{i}:\n    sources: [10.{}.{}.0/24]\n    allow: [svc{}, reviews]\n",
            i / 250,
            i % 250,
            i % 40
        );
    }
    for i in 0..50 {
        let hash = hex::encode(meshgate::policy::keys::hash_key(&format!("key-{i}")));
        s += &format!("  keyed{i}:\n    api_keys: [\"sha256:{hash}\"]\n    allow: [\"*\"]\n");
    }
    s
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mesh = rt
        .block_on(Mesh::start(MeshSpec::new().service(
            ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews").pod(PodSpec::new("reviews-a")),
        )))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = mesh.ca().issue("meshgate", "meshgate").unwrap();
    std::fs::write(dir.path().join("cert-chain.pem"), &cert.chain_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &cert.key_pem).unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), mesh.ca().root_pem()).unwrap();
    let path = dir.path().join("meshgate.yaml");
    let text = config_text(&mesh.gateway_addr().to_string());
    std::fs::write(&path, &text).unwrap();
    let snap = meshgate::config::parse(&path, &text, SystemTime::now()).unwrap();
    let tenants = meshgate::policy::Tenants::new(&snap.tenants);
    let routes = meshgate::route::RouteTable::for_services(&snap.services);

    let client: IpAddr = "10.0.199.7".parse().unwrap();
    let key = meshgate::policy::keys::hash_key("key-42");
    c.bench_function("authorize/by_source", |b| {
        b.iter(|| tenants.authorize(black_box(client), None, None))
    });
    c.bench_function("authorize/by_key", |b| {
        b.iter(|| tenants.authorize(black_box(client), Some(black_box(&key)), None))
    });
    c.bench_function("authorize/hash_key", |b| {
        b.iter(|| meshgate::policy::keys::hash_key(black_box("a-32-byte-api-key-from-the-vm-01")))
    });
    c.bench_function("resolve/host_with_port", |b| {
        b.iter(|| routes.resolve(black_box("svc33.ns33.svc.cluster.local:8080"), |_| true))
    });
    c.bench_function("resolve/alias_mixed_case", |b| {
        b.iter(|| routes.resolve(black_box("SVC17.Internal"), |_| true))
    });
    c.bench_function("sni/build", |b| {
        b.iter(|| meshgate::config::sni_for(black_box("reviews.bookinfo.svc.cluster.local"), 9080, Some("v2")))
    });

    // The VM-facing HTTP/1.1 codec: a typical head (what curl and most clients send), a
    // chunked body, and a response head.
    let limits = meshgate::h1::HeadLimits {
        max_head: 64 * 1024,
        max_headers: 100,
    };
    let head = b"GET /api/v1/reviews/42?details=true HTTP/1.1\r\nHost: reviews.bookinfo.svc.cluster.local\r\n\
        User-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Request-Id: 6d1c1e6e-3a3b-4a8a-9a43-8d7f5b2d7c10\r\n\
        X-Meshgate-Key: mgk_0123456789abcdef0123456789abcdef\r\n\r\n";
    c.bench_function("h1/parse_head", |b| {
        b.iter(|| {
            meshgate::h1::parse::parse_head(black_box(head), limits)
                .unwrap()
                .unwrap()
        })
    });
    let chunked = b"400\r\n"
        .iter()
        .chain(&[b'x'; 1024])
        .chain(b"\r\n0\r\n\r\n")
        .copied()
        .collect::<Vec<u8>>();
    c.bench_function("h1/decode_chunked_1k", |b| {
        b.iter(|| {
            let mut d = meshgate::h1::chunked::ChunkedDecoder::new(None, 16 * 1024);
            let mut used = 0;
            while !d.is_done() {
                used += d.decode(black_box(&chunked[used..])).unwrap().consumed;
            }
            used
        })
    });
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("x-request-id", "6d1c1e6e-3a3b-4a8a-9a43-8d7f5b2d7c10".parse().unwrap());
    headers.insert("server", "envoy".parse().unwrap());
    let mut out = Vec::with_capacity(1024);
    c.bench_function("h1/encode_head", |b| {
        b.iter(|| {
            out.clear();
            meshgate::h1::write::encode_head(
                &mut out,
                http::StatusCode::OK,
                black_box(&headers),
                meshgate::h1::write::BodyFraming::Length(128),
                false,
                false,
            );
            out.len()
        })
    });

    // The pool against the live mesh: a checkout of a warm HTTP/2 connection and its return
    // (the timing includes one `block_on`, a few hundred nanoseconds).
    let running = meshgate::config::parse(&path, &text, SystemTime::now()).unwrap();
    let bound = rt.block_on(meshgate::app::start(running)).unwrap();
    let proxy = bound.app.runtime().current();
    let service = proxy
        .snapshot
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .unwrap()
        .clone();
    let pool = proxy.upstream.pool(0, &service).clone();
    rt.block_on(async {
        drop(pool.checkout().await.unwrap());
    });
    c.bench_function("pool/checkout_warm_h2", |b| {
        b.iter(|| rt.block_on(async { drop(black_box(pool.checkout().await.unwrap())) }))
    });
    drop(bound);
    drop(mesh);
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
