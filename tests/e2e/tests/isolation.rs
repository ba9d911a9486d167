//! Tenant isolation (issue #19): what one client does, hostile or careless, does not reach
//! another tenant, the mesh or the fleet. Real sockets, bounded counts and waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use e2e::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `meshgate_denied_total{listener, reason}` as scraped.
fn denied(env: &Env, reason: &str) -> u64 {
    let needle = format!("reason=\"{reason}\"}} ");
    env.gate
        .app
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with("meshgate_denied_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Reads until the peer closes (bounded): the bytes read.
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut out)).await.ok()?.ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_partial_preface_sockets_from_one_address_do_not_lock_tenants_out() {
    // Connection slots for 600: without a per-source cap, 2000 sockets from one machine in no
    // tenant would hold them all.
    let env = EnvBuilder::default()
        .extra("limits:\n  max_connections: 600\n")
        .start()
        .await
        .unwrap();
    let load = Load::start(env.addr(), BILLING_IP, &host("reviews"), "/", 4);
    load.wait_for_more(20).await;
    let attacker: std::net::IpAddr = "127.66.0.1".parse().unwrap();
    let mut held = Vec::new();
    for i in 0..2000 {
        let Ok(mut s) = connect_from(env.addr(), attacker).await else {
            continue;
        };
        if i % 2 == 1 {
            // Half of them start the HTTP/2 preface and stop.
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n").await;
        }
        held.push(s);
    }
    // The tenant keeps being served while they are held.
    load.wait_for_more(200).await;
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{:?}", &failures[..failures.len().min(5)]);
    assert!(ok >= 220);
    // The attacker got at most its cap; the rest were closed at once, and counted.
    let refused = denied(&env, "source_connection_limit");
    assert!(refused >= 2000 - 256, "only {refused} refused");
    // New clients of the tenant still get in, on fresh connections.
    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    drop(held);
}

