//! The HTTP/3 listener (issue #8): a quinn + h3 client, as a laptop would use, reaches mesh
//! services through meshgate with the same routing and policy as the HTTP listener; the HTTP
//! listener advertises it with `Alt-Svc`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use e2e::*;
use sha2::Digest;

const SERVER_NAME: &str = "meshgate.vms.test";

/// Writes the h3 listener's certificate (from the mesh CA here; any CA the clients trust works).
fn write_server_cert(ca: &meshsim::MeshCa, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut opts = meshsim::IssueOptions::workload(ca.trust_domain(), "vms", "meshgate");
    opts.dns_names = vec![SERVER_NAME.into()];
    let c = ca.issue_with(&opts)?;
    std::fs::write(dir.join("h3-cert.pem"), c.chain_pem)?;
    std::fs::write(dir.join("h3-key.pem"), c.key_pem)?;
    Ok(())
}

async fn env() -> Env {
    env_with("").await
}

async fn env_with(extra: &str) -> Env {
    EnvBuilder::default()
        .extra(extra)
        .files(write_server_cert)
        .listener_extra("    alt_svc: 'h3=\":8443\"; ma=3600'\n")
        .listener("  - name: quic\n    bind: 127.0.0.1:0\n    protocol: h3\n    tls:\n      cert_chain: h3-cert.pem\n      key: h3-key.pem\n")
        .admin()
        .start()
        .await
        .unwrap()
}

struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    _endpoint: quinn::Endpoint,
    /// Ends when the connection does.
    driver: tokio::task::JoinHandle<()>,
}

struct H3Resp {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
}

impl H3Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A QUIC connection from `src` (a loopback address standing in for a client subnet).
async fn connect(env: &Env, src: &str) -> H3Client {
    try_connect(env, src, CLIENT_TIMEOUT).await.expect("QUIC handshake")
}

async fn try_connect(env: &Env, src: &str, limit: std::time::Duration) -> Result<H3Client, String> {
    let addr = env.gate.addr("quic").expect("quic listener");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(env.mesh.ca().root_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    let mut endpoint = quinn::Endpoint::client(src).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = tokio::time::timeout(limit, endpoint.connect(addr, SERVER_NAME).unwrap())
        .await
        .map_err(|_| "QUIC handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(H3Client {
        send,
        _endpoint: endpoint,
        driver,
    })
}

