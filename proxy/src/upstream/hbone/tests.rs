//! HBONE request shapes, TLS settings and failure readings.

use super::outer::connection_failure;
use super::*;

#[test]
fn forwarded_quotes_and_brackets() {
    assert_eq!(
        forwarded("10.20.3.4:51000".parse().unwrap(), "reviews.bookinfo.svc.cluster.local"),
        r#"for="10.20.3.4:51000";host=reviews.bookinfo.svc.cluster.local"#
    );
    assert_eq!(
        forwarded("[2001:db8::7]:443".parse().unwrap(), "r.ns.svc.cluster.local"),
        r#"for="[2001:db8::7]:443";host=r.ns.svc.cluster.local"#
    );
}

#[test]
fn traceparent_shape() {
    let t = traceparent();
    let parts: Vec<&str> = t.split('-').collect();
    assert_eq!(parts.len(), 4, "{t}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    assert_eq!(parts[3], "00");
    assert!(parts[1]
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_ne!(parts[1], "0".repeat(32));
    assert_ne!(traceparent(), t);
}

#[test]
fn connect_requests_carry_authority_and_headers() {
    let client: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let r = connect_request("[fd00::5]:9080", client, "reviews.ns.svc.cluster.local", None).unwrap();
    assert_eq!(r.method(), Method::CONNECT);
    assert_eq!(r.uri().authority().unwrap().as_str(), "[fd00::5]:9080");
    assert!(r.uri().scheme().is_none());
    assert!(r.headers().get(X_FORWARDED_NETWORK).is_none());
    assert_eq!(
        r.headers()["forwarded"],
        r#"for="127.0.0.1:4000";host=reviews.ns.svc.cluster.local"#
    );
    let r = connect_request(
        "reviews.ns.svc.cluster.local:9080",
        client,
        "reviews.ns.svc.cluster.local",
        Some("vm-net"),
    )
    .unwrap();
    assert_eq!(
        r.uri().authority().unwrap().as_str(),
        "reviews.ns.svc.cluster.local:9080"
    );
    assert_eq!(r.headers()[X_FORWARDED_NETWORK], "vm-net");
    assert!(r.headers().contains_key("traceparent"));
}

/// A snapshot with one service, `svc` (its `transport` and `hbone` lines given), short
/// upstream timeouts, and a real mesh identity.
fn snapshot(hbone: &str) -> (tempfile::TempDir, crate::config::Snapshot) {
    let dir = tempfile::tempdir().unwrap();
    let ca = meshsim::MeshCa::new("cluster.local").unwrap();
    let cert = ca.issue("meshgate", "meshgate").unwrap();
    cert.write_files(dir.path(), &ca.root_pem()).unwrap();
    let text = format!(
            "listeners:\n  - name: vm\n    bind: 127.0.0.1:0\n    protocol: http\nmesh:\n  trust_domain: cluster.local\n  \
             gateway: [127.0.0.1:1]\n  identity:\n    cert_chain: cert-chain.pem\n    key: key.pem\n    root_cert: root-cert.pem\n\
             services:\n  svc:\n    host: svc.ns.svc.cluster.local\n    port: 9080\n    protocol: http1\n    \
             identity: spiffe://cluster.local/ns/ns/sa/svc\n{hbone}\
             upstream:\n  connect_timeout: 500ms\n  handshake_timeout: 300ms\n\
             tenants:\n  t:\n    sources: [10.0.0.0/8]\n    allow: [\"*\"]\n"
        );
    let path = dir.path().join("meshgate.yaml");
    let s = crate::config::parse(&path, &text, std::time::SystemTime::now()).unwrap();
    (dir, s)
}

fn connector(s: &crate::config::Snapshot) -> Arc<Connector> {
    let svc = &s.services[0];
    let crate::config::Transport::Hbone(route) = &svc.transport else {
        panic!("not an HBONE service")
    };
    Arc::new(Connector::new(route, &s.identity, svc, &s.upstream))
}

/// A loopback listener that accepts TCP and never reads or answers: TLS to it stalls. The
/// count is of accepted connections; they are held open until the task is dropped.
async fn silent_listener() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, n, task)
}

