//! PROXY protocol from a trusted load balancer (127.0.0.9 stands in for the NLB): the header's
//! source is the client for policy, logs and X-Forwarded-For; untrusted peers cannot spoof it;
//! only the first header counts; LOCAL keeps the peer; VPC endpoint TLVs reach policy.

use bytes::Bytes;
use e2e::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshgate::proxy_protocol::encode_v2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LB: &str = "127.0.0.9";

async fn env(mode: &str) -> Env {
    let body = default_services_and_tenants().replace(
        "tenants:\n",
        "tenants:\n  privatelink:\n    sources: [127.40.0.0/16]\n    vpce: [vpce-0abc]\n    allow: [\"*\"]\n",
    );
    let listeners = format!("    proxy_protocol: {mode}\n    trusted_proxies: [{LB}/32]\n");
    EnvBuilder::default()
        .services_and_tenants(&body)
        .listener_extra(&listeners)
        .start()
        .await
        .unwrap()
}

/// Sends `prefix` (PROXY header bytes) then one HTTP/1.1 GET, from `src`.
async fn get_with_prefix(env: &Env, src: &str, prefix: &[u8], host: &str) -> anyhow::Result<(u16, String)> {
    let mut s = connect_from(env.addr(), src.parse()?).await?;
    s.write_all(prefix).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let req = Request::get("/").header("host", host).body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn v2_header_from_the_lb_names_the_client() {
    let env = env("optional").await;
    let hdr = encode_v2(Some(format!("{BILLING_IP}:40000").parse().unwrap()), env.addr(), None);
    let (status, body) = get_with_prefix(&env, LB, &hdr, &host("reviews")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-for"][0], BILLING_IP);
    // The same LB connection naming a stranger is refused as that stranger.
    let hdr = encode_v2(Some(format!("{STRANGER_IP}:40000").parse().unwrap()), env.addr(), None);
    let (status, _) = get_with_prefix(&env, LB, &hdr, &host("reviews")).await.unwrap();
    assert_eq!(status, 403);
}

#[tokio::test]
async fn v1_header_from_the_lb_names_the_client() {
    let env = env("optional").await;
    let hdr = format!("PROXY TCP4 {BILLING_IP} 10.0.0.1 40000 8080\r\n");
    let (status, body) = get_with_prefix(&env, LB, hdr.as_bytes(), &host("ratings"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn optional_mode_accepts_plain_connections_from_the_lb() {
    let env = env("optional").await;
    // No header: the LB's own address is the client, which is in no tenant.
    let (status, _) = get_with_prefix(&env, LB, b"", &host("reviews")).await.unwrap();
    assert_eq!(status, 403);
}

#[tokio::test]
async fn untrusted_peers_cannot_spoof_a_client_address() {
    let env = env("optional").await;
    // A stranger claims to be a billing VM: the header is not read from untrusted peers, so it is
    // just a malformed HTTP request.
    let hdr = encode_v2(Some(format!("{BILLING_IP}:40000").parse().unwrap()), env.addr(), None);
    let r = get_with_prefix(&env, STRANGER_IP, &hdr, &host("reviews")).await;
    assert!(
        matches!(&r, Ok((400, _))),
        "spoofed header was believed or not refused: {r:?}"
    );
    let hdr = format!("PROXY TCP4 {BILLING_IP} 10.0.0.1 40000 8080\r\n");
    let r = get_with_prefix(&env, STRANGER_IP, hdr.as_bytes(), &host("reviews")).await;
    assert!(matches!(&r, Ok((400, _))), "{r:?}");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn only_the_first_header_counts() {
    let env = env("optional").await;
    // The NLB prepends its header (naming a stranger) and passes the client's own forged one.
    let mut bytes = encode_v2(Some(format!("{STRANGER_IP}:40000").parse().unwrap()), env.addr(), None);
    bytes.extend_from_slice(format!("PROXY TCP4 {BILLING_IP} 10.0.0.1 40000 8080\r\n").as_bytes());
    let r = get_with_prefix(&env, LB, &bytes, &host("reviews")).await;
    assert!(
        matches!(&r, Ok((400, _))),
        "second header was believed or not refused: {r:?}"
    );
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn local_command_keeps_the_peer_address() {
    let env = env("required").await;
    let local = encode_v2(None, env.addr(), None);
    let (status, _) = get_with_prefix(&env, LB, &local, &host("reviews")).await.unwrap();
    assert_eq!(status, 403, "LOCAL must not adopt any client address");
}

#[tokio::test]
async fn required_mode_closes_lb_connections_without_a_header() {
    let env = env("required").await;
    let mut s = connect_from(env.addr(), LB.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("reviews")).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "expected the connection closed without a response: {}",
        String::from_utf8_lossy(&buf)
    );
    // Clients that are not the LB connect directly and need no header.
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn vpce_tlv_selects_the_privatelink_tenant() {
    let env = env("required").await;
    let src = "127.40.1.1:5000".parse().unwrap();
    let through = encode_v2(Some(src), env.addr(), Some("vpce-0abc"));
    let (status, body) = get_with_prefix(&env, LB, &through, &host("details")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let other = encode_v2(Some(src), env.addr(), Some("vpce-9999"));
    let (status, _) = get_with_prefix(&env, LB, &other, &host("details")).await.unwrap();
    assert_eq!(status, 403);
}

#[tokio::test]
async fn lb_health_checks_with_a_proxy_header_reach_the_admin_readyz() {
    // An NLB with proxy protocol v2 puts a header on its health checks too, even to the admin
    // port: /readyz must answer them, and still answer Prometheus or an operator without one.
    let listeners = format!("    proxy_protocol: required\n    trusted_proxies: [{LB}/32]\n");
    let env = EnvBuilder::default()
        .listener_extra(&listeners)
        .admin()
        .start()
        .await
        .unwrap();
    let admin = env.admin_addr();
    for (src, prefix) in [
        (LB, encode_v2(None, admin, None)),
        (LB, encode_v2(Some("127.20.0.5:40000".parse().unwrap()), admin, None)),
        (LB, Vec::new()),
        ("127.0.0.1", Vec::new()),
    ] {
        let mut s = connect_from(admin, src.parse().unwrap()).await.unwrap();
        s.write_all(&prefix).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "{src} with {} header bytes: {out}",
            prefix.len()
        );
        assert!(out.ends_with("ready\n"), "{out}");
    }
    // A peer outside trusted_proxies sending a header gets no special treatment: it is not HTTP.
    let mut s = connect_from(admin, "127.0.0.1".parse().unwrap()).await.unwrap();
    s.write_all(&encode_v2(None, admin, None)).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}
