//! Entry points for the fuzzers (`fuzz/`) and for the corpus replay test: each takes arbitrary
//! bytes and must never panic, whatever they are. Kept in the library so the fuzzers and the
//! normal test suite exercise exactly the same code.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The config parser and validator (identity files are resolved relative to a directory that
/// does not exist, so only the parsing and validation paths run).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let _ = crate::config::parse(Path::new("/nonexistent/fuzz/meshgate.yaml"), text, now);
    }
}

/// The PROXY protocol v1/v2 header parser.
pub fn proxy_header(data: &[u8]) {
    if let crate::proxy_protocol::Parsed::Header { len, .. } = crate::proxy_protocol::parse(data) {
        assert!(len <= data.len(), "header longer than its input");
    }
}

/// API-key extraction: each input line becomes a header value, alternately
/// `Proxy-Authorization` and the key header.
pub fn api_key(data: &[u8]) {
    let key_header = HeaderName::from_static("x-meshgate-key");
    let mut h = HeaderMap::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate().take(8) {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            let name = if i % 2 == 0 {
                http::header::PROXY_AUTHORIZATION
            } else {
                key_header.clone()
            };
            h.append(name, v);
        }
    }
    let _ = crate::policy::keys::presented_key(&h, &key_header);
}

/// Authority parsing and routing.
pub fn authority(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let table = crate::route::RouteTable::new([
            ("reviews.bookinfo.svc.cluster.local", 9080, 0),
            ("multi.ns.svc.cluster.local", 8080, 1),
            ("multi.ns.svc.cluster.local", 9090, 2),
        ]);
        if let Ok((host, _)) = crate::route::split_authority(s) {
            assert!(!host.is_empty());
        }
        let mut table = table;
        table.add_pattern("bookinfo.svc.cluster.local", &[9080], 3, false);
        if let Ok(crate::route::Route::Pattern { host, .. }) = table.resolve(s, |_| true) {
            // What a pattern yields becomes an SNI: it must be one.
            assert!(rustls::pki_types::ServerName::try_from(host).is_ok());
        }
    }
}

/// The HTTP/1.1 head parser and the chunked decoder on their own: never a panic, and what they
/// accept is consistent (a head never takes more bytes than it was given, a decoded body never
/// more than its input).
pub fn h1_head(data: &[u8]) {
    use crate::h1::chunked::ChunkedDecoder;
    use crate::h1::parse::{parse_head, HeadLimits};
    let limits = HeadLimits {
        max_head: 4096,
        max_headers: 32,
    };
    if let Ok(Some((_, n))) = parse_head(data, limits) {
        assert!(n <= data.len() && n <= limits.max_head);
    }
    let mut d = ChunkedDecoder::new(Some(1 << 20), 1024);
    let mut used = 0;
    while used < data.len() && !d.is_done() {
        match d.decode(&data[used..]) {
            Ok(step) => {
                if let Some(r) = &step.data {
                    assert!(r.end <= step.consumed);
                }
                if step.consumed == 0 {
                    break;
                }
                used += step.consumed;
            }
            Err(_) => break,
        }
    }
    assert!(d.total() <= used as u64);
}

/// Differential framing: the same bytes as a stream of HTTP/1.1 requests, framed by meshgate's
/// server (`h1_frames`) and by hyper's (an independent implementation). Every request meshgate
/// frames must be framed identically by hyper: same method, target and body, in the same order.
/// meshgate may refuse where hyper accepts (it is stricter on purpose: `Content-Length` with
/// `Transfer-Encoding`, codings other than `chunked`, bare LF in chunked framing), never the
/// other way round.
pub fn h1_framing(data: &[u8]) {
    let ours = h1_frames(data);
    let theirs = hyper_frames(data);
    for (i, m) in ours.iter().enumerate() {
        assert_eq!(theirs.get(i), Some(m), "request {i} framed differently (ours, hyper's)");
    }
}

/// One request as a framer saw it.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

/// The requests meshgate's HTTP/1.1 server frames from `data`, up to the first one it refuses,
/// the first incomplete one, or the last one the connection may carry.
pub fn h1_frames(data: &[u8]) -> Vec<Framed> {
    use crate::h1::chunked::ChunkedDecoder;
    use crate::h1::parse::{leading_blank_lines, parse_head, Framing, HeadLimits};
    let limits = HeadLimits {
        max_head: 16 * 1024,
        max_headers: 100,
    };
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        rest = &rest[leading_blank_lines(rest)..];
        let Ok(Some((head, n))) = parse_head(rest, limits) else {
            return out;
        };
        rest = &rest[n..];
        let body = match head.framing {
            Framing::None => Vec::new(),
            Framing::Length(len) => {
                let Ok(len) = usize::try_from(len) else { return out };
                if rest.len() < len {
                    return out;
                }
                let b = rest[..len].to_vec();
                rest = &rest[len..];
                b
            }
            Framing::Chunked => {
                let mut d = ChunkedDecoder::new(None, 16 * 1024);
                let mut body = Vec::new();
                let mut used = 0;
                while !d.is_done() {
                    match d.decode(&rest[used..]) {
                        Ok(step) => {
                            if let Some(r) = step.data {
                                body.extend_from_slice(&rest[used + r.start..used + r.end]);
                            }
                            if step.consumed == 0 {
                                return out;
                            }
                            used += step.consumed;
                        }
                        Err(_) => return out,
                    }
                }
                rest = &rest[used..];
                body
            }
        };
        let tunnel = head.method == http::Method::CONNECT || head.headers.contains_key(http::header::UPGRADE);
        out.push(Framed {
            method: head.method.to_string(),
            target: head.uri.to_string(),
            body,
        });
        // After these the bytes are not HTTP/1.1 requests any more (a tunnel), or not read.
        if tunnel || !head.keep_alive {
            return out;
        }
    }
}

/// The requests hyper's HTTP/1.1 server frames from `data` (body read to its end).
pub fn hyper_frames(data: &[u8]) -> Vec<Framed> {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<Framed>>> = Arc::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let input = data.to_vec();
    let seen2 = seen.clone();
    rt.block_on(async move {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(input.len() + 1024);
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let seen = seen2.clone();
            async move {
                let method = req.method().to_string();
                let target = req.uri().to_string();
                if let Ok(body) = req.into_body().collect().await {
                    seen.lock().expect("not poisoned").push(Framed {
                        method,
                        target,
                        body: body.to_bytes().to_vec(),
                    });
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .max_buf_size(16 * 1024)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        // The responses go nowhere: drain them so hyper never waits on a full pipe.
        let drain = async {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async { tokio::join!(conn, drain) }).await;
    });
    let v = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    v
}

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// The targets by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("proxy_header", proxy_header),
    ("api_key", api_key),
    ("authority", authority),
    ("h1_head", h1_head),
    ("h1_framing", h1_framing),
];
