//! gRPC-JSON transcoding end to end (issue #8): REST/JSON from a VM becomes a gRPC call to
//! meshsim's bookstore (`tests/meshsim/proto/bookstore.proto`) through the gateway and the
//! sidecar, and the answer comes back as JSON; native gRPC to the same service passes through.

use bytes::Bytes;
use e2e::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use meshsim::{MeshSpec, PodSpec, ServiceSpec};
use prost::Message as _;

fn bookstore_host() -> String {
    host("bookstore")
}

async fn start() -> Env {
    start_with(EnvBuilder::default()).await
}

async fn start_with(builder: EnvBuilder) -> Env {
    let spec = MeshSpec::new().service(
        ServiceSpec::new("bookstore", "bookinfo", 9090, "bookstore")
            .bookstore()
            .pod(PodSpec::new("bookstore-a")),
    );
    let body = format!(
        "services:\n  bookstore:\n    host: {}\n    port: 9090\n    protocol: http2\n    transcode:\n      descriptor_set: bookstore.pb\n      services: [bookstore.Bookstore]\ntenants:\n  billing-vms:\n    sources: [127.20.0.0/16]\n    allow: [bookstore]\n",
        bookstore_host()
    );
    builder
        .mesh(spec)
        .services_and_tenants(&body)
        .admin()
        .extra("reload:\n  watch: false\n")
        .files(|_, dir| Ok(std::fs::write(dir.join("bookstore.pb"), bookstore_descriptor_set())?))
        .start()
        .await
        .unwrap()
}