#[tokio::test]
async fn silent_sockets_from_many_addresses_evict_each_other_not_clients() {
    let env = EnvBuilder::default()
        .extra("limits:\n  max_preface_connections: 50\n  header_read_timeout: 30s\n")
        .start()
        .await
        .unwrap();
    let mut silent = Vec::new();
    for i in 0..200u32 {
        let src = format!("127.67.{}.{}", i / 200, 1 + i % 200);
        silent.push(connect_from(env.addr(), src.parse().unwrap()).await.unwrap());
    }
    // Clients that talk are served: their head arrives long before 50 newer sockets do.
    for _ in 0..20 {
        let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The oldest silent sockets were closed to make room (well before their 30 s deadline).
    let first = read_until_closed(&mut silent[0], Duration::from_secs(10)).await;
    assert_eq!(first, Some(Vec::new()), "the oldest silent socket is still open");
    assert!(denied(&env, "preface_limit") >= 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_one_tenant_do_not_stall_another() {
    let env = EnvBuilder::default()
        .upstream("upstream:\n  body_idle_timeout: 3s\n")
        .start()
        .await
        .unwrap();
    // Tenant A: 24 clients ask for 200 MB each (more than any socket buffers) and then stop
    // reading.
    let mut slow = Vec::new();
    for i in 0..24 {
        let src = format!("127.20.1.{}", i + 1);
        let mut s = connect_from(env.addr(), src.parse().unwrap()).await.unwrap();
        s.write_all(format!("GET /?bytes=200000000 HTTP/1.1\r\nHost: {}\r\n\r\n", host("reviews")).as_bytes())
            .await
            .unwrap();
        let mut head = [0u8; 512];
        let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert!(
            head[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head[..n])
        );
        slow.push(s);
    }
    // Tenant B (the laptops, by key) gets whole 1 MB responses from the same service, over the
    // same pooled upstream connections.
    let mut c = Client::connect(env.addr(), STRANGER_IP.parse().unwrap(), false)
        .await
        .unwrap();
    for _ in 0..3 {
        let req = Request::get("/?bytes=1000000")
            .header("host", host("reviews"))
            .header("x-meshgate-key", LAPTOP_KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = tokio::time::timeout(CLIENT_TIMEOUT, c.send(req))
            .await
            .expect("tenant B's response stalled behind tenant A's slow readers")
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 1_000_000);
    }
    // The slow readers' responses have made no progress for longer than body_idle_timeout by
    // now: cut, not held. (Reading one before its cut would let it run again, hence the wait.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    for s in slow.iter_mut().take(3) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        let closed = tokio::time::timeout(CLIENT_TIMEOUT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(n) if total + n > 100_000_000 => return false,
                    Ok(n) => total += n,
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(
            closed,
            "a stalled response was never cut ({total} bytes read after the stall)"
        );
    }
}

/// Sends `raw` on a fresh connection and reads until the server closes it (bounded).
async fn exchange_raw(env: &Env, raw: &[u8]) -> String {
    let mut s = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    s.write_all(raw).await.unwrap();
    let out = read_until_closed(&mut s, CLIENT_TIMEOUT)
        .await
        .expect("the connection was not closed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn one_framing_decision_for_every_smuggling_shape() {
    let env = Env::start().await.unwrap();
    let h = host("reviews");
    let responses = |text: &str| text.matches("HTTP/1.1 ").count();

    // A bare LF in the trailer section: 400 at once, the connection closed; the request after
    // it (itself carrying Content-Length with Transfer-Encoding) is never read as a request.
    let text = exchange_raw(
        &env,
        format!(
            "POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\r\n\
             POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("bare LF in the trailer section"), "{text}");
    assert_eq!(responses(&text), 1, "{text}");

    // A transfer coding other than chunked: 501, closed.
    let text = exchange_raw(
        &env,
        format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: {h}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");
    assert_eq!(responses(&text), 1, "{text}");
    for te in ["chunked, chunked", "foo, chunked", ",chunked"] {
        let text = exchange_raw(
            &env,
            format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(
            text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.1 501"),
            "{te}: {text}"
        );
        assert_eq!(responses(&text), 1, "{te}: {text}");
    }

    // An absurd chunk size: 400 at once, without waiting for data that will never come.
    let text = exchange_raw(
        &env,
        format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n").as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    // Pipelined requests: one response each, in order.
    let text = exchange_raw(
        &env,
        format!(
            "GET /a HTTP/1.1\r\nHost: {h}\r\n\r\nPOST /b HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\n\r\nabc\
             GET /c HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(responses(&text), 3, "{text}");
    let (a, b, c) = (
        text.find("\"path\":\"/a\"").unwrap(),
        text.find("\"path\":\"/b\"").unwrap(),
        text.find("\"path\":\"/c\"").unwrap(),
    );
    assert!(a < b && b < c, "{text}");
}

#[tokio::test]
async fn the_mesh_sees_the_canonical_host_and_no_client_controls() {
    let env = Env::start().await.unwrap();
    let r = env
        .get(
            BILLING_IP,
            "REVIEWS.bookinfo.svc.cluster.local.:31337",
            "/",
            &[
                ("x-envoy-retry-on", "5xx"),
                ("x-envoy-upstream-rq-timeout-ms", "1"),
                ("x-envoy-original-path", "/admin"),
                ("connection", "upgrade, http2-settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["host"], format!("{}:9080", host("reviews")));
    let headers = j["headers"].to_string();
    assert!(!headers.contains("x-envoy-"), "{headers}");
    assert!(
        !headers.contains("h2c") && !headers.contains("http2-settings"),
        "{headers}"
    );
}

/// A raw h2c connection (the `h2` crate, so a test controls windows and reads) from the
/// billing subnet: the request handle and the connection's driver.
async fn raw_h2c(env: &Env, connection_window: u32) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_connection_window_size(connection_window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send.ready().await.unwrap(), driver)
}

/// GET `path` from the reviews service on `send`: the 200 response's body.
async fn h2_get(send: &mut h2::client::SendRequest<Bytes>, path: &str) -> h2::RecvStream {
    let req = Request::get(format!("http://{}{path}", host("reviews")))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body()
}

/// Reads `body` to its end, giving the window back as it goes: the bytes read.
async fn h2_read_all(body: &mut h2::RecvStream) -> usize {
    let mut got = 0;
    while let Some(d) = tokio::time::timeout(CLIENT_TIMEOUT, body.data()).await.unwrap() {
        let d = d.expect("the response ended with an error");
        got += d.len();
        let _ = body.flow_control().release_capacity(d.len());
    }
    got
}

#[tokio::test]
async fn idle_h2c_connections_are_closed() {
    let env = EnvBuilder::default()
        .extra("limits:\n  idle_timeout: 1s\n")
        .start()
        .await
        .unwrap();
    let (mut send, driver) = raw_h2c(&env, 65_535).await;
    h2_read_all(&mut h2_get(&mut send, "/").await).await;
    // Nothing in flight: the server ends the connection (GOAWAY, then close), pings or not.
    let ended = tokio::time::timeout(Duration::from_secs(20), driver).await;
    assert!(ended.is_ok(), "an idle h2c connection was held open");
}

/// An h2c client that stops reading one response: the stream is cut after
/// `body_idle_timeout`, while its connection goes on serving other streams. The connection had
/// no streaming body before, so its task sweeps only because the first one woke it.
#[tokio::test]
async fn a_stalled_h2c_response_is_cut_and_its_connection_serves_on() {
    let env = EnvBuilder::default()
        .upstream("upstream:\n  body_idle_timeout: 2s\n")
        .start()
        .await
        .unwrap();
    // A large connection window, so the stalled stream's unread bytes hold only its own window.
    let (mut send, _driver) = raw_h2c(&env, 64 << 20).await;
    let mut stalled = h2_get(&mut send, "/?bytes=200000000").await;
    // Nothing read (so no window given back) for twice the timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut send = send.ready().await.unwrap();
    let got = h2_read_all(&mut h2_get(&mut send, "/?bytes=100000").await).await;
    assert_eq!(got, 100_000, "the connection stopped serving after one stream stalled");
    // The stalled stream: what it had buffered, then its reset, not the other 200 MB.
    let mut total = 0usize;
    let cut = tokio::time::timeout(CLIENT_TIMEOUT, async {
        while let Some(d) = stalled.data().await {
            match d {
                Ok(d) => {
                    total += d.len();
                    let _ = stalled.flow_control().release_capacity(d.len());
                    if total > 100_000_000 {
                        return false;
                    }
                }
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(
        cut,
        "a stalled h2c response was never cut ({total} bytes read after the stall)"
    );
}

/// A drain asks an h2c client to go with GOAWAY: the stream it has in flight finishes whole,
/// a new stream is refused, and the connection then ends, all well before `drain.timeout`.
#[tokio::test]
async fn a_drain_sends_h2c_clients_goaway_and_lets_their_streams_finish() {
    let env = EnvBuilder::default()
        .extra("drain:\n  delay: 1ms\n  spread: 1s\n  timeout: 30s\n")
        .start()
        .await
        .unwrap();
    let (mut send, driver) = raw_h2c(&env, 65_535).await;
    // 1 MB: more than the stream's window, so it is still in flight when the drain starts.
    let mut body = h2_get(&mut send, "/?bytes=1000000").await;
    let app = env.gate.app.clone();
    let drain = tokio::spawn(async move { app.drain().await });
    // Past the spread: the GOAWAY has been sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h2_read_all(&mut body).await,
        1_000_000,
        "the stream in flight was cut short"
    );
    let refused = match send.ready().await {
        Err(_) => true,
        Ok(mut s) => {
            let req = Request::get(format!("http://{}/", host("reviews"))).body(()).unwrap();
            match s.send_request(req, true) {
                Err(_) => true,
                Ok((r, _)) => tokio::time::timeout(CLIENT_TIMEOUT, r).await.unwrap().is_err(),
            }
        }
    };
    assert!(refused, "a new stream was served after the GOAWAY");
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "the drained h2c connection was held open");
    tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn http3_handshakes_that_never_finish_do_not_block_tcp_clients() {
    let env = EnvBuilder::default()
        .extra("limits:\n  max_connections: 100\n  max_preface_connections: 64\n")
        .files(|ca, dir| {
            let mut opts = meshsim::IssueOptions::workload(ca.trust_domain(), "vms", "meshgate");
            opts.dns_names = vec!["meshgate.vms.test".into()];
            let c = ca.issue_with(&opts)?;
            std::fs::write(dir.join("h3-cert.pem"), c.chain_pem)?;
            std::fs::write(dir.join("h3-key.pem"), c.key_pem)?;
            Ok(())
        })
        .listener("  - name: quic\n    bind: 127.0.0.1:0\n    protocol: h3\n    tls:\n      cert_chain: h3-cert.pem\n      key: h3-key.pem\n")
        .start()
        .await
        .unwrap();
    let quic = env.gate.addr("quic").unwrap();
    // 150 real QUIC clients whose handshakes can never finish: each talks through a relay that
    // forwards its packets to meshgate and drops everything meshgate answers (counting Retry
    // packets on the way).
    let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    let mut clients = Vec::new();
    for _ in 0..150 {
        let relay = tokio::net::UdpSocket::bind("127.68.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let retries = retries.clone();
        flood.spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = relay.recv_from(&mut buf).await {
                if from == quic {
                    // QUIC v1 long header: form and fixed bits set, type 3 is Retry.
                    if n > 0 && buf[0] & 0xc0 == 0xc0 && (buf[0] >> 4) & 0x03 == 3 {
                        retries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                } else {
                    let _ = relay.send_to(&buf[..n], quic).await;
                }
            }
        });
        clients.push(start_handshake(relay_addr));
    }
    // TCP clients are served meanwhile: the handshakes took no connection slot.
    let load = Load::start(env.addr(), BILLING_IP, &host("reviews"), "/", 4);
    load.wait_for_more(100).await;
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{:?}", &failures[..failures.len().min(5)]);
    assert!(ok >= 100);
    // Under that load the listener asked for address validation, which a client that cannot
    // receive (a spoofed source) never passes.
    eventually(Duration::from_secs(10), "a Retry under a handshake flood", || {
        let r = retries.clone();
        async move { r.load(std::sync::atomic::Ordering::SeqCst) > 0 }
    })
    .await;
    flood.abort_all();
    drop(clients);
}

/// A QUIC client starting a handshake to `to`, abandoned when dropped.
fn start_handshake(to: SocketAddr) -> tokio::task::JoinHandle<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let connecting = endpoint.connect(to, "meshgate.vms.test").unwrap();
    tokio::spawn(async move {
        let _endpoint = endpoint;
        let _ = tokio::time::timeout(Duration::from_secs(30), connecting).await;
    })
}

#[tokio::test]
async fn a_chunk_size_past_the_body_limit_is_refused_at_once() {
    let env = EnvBuilder::default()
        .extra("limits:\n  max_request_body: 1000\n")
        .start()
        .await
        .unwrap();
    // 64 KiB declared, nothing sent: the answer comes at once, not after waiting for the data.
    let text = exchange_raw(
        &env,
        format!(
            "POST / HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n",
            host("reviews")
        )
        .as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("beyond limits.max_request_body"), "{text}");
}
