//! Limits and request safety at the VM-facing edge: rate and concurrency limits per tenant,
//! shedding when a service is saturated, body/header/connection limits, slow clients, and
//! ambiguous framing. Each test counts what it sent and what came back.

use std::time::Duration;

use bytes::Bytes;
use e2e::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tenants_with(extra_billing: &str) -> String {
    default_services_and_tenants().replace(
        "    allow: [reviews, reviews-v2, ratings]\n",
        &format!("    allow: [reviews, reviews-v2, ratings]\n{extra_billing}"),
    )
}

/// Sends raw bytes from `src` and returns what the server wrote until it closed or went quiet.
async fn raw(env: &Env, src: &str, bytes: &[u8]) -> String {
    let mut s = connect_from(env.addr(), src.parse().unwrap()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 12 {
                    // Enough for a status line; a keep-alive response would otherwise wait.
                    let text = String::from_utf8_lossy(&out);
                    if text.contains("content-length: ") || text.contains("Content-Length: ") {
                        break;
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn tenant_rate_limit_gives_429_with_retry_after_and_spares_others() {
    let env = EnvBuilder::default()
        .services_and_tenants(&tenants_with("    rate_limit: {requests_per_second: 0.01, burst: 5}\n"))
        .start()
        .await
        .unwrap();
    let (mut ok, mut limited) = (0, 0);
    let mut c = env.h1(BILLING_IP).await.unwrap();
    for _ in 0..12 {
        let req = Request::get("/")
            .header("host", host("reviews"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(r.text(), "meshgate: rate limit exceeded for tenant\n");
                let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(ra >= 1);
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    eprintln!("sent 12: {ok} ok, {limited} rate-limited");
    // The burst passes; the refill (one token per 100 s) adds nothing within this test.
    assert_eq!((ok, limited), (5, 7));
    // Another tenant is unaffected.
    let r = env
        .get("127.99.0.1", &host("details"), "/", &[("x-meshgate-key", LAPTOP_KEY)])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn tenant_concurrency_limit_gives_429() {
    let env = EnvBuilder::default()
        .services_and_tenants(&tenants_with("    max_concurrent_requests: 2\n"))
        .start()
        .await
        .unwrap();
    let addr = env.addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        tasks.spawn(async move {
            let mut c = Client::connect(addr, format!("127.20.1.{}", i + 1).parse().unwrap(), false)
                .await
                .unwrap();
            let req = Request::get("/?delay_ms=4000")
                .header("host", host("reviews"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            c.send(req).await.unwrap().status.as_u16()
        });
    }
    let mut codes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        codes.push(r.unwrap());
    }
    codes.sort();
    eprintln!("sent 6 concurrent: {codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 4, "{codes:?}");
    // Slots come back: the next request passes.
    assert_eq!(
        env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn saturated_service_sheds_with_503_instead_of_queueing() {
    let env = EnvBuilder::default()
        .upstream(
            "upstream:\n  min_connections: 1\n  max_connections: 1\n  target_streams_per_connection: 1\n  max_streams_per_connection: 1\n  max_pending_requests: 1\n  request_timeout: 20s\n",
        )
        .start()
        .await
        .unwrap();
    let addr = env.addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        tasks.spawn(async move {
            let mut c = Client::connect(addr, format!("127.20.2.{}", i + 1).parse().unwrap(), false)
                .await
                .unwrap();
            let req = Request::get("/?delay_ms=1000")
                .header("host", host("reviews"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = c.send(req).await.unwrap();
            (r.status.as_u16(), r.text())
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.unwrap());
    }
    eprintln!(
        "sent 4 concurrent: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let shed: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(!shed.is_empty(), "{results:?}");
    assert!(
        shed.iter().all(|r| r.1.contains("too many requests waiting")),
        "{results:?}"
    );
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 503), "{results:?}");
}

#[tokio::test]
async fn request_body_limit_gives_413() {
    let env = EnvBuilder::default()
        .extra("limits:\n  max_request_body: 1024\n")
        .start()
        .await
        .unwrap();
    let mut c = env.h1(BILLING_IP).await.unwrap();
    let req = Request::post("/")
        .header("host", host("reviews"))
        .body(Full::new(Bytes::from(vec![7u8; 2048])))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    // Chunked, so the length is only known while streaming.
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        host("ratings")
    );
    let mut bytes = head.into_bytes();
    for _ in 0..4 {
        bytes.extend_from_slice(b"200\r\n");
        bytes.extend_from_slice(&[b'x'; 0x200]);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    let text = raw(&env, BILLING_IP, &bytes).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // Within the limit is fine.
    let req = Request::post("/")
        .header("host", host("reviews"))
        .body(Full::new(Bytes::from(vec![7u8; 1000])))
        .unwrap();
    let mut c = env.h1(BILLING_IP).await.unwrap();
    assert_eq!(c.send(req).await.unwrap().status, 200);
}

#[tokio::test]
async fn oversized_and_too_many_headers_are_refused() {
    let env = EnvBuilder::default()
        .extra("limits:\n  max_header_bytes: 16384\n  max_headers: 20\n")
        .start()
        .await
        .unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n",
        host("reviews"),
        "a".repeat(40_000)
    );
    let text = raw(&env, BILLING_IP, big.as_bytes()).await;
    // The promised status with its one-line reason, then a close: never a bare close.
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert!(text.contains("meshgate: "), "{text}");
    let mut many = format!("GET / HTTP/1.1\r\nHost: {}\r\n", host("reviews"));
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let text = raw(&env, BILLING_IP, many.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(text.contains("meshgate: "), "{text}");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn slow_header_senders_are_disconnected() {
    let env = EnvBuilder::default()
        .extra("limits:\n  header_read_timeout: 1s\n")
        .start()
        .await
        .unwrap();
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: rev").await.unwrap();
    // Part of a head arrived, so the answer is the promised 408 and a close; read to the end.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got))
        .await
        .expect("slowloris connection held open")
        .unwrap();
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("meshgate: "), "{text}");
    // Not before the configured timeout; the 15 s bound above is only a ceiling.
    assert!(
        waited >= Duration::from_millis(950),
        "answered after {waited:?}, before header_read_timeout"
    );
}

#[tokio::test]
async fn ambiguous_framing_is_rejected() {
    let env = Env::start().await.unwrap();
    let h = host("reviews");
    let cases = [
        format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.example\r\n\r\n"),
        format!("GET http://{} HTTP/1.1\r\nHost: {h}\r\n\r\n", host("details")),
        // Last: found only while streaming (see below).
        format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ];
    for (i, c) in cases.iter().enumerate() {
        let before = env.mesh.stats().pods_total(|p| p.app_requests);
        let text = raw(&env, BILLING_IP, c.as_bytes()).await;
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "case {i} was not refused with 400: {text}"
        );
        let reached = env.mesh.stats().pods_total(|p| p.app_requests) - before;
        // A bad chunk is only found while the body streams, after the headers went upstream: the
        // app then sees a request whose body is reset, never a complete one. The other cases are
        // refused before anything is forwarded.
        if i != cases.len() - 1 {
            assert_eq!(reached, 0, "case {i} reached the app");
        }
    }
}

#[tokio::test]
async fn connection_limit_closes_excess_connections() {
    let env = EnvBuilder::default()
        .extra("limits:\n  max_connections: 4\n")
        .start()
        .await
        .unwrap();
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(
            Client::connect(env.addr(), format!("127.20.3.{}", i + 1).parse().unwrap(), false)
                .await
                .unwrap(),
        );
    }
    // Make sure all four are accepted and counted before the fifth.
    for c in held.iter_mut() {
        let req = Request::get("/")
            .header("host", host("reviews"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(c.send(req).await.unwrap().status, 200);
    }
    let text = raw(
        &env,
        BILLING_IP,
        format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("reviews")).as_bytes(),
    )
    .await;
    assert!(text.is_empty(), "fifth connection was served: {text}");
    drop(held.pop());
    eventually(Duration::from_secs(10), "a slot to free up", || async {
        env.get(BILLING_IP, &host("reviews"), "/", &[])
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
}

#[tokio::test]
async fn content_length_with_chunked_is_refused_and_cannot_smuggle_a_request() {
    // A front end framing by Content-Length would take the bytes after the empty chunk as a
    // second request; meshgate refuses the ambiguous request with 400, closes, and the
    // "smuggled" bytes are never parsed. Both header orders, after a good keep-alive request.
    let env = Env::start().await.unwrap();
    let h = host("reviews");
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n");
    let first = format!("GET /good HTTP/1.1\r\nHost: {h}\r\n\r\n");
    let heads = [
        format!("Content-Length: {}\r\nTransfer-Encoding: chunked", 5 + smuggled.len()),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {}", 5 + smuggled.len()),
        // hyper never parses a Content-Length after Transfer-Encoding: an invalid one counts too.
        format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {0}, {0}",
            5 + smuggled.len()
        ),
    ];
    for framing in heads {
        let before = env.mesh.stats().pods_total(|p| p.app_requests);
        let req = format!("{first}POST /ambiguous HTTP/1.1\r\nHost: {h}\r\n{framing}\r\n\r\n0\r\n\r\n{smuggled}");
        let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(CLIENT_TIMEOUT, s.read_to_end(&mut out))
            .await
            .expect("connection not closed")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let second = &text[text.rfind("HTTP/1.1 ").unwrap()..];
        assert!(second.starts_with("HTTP/1.1 400"), "{second}");
        assert!(
            second.contains("meshgate: malformed request: both Content-Length and Transfer-Encoding"),
            "{second}"
        );
        assert!(!text.contains("/smuggled") && !text.contains("/ambiguous"), "{text}");
        assert_eq!(
            env.mesh.stats().pods_total(|p| p.app_requests) - before,
            1,
            "only the good request reached the app"
        );
    }
}

#[tokio::test]
async fn idempotent_requests_are_retried_once_on_a_reset_and_others_never() {
    let env = Env::start().await.unwrap();
    // The sidecar resets the stream (`reset=1`) after the request arrived.
    let before = env.mesh.stats().pods_total(|p| p.app_requests);
    let r = env.get(BILLING_IP, &host("reviews"), "/?reset=1", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let after_get = env.mesh.stats().pods_total(|p| p.app_requests);
    assert_eq!(
        after_get - before,
        2,
        "a GET without body is sent once more, and only once"
    );
    let mut c = env.h1(BILLING_IP).await.unwrap();
    let req = Request::post("/?reset=1")
        .header("host", host("reviews"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 502);
    eventually(Duration::from_secs(5), "the POST to be counted", || async {
        env.mesh.stats().pods_total(|p| p.app_requests) > after_get
    })
    .await;
    assert_eq!(
        env.mesh.stats().pods_total(|p| p.app_requests) - after_get,
        1,
        "a POST is never retried"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    // HTTP/1.1: `limits.idle_timeout` bounds the wait for the next request on a keep-alive
    // connection, so an idle client does not hold its slot.
    let env = EnvBuilder::default()
        .extra("limits:\n  idle_timeout: 1s\n")
        .start()
        .await
        .unwrap();
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host("reviews")).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the server closes (a bounded wait for its verdict, not a timing assertion).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "idle keep-alive connection held open");
}

#[tokio::test]
async fn http2_rapid_reset_closes_the_attacking_connection_only() {
    // CVE-2023-44487: open streams and reset them at once, as fast as possible, on one h2c
    // connection. The server must cut that connection instead of doing work for each stream.
    let env = Env::start().await.unwrap();
    let io = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let (mut client, conn) = h2::client::handshake(io).await.unwrap();
    let conn_task = tokio::spawn(conn);
    let mut sent = 0u64;
    let mut refused_at = None;
    for i in 0..5000u64 {
        let req = Request::get(format!("http://{}/?delay_ms=2000", host("reviews")))
            .body(())
            .unwrap();
        let ready = match tokio::time::timeout(CLIENT_TIMEOUT, client.clone().ready()).await {
            Ok(Ok(c)) => c,
            _ => {
                refused_at = Some(i);
                break;
            }
        };
        client = ready;
        match client.send_request(req, true) {
            Ok((_resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(_) => {
                refused_at = Some(i);
                break;
            }
        }
    }
    // The connection is torn down by the server (GOAWAY / error), within a bounded wait, while
    // the client still holds it open.
    let ended = tokio::time::timeout(Duration::from_secs(20), conn_task).await;
    let reached = env.mesh.stats().pods_total(|p| p.app_requests);
    eprintln!("rapid reset: {sent} streams opened and reset; refused at {refused_at:?}; connection: {ended:?}; {reached} reached the app");
    let result = ended.expect("the attacking connection was not closed").unwrap();
    let err = result.expect_err("the server closed the connection without an error code");
    // The server tore the connection down: h2's rapid-reset guard sends GOAWAY
    // ENHANCE_YOUR_CALM and closes, so the client sees that GOAWAY, or, when it was still
    // writing its resets, the closed socket. Any other error (a protocol error of the client's
    // own making, a different GOAWAY code) fails.
    let closed_by_server = err.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        )
    });
    assert!(
        (err.is_go_away() && err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)) || closed_by_server,
        "{err:?}"
    );
    drop(client);
    // Far fewer requests than resets did any work upstream.
    assert!(reached < sent / 2, "{reached} of {sent} reset streams reached the app");
    // Everyone else is served.
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
}