impl H3Client {
    async fn request(&mut self, req: http::Request<()>, body: Option<Bytes>) -> H3Resp {
        tokio::time::timeout(CLIENT_TIMEOUT, async {
            let mut stream = self.send.send_request(req).await.unwrap();
            if let Some(b) = body {
                // In pieces, as a real upload arrives.
                for chunk in b.chunks(16 * 1024) {
                    stream.send_data(Bytes::copy_from_slice(chunk)).await.unwrap();
                }
            }
            stream.finish().await.unwrap();
            let resp = stream.recv_response().await.unwrap();
            let mut body = Vec::new();
            while let Some(mut chunk) = stream.recv_data().await.unwrap() {
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    body.extend_from_slice(c);
                    let n = c.len();
                    chunk.advance(n);
                }
            }
            let trailers = stream.recv_trailers().await.unwrap();
            H3Resp {
                status: resp.status(),
                headers: resp.headers().clone(),
                body,
                trailers,
            }
        })
        .await
        .expect("HTTP/3 request timed out")
    }

    async fn get(&mut self, host_name: &str, path: &str, headers: &[(&str, &str)]) -> H3Resp {
        let mut b = http::Request::get(format!("https://{host_name}{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.request(b.body(()).unwrap(), None).await
    }
}

#[tokio::test]
async fn http3_requests_reach_the_mesh_with_the_same_routing_and_policy() {
    let env = env().await;
    let mut c = connect(&env, BILLING_IP).await;
    // Several requests on one QUIC connection, each its own stream.
    for i in 0..5 {
        let r = c.get(&host("reviews"), &format!("/books/{i}?x=1"), &[]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(j["service"], "reviews");
        assert_eq!(j["path"], format!("/books/{i}"));
        assert_eq!(j["query"], "x=1");
        assert_eq!(j["peer_principal"], "spiffe://cluster.local/ns/meshgate/sa/meshgate");
        // The client's source address is the one meshgate saw over QUIC.
        assert_eq!(j["headers"]["x-forwarded-for"][0], BILLING_IP, "{j}");
        assert_eq!(j["headers"]["x-forwarded-proto"][0], "https", "{j}");
        assert!(j["headers"]["x-request-id"][0].is_string());
    }
    // A 1 MiB upload arrives whole upstream.
    let body = Bytes::from((0..1024 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let req = http::Request::post(format!("https://{}/upload", host("reviews")))
        .header("content-type", "application/octet-stream")
        .body(())
        .unwrap();
    let r = c.request(req, Some(body.clone())).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_bytes"], 1024 * 1024);
    assert_eq!(r.json()["body_sha256"], hex::encode(sha2::Sha256::digest(&body)));

    // Default deny, exactly as on the HTTP listener: billing may not call details.
    let r = c.get(&host("details"), "/", &[]).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // An unknown host: 404 with a reason, nothing sent to the mesh.
    let r = c.get("example.com", "/", &[]).await;
    assert_eq!(r.status, 404);
    // CONNECT is for the HTTP listener; over HTTP/3 it is refused plainly, not half-opened.
    let connect = http::Request::connect(format!("{}:9080", host("reviews")))
        .body(())
        .unwrap();
    let r = c.request(connect, None).await;
    assert_eq!(r.status, 501);
    assert!(String::from_utf8_lossy(&r.body).contains("CONNECT over HTTP/3 is not supported"));
}

#[tokio::test]
async fn api_keys_work_as_headers_over_http3() {
    let env = env().await;
    let mut c = connect(&env, STRANGER_IP).await;
    let r = c.get(&host("details"), "/", &[]).await;
    assert_eq!(r.status, 403, "an unknown source without a key is refused");
    let r = c.get(&host("details"), "/", &[("x-meshgate-key", LAPTOP_KEY)]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["headers"].get("x-meshgate-key").is_none(),
        "the key never reaches the mesh"
    );
    // Response headers come back over HTTP/3 as sent by the app.
    assert!(r
        .headers
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("application/json")));
    let r = c.get(&host("details"), "/", &[("x-meshgate-key", "wrong")]).await;
    assert_eq!(r.status, 401, "a wrong key is refused like on the HTTP listener");
    // Counted on the h3 listener like any other.
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    let counted = |code: &str| {
        metrics.lines().any(|l| {
            l.starts_with("meshgate_requests_total{")
                && l.contains("listener=\"quic\"")
                && l.contains(&format!("code=\"{code}\""))
        })
    };
    assert!(counted("200") && counted("401") && counted("403"), "{metrics}");
}

#[tokio::test]
async fn the_http_listener_advertises_http3_with_alt_svc() {
    let env = env().await;
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("alt-svc").unwrap(), "h3=\":8443\"; ma=3600");
    // Refusals carry it too: a client learns of HTTP/3 from any answer.
    let r = env.get(STRANGER_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 403);
    assert!(r.headers.get("alt-svc").is_some());
}

#[tokio::test]
async fn a_drain_closes_the_http3_listener() {
    let env = env_with("drain:\n  delay: 10ms\n  spread: 10ms\n  timeout: 60s\n").await;
    let mut c = connect(&env, BILLING_IP).await;
    assert_eq!(c.get(&host("reviews"), "/", &[]).await.status, 200);
    // The idle connection gets a GOAWAY and is closed once nothing is in flight: the drain
    // does not sit out its 60 s timeout (keep-alives would keep the connection up that long).
    tokio::time::timeout(std::time::Duration::from_secs(20), env.gate.app.drain())
        .await
        .expect("drain finished long before its timeout");
    // The listener is gone: a new QUIC connection is refused (or times out), never served.
    let again = try_connect(&env, BILLING_IP, std::time::Duration::from_secs(3)).await;
    assert!(again.is_err(), "a drained h3 listener accepted a connection");
}

#[tokio::test]
async fn grpc_over_http3_carries_messages_and_trailers() {
    let env = env().await;
    let mut c = connect(&env, BILLING_IP).await;
    let mut framed = vec![0u8];
    framed.extend_from_slice(&5u32.to_be_bytes());
    framed.extend_from_slice(b"hello");
    let req = http::Request::post(format!("https://{}/echo.Echo/Say", host("reviews")))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let r = c.request(req, Some(Bytes::from(framed.clone()))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, framed, "the echo returns the message as sent");
    let trailers = r.trailers.expect("gRPC status arrives in HTTP/3 trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
}

#[tokio::test]
async fn idle_http3_connections_are_closed() {
    let env = env_with("limits:\n  idle_timeout: 1s\n").await;
    let mut c = connect(&env, BILLING_IP).await;
    let req = http::Request::get(format!("https://{}/", host("reviews")))
        .body(())
        .unwrap();
    assert_eq!(c.request(req, None).await.status, 200);
    // Nothing in flight: the server closes the connection, whatever the client's QUIC pings.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), &mut c.driver).await;
    assert!(ended.is_ok(), "an idle HTTP/3 connection was held open");
}
