//! TCP listeners (issue #8): opaque bytes from an allowed VM to a mesh service declared TCP,
//! over mTLS with ALPN `istio` through the gateway; half-close and large transfers both ways.

use std::time::Duration;

use e2e::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn env(listener_extra: &str) -> Env {
    EnvBuilder::default()
        .mesh(spec_with_db())
        .listener(&format!(
            "  - name: db\n    bind: 127.0.0.1:0\n    protocol: tcp\n    service: db\n{listener_extra}"
        ))
        .services_and_tenants(&tcp_config())
        .admin()
        .start()
        .await
        .unwrap()
}

/// The default services and tenants, plus `db` (TCP) allowed to billing only, and a tenant
/// `others` (127.40.0.0/16) that may not use it.
fn tcp_config() -> String {
    let base = default_services_and_tenants();
    let (services, tenants) = base.split_once("tenants:\n").unwrap();
    let tenants = tenants.replacen("    allow: [", "    allow: [db, ", 1);
    format!(
        "{services}  db:\n    host: db.data.svc.cluster.local\n    port: 5432\n    protocol: tcp\ntenants:\n{tenants}  others:\n    sources: [127.40.0.0/16]\n    allow: [details]\n"
    )
}

#[tokio::test]
async fn a_hundred_mib_each_way_with_half_close() {
    let env = env("").await;
    let addr = env.gate.addr("db").unwrap();
    let s = connect_from(addr, BILLING_IP.parse().unwrap()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    const TOTAL: u64 = 100 << 20;
    // Send and receive at once: the echo comes back while we are still sending, so this also
    // exercises backpressure both ways.
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let chunk: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut sent = 0u64;
        while sent < TOTAL {
            wr.write_all(&chunk).await.unwrap();
            h.update(&chunk);
            sent += chunk.len() as u64;
        }
        // Half-close: the service sees EOF, and its replies still reach us.
        wr.shutdown().await.unwrap();
        (sent, h.finalize())
    });
    let reader = async {
        let mut h = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n as u64;
        }
        (got, h.finalize())
    };
    let (back, sent) = tokio::time::timeout(Duration::from_secs(120), async {
        let back = reader.await;
        (back, writer.await.unwrap())
    })
    .await
    .expect("transfer did not finish");
    assert_eq!(sent.0, TOTAL);
    assert_eq!(back.0, TOTAL, "every byte came back, then EOF");
    assert_eq!(back.1, sent.1, "and unchanged");
    let s = env.mesh.stats();
    assert_eq!(s.pods["db-a"].tcp_connections, 1);
    assert_eq!(s.pods["db-a"].tcp_bytes, TOTAL);
    // Byte counters for the service, both directions.
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    for dir in ["upstream", "downstream"] {
        let line = format!("meshgate_bytes_total{{service=\"db\",direction=\"{dir}\"}} {TOTAL}");
        assert!(metrics.contains(&line), "{line} missing");
    }
}

#[tokio::test]
async fn clients_outside_the_allowed_tenants_are_disconnected_before_the_mesh() {
    let env = env("").await;
    let addr = env.gate.addr("db").unwrap();
    // No tenant claims this address; another tenant's address whose allow list lacks `db`.
    for (src, reason) in [(STRANGER_IP, "unknown_client"), ("127.40.0.5", "service_not_allowed")] {
        let mut s = connect_from(addr, src.parse().unwrap()).await.unwrap();
        let _ = s.write_all(b"SELECT 1;").await;
        let mut back = Vec::new();
        let r = tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut back))
            .await
            .expect("connection left open");
        assert!(r.is_err() || back.is_empty(), "{src}: got {back:?}");
        let (_, metrics) = env.admin_get("/metrics").await.unwrap();
        let line = format!("meshgate_denied_total{{listener=\"db\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing");
    }
    assert_eq!(
        env.mesh.stats().pods["db-a"].tcp_connections,
        0,
        "nothing reached the mesh"
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let env = env("    idle_timeout: 300ms\n").await;
    let addr = env.gate.addr("db").unwrap();
    let mut s = connect_from(addr, BILLING_IP.parse().unwrap()).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    // Then silence: meshgate closes both sides (a bounded wait for its verdict).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "idle TCP connection held open");
    assert!(rest.is_empty());
}

