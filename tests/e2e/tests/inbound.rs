//! The mesh → VM direction (issue #16): mesh workloads, dialling like sidecars (meshsim's
//! `MeshClient`), call VM services through meshgate's `mesh-inbound` listener; meshgate checks
//! the caller's principal, forwards to the VM backends (test-local servers standing in for VM
//! apps) and tells them who called in `x-forwarded-client-cert`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use e2e::meshsim::{MeshClient, MeshProtocol};
use e2e::*;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MESHGATE_ID: &str = "spiffe://cluster.local/ns/meshgate/sa/meshgate";

struct Setup {
    env: Env,
    apps: Vec<VmApp>,
}

impl Setup {
    fn inbound(&self) -> SocketAddr {
        self.env.gate.addr("mesh-in").unwrap()
    }

    /// A sidecar of `ns/sa`, expecting meshgate's identity.
    fn client(&self, ns: &str, sa: &str) -> MeshClient {
        let ca = self.env.mesh.ca();
        MeshClient::new(ca.root_der(), Some(ca.issue(ns, sa).unwrap()), &[MESHGATE_ID]).unwrap()
    }
}

async fn setup(extra_billing: &str) -> Setup {
    let apps = vec![
        VmApp::http("billing-a").await,
        VmApp::http("billing-b").await,
        VmApp::http("ledger-a").await,
        VmApp::tcp_echo().await,
    ];
    let vm = format!(
        r#"vm_services:
  billing:
    hosts: [billing.vms.internal]
    port: 8080
    protocol: http1
    backends: ["{a}", "{b}"]
    allow: ["spiffe://cluster.local/ns/shop/sa/cart", "ns/ops/*"]
    connect_timeout: 1s
{extra_billing}  ledger:
    hosts: [ledger.vms.internal]
    port: 9090
    protocol: http2
    backends: ["{c}"]
    allow: ["cluster.local/ns/shop/sa/cart"]
  db:
    hosts: [db.vms.internal]
    port: 5432
    protocol: tcp
    backends: ["{d}"]
    allow: ["spiffe://cluster.local/ns/shop/sa/*"]
"#,
        a = apps[0].addr,
        b = apps[1].addr,
        c = apps[2].addr,
        d = apps[3].addr,
    );
    let env = EnvBuilder::default()
        .listener("  - name: mesh-in\n    bind: 127.0.0.1:0\n    protocol: mesh-inbound\n")
        .extra(&vm)
        .admin()
        .start()
        .await
        .unwrap();
    Setup { env, apps }
}

fn get(path: &str, host: &str) -> Request<Bytes> {
    Request::get(path)
        .header("host", host)
        .header(
            "x-forwarded-client-cert",
            "By=spiffe://forged;URI=spiffe://cluster.local/ns/admin/sa/root",
        )
        .body(Bytes::new())
        .unwrap()
}

fn json(r: &http::Response<Bytes>) -> serde_json::Value {
    serde_json::from_slice(r.body()).unwrap_or_else(|e| panic!("{e}: {} {:?}", r.status(), r.body()))
}

