//! gRPC end to end (issue #8): h2c in, h2 over mTLS out, messages streamed both ways as they
//! come, trailers carried, `grpc-timeout` honoured, and refusals in gRPC's own terms.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use e2e::*;
use http::{HeaderMap, Request};

/// A gRPC length-prefixed message (uncompressed).
fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

async fn client(env: &Env, src: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = connect_from(env.addr(), src.parse().unwrap()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap()
}

fn call(method: &str, meta: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::post(format!("http://{}/echo.Echo/{method}", host("reviews")))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in meta {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

/// Reads exactly `n` bytes of response data.
async fn read_n(body: &mut h2::RecvStream, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(CLIENT_TIMEOUT, body.data())
            .await
            .expect("no data")
            .expect("stream ended early")
            .unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        out.extend_from_slice(&chunk);
    }
    out
}

async fn trailers(body: &mut h2::RecvStream) -> HeaderMap {
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
    }
    body.trailers().await.unwrap().expect("no trailers")
}

#[tokio::test]
async fn unary_call_with_trailers() {
    let env = Env::start().await.unwrap();
    let mut c = client(&env, BILLING_IP).await;
    let (resp, mut send) = c.send_request(call("Unary", &[]), false).unwrap();
    let msg = frame(b"hello mesh");
    send.send_data(msg.clone(), true).unwrap();
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();
    assert_eq!(read_n(&mut body, msg.len()).await, msg);
    let t = trailers(&mut body).await;
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-echo-peer"], "spiffe://cluster.local/ns/meshgate/sa/meshgate");
}

#[tokio::test]
async fn bidirectional_stream_flows_message_by_message() {
    let env = Env::start().await.unwrap();
    let mut c = client(&env, BILLING_IP).await;
    let (resp, mut send) = c.send_request(call("Chat", &[("grpc-timeout", "20S")]), false).unwrap();
    let mut body: Option<h2::RecvStream> = None;
    let mut resp = Some(resp);
    // Each reply arrives before the next message is sent: nothing is buffered to the end.
    for i in 0..5 {
        let msg = frame(format!("message {i}").as_bytes());
        send.send_data(msg.clone(), false).unwrap();
        if let Some(r) = resp.take() {
            let r = tokio::time::timeout(CLIENT_TIMEOUT, r).await.unwrap().unwrap();
            assert_eq!(r.status(), 200);
            body = Some(r.into_body());
        }
        assert_eq!(read_n(body.as_mut().unwrap(), msg.len()).await, msg, "message {i}");
    }
    send.send_data(Bytes::new(), true).unwrap();
    let t = trailers(body.as_mut().unwrap()).await;
    assert_eq!(t["grpc-status"], "0");
}

#[tokio::test]
async fn server_status_in_trailers_reaches_the_client() {
    let env = Env::start().await.unwrap();
    let mut c = client(&env, BILLING_IP).await;
    let (resp, mut send) = c.send_request(call("Fail", &[("echo-status", "9")]), false).unwrap();
    send.send_data(frame(b"x"), true).unwrap();
    let mut body = tokio::time::timeout(CLIENT_TIMEOUT, resp)
        .await
        .unwrap()
        .unwrap()
        .into_body();
    let _ = read_n(&mut body, 6).await;
    assert_eq!(trailers(&mut body).await["grpc-status"], "9");
}

#[tokio::test]
async fn deadline_from_grpc_timeout_ends_the_call_with_deadline_exceeded() {
    let env = Env::start().await.unwrap();
    let mut c = client(&env, BILLING_IP).await;
    // The server would answer after 30 s, meshgate's request_timeout is 20 s; the client allows
    // 300 ms. (A bounded wait well between those, not a timing measurement.)
    let (resp, mut send) = c
        .send_request(
            call("Slow", &[("grpc-timeout", "300m"), ("echo-delay-ms", "30000")]),
            false,
        )
        .unwrap();
    send.send_data(frame(b"x"), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("meshgate did not apply the deadline")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4", "{:?}", resp.headers());
    assert!(resp.headers()["grpc-message"]
        .to_str()
        .unwrap()
        .contains("no response from upstream"));
}

#[tokio::test]
async fn refusals_are_grpc_statuses() {
    let env = Env::start().await.unwrap();
    // No tenant for this address: PERMISSION_DENIED; a bad key: UNAUTHENTICATED; an unknown
    // service: UNIMPLEMENTED. Always HTTP 200 with the status in the headers (trailers-only).
    let cases = [
        (
            STRANGER_IP,
            "reviews",
            vec![],
            "7",
            "client address is not in any tenant",
        ),
        (
            BILLING_IP,
            "reviews",
            vec![("x-meshgate-key", "wrong")],
            "16",
            "invalid API key",
        ),
        (BILLING_IP, "nope", vec![], "12", "unknown host"),
    ];
    for (src, svc, meta, code, msg) in cases {
        let mut c = client(&env, src).await;
        let mut req = call("Any", &meta);
        *req.uri_mut() = format!("http://{}/echo.Echo/Any", host(svc)).parse().unwrap();
        let (resp, mut send) = c.send_request(req, false).unwrap();
        send.send_data(frame(b"x"), true).unwrap();
        let resp = tokio::time::timeout(CLIENT_TIMEOUT, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "{svc} from {src}");
        assert_eq!(
            resp.headers()["grpc-status"],
            code,
            "{svc} from {src}: {:?}",
            resp.headers()
        );
        let m = resp.headers()["grpc-message"].to_str().unwrap();
        assert!(m.contains(msg), "{m}");
    }
}
