//! The core data path end to end: VM client → meshgate → meshsim gateway (AUTO_PASSTHROUGH) →
//! sidecar (mTLS) → echo app, through real sockets and real TLS.

use std::collections::{BTreeMap, HashSet};

use base64::Engine;
use bytes::Bytes;
use e2e::*;
use http::Request;
use http_body_util::Full;
use meshsim::{MeshSpec, PodIdentity, PodSpec, ServiceSpec};
use sha2::Digest;

fn meshgate_id() -> String {
    format!("spiffe://{TD}/ns/meshgate/sa/meshgate")
}

#[tokio::test]
async fn allowed_subnet_reaches_app_with_mesh_identity_host_and_h2() {
    let env = Env::start().await.unwrap();
    let r = env
        .get(
            BILLING_IP,
            &host("reviews"),
            "/reviews/1?x=y",
            &[
                (
                    "x-forwarded-client-cert",
                    "By=spiffe://evil;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
                ),
                ("x-envoy-peer-metadata-id", "sidecar~forged"),
                ("x-custom", "kept"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["peer_principal"], meshgate_id());
    let xfcc = j["xfcc"].as_str().unwrap();
    // The forged element is gone: exactly the sidecar's one element remains, naming meshgate.
    assert!(!xfcc.contains(','), "client XFCC was forwarded: {xfcc}");
    assert!(xfcc.contains(&format!("URI={}", meshgate_id())), "{xfcc}");
    assert!(
        xfcc.contains("By=spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),
        "{xfcc}"
    );
    // The service's canonical authority, port included (9080 is not the scheme default).
    assert_eq!(j["host"], format!("{}:9080", host("reviews")));
    assert_eq!(j["alpn"], "h2");
    assert_eq!(j["version"], "HTTP/2.0");
    assert_eq!(j["path"], "/reviews/1");
    assert_eq!(j["query"], "x=y");
    let h = &j["headers"];
    assert_eq!(h["x-forwarded-for"][0], BILLING_IP);
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-custom"][0], "kept");
    assert!(h["x-request-id"][0].as_str().unwrap().len() >= 16);
    assert!(h.get("x-envoy-peer-metadata-id").is_none());
    // meshgate strips the mesh's peer metadata from responses too.
    assert!(r.headers.get("x-envoy-peer-metadata-id").is_none());
    assert!(r.headers.get("x-echo-pod").is_some());
}

#[tokio::test]
async fn http1_service_negotiates_http11_alpn() {
    let env = Env::start().await.unwrap();
    let r = env.get(BILLING_IP, &host("ratings"), "/ratings/7", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["alpn"], "http/1.1");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["host"], format!("{}:9080", host("ratings")));
    assert_eq!(j["peer_principal"], meshgate_id());
}

#[tokio::test]
async fn client_in_another_subnet_gets_403() {
    let env = Env::start().await.unwrap();
    let r = env.get(STRANGER_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "meshgate: client address is not in any tenant\n");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn valid_key_from_any_address_gets_200_and_key_never_reaches_app() {
    let env = Env::start().await.unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(":{LAPTOP_KEY}"));
    let bearer = format!("Bearer {LAPTOP_KEY}");
    let basic = format!("Basic {basic}");
    let forms: Vec<(&str, &str)> = vec![
        ("x-meshgate-key", LAPTOP_KEY),
        ("proxy-authorization", &bearer),
        ("proxy-authorization", &basic),
    ];
    for (name, value) in forms {
        // details is outside billing-vms' allow list; the key's tenant allows everything.
        let r = env
            .get("127.99.1.1", &host("details"), "/", &[(name, value)])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let j = r.json();
        let headers = j["headers"].as_object().unwrap();
        assert!(!headers.contains_key("x-meshgate-key"), "{headers:?}");
        assert!(!headers.contains_key("proxy-authorization"), "{headers:?}");
        assert!(!r.body.windows(LAPTOP_KEY.len()).any(|w| w == LAPTOP_KEY.as_bytes()));
    }
}

#[tokio::test]
async fn wrong_key_gets_401() {
    let env = Env::start().await.unwrap();
    // Even from an allowed subnet: a bad key is never downgraded to a source match.
    let r = env
        .get(BILLING_IP, &host("reviews"), "/", &[("x-meshgate-key", "not-a-key")])
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "meshgate: invalid API key\n");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn unknown_host_gets_404() {
    let env = Env::start().await.unwrap();
    let r = env
        .get(BILLING_IP, "nope.bookinfo.svc.cluster.local", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "meshgate: unknown host\n");
}

#[tokio::test]
async fn service_outside_tenant_allow_list_gets_403() {
    let env = Env::start().await.unwrap();
    let r = env.get(BILLING_IP, &host("details"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "meshgate: service not allowed for tenant\n");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn malformed_request_gets_400() {
    let env = Env::start().await.unwrap();
    // HTTP/1.1 without Host.
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(
        text.contains("meshgate: malformed request: missing Host header"),
        "{text}"
    );
}

#[tokio::test]
async fn host_matching_is_case_insensitive_with_port_alias_and_absolute_form() {
    let env = Env::start().await.unwrap();
    for h in [
        host("reviews").to_uppercase(),
        format!("{}:9080", host("reviews")),
        format!("{}.", host("reviews")),
    ] {
        let r = env.get(BILLING_IP, &h, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{h}: {}", r.text());
    }
    // Absolute-form, as `curl --proxy` sends it.
    let mut c = env.h1(BILLING_IP).await.unwrap();
    let req = Request::get(format!("http://{}:9080/abs", host("ratings")))
        .header("host", host("ratings"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/abs");
}

#[tokio::test]
async fn h2c_clients_are_served_on_the_same_port() {
    let env = Env::start().await.unwrap();
    let mut c = env.h2c(BILLING_IP).await.unwrap();
    for i in 0..3 {
        let req = Request::get(format!("http://{}/h2c/{i}", host("reviews")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["host"], format!("{}:9080", host("reviews")));
    }
    // And an HTTP/1.1 service behind an h2c client.
    let req = Request::get(format!("http://{}/", host("ratings")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().json()["alpn"], "http/1.1");
}

#[tokio::test]
async fn keep_alive_connections_reuse_upstream_connections() {
    let env = Env::start().await.unwrap();
    let mut c = env.h1(BILLING_IP).await.unwrap();
    for _ in 0..20 {
        let req = Request::get("/")
            .header("host", host("ratings"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(c.send(req).await.unwrap().status, 200);
    }
    // Sequential HTTP/1.1 requests reuse one upstream keep-alive connection.
    assert_eq!(env.mesh.stats().gateway_routed, 1);
}

#[tokio::test]
async fn subset_service_lands_on_subset_pods_only() {
    let env = Env::start().await.unwrap();
    let mut pods = HashSet::new();
    for _ in 0..12 {
        let r = env.get(BILLING_IP, "reviews-v2.bookinfo.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["subset"], "v2");
        pods.insert(j["pod"].as_str().unwrap().to_string());
    }
    assert_eq!(pods, HashSet::from(["reviews-v2-a".to_string()]));
}

#[tokio::test]
async fn concurrent_requests_share_a_bounded_pool_spread_over_pods() {
    let env = EnvBuilder::default()
        .upstream(
            "upstream:\n  min_connections: 2\n  max_connections: 4\n  target_streams_per_connection: 50\n  max_streams_per_connection: 100\n",
        )
        .start()
        .await
        .unwrap();
    let addr = env.addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        tasks.spawn(async move {
            let src = format!("127.20.{}.{}", i / 100, 1 + i % 100);
            let mut c = Client::connect(addr, src.parse().unwrap(), false).await.unwrap();
            let req = Request::get("/slow?delay_ms=300")
                .header("host", host("reviews"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            c.send(req).await.unwrap()
        });
    }
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        *by_pod.entry(r.json()["pod"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let stats = env.mesh.stats();
    assert!(
        stats.gateway_routed <= 4,
        "opened {} connections, pool allows 4",
        stats.gateway_routed
    );
    assert!(stats.gateway_routed >= 2, "min_connections is 2");
    assert!(by_pod.len() > 1, "all requests pinned to one pod: {by_pod:?}");
    assert_eq!(by_pod.values().sum::<usize>(), 200);
}

#[tokio::test]
async fn ten_mib_bodies_stream_both_ways() {
    let env = Env::start().await.unwrap();
    let upload: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let want = hex::encode(sha2::Sha256::digest(&upload));
    for service in ["reviews", "ratings"] {
        let mut c = env.h1(BILLING_IP).await.unwrap();
        let req = Request::post("/upload")
            .header("host", host(service))
            .body(Full::new(Bytes::from(upload.clone())))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{service}");
        let j = r.json();
        assert_eq!(j["body_bytes"], 10 * 1024 * 1024, "{service}");
        assert_eq!(j["body_sha256"], want.as_str(), "{service}");

        let req = Request::get("/download?bytes=10485760")
            .header("host", host(service))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 10 * 1024 * 1024, "{service}");
        let got = hex::encode(sha2::Sha256::digest(&r.body));
        assert_eq!(r.headers["x-body-sha256"].to_str().unwrap(), got, "{service}");
    }
}

#[tokio::test]
async fn expect_100_continue_upload_works() {
    let env = Env::start().await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: {}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        host("reviews")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let mut text = String::new();
    while !text.contains("\"body_bytes\"") {
        let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body_bytes\":5"), "{text}");
}

#[tokio::test]
async fn gateway_down_gives_503() {
    let env = Env::start().await.unwrap();
    env.mesh.stop_gateway().await;
    let started = std::time::Instant::now();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().starts_with("meshgate: gateway "), "{}", r.text());
    assert!(r.text().contains("unreachable"), "{}", r.text());
    // Reported, not a measurement: the refusal comes from the connect attempt (timeout 2s).
    eprintln!("503 after {:?}", started.elapsed());
    // And it recovers when the gateway returns.
    env.mesh.start_gateway().await.unwrap();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn gateway_that_never_answers_gives_503_after_the_connect_timeout() {
    // A listener that never accepts, with its accept queue filled: further SYNs are dropped, so
    // connects hang the way they do to a black-holed address.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = sock.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        fillers.push(tokio::spawn(tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::net::TcpStream::connect(hole_addr),
        )));
    }
    let env = EnvBuilder::default()
        .gateway(&hole_addr.to_string())
        .upstream("upstream:\n  connect_timeout: 1s\n  request_timeout: 20s\n")
        .start()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("timed out"), "{}", r.text());
    // The answer came from the connect timeout: not before it, and well before the request
    // deadline (20 s) or anything else could have ended it. A wide margin, not a benchmark.
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(950) && waited < std::time::Duration::from_secs(10),
        "503 after {waited:?} with connect_timeout 1s"
    );
    for f in fillers {
        f.abort();
    }
}

fn reviews_mesh(identity: PodIdentity) -> MeshSpec {
    MeshSpec::new().service(
        ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews")
            .pod(PodSpec::new("reviews-x").identity(identity)),
    )
}

fn reviews_only_config() -> String {
    format!(
        "services:\n  reviews:\n    host: {}\n    port: 9080\n    protocol: http2\n    identity: spiffe://{TD}/ns/bookinfo/sa/bookinfo-reviews\ntenants:\n  billing-vms:\n    sources: [127.20.0.0/16]\n    allow: [reviews]\n",
        host("reviews")
    )
}

#[tokio::test]
async fn sidecar_with_wrong_spiffe_identity_gives_502_and_app_sees_nothing() {
    let env = EnvBuilder::default()
        .mesh(reviews_mesh(PodIdentity::Other {
            namespace: "bookinfo".into(),
            service_account: "bookinfo-ratings".into(),
        }))
        .services_and_tenants(&reviews_only_config())
        .start()
        .await
        .unwrap();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("bookinfo-ratings"), "{}", r.text());
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn sidecar_with_cert_from_another_ca_gives_502_and_app_sees_nothing() {
    let env = EnvBuilder::default()
        .mesh(reviews_mesh(PodIdentity::ForeignCa))
        .services_and_tenants(&reviews_only_config())
        .start()
        .await
        .unwrap();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("unknown CA") || r.text().contains("UnknownIssuer"),
        "{}",
        r.text()
    );
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused_by_the_sidecar() {
    // meshgate's identity comes from an unrelated CA (its own root, so config checks pass); it
    // trusts the mesh root too, so the failure is the sidecar's refusal, not ours.
    let env = EnvBuilder::default()
        .identity(|mesh_ca| {
            let other = meshsim::MeshCa::new(TD).unwrap();
            let cert = other.issue("meshgate", "meshgate").unwrap();
            (
                cert.chain_pem,
                cert.key_pem,
                format!("{}{}", other.root_pem(), mesh_ca.root_pem()),
            )
        })
        .start()
        .await
        .unwrap();
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let stats = env.mesh.stats();
    assert!(stats.pods_total(|p| p.tls_failures) >= 1, "{stats:?}");
    assert_eq!(stats.pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn unknown_sni_is_refused_by_the_gateway() {
    let cfg = format!(
        "services:\n  ghost:\n    host: ghost.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http2\n  reviews-v9:\n    host: {}\n    port: 9080\n    protocol: http2\n    subset: v9\n    aliases: [reviews-v9.bookinfo.test]\ntenants:\n  billing-vms:\n    sources: [127.20.0.0/16]\n    allow: [\"*\"]\n",
        host("reviews")
    );
    let env = EnvBuilder::default().services_and_tenants(&cfg).start().await.unwrap();
    for h in ["ghost.bookinfo.svc.cluster.local", "reviews-v9.bookinfo.test"] {
        let r = env.get(BILLING_IP, h, "/", &[]).await.unwrap();
        assert_eq!(r.status, 502, "{h}: {}", r.text());
        assert!(r.text().contains("gateway closed the connection"), "{h}: {}", r.text());
    }
    let stats = env.mesh.stats();
    assert!(stats.gateway_refused >= 2, "{stats:?}");
    assert_eq!(stats.pods_total(|p| p.tls_handshakes), 0);
}