/// A TCP listener behind a load balancer that speaks PROXY protocol: its header is the
/// connection's first head, held to `limits.header_read_timeout` from accept like any other
/// (the listener's own idle timeout, an hour here, does not apply until the tunnel runs).
#[tokio::test]
async fn a_proxy_header_that_never_completes_is_cut_at_the_head_deadline() {
    let env = EnvBuilder::default()
        .mesh(spec_with_db())
        .listener(
            "  - name: db\n    bind: 127.0.0.1:0\n    protocol: tcp\n    service: db\n    proxy_protocol: required\n    \
             trusted_proxies: [127.0.0.0/8]\n",
        )
        .services_and_tenants(&tcp_config())
        .extra("limits:\n  header_read_timeout: 1s\n")
        .start()
        .await
        .unwrap();
    let addr = env.gate.addr("db").unwrap();
    let mut s = connect_from(addr, BILLING_IP.parse().unwrap()).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"PROXY TCP4 127.20.0.5 ").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a connection stuck in its PROXY header was held open");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "cut after {:?}, before header_read_timeout",
        started.elapsed()
    );
    assert_eq!(env.mesh.stats().pods["db-a"].tcp_connections, 0);
}

#[tokio::test]
async fn connect_opens_a_tunnel_to_a_tcp_service_and_refuses_an_http_service() {
    let env = env("").await;
    // A TCP service: bytes echoed, half-close passed on.
    let (head, s) = connect_tunnel(env.addr(), BILLING_IP, "db.data.svc.cluster.local:5432", "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let (mut rd, mut wr) = s.into_split();
    let p2 = payload.clone();
    let w = tokio::spawn(async move {
        wr.write_all(&p2).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, rd.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    w.await.unwrap();
    assert_eq!(back, payload);

    // An HTTP service through a tunnel (a client that always tunnels, like many HTTPS_PROXY
    // users) is refused: inside a tunnel its requests would skip every header rule, a forged
    // x-forwarded-client-cert among them. The refusal says what to do instead, and the same
    // connection then carries the request as a request, with the rules applied.
    let key = format!("Proxy-Authorization: Bearer {LAPTOP_KEY}\r\n");
    let target = format!("{}:9080", host("details"));
    let (head, mut s) = connect_tunnel(env.addr(), STRANGER_IP, &target, &key).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("CONNECT reaches tcp services only"), "{body}");
    let forged = "By=spiffe://x;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    s.write_all(
        format!(
            "GET /inside HTTP/1.1\r\nHost: {}\r\n{key}x-forwarded-client-cert: {forged}\r\nx-forwarded-for: 6.6.6.6\r\nConnection: close\r\n\r\n",
            host("details")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"path\":\"/inside\""), "{resp}");
    assert!(!resp.contains("kube-system"), "a forged XFCC reached the app: {resp}");
    assert!(
        resp.contains("spiffe://cluster.local/ns/meshgate/sa/meshgate"),
        "{resp}"
    );
    // meshgate appends the client's address to the client's own X-Forwarded-For.
    assert!(resp.contains(&format!("6.6.6.6, {STRANGER_IP}")), "{resp}");
}

#[tokio::test]
async fn connect_is_never_an_open_proxy() {
    let env = env("").await;
    let cases = [
        (BILLING_IP, "example.com:443", "404", "unknown host"),
        (BILLING_IP, "127.0.0.1:22", "404", "unknown host"),
        (BILLING_IP, "db.data.svc.cluster.local:5433", "404", "unknown host"),
        // An HTTP service only on its own port (reviews is 9080).
        (
            BILLING_IP,
            "reviews.bookinfo.svc.cluster.local:22",
            "404",
            "unknown host",
        ),
        (BILLING_IP, "db.data.svc.cluster.local", "400", "malformed"),
        (
            STRANGER_IP,
            "db.data.svc.cluster.local:5432",
            "403",
            "client address is not in any tenant",
        ),
        (
            "127.40.0.5",
            "db.data.svc.cluster.local:5432",
            "403",
            "service not allowed",
        ),
    ];
    for (src, target, status, why) in cases {
        let (head, mut s) = connect_tunnel(env.addr(), src, target, "").await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{target}: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        let mut body = vec![0u8; len];
        tokio::time::timeout(CLIENT_TIMEOUT, s.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(why), "{target}: {body}");
    }
    assert_eq!(
        env.mesh.stats().pods["db-a"].tcp_connections,
        0,
        "nothing reached the mesh"
    );
}

#[tokio::test]
async fn tunnels_count_against_connection_limits_and_are_cut_by_a_drain() {
    // One client connection at most on the HTTP listener; a short drain.
    let env = EnvBuilder::default()
        .mesh(spec_with_db())
        .listener_extra("    max_connections: 1\n")
        .services_and_tenants(&tcp_config())
        .extra("drain:\n  delay: 1ms\n  spread: 1ms\n  timeout: 1s\n")
        .start()
        .await
        .unwrap();
    let (head, mut tunnel) = connect_tunnel(env.addr(), BILLING_IP, "db.data.svc.cluster.local:5432", "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tunnel.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tunnel.read_exact(&mut b).await.unwrap();
    // hyper is done with the connection, but the tunnel still holds the listener's one slot.
    let mut other = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let _ = other
        .write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("reviews")).as_bytes())
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, other.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        out.is_empty(),
        "a second connection was served: {}",
        String::from_utf8_lossy(&out)
    );

    // A drain cuts the tunnel at its deadline (a bounded wait for the verdict).
    let app = env.gate.app.clone();
    tokio::spawn(async move { app.drain().await });
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), tunnel.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "tunnel outlived the drain");
}

