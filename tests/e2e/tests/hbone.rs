//! HBONE upstreams (issue #9, Istio ambient): meshgate reaches ambient services by HTTP/2
//! CONNECT over mTLS to meshsim's ztunnel-like endpoints, directly or through the ambient
//! east-west gateway (double HBONE), and fails with 502 when the mesh's checks fail. Each
//! ambient pod's endpoint has an address of its own (127.0.0.N), as pods do.

use e2e::*;
use meshsim::{IssueOptions, MeshSpec, PodSpec, ServiceSpec};

const MESHGATE_ID: &str = "spiffe://cluster.local/ns/meshgate/sa/meshgate";
const NETWORK: &str = "vm-net";

/// All ambient: `reviews` (HTTP/1.1 app), `ratings` (h2 app), `details` (reached through the
/// ambient gateway), `secure` (RBAC admits someone else only), `impostor` (its pod presents
/// another service account's certificate).
fn spec() -> MeshSpec {
    let svc = |name: &str, pod: PodSpec| {
        ServiceSpec::new(name, "bookinfo", 9080, &format!("bookinfo-{name}"))
            .ambient()
            .pod(pod)
    };
    MeshSpec::new()
        .service(svc("reviews", PodSpec::new("reviews-a")))
        .service(svc("ratings", PodSpec::new("ratings-a")))
        .service(svc("details", PodSpec::new("details-a")))
        .service(svc(
            "secure",
            PodSpec::new("secure-a").allow(["cluster.local/ns/billing/sa/other"]),
        ))
        .service(svc(
            "impostor",
            PodSpec::new("impostor-a").other_identity("bookinfo", "intruder"),
        ))
}

fn id(name: &str) -> String {
    format!("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-{name}")
}

fn services(mesh: &meshsim::Mesh) -> String {
    let addr = |pod: &str| mesh.hbone_addr(pod).expect("ambient pod").to_string();
    let single = |name: &str, protocol: &str, pod: &str, extra: &str| {
        format!(
            "  {name}:\n    host: {h}\n    port: 9080\n    protocol: {protocol}\n    identity: {i}\n    transport: hbone\n    hbone:\n      address: \"{a}\"\n{extra}",
            h = host(name),
            i = id(name),
            a = addr(pod),
        )
    };
    // The reviews pod as a tcp service: what CONNECT tunnels reach.
    let raw = format!(
        "  reviews-raw:\n    host: reviews-raw.bookinfo.test\n    port: 9080\n    protocol: tcp\n    identity: {i}\n    transport: hbone\n    hbone:\n      address: \"{a}\"\n",
        i = id("reviews"),
        a = addr("reviews-a"),
    );
    format!(
        "services:\n{}{}{}{}{}  details:\n    host: {dh}\n    port: 9080\n    protocol: http2\n    identity: {di}\n    transport: double-hbone\n    hbone:\n      gateway: \"{gw}\"\n      gateway_identity: {gid}\n      network: {NETWORK}\n  wrong-port:\n    host: wrong-port.bookinfo.test\n    port: 9080\n    protocol: http1\n    transport: hbone\n    hbone:\n      address: \"{ra}\"\n      target: \"{rip}:9999\"\n  wrong-ip:\n    host: wrong-ip.bookinfo.test\n    port: 9080\n    protocol: http1\n    transport: hbone\n    hbone:\n      address: \"{ra}\"\n      target: \"{other}:9080\"\ntenants:\n  billing:\n    sources: [127.20.0.0/16]\n    allow: [\"*\"]\n",
        single("reviews", "http1", "reviews-a", ""),
        single("ratings", "http2", "ratings-a", ""),
        single("secure", "http1", "secure-a", ""),
        single("impostor", "http1", "impostor-a", ""),
        raw,
        dh = host("details"),
        di = id("details"),
        gw = mesh.ambient_gateway_addr().expect("ambient gateway"),
        gid = mesh.ambient().gateway_spiffe_id().expect("gateway identity"),
        ra = addr("reviews-a"),
        rip = mesh.hbone_addr("reviews-a").expect("ambient pod").ip(),
        other = mesh.hbone_addr("ratings-a").expect("ambient pod").ip(),
    )
}

