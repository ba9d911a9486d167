//! Transcoding end to end in memory: REST requests to gRPC messages and back, for every
//! binding shape of the test library service. One file: the cases share one descriptor set.

use std::path::Path;

use prost_reflect::{DescriptorPool, SerializeOptions};

use super::*;

fn descriptor_set() -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = protox::Compiler::new([
        root.join("src/transcode/testdata"),
        root.join("../third_party/googleapis"),
    ])
    .unwrap();
    c.include_imports(true);
    c.open_file("library.proto").unwrap();
    c.encode_file_descriptor_set()
}

fn library() -> Transcoder {
    Transcoder::load(&descriptor_set(), &["library.v1.Library"]).unwrap()
}

fn uri(s: &str) -> Uri {
    s.parse().unwrap()
}

/// Which method a request reaches.
fn routed(t: &Transcoder, method: Method, u: &str) -> Option<String> {
    let u = uri(u);
    t.route(&method, &u).map(|c| c.method_name().to_string())
}

/// The request message a REST request becomes, as canonical JSON (proto names, defaults kept
/// out), or the 400 reason.
fn request_json(t: &Transcoder, method: Method, u: &str, body: &str) -> Result<serde_json::Value, String> {
    let u = uri(u);
    let call = t.route(&method, &u).expect("routed");
    let framed = call.encode(body.as_bytes())?;
    let desc = call.binding.method.input();
    let mut msgs = Vec::new();
    let mut rest = &framed[..];
    while !rest.is_empty() {
        assert_eq!(rest[0], 0, "uncompressed");
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let m = DynamicMessage::decode(desc.clone(), &rest[5..5 + len]).unwrap();
        msgs.push(
            m.serialize_with_options(
                serde_json::value::Serializer,
                &SerializeOptions::new().use_proto_field_name(true),
            )
            .unwrap(),
        );
        rest = &rest[5 + len..];
    }
    Ok(if call.binding.method.is_client_streaming() {
        serde_json::Value::Array(msgs)
    } else {
        assert_eq!(msgs.len(), 1);
        msgs.pop().unwrap()
    })
}

#[test]
fn routes_by_method_path_and_specificity() {
    let t = library();
    assert_eq!(
        routed(&t, Method::GET, "/v1/shelves/7").as_deref(),
        Some("library.v1.Library.GetShelf")
    );
    assert_eq!(
        routed(&t, Method::GET, "/v1/shelves/special").as_deref(),
        Some("library.v1.Library.GetSpecialShelf"),
        "a literal segment beats a variable"
    );
    assert_eq!(
        routed(&t, Method::GET, "/v1/themes/sf/shelves/7?x=1").as_deref(),
        Some("library.v1.Library.GetShelf"),
        "additional binding"
    );
    assert_eq!(
        routed(&t, Method::PATCH, "/v1/shelves/1/books/2").as_deref(),
        Some("library.v1.Library.UpdateBook")
    );
    assert_eq!(
        routed(&t, Method::from_bytes(b"ARCHIVE").unwrap(), "/v1/shelves/7").as_deref(),
        Some("library.v1.Library.Archive")
    );
    assert_eq!(
        routed(&t, Method::POST, "/v1/books:search").as_deref(),
        Some("library.v1.Library.Search")
    );
    // No binding: passes through untouched.
    assert_eq!(routed(&t, Method::POST, "/v1/shelves/7"), None);
    assert_eq!(routed(&t, Method::GET, "/v1/books"), None);
    assert_eq!(routed(&t, Method::POST, "/library.v1.Library/GetShelf"), None);
    let u = uri("/v1/shelves/7");
    assert_eq!(
        t.route(&Method::GET, &u).unwrap().grpc_path(),
        "/library.v1.Library/GetShelf"
    );
}

#[test]
fn path_and_query_bind_fields() {
    let t = library();
    let v = request_json(
        &t,
        Method::GET,
        "/v1/shelves/7?with_books=true&filter.pages.min=100&filter.author=Le%20Guin&tags=a&tags=b+c\
         &token=aGk&format=EBOOK&since=2024-01-02T03:04:05Z&pageSize=20",
        "",
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "shelf_id": "7",
            "with_books": true,
            "filter": { "pages": { "min": 100 }, "author": "Le Guin" },
            "tags": ["a", "b c"],
            "token": "aGk=",
            "format": "EBOOK",
            "since": "2024-01-02T03:04:05Z",
            "page_size": 20,
        })
    );
    // Enum by number; additional binding with two variables.
    let v = request_json(&t, Method::GET, "/v1/themes/sci-fi/shelves/3?format=1", "").unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "shelf_id": "3", "theme": "sci-fi", "format": "PAPER" })
    );
    // The path wins over the query for the same field.
    let v = request_json(&t, Method::GET, "/v1/shelves/3?shelf_id=9", "").unwrap();
    assert_eq!(v, serde_json::json!({ "shelf_id": "3" }));
}