#[tokio::test]
async fn an_allowed_principal_reaches_vm_backends_over_http1_http2_and_tcp() {
    let s = setup("").await;
    let cart = s.client("shop", "cart");
    // HTTP/1.1, the SNI a sidecar sends for an ISTIO_MUTUAL ServiceEntry.
    let r = cart
        .request(
            s.inbound(),
            "outbound_.8080_._.billing.vms.internal",
            MeshProtocol::Http1,
            get("/invoices", "billing.vms.internal:8080"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.body());
    let j = json(&r);
    assert!(j["backend"].as_str().unwrap().starts_with("billing-"));
    assert_eq!(j["path"], "/invoices");
    // The caller, as the sidecar in front of an app would tell it: one XFCC element, ours.
    assert_eq!(j["xfcc_count"], 1);
    let xfcc = j["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.starts_with(&format!("By={MESHGATE_ID};Hash=")), "{xfcc}");
    assert!(
        xfcc.ends_with(";Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/cart"),
        "{xfcc}"
    );
    assert!(!xfcc.contains("forged"), "{xfcc}");
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");
    assert_eq!(j["headers"]["host"], "billing.vms.internal:8080");

    // HTTP/2 from the mesh to an http2 VM service (h2c to the backend).
    let r = cart
        .request(
            s.inbound(),
            "outbound_.9090_._.ledger.vms.internal",
            MeshProtocol::Http2,
            get("/entries", "ledger.vms.internal:9090"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.body());
    let j = json(&r);
    assert_eq!(j["backend"], "ledger-a");
    assert_eq!(j["version"], "HTTP/2.0");
    assert!(j["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .ends_with("URI=spiffe://cluster.local/ns/shop/sa/cart"));
    // And HTTP/2 from the mesh to the http1 service: each side speaks its own.
    let r = cart
        .request(
            s.inbound(),
            "outbound_.8080_._.billing.vms.internal",
            MeshProtocol::Http2,
            get("/h2", "billing.vms.internal:8080"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(&r)["version"], "HTTP/1.1");

    // A plain SNI, and no SNI at all (an IP as the server name): the Host header decides.
    for sni in ["billing.vms.internal", "127.0.0.1"] {
        let r = cart
            .request(
                s.inbound(),
                sni,
                MeshProtocol::Http1,
                get("/plain", "billing.vms.internal:8080"),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{sni}: {:?}", r.body());
        assert_eq!(json(&r)["path"], "/plain");
    }
    let r = cart
        .request(
            s.inbound(),
            "127.0.0.1",
            MeshProtocol::Http1,
            get("/", "ledger.vms.internal:9090"),
        )
        .await
        .unwrap();
    assert_eq!(json(&r)["backend"], "ledger-a");

    // TCP: ALPN `istio` alone, bytes both ways.
    let mut tls = cart
        .connect(s.inbound(), "outbound_.5432_._.db.vms.internal", MeshProtocol::Tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"SELECT 1").await.unwrap();
    let mut buf = [0u8; 8];
    tokio::time::timeout(CLIENT_TIMEOUT, tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"SELECT 1");

    let m = s.env.gate.app.metrics().encode();
    assert!(
        m.contains(r#"meshgate_inbound_requests_total{listener="mesh-in",service="billing",code="200"} 4"#),
        "{m}"
    );
    assert!(m.contains(r#"meshgate_inbound_requests_total{listener="mesh-in",service="db",code="200"} 1"#));
    // Both billing backends took a request (round robin).
    assert!(m.contains(r#"meshgate_vm_backend_healthy{service="billing",backend=""#));
    let _ = &s.apps;
}

#[tokio::test]
async fn principals_not_allowed_are_refused() {
    let s = setup("").await;
    // A namespace rule: any service account of `ops`.
    let r = s
        .client("ops", "deployer")
        .request(
            s.inbound(),
            "outbound_.8080_._.billing.vms.internal",
            MeshProtocol::Http1,
            get("/", "billing.vms.internal"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // `cart` may call billing, not `reviews`; `ledger` only `cart`.
    let reviews = s.client("bookinfo", "reviews");
    let r = reviews
        .request(
            s.inbound(),
            "outbound_.8080_._.billing.vms.internal",
            MeshProtocol::Http1,
            get("/", "billing.vms.internal"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let text = String::from_utf8_lossy(r.body()).to_string();
    assert_eq!(
        text,
        "meshgate: principal_not_allowed: spiffe://cluster.local/ns/bookinfo/sa/reviews may not call billing\n"
    );
    let r = s
        .client("shop", "checkout")
        .request(
            s.inbound(),
            "outbound_.9090_._.ledger.vms.internal",
            MeshProtocol::Http2,
            get("/", "ledger.vms.internal"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A host no vm_service has.
    let r = reviews
        .request(
            s.inbound(),
            "outbound_.8080_._.nothing.vms.internal",
            MeshProtocol::Http1,
            get("/", "nothing.vms.internal"),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // TCP: a caller outside `ns/shop` is closed before a byte reaches the VM.
    let mut tls = reviews
        .connect(s.inbound(), "outbound_.5432_._.db.vms.internal", MeshProtocol::Tcp)
        .await
        .unwrap();
    let _ = tls.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, tls.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let m = s.env.gate.app.metrics().encode();
    assert!(
        m.contains(r#"meshgate_inbound_denied_total{listener="mesh-in",reason="principal_not_allowed"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"meshgate_inbound_denied_total{listener="mesh-in",reason="unknown_vm_service"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn callers_without_a_mesh_certificate_fail_the_handshake() {
    let s = setup("").await;
    let sni = "outbound_.8080_._.billing.vms.internal";
    // A certificate from another CA (right trust domain, wrong root).
    let foreign = s.env.mesh.foreign_ca().issue("shop", "cart").unwrap();
    let c = MeshClient::new(s.env.mesh.ca().root_der(), Some(foreign), &[MESHGATE_ID]).unwrap();
    let r = c
        .request(s.inbound(), sni, MeshProtocol::Http1, get("/", "billing.vms.internal"))
        .await;
    assert!(r.is_err(), "{r:?}");
    // No certificate at all.
    let c = MeshClient::new(s.env.mesh.ca().root_der(), None, &[MESHGATE_ID]).unwrap();
    let r = c
        .request(s.inbound(), sni, MeshProtocol::Http1, get("/", "billing.vms.internal"))
        .await;
    assert!(r.is_err(), "{r:?}");
    // The caller checks meshgate too: a sidecar expecting another identity refuses it.
    let wrong = MeshClient::new(
        s.env.mesh.ca().root_der(),
        Some(s.env.mesh.ca().issue("shop", "cart").unwrap()),
        &["spiffe://cluster.local/ns/billing/sa/billing"],
    )
    .unwrap();
    let r = wrong
        .request(s.inbound(), sni, MeshProtocol::Http1, get("/", "billing.vms.internal"))
        .await;
    assert!(r.is_err(), "{r:?}");
    eventually(
        Duration::from_secs(10),
        "the refused handshakes to be counted",
        || async {
            s.env
                .gate
                .app
                .metrics()
                .encode()
                .contains(r#"meshgate_inbound_denied_total{listener="mesh-in",reason="handshake"} 3"#)
        },
    )
    .await;
    // Nothing reached a VM.
    assert!(!s
        .env
        .gate
        .app
        .metrics()
        .encode()
        .contains(r#"meshgate_inbound_requests_total{listener="mesh-in",service="billing""#));
}

#[tokio::test]
async fn requests_fail_over_when_a_backend_dies_and_health_checks_take_it_out() {
    // Outlier detection out of the way: here only the active check may mark it.
    let s = setup(
        "    health_check:\n      path: /healthz\n      interval: 200ms\n      timeout: 500ms\n      unhealthy_threshold: 2\n      healthy_threshold: 1\n    outlier_detection:\n      consecutive_failures: 1000\n",
    )
    .await;
    let cart = s.client("shop", "cart");
    let sni = "outbound_.8080_._.billing.vms.internal";
    s.apps[0].stop();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = cart
            .request(s.inbound(), sni, MeshProtocol::Http1, get("/", "billing.vms.internal"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{:?}", r.body());
        seen.insert(json(&r)["backend"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["billing-b".to_string()].into());
    let dead = s.apps[0].addr;
    eventually(
        Duration::from_secs(10),
        "the dead backend to fail its health check",
        || async {
            let (_, m) = s.env.admin_get("/metrics").await.unwrap();
            m.contains(&format!(
                r#"meshgate_vm_backend_healthy{{service="billing",backend="{dead}"}} 0"#
            ))
        },
    )
    .await;
    // Out of rotation now: no more attempts on it.
    let errors = || {
        let m = s.env.gate.app.metrics().encode();
        m.lines()
            .find_map(|l| l.strip_prefix(r#"meshgate_vm_backend_errors_total{service="billing",reason="connect"} "#))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    let before = errors();
    assert!(before >= 1.0);
    for _ in 0..5 {
        let r = cart
            .request(s.inbound(), sni, MeshProtocol::Http1, get("/", "billing.vms.internal"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(errors(), before);
    assert!(!s
        .env
        .gate
        .app
        .metrics()
        .encode()
        .contains("meshgate_vm_backend_ejections_total{"));
}

#[tokio::test]
async fn consecutive_failures_eject_a_backend() {
    let s = setup("    outlier_detection:\n      consecutive_failures: 2\n      ejection_time: 30s\n").await;
    let cart = s.client("shop", "cart");
    s.apps[1].stop();
    for _ in 0..6 {
        let r = cart
            .request(
                s.inbound(),
                "outbound_.8080_._.billing.vms.internal",
                MeshProtocol::Http1,
                get("/", "billing.vms.internal"),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(json(&r)["backend"], "billing-a");
    }
    let dead = s.apps[1].addr;
    let m = s.env.gate.app.metrics().encode();
    assert!(
        m.contains(&format!(
            r#"meshgate_vm_backend_ejections_total{{service="billing",backend="{dead}"}} 1"#
        )),
        "{m}"
    );
    assert!(
        m.contains(r#"meshgate_vm_backend_errors_total{service="billing",reason="connect"} 2"#),
        "{m}"
    );
}

#[tokio::test]
async fn idle_mesh_connections_are_closed_and_silent_ones_cut_at_the_head_deadline() {
    let apps = VmApp::http("billing-a").await;
    let env = EnvBuilder::default()
        .listener("  - name: mesh-in\n    bind: 127.0.0.1:0\n    protocol: mesh-inbound\n")
        .extra(&format!(
            "limits:\n  idle_timeout: 300ms\n  header_read_timeout: 500ms\nvm_services:\n  billing:\n    hosts: [billing.vms.internal]\n    port: 8080\n    protocol: http1\n    backends: [\"{}\"]\n    allow: [\"*\"]\n",
            apps.addr
        ))
        .start()
        .await
        .unwrap();
    let addr = env.gate.addr("mesh-in").unwrap();
    let ca = env.mesh.ca();
    let client = MeshClient::new(ca.root_der(), Some(ca.issue("shop", "cart").unwrap()), &[MESHGATE_ID]).unwrap();
    let mut tls = client
        .connect(addr, "outbound_.8080_._.billing.vms.internal", MeshProtocol::Http1)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: billing.vms.internal\r\n\r\n")
        .await
        .unwrap();
    // The response, then the close once the connection has been idle for 300 ms.
    let mut got = Vec::new();
    let read_all = tokio::time::timeout(CLIENT_TIMEOUT, tls.read_to_end(&mut got)).await;
    assert!(read_all.is_ok(), "the idle connection was not closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // A TCP connection that never starts its TLS handshake is cut at the head deadline.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, silent.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(env
        .gate
        .app
        .metrics()
        .encode()
        .contains(r#"meshgate_inbound_denied_total{listener="mesh-in",reason="handshake"} 1"#));
}

#[tokio::test]
async fn a_reload_forgets_removed_backends_and_bodies_keep_their_limit() {
    let s = setup("").await;
    let cart = s.client("shop", "cart");
    let sni = "outbound_.8080_._.billing.vms.internal";
    let (a, b) = (s.apps[0].addr, s.apps[1].addr);
    // billing-a leaves the config; a body limit arrives.
    let text = std::fs::read_to_string(&s.env.config_path).unwrap();
    let text = text.replace(&format!("\"{a}\", "), "") + "limits:\n  max_request_body: 1000\n";
    std::fs::write(&s.env.config_path, text).unwrap();
    let (st, body) = admin_request(s.env.admin_addr(), http::Method::POST, "/reload")
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    let (_, m) = s.env.admin_get("/metrics").await.unwrap();
    assert!(!m.contains(&format!("backend=\"{a}\"")), "{m}");
    assert!(
        m.contains(&format!(
            r#"meshgate_vm_backend_healthy{{service="billing",backend="{b}"}} 1"#
        )),
        "{m}"
    );
    for _ in 0..3 {
        let r = cart
            .request(s.inbound(), sni, MeshProtocol::Http1, get("/", "billing.vms.internal"))
            .await
            .unwrap();
        assert_eq!(json(&r)["backend"], "billing-b");
    }
    // `limits.max_request_body` holds for mesh callers too.
    let big = Request::post("/upload")
        .header("host", "billing.vms.internal")
        .body(Bytes::from(vec![b'x'; 2000]))
        .unwrap();
    let r = cart.request(s.inbound(), sni, MeshProtocol::Http1, big).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r.body());
    assert_eq!(
        String::from_utf8_lossy(r.body()),
        "meshgate: body_too_large: the request body is over 1000 bytes\n"
    );
    let small = Request::post("/upload")
        .header("host", "billing.vms.internal")
        .body(Bytes::from(vec![b'x'; 500]))
        .unwrap();
    let r = cart
        .request(s.inbound(), sni, MeshProtocol::Http1, small)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