/// `meshgate_upstream_errors_total{service, reason}`: the reason label is what the operator
/// reads, whatever the body says.
fn upstream_errors(env: &Env, service: &str, reason: &str) -> u64 {
    let needle = format!("meshgate_upstream_errors_total{{service=\"{service}\",reason=\"{reason}\"}} ");
    let text = env.gate.app.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn env() -> Env {
    EnvBuilder::default()
        .mesh(spec())
        .services_and_tenants_with(services)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_hbone_reaches_the_pod_as_meshgate() {
    let env = env().await;
    let r = env.get(BILLING_IP, &host("reviews"), "/hello", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["pod"], "reviews-a");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["peer_principal"], MESHGATE_ID);
    assert_eq!(j["headers"]["x-forwarded-for"][0], BILLING_IP);

    let s = env.mesh.ambient().hbone_stats("reviews-a").unwrap();
    let seen = s.last_connect.expect("a CONNECT");
    let pod = env.mesh.hbone_addr("reviews-a").unwrap();
    assert_eq!(seen.authority.as_deref(), Some(format!("{}:9080", pod.ip()).as_str()));
    assert_eq!(seen.principal.as_deref(), Some(MESHGATE_ID));
    let fwd = seen.forwarded.unwrap();
    assert!(
        fwd.starts_with("for=\"127.0.0.1:") && fwd.ends_with(&format!(";host={}", host("reviews"))),
        "{fwd}"
    );
    let tp = seen.traceparent.unwrap();
    assert!(tp.starts_with("00-") && tp.ends_with("-00") && tp.len() == 55, "{tp}");
    assert_eq!(seen.forwarded_network, None);
    // ztunnel's suites only (istio-wire.md §5.1): no ChaCha20 offered.
    assert_eq!(
        s.offered_cipher_suites,
        ["TLS13_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256"]
    );
    assert_eq!(s.cipher_suite.as_deref(), Some("TLS13_AES_256_GCM_SHA384"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_hbone() {
    let env = env().await;
    let mut c = env.h2c(BILLING_IP).await.unwrap();
    let req = http::Request::get(format!("http://{}/x", host("ratings")))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["pod"], "ratings-a");
    assert_eq!(j["version"], "HTTP/2.0");
    assert_eq!(j["peer_principal"], MESHGATE_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_share_one_outer_connection() {
    let env = env().await;
    // Sequential, then concurrent: the HTTP/1.1 app needs several CONNECT streams at once.
    for _ in 0..5 {
        let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (addr, h) = (env.addr(), host("reviews"));
        tasks.spawn(async move {
            let mut c = Client::connect(addr, BILLING_IP.parse().unwrap(), false).await.unwrap();
            let req = http::Request::get("/?delay_ms=100")
                .header("host", h)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            c.send(req).await.unwrap().status
        });
    }
    while let Some(s) = tasks.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    let s = env.mesh.ambient().hbone_stats("reviews-a").unwrap();
    assert_eq!(s.tls_handshakes, 1, "{s:?}");
    assert!(s.connects_ok >= 2, "concurrent requests need several streams: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_hbone_through_the_ambient_gateway() {
    let env = env().await;
    for _ in 0..3 {
        let r = env.get(BILLING_IP, &host("details"), "/d", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["pod"], "details-a");
        assert_eq!(j["version"], "HTTP/2.0");
        // The inner TLS is end to end: the pod sees meshgate, not the gateway.
        assert_eq!(j["peer_principal"], MESHGATE_ID);
    }
    let authority = format!("{}:9080", host("details"));
    let gw = env.mesh.ambient().gateway_stats().unwrap();
    assert_eq!(gw.tls_handshakes, 1, "one outer connection: {gw:?}");
    let outer = gw.last_connect.unwrap();
    assert_eq!(outer.authority.as_deref(), Some(authority.as_str()));
    assert_eq!(outer.principal.as_deref(), Some(MESHGATE_ID));
    assert_eq!(outer.forwarded_network, None);
    let pod = env.mesh.ambient().hbone_stats("details-a").unwrap();
    let inner = pod.last_connect.unwrap();
    assert_eq!(inner.authority.as_deref(), Some(authority.as_str()));
    assert_eq!(inner.forwarded_network.as_deref(), Some(NETWORK));
    assert_eq!(inner.principal.as_deref(), Some(MESHGATE_ID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_502_with_the_reason() {
    let env = env().await;
    // The pod presents a valid mesh certificate for another service account.
    let r = env.get(BILLING_IP, &host("impostor"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("spiffe://cluster.local/ns/bookinfo/sa/intruder"),
        "{}",
        r.text()
    );
    assert_eq!(env.mesh.stats().pods["impostor-a"].app_requests, 0);

    // RBAC denies meshgate's principal: ztunnel answers the CONNECT 401.
    let r = env.get(BILLING_IP, &host("secure"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("401") && r.text().contains("RBAC"), "{}", r.text());
    assert!(env.mesh.ambient().hbone_stats("secure-a").unwrap().refused_401 >= 1);
    assert_eq!(env.mesh.stats().pods["secure-a"].app_requests, 0);

    // Nothing listens on the target port: ztunnel answers 503.
    let r = env.get(BILLING_IP, "wrong-port.bookinfo.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("503"), "{}", r.text());

    // The CONNECT names another pod's IP than the one dialed: ztunnel answers 400.
    let before = env.mesh.ambient().hbone_stats("reviews-a").unwrap().refused_400;
    let r = env.get(BILLING_IP, "wrong-ip.bookinfo.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("refused with 400"), "{}", r.text());
    assert!(upstream_errors(&env, "wrong-ip", "upstream_hbone") >= 1);
    assert!(env.mesh.ambient().hbone_stats("reviews-a").unwrap().refused_400 > before);
}

/// The mesh is trust domain `other.local`; meshgate's certificate, though signed by the mesh
/// CA, is for `cluster.local`. ztunnel's trust-domain check refuses it during the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_another_trust_domain_is_refused() {
    let spec = MeshSpec::new().trust_domain("other.local").service(
        ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews")
            .ambient()
            .pod(PodSpec::new("reviews-a")),
    );
    let env = EnvBuilder::default()
        .mesh(spec)
        .identity(|ca| {
            let mut o = IssueOptions::workload("cluster.local", "meshgate", "meshgate");
            o.spiffe_id = Some(MESHGATE_ID.to_string());
            let c = ca.issue_with(&o).unwrap();
            (c.chain_pem, c.key_pem, ca.root_pem())
        })
        .services_and_tenants_with(|mesh| {
            format!(
                "services:\n  reviews:\n    host: {}\n    port: 9080\n    protocol: http1\n    identity: spiffe://other.local/ns/bookinfo/sa/bookinfo-reviews\n    transport: hbone\n    hbone:\n      address: \"{}\"\ntenants:\n  billing:\n    sources: [127.20.0.0/16]\n    allow: [\"*\"]\n",
                host("reviews"),
                mesh.hbone_addr("reviews-a").unwrap()
            )
        })
        .start()
        .await
        .unwrap();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    // The endpoint's alert, or the reset that can overtake it: a refused handshake either way.
    let text = r.text();
    assert!(
        text.contains("CertificateUnknown") || text.contains("closed before the endpoint sent anything"),
        "{text}"
    );
    assert!(upstream_errors(&env, "reviews", "upstream_tls") >= 1);
    // The endpoint counts the refusal after sending its alert, so possibly after our 502.
    let ambient = env.mesh.ambient();
    eventually(
        std::time::Duration::from_secs(10),
        "the endpoint to count the refusal",
        || async { ambient.hbone_stats("reviews-a").unwrap().tls_failures >= 1 },
    )
    .await;
    let s = ambient.hbone_stats("reviews-a").unwrap();
    assert_eq!(s.tls_handshakes, 0, "{s:?}");
    assert_eq!(env.mesh.stats().pods["reviews-a"].app_requests, 0);
}

/// `CONNECT host:port` from a VM over an HBONE service: a CONNECT stream of its own, naming the
/// VM in `forwarded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_over_hbone_names_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env().await;
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    // CONNECT reaches tcp services only: the reviews pod as one, an opaque stream through its
    // ztunnel, inside which the client speaks HTTP/1.1 to the app itself.
    let h = "reviews-raw.bookinfo.test";
    s.write_all(format!("CONNECT {h}:9080 HTTP/1.1\r\nHost: {h}:9080\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(format!("GET /t HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"pod\":\"reviews-a\""), "{text}");
    let seen = env
        .mesh
        .ambient()
        .hbone_stats("reviews-a")
        .unwrap()
        .last_connect
        .unwrap();
    let fwd = seen.forwarded.unwrap();
    assert!(fwd.starts_with(&format!("for=\"{BILLING_IP}:")), "{fwd}");
}

/// Double HBONE checks both identities: the gateway's on the outer TLS (`hbone.gateway_identity`)
/// and the destination's on the inner TLS, end to end through the gateway's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_hbone_verifies_the_gateway_and_the_destination() {
    let env = EnvBuilder::default()
        .mesh(spec())
        .services_and_tenants_with(|mesh| {
            let svc = |name: &str, svc_host: &str, identity: &str, gateway_identity: &str| {
                format!(
                    "  {name}:\n    host: {svc_host}\n    port: 9080\n    protocol: http1\n    identity: {identity}\n    transport: double-hbone\n    hbone:\n      gateway: \"{gw}\"\n      gateway_identity: {gateway_identity}\n      network: {NETWORK}\n",
                    gw = mesh.ambient_gateway_addr().expect("ambient gateway"),
                )
            };
            let gid = mesh.ambient().gateway_spiffe_id().expect("gateway identity");
            format!(
                "services:\n{}{}tenants:\n  billing:\n    sources: [127.20.0.0/16]\n    allow: [\"*\"]\n",
                // Someone else answers on the gateway's address.
                svc(
                    "wrong-gateway",
                    &host("reviews"),
                    &id("reviews"),
                    "spiffe://cluster.local/ns/istio-system/sa/not-the-gateway"
                ),
                // The gateway is right, but the pod behind it is not the service configured.
                svc("wrong-destination", &host("details"), &id("reviews"), &gid),
            )
        })
        .start()
        .await
        .unwrap();
    let ambient = env.mesh.ambient();

    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("istio-eastwestgateway"), "{}", r.text());
    assert!(upstream_errors(&env, "wrong-gateway", "upstream_identity") >= 1);
    let gw = ambient.gateway_stats().unwrap();
    assert_eq!((gw.tls_handshakes, gw.connects_ok), (0, 0), "{gw:?}");
    assert_eq!(ambient.hbone_stats("reviews-a").unwrap().tls_handshakes, 0);
    assert_eq!(env.mesh.stats().pods["reviews-a"].app_requests, 0);

    let r = env.get(BILLING_IP, &host("details"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    // The pod's own certificate came through the gateway's stream and was refused.
    assert!(r.text().contains(&id("details")), "{}", r.text());
    assert!(upstream_errors(&env, "wrong-destination", "upstream_identity") >= 1);
    let gw = ambient.gateway_stats().unwrap();
    assert_eq!(gw.tls_handshakes, 1, "the outer TLS to the gateway passed: {gw:?}");
    assert!(gw.connects_ok >= 1, "{gw:?}");
    assert_eq!(ambient.hbone_stats("details-a").unwrap().tls_handshakes, 0);
    assert_eq!(env.mesh.stats().pods["details-a"].app_requests, 0);
}

/// An HBONE address that accepts TCP and never answers TLS (a listener that never reads): the
/// concurrent requests share one outer dial, bounded by the handshake timeout, instead of
/// dialing one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_fails_all_waiters_with_one_dial() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const N: usize = 8;
    const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let holder = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        })
    };
    let env = EnvBuilder::default()
        .mesh(MeshSpec::new())
        .upstream("upstream:\n  connect_timeout: 1s\n  handshake_timeout: 1s\n  request_timeout: 20s\n")
        .services_and_tenants(&format!(
            "services:\n  dead:\n    host: dead.bookinfo.test\n    port: 9080\n    protocol: http1\n    identity: {}\n    transport: hbone\n    hbone:\n      address: \"{dead}\"\ntenants:\n  billing:\n    sources: [127.20.0.0/16]\n    allow: [\"*\"]\n",
            id("reviews")
        ))
        .start()
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..N {
        let addr = env.addr();
        tasks.spawn(async move {
            let mut c = Client::connect(addr, BILLING_IP.parse().unwrap(), false).await.unwrap();
            let req = http::Request::get("/")
                .header("host", "dead.bookinfo.test")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let r = c.send(req).await.unwrap();
            (r.status, r.text())
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (status, text) = r.unwrap();
        // A handshake timeout is 504 (docs/config.md `upstream.handshake_timeout`).
        assert_eq!(status, 504, "{text}");
        assert!(text.contains("timed out"), "{text}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < 3 * HANDSHAKE_TIMEOUT,
        "{N} waiters took {elapsed:?}: one dial is about {HANDSHAKE_TIMEOUT:?}"
    );
    assert_eq!(upstream_errors(&env, "dead", "upstream_handshake_timeout"), N as u64);
    // The endpoint saw one connection for the one dial, not one per waiting request.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    holder.abort();
}