/// One REST request over HTTP/1.1 from a billing VM.
async fn rest(env: &Env, method: Method, path: &str, body: &str) -> Resp {
    let mut c = env.h1(BILLING_IP).await.unwrap();
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", bookstore_host());
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    c.send(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap()
}

fn content_type(r: &Resp) -> &str {
    r.headers.get("content-type").map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn rest_call_binds_path_query_and_body() {
    let env = start().await;
    // Path (shelf), query (request_tag, nested and repeated options.labels) and body (book).
    let r = rest(
        &env,
        Method::POST,
        "/v1/shelves/7/books?request_tag=vm-1&options.labels=new&options.labels=paperback",
        r#"{"title": "Dune Messiah", "author": "Frank Herbert", "genre": "FICTION", "details": {"pages": 256}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(content_type(&r), "application/json");
    let book = r.json();
    let id = book["id"].as_str().expect("int64 as a JSON string");
    assert_eq!(book["name"], format!("shelves/7/books/{id}"));
    assert_eq!(book["title"], "Dune Messiah");
    assert_eq!(book["genre"], "FICTION");
    assert_eq!(book["details"], serde_json::json!({ "pages": 256 }));
    assert_eq!(book["tags"], serde_json::json!(["request:vm-1", "new", "paperback"]));
    // The call reached the app as gRPC: its trailer metadata comes back as a header.
    assert_eq!(r.headers["x-bookstore-method"], "CreateBook");
    assert_eq!(r.headers["server"], "istio-envoy");
    // The app was told meshgate's deadline: what was left of the 20 s request timeout.
    let t = r.headers["x-bookstore-grpc-timeout"].to_str().unwrap();
    let ms: u64 = t.strip_suffix('m').and_then(|n| n.parse().ok()).expect(t);
    assert!((10_000..=20_000).contains(&ms), "grpc-timeout {t}");

    // A multi-segment path variable, and the same method under an additional binding.
    for path in ["/v1/shelves/1/books/1", "/v2/shelves/1/books/1"] {
        let r = rest(&env, Method::GET, path, "").await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(
            r.json(),
            serde_json::json!({
                "id": "1", "name": "shelves/1/books/1", "title": "Dune", "author": "Frank Herbert",
                "tags": ["classic"], "genre": "FICTION", "details": { "pages": 412, "isbn": "978-0-0001" },
            })
        );
    }

    // Client streaming: NDJSON in, one message per line.
    let r = rest(
        &env,
        Method::POST,
        "/v1/shelves/3/books:batchCreate",
        "{\"book\": {\"title\": \"A\"}}\n{\"book\": {\"title\": \"B\"}, \"options\": {\"validateOnly\": true}}\n",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["count"], 2);
    assert_eq!(v["names"][1], "shelves/3/books/0");
}

#[tokio::test]
async fn grpc_errors_map_to_http_statuses_with_json() {
    let env = start().await;
    let cases = [
        (
            Method::DELETE,
            "/v1/shelves/1/books/99",
            "",
            404,
            5,
            "book shelves/1/books/99 not found",
        ),
        (
            Method::GET,
            "/v1/shelves/1/books/99",
            "",
            404,
            5,
            "book \"shelves/1/books/99\" not found",
        ),
        (
            Method::POST,
            "/v1/shelves/1/books",
            r#"{"author": "nobody"}"#,
            400,
            3,
            "book.title is required",
        ),
        (Method::GET, "/v1/shelves/2/books", "", 404, 5, "shelf 2 not found"),
    ];
    for (m, path, body, status, code, message) in cases {
        let r = rest(&env, m.clone(), path, body).await;
        assert_eq!(r.status.as_u16(), status, "{m} {path}: {}", r.text());
        assert_eq!(content_type(&r), "application/json");
        assert_eq!(
            r.json(),
            serde_json::json!({ "code": code, "message": message }),
            "{m} {path}"
        );
    }
    let r = rest(&env, Method::DELETE, "/v1/shelves/1/books/2", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({}));
}

#[tokio::test]
async fn server_streaming_is_ndjson_sent_as_messages_arrive() {
    let env = start().await;
    let tcp = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Frank Herbert's fiction over 400 pages (nested and repeated query parameters); the
    // server waits 500 ms between messages.
    let req = Request::get("/v1/shelves/1/books?author=Frank%20Herbert&genres=FICTION&genres=SCIENCE&min_details.pages=400&interval_ms=500")
        .header("host", bookstore_host())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    let mut chunks: Vec<Bytes> = Vec::new();
    while let Some(f) = tokio::time::timeout(CLIENT_TIMEOUT, body.frame()).await.unwrap() {
        if let Ok(d) = f.unwrap().into_data() {
            chunks.push(d);
        }
    }
    // The first book arrived on its own, before the server sent the second: not buffered.
    assert_eq!(chunks[0].iter().filter(|b| **b == b'\n').count(), 1, "{chunks:?}");
    let all: Vec<u8> = chunks.concat();
    let lines: Vec<serde_json::Value> = all
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let titles: Vec<&str> = lines.iter().map(|l| l["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["Dune", "Children of Dune"]);
    assert_eq!(lines[1]["id"], "4");
}

#[tokio::test]
async fn server_stream_with_no_message_is_an_empty_200() {
    let env = start().await;
    // No book matches: the app answers trailers-only with grpc-status 0, as grpc-go does for a
    // server stream that returns without sending.
    let r = rest(&env, Method::GET, "/v1/shelves/1/books?author=Nobody", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(content_type(&r), "application/x-ndjson");
    assert_eq!(r.text(), "");
    // The trailers-only metadata still comes back (and the gRPC status fields do not).
    assert_eq!(r.headers["x-bookstore-method"], "ListBooks");
    assert!(!r.headers.contains_key("grpc-status"));
}

#[tokio::test]
async fn bad_requests_are_400_before_reaching_the_mesh() {
    let env = start().await;
    let cases = [
        (
            Method::POST,
            "/v1/shelves/1/books",
            "{\"title\": ",
            "invalid JSON for bookstore.CreateBookRequest",
        ),
        (Method::POST, "/v1/shelves/1/books", "{\"title\": 5}", "invalid JSON"),
        (
            Method::POST,
            "/v1/shelves/x/books",
            "{}",
            "path variable shelf: \"x\" is not a 64-bit integer",
        ),
        (
            Method::GET,
            "/v1/shelves/1/books?genres=POETRY",
            "",
            "genres: \"POETRY\" is not a value of bookstore.Genre",
        ),
        (
            Method::GET,
            "/v1/shelves/1/books?colour=red",
            "",
            "query parameter colour",
        ),
        // A query parameter cannot override the body (body: "book") ...
        (
            Method::POST,
            "/v1/shelves/1/books?book.title=Other",
            "{\"title\": \"Dune\"}",
            "query parameter book.title: field book is set by the request body",
        ),
        // ... and with body: "*" there are no query parameters at all.
        (
            Method::POST,
            "/v1/shelves/1/books:batchCreate?request_tag=x",
            "{\"book\": {\"title\": \"A\"}}\n",
            "so it takes no query parameters",
        ),
    ];
    for (m, path, body, why) in cases {
        let r = rest(&env, m.clone(), path, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{m} {path}: {}", r.text());
        assert_eq!(content_type(&r), "application/json");
        let v = r.json();
        assert_eq!(v["code"], 3);
        let msg = v["message"].as_str().unwrap();
        assert!(msg.starts_with("meshgate: ") && msg.contains(why), "{m} {path}: {msg}");
        assert!(!r.text().trim_end().contains('\n'));
    }
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}

#[tokio::test]
async fn native_grpc_and_unmatched_requests_pass_through() {
    let env = start().await;
    // Native gRPC to the transcoded service: untouched, binary in and out.
    let tcp = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = Request::post(format!("http://{}/bookstore.Bookstore/GetBook", bookstore_host()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    let msg = meshsim::bookstore::GetBookRequest {
        name: "shelves/1/books/3".into(),
    };
    stream.send_data(meshsim::bookstore::frame(&msg), true).unwrap();
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, resp).await.unwrap().unwrap();
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
        data.extend_from_slice(&d);
    }
    assert_eq!(body.trailers().await.unwrap().unwrap()["grpc-status"], "0");
    let book = meshsim::bookstore::Book::decode(&data[5..]).unwrap();
    assert_eq!(book.title, "The Guns of August");

    // A REST path no binding matches goes to the app as it came (here the HTTP echo).
    let r = rest(&env, Method::GET, "/healthz?probe=1", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let echo = r.json();
    assert_eq!(echo["path"], "/healthz");
    assert_eq!(echo["query"], "probe=1");
}

#[tokio::test]
async fn reload_with_a_bad_descriptor_set_keeps_the_running_config() {
    let env = start().await;
    std::fs::write(env.dir.path().join("bookstore.pb"), b"not a descriptor set").unwrap();
    let (st, body) = admin_request(env.admin_addr(), Method::POST, "/reload").await.unwrap();
    assert_ne!(st, StatusCode::OK);
    assert!(body.contains("not a valid descriptor set"), "{body}");
    let r = rest(&env, Method::GET, "/v1/shelves/1/books/2", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["title"], "A Brief History of Time");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start_with(
        EnvBuilder::default()
            .upstream("upstream:\n  connect_timeout: 2s\n  handshake_timeout: 5s\n  request_timeout: 1s\n"),
    )
    .await;
    let mut tcp = connect_from(env.addr(), BILLING_IP.parse().unwrap()).await.unwrap();
    // 100 bytes announced, 9 sent.
    let head = format!(
        "POST /v1/shelves/1/books HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"title\":",
        bookstore_host()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(CLIENT_TIMEOUT, tcp.read_to_end(&mut out))
        .await
        .expect("meshgate answers and closes")
        .unwrap();
    let out = String::from_utf8_lossy(&out).to_lowercase();
    assert!(out.starts_with("http/1.1 408 "), "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert!(out.contains("meshgate: request body not received in time"), "{out}");
    assert_eq!(env.mesh.stats().pods_total(|p| p.app_requests), 0);
}