#[test]
fn body_bindings() {
    let t = library();
    // body: "book" with a nested path variable inside the body field; query for the rest.
    let v = request_json(
        &t,
        Method::PATCH,
        "/v1/shelves/1/books/2?allow_missing=true",
        r#"{"title": "Dune", "isbn": "9780441013593", "format": "PAPER", "name": "ignored"}"#,
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "book": { "name": "shelves/1/books/2", "title": "Dune", "isbn": "9780441013593", "format": "PAPER" },
            "allow_missing": true,
        })
    );
    // body: "*" takes the whole message, JSON names and proto names alike.
    let v = request_json(&t, Method::POST, "/v1/books:search", r#"{"query": "dune", "limit": 5}"#).unwrap();
    assert_eq!(v, serde_json::json!({ "query": "dune", "limit": 5 }));
    // Client streaming: one message per NDJSON line, path variables applied to each.
    let v = request_json(
        &t,
        Method::POST,
        "/v1/shelves/s1:import",
        "{\"title\": \"A\"}\n\n{\"title\": \"B\", \"isbn\": 2}\n",
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!([{ "name": "s1", "title": "A" }, { "name": "s1", "title": "B", "isbn": "2" }])
    );
}

/// google.api.http: query parameters bind only the fields the body does not cover, and with
/// `body: "*"` there are none ("it is not possible to have HTTP parameters"). A parameter that
/// names a body field would otherwise silently override (or be silently dropped): a 400.
#[test]
fn query_parameters_cannot_set_body_fields() {
    let t = library();
    let book = r#"{"title": "Dune"}"#;
    for u in [
        "/v1/shelves/1/books/2?book.title=x",
        "/v1/shelves/1/books/2?allow_missing=true&book.isbn=7",
        "/v1/shelves/1/books/2?book=x",
        // The body field by its JSON name, and a field that is also a path variable.
        "/v1/shelves/1/books/2?book.format=EBOOK",
        "/v1/shelves/1/books/2?book.name=shelves/9/books/9",
    ] {
        let e = request_json(&t, Method::PATCH, u, book).unwrap_err();
        assert!(
            e.starts_with("query parameter book") && e.contains("field book is set by the request body"),
            "{u}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // Without a body too: the field is the body's whether or not one was sent.
        assert!(request_json(&t, Method::PATCH, u, "").is_err(), "{u}");
    }
    // Fields outside the body still come from the query.
    let v = request_json(&t, Method::PATCH, "/v1/shelves/1/books/2?allow_missing=1", book).unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "book": { "name": "shelves/1/books/2", "title": "Dune" }, "allow_missing": true })
    );
    // body: "*": no query parameters at all, for unary and client-streaming methods alike.
    for (u, body) in [
        ("/v1/books:search?limit=99", r#"{"query": "dune", "limit": 5}"#),
        ("/v1/books:search?query=x", "{}"),
        ("/v1/shelves/s1:import?title=x", "{\"title\": \"A\"}\n"),
        ("/v1/shelves/s1:import?name=s2", ""),
    ] {
        let e = request_json(&t, Method::POST, u, body).unwrap_err();
        assert!(e.contains("so it takes no query parameters"), "{u}: {e}");
        assert!(e.starts_with("query parameter "), "{u}: {e}");
    }
}

