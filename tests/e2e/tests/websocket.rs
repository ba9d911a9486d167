//! WebSocket through meshgate (issue #8): the HTTP/1.1 Upgrade handshake reaches an http1
//! service, and HTTP/2 extended CONNECT (RFC 8441) an http2 service; then frames flow both ways
//! over the mesh until the close handshake.

use e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A masked client frame (RFC 6455 §5.2).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one unmasked server frame: (opcode, payload).
async fn server_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tokio::time::timeout(CLIENT_TIMEOUT, s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => s.read_u16().await.unwrap() as usize,
        127 => s.read_u64().await.unwrap() as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x0f, payload)
}

async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed inside the response head: {head:?}");
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

fn handshake(service: &str) -> String {
    // The key and accept value are RFC 6455's own example.
    format!(
        "GET /chat HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        host(service)
    )
}

#[tokio::test]
async fn websocket_echo_through_the_mesh() {
    let env = Env::start().await.unwrap();
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    s.write_all(handshake("ratings").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    for (opcode, msg) in [
        (0x1, b"hello mesh".to_vec()),
        (0x2, vec![7u8; 1000]),
        (0x1, b"again".to_vec()),
    ] {
        s.write_all(&client_frame(opcode, &msg)).await.unwrap();
        assert_eq!(server_frame(&mut s).await, (opcode, msg));
    }
    // Ping → pong; then the close handshake ends the connection.
    s.write_all(&client_frame(0x9, b"p")).await.unwrap();
    assert_eq!(server_frame(&mut s).await, (0xA, b"p".to_vec()));
    s.write_all(&client_frame(0x8, &1000u16.to_be_bytes())).await.unwrap();
    assert_eq!(server_frame(&mut s).await.0, 0x8);
    let mut rest = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn upgrades_follow_tenant_rules_and_need_an_http1_service() {
    let env = Env::start().await.unwrap();
    // Not a tenant: refused before anything reaches the mesh.
    let before = env.mesh.stats().pods_total(|p| p.app_requests);
    let mut s = connect_from(env.addr(), STRANGER_IP.parse().unwrap()).await.unwrap();
    s.write_all(handshake("ratings").as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 403"));
    // reviews is an HTTP/2 service: an HTTP/1.1 upgrade cannot be carried there.
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    s.write_all(handshake("reviews").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), before);
}

/// An h2c connection to meshgate from `src` and an RFC 8441 extended CONNECT for a WebSocket.
async fn extended_connect(
    env: &Env,
    src: &str,
    service: &str,
) -> (http::StatusCode, http::HeaderMap, Option<hyper::upgrade::Upgraded>) {
    let tcp = connect_from(env.addr(), src.parse().unwrap()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{}/chat", host(service)))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let mut resp = tokio::time::timeout(CLIENT_TIMEOUT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let upgraded = if status == 200 {
        Some(hyper::upgrade::on(&mut resp).await.unwrap())
    } else {
        None
    };
    (status, headers, upgraded)
}

#[tokio::test]
async fn websocket_over_http2_extended_connect_to_an_http2_service() {
    let env = Env::start().await.unwrap();
    // reviews is an http2 service: the extended CONNECT goes to its sidecar as one.
    let (status, headers, upgraded) = extended_connect(&env, BILLING_IP, "reviews").await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(
        headers.get("x-peer-principal").unwrap(),
        "spiffe://cluster.local/ns/meshgate/sa/meshgate"
    );
    let mut s = hyper_util::rt::TokioIo::new(upgraded.unwrap());
    for (opcode, msg) in [(0x1, b"over h2".to_vec()), (0x2, vec![9u8; 3000])] {
        s.write_all(&client_frame(opcode, &msg)).await.unwrap();
        assert_eq!(server_frame(&mut s).await, (opcode, msg));
    }
    s.write_all(&client_frame(0x8, &1000u16.to_be_bytes())).await.unwrap();
    assert_eq!(server_frame(&mut s).await.0, 0x8);
}

#[tokio::test]
async fn extended_connect_follows_tenant_rules_and_needs_an_http2_service() {
    let env = Env::start().await.unwrap();
    let before = env.mesh.stats().pods_total(|p| p.app_requests);
    let (status, _, _) = extended_connect(&env, STRANGER_IP, "reviews").await;
    assert_eq!(status, 403);
    // ratings is an http1 service: HTTP/1.1 clients reach it with an Upgrade instead.
    let (status, _, _) = extended_connect(&env, BILLING_IP, "ratings").await;
    assert_eq!(status, 400);
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), before);
}
