//! The bookstore gRPC app (`bookstore.Bookstore` of `tests/meshsim/proto/bookstore.proto`),
//! served by the echo app of services built with [`crate::ServiceSpec::bookstore`]. Its
//! messages are written by hand with prost's derive, from the .proto, not generated and not
//! shared with meshgate: the transcoder is checked against an independent reading.
//!
//! Shelf 1 holds four fixed books; other shelves are empty and do not exist. A call that ends
//! with no message (ListBooks matching nothing) is answered trailers-only. Created books get
//! fresh ids but are not stored (every pod answers the same). Unknown methods are
//! UNIMPLEMENTED. Each response carries trailer `x-bookstore-method` with the method called,
//! and header `x-bookstore-grpc-timeout` with the call's `grpc-timeout` when it had one.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt as _, Either};
use hyper::body::Incoming;
use prost::Message;

use crate::echo::EchoBody;

#[derive(Clone, PartialEq, Message)]
pub struct Details {
    #[prost(int32, tag = "1")]
    pub pages: i32,
    #[prost(string, tag = "2")]
    pub isbn: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Book {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub title: String,
    #[prost(string, tag = "4")]
    pub author: String,
    #[prost(string, repeated, tag = "5")]
    pub tags: Vec<String>,
    /// `bookstore.Genre`: 0 unspecified, 1 FICTION, 2 SCIENCE, 3 HISTORY.
    #[prost(int32, tag = "6")]
    pub genre: i32,
    #[prost(message, optional, tag = "7")]
    pub details: Option<Details>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GetBookRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct CreateOptions {
    #[prost(bool, tag = "1")]
    pub validate_only: bool,
    #[prost(string, repeated, tag = "2")]
    pub labels: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CreateBookRequest {
    #[prost(int64, tag = "1")]
    pub shelf: i64,
    #[prost(message, optional, tag = "2")]
    pub book: Option<Book>,
    #[prost(string, tag = "3")]
    pub request_tag: String,
    #[prost(message, optional, tag = "4")]
    pub options: Option<CreateOptions>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListBooksRequest {
    #[prost(int64, tag = "1")]
    pub shelf: i64,
    #[prost(string, tag = "2")]
    pub author: String,
    #[prost(int32, repeated, tag = "3")]
    pub genres: Vec<i32>,
    #[prost(message, optional, tag = "4")]
    pub min_details: Option<Details>,
    #[prost(int32, tag = "5")]
    pub interval_ms: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeleteBookRequest {
    #[prost(int64, tag = "1")]
    pub shelf: i64,
    #[prost(int64, tag = "2")]
    pub id: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeleteBookResponse {}

#[derive(Clone, PartialEq, Message)]
pub struct CreateBooksResponse {
    #[prost(int32, tag = "1")]
    pub count: i32,
    #[prost(string, repeated, tag = "2")]
    pub names: Vec<String>,
}

const NOT_FOUND: u32 = 5;
const INVALID_ARGUMENT: u32 = 3;
const UNIMPLEMENTED: u32 = 12;
/// Longest wait between streamed messages.
const MAX_INTERVAL: Duration = Duration::from_secs(5);
/// Largest request accepted (the app reads requests whole).
const MAX_REQUEST: usize = 4 << 20;

static NEXT_ID: AtomicI64 = AtomicI64::new(1000);

/// The books of shelf 1.
pub fn shelf_one() -> Vec<Book> {
    let book = |id: i64, title: &str, author: &str, genre: i32, pages: i32, tags: &[&str]| Book {
        id,
        name: format!("shelves/1/books/{id}"),
        title: title.into(),
        author: author.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        genre,
        details: Some(Details {
            pages,
            isbn: format!("978-0-{id:04}"),
        }),
    };
    vec![
        book(1, "Dune", "Frank Herbert", 1, 412, &["classic"]),
        book(2, "A Brief History of Time", "Stephen Hawking", 2, 256, &[]),
        book(3, "The Guns of August", "Barbara Tuchman", 3, 511, &["pulitzer"]),
        book(4, "Children of Dune", "Frank Herbert", 1, 444, &[]),
    ]
}

/// A gRPC length-prefixed message.
pub fn frame(msg: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// Splits a request body into messages of type `M`.
fn messages<M: Message + Default>(mut body: Bytes) -> Result<Vec<M>, String> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.len() < 5 {
            return Err("truncated message prefix".into());
        }
        if body[0] != 0 {
            return Err("compressed messages are not supported".into());
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.advance(5);
        if body.len() < len {
            return Err("truncated message".into());
        }
        out.push(M::decode(body.split_to(len)).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn one<M: Message + Default>(body: Bytes) -> Result<M, (u32, String)> {
    let mut m = messages::<M>(body).map_err(|e| (INVALID_ARGUMENT, e))?;
    if m.len() != 1 {
        return Err((
            INVALID_ARGUMENT,
            format!("expected one request message, got {}", m.len()),
        ));
    }
    Ok(m.pop().expect("one"))
}

/// Trailers of a call's end.
fn status_trailers(method: &str, code: u32, message: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        let enc: String = message
            .bytes()
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&enc) {
            t.insert("grpc-message", v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(method) {
        t.insert("x-bookstore-method", v);
    }
    t
}

/// Serves one call on `/bookstore.Bookstore/METHOD`, echoing its `grpc-timeout` (so tests see
/// the deadline the app was given).
pub(crate) async fn serve(req: Request<Incoming>) -> Response<EchoBody> {
    let timeout = req.headers().get("grpc-timeout").cloned();
    let mut resp = call(req).await;
    if let Some(t) = timeout {
        resp.headers_mut().insert("x-bookstore-grpc-timeout", t);
    }
    resp
}

async fn call(req: Request<Incoming>) -> Response<EchoBody> {
    let method = req
        .uri()
        .path()
        .strip_prefix("/bookstore.Bookstore/")
        .unwrap_or("")
        .to_string();
    let body = match tokio::time::timeout(Duration::from_secs(60), req.into_body().collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return respond(
                &method,
                Vec::new(),
                (INVALID_ARGUMENT, "request body not received".into()),
                None,
            )
        }
    };
    if body.len() > MAX_REQUEST {
        return respond(
            &method,
            Vec::new(),
            (INVALID_ARGUMENT, "request too large".into()),
            None,
        );
    }
    let ok = (0, String::new());
    match method.as_str() {
        "GetBook" => match one::<GetBookRequest>(body) {
            Ok(r) => match shelf_one().into_iter().find(|b| b.name == r.name) {
                Some(b) => respond(&method, vec![frame(&b)], ok, None),
                None => respond(
                    &method,
                    vec![],
                    (NOT_FOUND, format!("book {:?} not found", r.name)),
                    None,
                ),
            },
            Err(e) => respond(&method, vec![], e, None),
        },
        "CreateBook" => match one::<CreateBookRequest>(body).and_then(create) {
            Ok(b) => respond(&method, vec![frame(&b)], ok, None),
            Err(e) => respond(&method, vec![], e, None),
        },
        "CreateBooks" => match messages::<CreateBookRequest>(body) {
            Ok(reqs) => {
                let mut names = Vec::new();
                for r in reqs {
                    match create(r) {
                        Ok(b) => names.push(b.name),
                        Err(e) => return respond(&method, vec![], e, None),
                    }
                }
                let resp = CreateBooksResponse {
                    count: names.len() as i32,
                    names,
                };
                respond(&method, vec![frame(&resp)], ok, None)
            }
            Err(e) => respond(&method, vec![], (INVALID_ARGUMENT, e), None),
        },
        "DeleteBook" => match one::<DeleteBookRequest>(body) {
            Ok(r) if r.shelf == 1 && shelf_one().iter().any(|b| b.id == r.id) => {
                respond(&method, vec![frame(&DeleteBookResponse {})], ok, None)
            }
            Ok(r) => respond(
                &method,
                vec![],
                (NOT_FOUND, format!("book shelves/{}/books/{} not found", r.shelf, r.id)),
                None,
            ),
            Err(e) => respond(&method, vec![], e, None),
        },
        "ListBooks" => match one::<ListBooksRequest>(body) {
            Ok(r) if r.shelf != 1 => respond(
                &method,
                vec![],
                (NOT_FOUND, format!("shelf {} not found", r.shelf)),
                None,
            ),
            Ok(r) => {
                let min_pages = r.min_details.as_ref().map_or(0, |d| d.pages);
                let books: Vec<Bytes> = shelf_one()
                    .into_iter()
                    .filter(|b| r.author.is_empty() || b.author == r.author)
                    .filter(|b| r.genres.is_empty() || r.genres.contains(&b.genre))
                    .filter(|b| b.details.as_ref().map_or(0, |d| d.pages) >= min_pages)
                    .map(|b| frame(&b))
                    .collect();
                let interval = Duration::from_millis(r.interval_ms.max(0) as u64).min(MAX_INTERVAL);
                respond(&method, books, ok, Some(interval))
            }
            Err(e) => respond(&method, vec![], e, None),
        },
        _ => respond(
            &method,
            vec![],
            (UNIMPLEMENTED, format!("unknown method bookstore.Bookstore/{method}")),
            None,
        ),
    }
}

fn create(r: CreateBookRequest) -> Result<Book, (u32, String)> {
    let mut b = r.book.unwrap_or_default();
    if b.title.is_empty() {
        return Err((INVALID_ARGUMENT, "book.title is required".into()));
    }
    let opts = r.options.unwrap_or_default();
    b.id = if opts.validate_only {
        0
    } else {
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    };
    b.name = format!("shelves/{}/books/{}", r.shelf, b.id);
    if !r.request_tag.is_empty() {
        b.tags.push(format!("request:{}", r.request_tag));
    }
    b.tags.extend(opts.labels);
    Ok(b)
}

/// A gRPC response: `messages` (with `interval` between them, streamed from a task), then the
/// status in trailers; with no messages, trailers-only whatever the status, as gRPC servers
/// answer (grpc-go for a server stream that returns without sending: `grpc-status: 0` in the
/// headers and no body; ListBooks with a filter that matches nothing does that here).
fn respond(
    method: &str,
    messages: Vec<Bytes>,
    status: (u32, String),
    interval: Option<Duration>,
) -> Response<EchoBody> {
    let trailers = status_trailers(method, status.0, &status.1);
    if messages.is_empty() {
        let mut resp = Response::new(Either::Left(http_body_util::Full::new(Bytes::new())));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.extend(trailers);
        return resp;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for (i, m) in messages.into_iter().enumerate() {
            if i > 0 {
                if let Some(d) = interval {
                    tokio::time::sleep(d).await;
                }
            }
            if tx.send(Frame::data(m)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    let mut resp = Response::new(Either::Right(Either::Right(Either::Right(ChannelBody(rx)))));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// Frames from a task, so messages can be spaced in time.
#[derive(Debug)]
pub struct ChannelBody(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = crate::echo::EchoReset;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}