#[test]
fn unconvertible_requests_are_one_line_reasons() {
    let t = library();
    let cases = [
        (
            Method::PATCH,
            "/v1/shelves/1/books/2",
            "{\"title\": ",
            "invalid JSON for library.v1.UpdateBookRequest",
        ),
        (
            Method::PATCH,
            "/v1/shelves/1/books/2",
            "{\"titel\": \"x\"}",
            "unrecognized field name 'titel'",
        ),
        (
            Method::PATCH,
            "/v1/shelves/1/books/2",
            "{\"isbn\": \"x1\"}",
            "invalid JSON",
        ),
        (
            Method::POST,
            "/v1/books:search",
            "{\"limit\": 1} trailing",
            "invalid JSON",
        ),
        (
            Method::GET,
            "/v1/shelves/x",
            "",
            "path variable shelf_id: \"x\" is not a 64-bit integer",
        ),
        (
            Method::GET,
            "/v1/shelves/1?nope=1",
            "",
            "query parameter nope: library.v1.GetShelfRequest has no field \"nope\"",
        ),
        (
            Method::GET,
            "/v1/shelves/1?with_books=maybe",
            "",
            "with_books: \"maybe\" is not true or false",
        ),
        (
            Method::GET,
            "/v1/shelves/1?format=VINYL",
            "",
            "is not a value of library.v1.Format",
        ),
        (Method::GET, "/v1/shelves/1?labels=a", "", "map"),
        (Method::GET, "/v1/shelves/1?tags.x=a", "", "tags is not a message field"),
        (Method::GET, "/v1/shelves/1", "{}", "takes no request body"),
        (
            Method::POST,
            "/v1/shelves/s:import",
            "{}\n{\"bad\": 1}\n",
            "line 2: invalid JSON",
        ),
    ];
    for (m, u, body, want) in cases {
        let e = request_json(&t, m.clone(), u, body).unwrap_err();
        assert!(e.contains(want), "{m} {u} {body:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn load_errors_name_the_problem() {
    let set = descriptor_set();
    let e = Transcoder::load(&set, &["library.v1.Library", "library.v1.Nope"]).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].service, Some(1));
    assert!(
        e[0].message
            .contains("\"library.v1.Nope\" is not in the descriptor set"),
        "{}",
        e[0].message
    );
    assert!(
        e[0].message.contains("library.v1.Library, library.v1.Unannotated"),
        "{}",
        e[0].message
    );
    let e = Transcoder::load(&set, &["library.v1.Unannotated"]).unwrap_err();
    assert!(e[0].message.contains("no google.api.http bindings"), "{}", e[0].message);
    // Every bad service is reported, not only the first: an earlier service's error does not
    // hide a later one's lack of bindings.
    for services in [
        ["library.v1.Nope", "library.v1.Unannotated"],
        ["library.v1.Unannotated", "library.v1.Unannotated"],
    ] {
        let e = Transcoder::load(&set, &services).unwrap_err();
        assert_eq!(e.len(), 2, "{services:?}: {e:?}");
        assert_eq!(e[0].service, Some(0));
        assert_eq!(e[1].service, Some(1));
        assert!(e[1].message.contains("no google.api.http bindings"), "{}", e[1].message);
    }
    let e = Transcoder::load(b"not a descriptor set", &["x.Y"]).unwrap_err();
    assert_eq!(e[0].service, None);
    assert!(e[0].message.contains("not a valid descriptor set"), "{}", e[0].message);
    assert!(Transcoder::load(&set, &[]).is_err());

    // A descriptor set without its imports is refused as such.
    let mut c = protox::Compiler::new([
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transcode/testdata"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../third_party/googleapis"),
    ])
    .unwrap();
    c.open_file("library.proto").unwrap();
    let e = Transcoder::load(&c.encode_file_descriptor_set(), &["library.v1.Library"]).unwrap_err();
    assert!(e[0].message.contains("not a valid descriptor set"), "{}", e[0].message);
}

#[test]
fn invalid_bindings_are_load_errors() {
    // The test proto with its first binding rewritten, compiled and loaded.
    fn with_binding(from: &str, to: &str) -> Vec<LoadError> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("src/transcode/testdata/library.proto")).unwrap();
        assert!(text.contains(from), "{from}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("library.proto"), text.replacen(from, to, 1)).unwrap();
        let mut c = protox::Compiler::new([dir.path().to_owned(), root.join("../third_party/googleapis")]).unwrap();
        c.include_imports(true);
        c.open_file("library.proto").unwrap();
        Transcoder::load(&c.encode_file_descriptor_set(), &["library.v1.Library"]).unwrap_err()
    }
    let get = "get: \"/v1/shelves/{shelf_id}\"";
    let cases = [
        (
            get,
            "get: \"v1/x\"",
            "invalid path template \"v1/x\": must start with '/'",
        ),
        (
            get,
            "get: \"/v1/{nope}\"",
            "library.v1.GetShelfRequest has no field \"nope\"",
        ),
        (
            get,
            "get: \"/v1/{filter.pages}/{filter.author.x}\"",
            "author is not a message",
        ),
        (get, "get: \"/v1/x\" body: \"nope\"", "body \"nope\""),
        (get, "get: \"/v1/x\" response_body: \"nope\"", "response_body \"nope\""),
    ];
    for (from, to, want) in cases {
        let e = with_binding(from, to);
        assert_eq!(e[0].service, Some(0));
        assert!(
            e[0].message.starts_with("library.v1.Library.GetShelf: "),
            "{}",
            e[0].message
        );
        assert!(e[0].message.contains(want), "{want}: {}", e[0].message);
    }
}