async fn accepted_settles(n: &AtomicU64, want: u64) {
    let until = Instant::now() + Duration::from_secs(2);
    while n.load(Ordering::SeqCst) < want && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn suite_names(c: &ClientConfig) -> Vec<String> {
    c.crypto_provider()
        .cipher_suites
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_dialed_once_for_all_waiters_then_fails_fast() {
    let (addr, accepted, _task) = silent_listener().await;
    let (_dir, s) = snapshot(&format!(
        "    transport: hbone\n    hbone:\n      address: \"{addr}\"\n"
    ));
    let c = connector(&s);
    let limit = s.upstream.connect_timeout + s.upstream.handshake_timeout;
    let started = Instant::now();
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = c.clone();
        waiters.spawn(async move { c.open(None).await.map(|_| ()) });
    }
    while let Some(r) = waiters.join_next().await {
        let e = r.unwrap().expect_err("nothing answers TLS");
        assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
    }
    // One dial shared by all: about one handshake timeout, not eight in a row.
    assert!(started.elapsed() < 3 * limit, "{:?}", started.elapsed());
    accepted_settles(&accepted, 1).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all the waiters");

    // Right after the failure: the same error at once, no new connection.
    let e = c.open(None).await.map(|_| ()).expect_err("fails fast");
    assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // After the fail-fast window the endpoint is dialed again.
    tokio::time::sleep(FAIL_FAST + Duration::from_millis(50)).await;
    let e = c.open(None).await.map(|_| ()).expect_err("still dead");
    assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
    accepted_settles(&accepted, 2).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_name_is_resolved_at_every_dial() {
    let (live, accepted, _task) = silent_listener().await;
    let (_dir, s) = snapshot(&format!(
            "    transport: double-hbone\n    hbone:\n      gateway: \"localhost:{}\"\n      \
             gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
            live.port()
        ));
    let c = connector(&s);
    // What an earlier resolution found; the name now resolves elsewhere.
    let stale = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    c.outer.target.set_addrs(vec![stale]);
    let e = c.open(None).await.map(|_| ()).expect_err("nothing answers TLS");
    assert!(matches!(e, UpstreamError::HandshakeTimeout { .. }), "{e}");
    accepted_settles(&accepted, 1).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "dialed the freshly resolved address"
    );
    let addrs = c.outer.target.addrs();
    assert!(addrs.contains(&live) && !addrs.contains(&stale), "{addrs:?}");
}

#[test]
fn hbone_tls_offers_ztunnel_cipher_suites_only() {
    let (_dir, s) = snapshot(
            "    transport: double-hbone\n    hbone:\n      gateway: \"127.0.0.1:15008\"\n      \
             gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
        );
    let c = connector(&s);
    let want = ["TLS13_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256"];
    assert_eq!(suite_names(&c.outer.tls.config), want);
    assert_eq!(suite_names(c.inner_tls.as_ref().unwrap()), want);
}

#[test]
fn a_connection_ended_before_the_endpoint_spoke_is_a_tls_refusal() {
    let addr: SocketAddr = "127.0.0.2:15008".parse().unwrap();
    let reset = "connection error: Connection reset by peer (os error 104)";
    // The alert arrived: its text says why.
    let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateUnknown);
    match connection_failure(addr, "outer", &reset, Some(alert), false) {
        UpstreamError::Tls { reason, .. } => assert!(reason.contains("CertificateUnknown"), "{reason}"),
        other => panic!("{other}"),
    }
    // The reset overtook the alert: still a refused handshake.
    match connection_failure(addr, "outer", &reset, None, false) {
        UpstreamError::Tls { reason, .. } => {
            assert!(reason.contains("refuse this client certificate"), "{reason}")
        }
        other => panic!("{other}"),
    }
    // A connection that was working and then dropped is a reset, not a TLS problem.
    assert!(matches!(
        connection_failure(addr, "outer", &reset, None, true),
        UpstreamError::Http(_)
    ));
}

#[test]
fn refusals_are_named() {
    assert!(refusal_reason(StatusCode::UNAUTHORIZED).contains("RBAC"));
    assert!(refusal_reason(StatusCode::BAD_REQUEST).contains("authority"));
    assert!(refusal_reason(StatusCode::SERVICE_UNAVAILABLE).contains("app"));
}