#[tokio::test]
async fn tcp_connections_are_held_to_the_tenant_concurrency_limit() {
    // billing may hold one connection at a time: the second is refused (closed at once and
    // counted), and once the first ends a new one is carried again.
    let config = tcp_config().replacen(
        "  billing-vms:\n",
        "  billing-vms:\n    max_concurrent_requests: 1\n",
        1,
    );
    let env = EnvBuilder::default()
        .mesh(spec_with_db())
        .listener("  - name: db\n    bind: 127.0.0.1:0\n    protocol: tcp\n    service: db\n")
        .services_and_tenants(&config)
        .start()
        .await
        .unwrap();
    let addr = env.gate.addr("db").unwrap();
    let echo = |mut s: tokio::net::TcpStream| async move {
        s.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        tokio::time::timeout(CLIENT_TIMEOUT, s.read_exact(&mut b))
            .await
            .ok()?
            .ok()?;
        Some((b, s))
    };
    let first = connect_from(addr, BILLING_IP.parse().unwrap()).await.unwrap();
    let (b, first) = echo(first).await.expect("the first connection is carried");
    assert_eq!(&b, b"ping");
    let second = connect_from(addr, "127.20.0.6".parse().unwrap()).await.unwrap();
    assert!(
        echo(second).await.is_none(),
        "a second connection was carried over the limit"
    );
    let text = env.gate.app.metrics().encode();
    assert!(
        text.contains("meshgate_denied_total{listener=\"db\",reason=\"concurrency_limited\"} 1"),
        "{text}"
    );
    drop(first);
    let again = async {
        loop {
            let s = connect_from(addr, BILLING_IP.parse().unwrap()).await.unwrap();
            if let Some((b, _)) = echo(s).await {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let b = tokio::time::timeout(CLIENT_TIMEOUT, again)
        .await
        .expect("no connection carried after the first ended");
    assert_eq!(&b, b"ping");
}