#[test]
fn responses_to_json() {
    let pool = DescriptorPool::decode(descriptor_set().as_slice()).unwrap();
    let out = pool.get_message_by_name("library.v1.SearchResponse").unwrap();
    let mut msg = DynamicMessage::new(out.clone());
    msg.set_field_by_name("total", prost_reflect::Value::I32(1));
    let mut book = DynamicMessage::new(pool.get_message_by_name("library.v1.Book").unwrap());
    book.set_field_by_name("title", prost_reflect::Value::String("Dune".into()));
    book.set_field_by_name("isbn", prost_reflect::Value::I64(42));
    msg.set_field_by_name(
        "books",
        prost_reflect::Value::List(vec![prost_reflect::Value::Message(book)]),
    );
    let bytes = msg.encode_to_vec();
    let whole = message::message_to_json(&out, None, &bytes).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&whole).unwrap(),
        serde_json::json!({ "books": [{ "title": "Dune", "isbn": "42" }], "total": 1 })
    );
    let books = out.get_field_by_name("books").unwrap();
    let part = message::message_to_json(&out, Some(&books), &bytes).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&part).unwrap(),
        serde_json::json!([{ "title": "Dune", "isbn": "42" }])
    );
    let empty = message::message_to_json(&out, Some(&books), &[]).unwrap();
    assert_eq!(empty, b"[]");
    assert!(message::message_to_json(&out, None, &[0xff]).is_err());
}

#[test]
fn grpc_codes_map_to_http_statuses() {
    let cases = [
        (0, 200),
        (1, 499),
        (2, 500),
        (3, 400),
        (4, 504),
        (5, 404),
        (6, 409),
        (7, 403),
        (8, 429),
        (9, 400),
        (10, 409),
        (11, 400),
        (12, 501),
        (13, 500),
        (14, 503),
        (15, 500),
        (16, 401),
        (99, 500),
    ];
    for (code, status) in cases {
        assert_eq!(http_status(code).as_u16(), status, "code {code}");
    }
    assert_eq!(
        error_json(5, "book \"x\" not found"),
        "{\"code\":5,\"message\":\"book \\\"x\\\" not found\"}\n"
    );
}

/// A gRPC answer as meshgate receives it: `resp` served over a real HTTP/2 connection.
async fn upstream(resp: http::Response<http_body_util::Full<Bytes>>) -> http::Response<hyper::body::Incoming> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let resp = std::sync::Mutex::new(Some(resp));
    let svc = hyper::service::service_fn(move |_req| {
        let r = resp.lock().unwrap().take().expect("one request");
        async move { Ok::<_, std::convert::Infallible>(r) }
    });
    tokio::spawn(
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(server_io), svc),
    );
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://bookstore/x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap()
}

/// A trailers-only answer: headers with `grpc-status`, no body.
fn trailers_only(status: &str) -> http::Response<http_body_util::Full<Bytes>> {
    http::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", status)
        .header("grpc-message", "shelf%209%20not%20found")
        .header("x-app", "1")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn trailers_only_ok_ends_the_call() {
    use http_body_util::BodyExt as _;
    let t = library();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let respond = |u: &'static str, status: &'static str| {
        let t = &t;
        async move {
            let u = uri(u);
            let call = t.route(&Method::GET, &u).expect("routed");
            let r = super::respond(
                call,
                upstream(trailers_only(status))
                    .await
                    .map(crate::upstream::UpstreamBody::H1),
                deadline,
            )
            .await
            .unwrap_or_else(|r| panic!("passed through: {r:?}"));
            let (parts, body) = r.into_parts();
            (parts, body.collect().await.unwrap().to_bytes())
        }
    };
    // Server streaming with no message (grpc-go answers trailers-only): 200, empty NDJSON.
    let (parts, body) = respond("/v1/shelves/9/books", "0").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers[header::CONTENT_TYPE], "application/x-ndjson");
    assert_eq!(parts.headers["x-app"], "1");
    assert!(!parts.headers.contains_key("grpc-status"));
    assert_eq!(body, "");
    // Unary with no message: still an error, the one for a missing response message.
    let (parts, body) = respond("/v1/shelves/9", "0").await;
    assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], 13);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no response message for a unary call"),
        "{v}"
    );
    // A trailers-only failure keeps its status, for both kinds.
    for u in ["/v1/shelves/9/books", "/v1/shelves/9"] {
        let (parts, body) = respond(u, "5").await;
        assert_eq!(parts.status, StatusCode::NOT_FOUND, "{u}");
        assert_eq!(body, error_json(5, "shelf 9 not found"), "{u}");
    }
}
