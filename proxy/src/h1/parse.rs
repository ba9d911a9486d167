//! The request head of HTTP/1.1 (RFC 9112 §2-§3, §5, §6) and the one framing decision for the
//! body that follows it. Nothing else in meshgate decides where a request ends: the bytes after
//! a head are the body this module says they are, and then the next head.
//!
//! Strict where a lenient reading could disagree with another parser about message boundaries
//! (request smuggling): `Transfer-Encoding` other than exactly `chunked` (501 for a coding we do
//! not implement, 400 for a malformed list), `Transfer-Encoding` with `Content-Length` (400; RFC
//! 9112 §6.1 lets a server reject it, and no valid client sends both), `Transfer-Encoding` on
//! HTTP/1.0 (400, §6.1), a `Content-Length` that is not one run of digits, or several that
//! differ (400, §6.3), whitespace before a field's colon, folded lines, control characters
//! (httparse refuses them). Lenient only where it cannot move a boundary: empty lines before the
//! request line (§2.2) and a bare LF ending a head line (§2.2 allows it; httparse reads it).

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

/// How the body after a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length`, no `Transfer-Encoding`): the next byte starts a new request.
    None,
    Length(u64),
    Chunked,
}

/// A request head as read, with what the connection must know about it.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this one (RFC 9112 §9.3).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1: the client waits for `100 Continue` before its body.
    pub expect_continue: bool,
}

/// Why a head was refused; each maps to the status the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 431: the head is larger than `limits.max_header_bytes`.
    TooLarge,
    /// 431: more fields than `limits.max_headers`.
    TooManyHeaders,
    /// 400, with the reason.
    Malformed(&'static str),
    /// 501: a transfer coding meshgate does not implement.
    NotImplemented(&'static str),
    /// 505: a version other than HTTP/1.0 and HTTP/1.1.
    Version,
}

impl HeadError {
    pub fn status(self) -> http::StatusCode {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Malformed(_) => http::StatusCode::BAD_REQUEST,
            HeadError::NotImplemented(_) => http::StatusCode::NOT_IMPLEMENTED,
            HeadError::Version => http::StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            HeadError::TooLarge => "request head larger than limits.max_header_bytes",
            HeadError::TooManyHeaders => "more header fields than limits.max_headers",
            HeadError::Malformed(why) | HeadError::NotImplemented(why) => why,
            HeadError::Version => "only HTTP/1.0 and HTTP/1.1 are served on this port (and h2c with prior knowledge)",
        }
    }
}

/// The limits a head is read under.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_head: usize,
    pub max_headers: usize,
}

/// Header slots parsed on the stack; configs allowing more fields use the heap.
const STACK_HEADERS: usize = 128;

/// Bytes of blank lines at the start of `buf` (ignored before a request line, RFC 9112 §2.2).
pub fn leading_blank_lines(buf: &[u8]) -> usize {
    buf.iter().take_while(|b| **b == b'\r' || **b == b'\n').count()
}

/// Parses the request head at the start of `buf` (which must not start with blank lines).
/// `Ok(None)`: not complete yet, and still within the limits. On success, the head and the
/// number of bytes it took.
pub fn parse_head(buf: &[u8], limits: HeadLimits) -> Result<Option<(Head, usize)>, HeadError> {
    // Uninitialised slots on the stack: no per-request allocation, nothing to clear.
    let mut stack: [MaybeUninit<httparse::Header<'_>>; STACK_HEADERS] =
        [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap;
    let slots = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap = vec![MaybeUninit::uninit(); limits.max_headers];
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, slots) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(e) => return Err(HeadError::Malformed(parse_error(e))),
    };
    let len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            return if buf.len() > limits.max_head {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            }
        }
    };
    if len > limits.max_head {
        return Err(HeadError::TooLarge);
    }
    // One copy of the head; the URI and every value are slices of it, so the connection's read
    // buffer is free again as soon as this returns.
    let shared = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let slice = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        shared.slice(start..start + s.len())
    };
    let method = Method::from_bytes(req.method.expect("complete").as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let version = match req.version.expect("complete") {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = req.path.expect("complete");
    let uri = request_target(&method, slice(target.as_bytes()))?;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value =
            HeaderValue::from_maybe_shared(slice(h.value)).map_err(|_| HeadError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    let framing = framing(version, &headers)?;
    let keep_alive = keep_alive(version, &headers);
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some((
        Head {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
        },
        len,
    )))
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header field name (or whitespace before its colon)",
        httparse::Error::HeaderValue => "invalid header field value",
        httparse::Error::NewLine => "invalid line ending in the request head",
        httparse::Error::Status | httparse::Error::Token => "invalid request line",
        _ => "malformed request head",
    }
}

/// The request target as a URI: origin-form, absolute-form, authority-form (CONNECT only) or
/// `*` (OPTIONS only), RFC 9112 §3.2.
fn request_target(method: &Method, target: Bytes) -> Result<Uri, HeadError> {
    let bad = HeadError::Malformed("invalid request target");
    match target.first() {
        Some(b'/') => Uri::from_maybe_shared(target).map_err(|_| bad),
        Some(b'*') if target.len() == 1 && method == Method::OPTIONS => Ok(Uri::from_static("*")),
        Some(_) if method == Method::CONNECT => {
            let uri = Uri::from_maybe_shared(target).map_err(|_| bad)?;
            // authority-form only: host:port, nothing else.
            if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty() && p != "/") {
                return Err(bad);
            }
            Ok(uri)
        }
        Some(_) => {
            let uri = Uri::from_maybe_shared(target).map_err(|_| bad)?;
            match uri.scheme_str() {
                Some(s)
                    if (s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
                        && uri.authority().is_some() =>
                {
                    Ok(uri)
                }
                _ => Err(bad),
            }
        }
        None => Err(bad),
    }
}

/// RFC 9112 §6: the framing of a request body, refusing every ambiguous or unsupported form.
pub fn framing(version: Version, headers: &HeaderMap) -> Result<Framing, HeadError> {
    let te = headers.get_all(header::TRANSFER_ENCODING);
    if te.iter().next().is_some() {
        if version == Version::HTTP_10 {
            return Err(HeadError::Malformed("Transfer-Encoding on an HTTP/1.0 request"));
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(HeadError::Malformed(
                "both Content-Length and Transfer-Encoding (ambiguous framing)",
            ));
        }
        let mut codings = 0;
        let mut last_chunked = false;
        for v in te.iter() {
            for coding in v.as_bytes().split(|b| *b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    return Err(HeadError::Malformed("empty element in Transfer-Encoding"));
                }
                if last_chunked {
                    // chunked must be the last coding, and applied once (RFC 9112 §6.1).
                    return Err(HeadError::Malformed("Transfer-Encoding with a coding after chunked"));
                }
                codings += 1;
                last_chunked = coding.eq_ignore_ascii_case(b"chunked");
            }
        }
        if !last_chunked {
            return Err(HeadError::Malformed(
                "Transfer-Encoding whose final coding is not chunked",
            ));
        }
        if codings > 1 {
            return Err(HeadError::NotImplemented(
                "transfer codings other than chunked are not implemented",
            ));
        }
        return Ok(Framing::Chunked);
    }
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        // Repeated identical fields are one value; a comma list is refused (RFC 9110 §8.6 lets a
        // recipient take either way; hyper, a likely peer, refuses lists, so they are refused).
        let n = content_length(v.as_bytes().trim_ascii()).ok_or(HeadError::Malformed("invalid Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(HeadError::Malformed("several different Content-Length values"));
        }
        length = Some(n);
    }
    Ok(match length {
        None | Some(0) => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// `1*DIGIT`, at most 18 digits (so any sum of them fits a u64): no sign, no spaces, no hex.
fn content_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether the client lets the connection carry another request (RFC 9112 §9.3): HTTP/1.1
/// unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &[u8]| {
        headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    if has(b"close") {
        return false;
    }
    version == Version::HTTP_11 || has(b"keep-alive")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head: 8192,
        max_headers: 16,
    };

    fn parse(s: &str) -> Result<Option<(Head, usize)>, HeadError> {
        parse_head(s.as_bytes(), LIMITS)
    }

    fn head(s: &str) -> Head {
        parse(s).unwrap().unwrap().0
    }

    fn err(s: &str) -> HeadError {
        parse(s).unwrap_err()
    }

    #[test]
    fn simple_get_and_the_bytes_it_took() {
        let text = "GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Y: z \r\n\r\nGET /next";
        let (h, n) = parse(text).unwrap().unwrap();
        assert_eq!(&text[n..], "GET /next");
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri, "/a?b=c");
        assert_eq!(h.headers["x-y"], "z");
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
    }

    #[test]
    fn incomplete_heads_wait_until_the_limit() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(err(&long), HeadError::TooLarge);
        let many: String = (0..20).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(err(&format!("GET / HTTP/1.1\r\n{many}\r\n")), HeadError::TooManyHeaders);
    }

    #[test]
    fn framing_rules() {
        let f = |hdrs: &str| parse(&format!("POST / HTTP/1.1\r\nHost: x\r\n{hdrs}\r\n")).map(|r| r.unwrap().0.framing);
        assert_eq!(f("Content-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(f("Content-Length: 5\r\nContent-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(f("Content-Length: 0\r\n"), Ok(Framing::None));
        assert_eq!(f("Transfer-Encoding: chunked\r\n"), Ok(Framing::Chunked));
        assert_eq!(f("Transfer-Encoding: CHUNKED\r\n"), Ok(Framing::Chunked));
        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length: 5 5\r\n",
            "Content-Length: \r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 1234567890123456789\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: ,chunked\r\n",
            "Transfer-Encoding: \r\n",
        ] {
            assert!(matches!(f(bad), Err(HeadError::Malformed(_))), "{bad:?}: {:?}", f(bad));
        }
        for unimplemented in [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: foo\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert!(
                matches!(f(unimplemented), Err(HeadError::NotImplemented(_))),
                "{unimplemented:?}"
            );
        }
        let http10 = parse("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(http10, Err(HeadError::Malformed(_))));
    }

    #[test]
    fn what_httparse_refuses_is_refused() {
        for bad in [
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1 \r\n\r\n",
            "G@T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(err(bad), HeadError::Malformed(_)), "{bad:?}");
        }
        assert_eq!(err("GET / HTTP/2.0\r\n\r\n"), HeadError::Version);
    }

    #[test]
    fn request_targets() {
        assert_eq!(
            head("GET http://a.b:80/x HTTP/1.1\r\n\r\n").uri.authority().unwrap(),
            "a.b:80"
        );
        assert_eq!(
            head("CONNECT a.b:443 HTTP/1.1\r\n\r\n").uri.authority().unwrap(),
            "a.b:443"
        );
        assert_eq!(head("OPTIONS * HTTP/1.1\r\n\r\n").uri, "*");
        for bad in [
            "GET a.b:443 HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET ftp://a/ HTTP/1.1\r\n\r\n",
            "CONNECT http://a.b/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(err(bad), HeadError::Malformed(_)), "{bad:?}");
        }
    }

    #[test]
    fn persistence_and_expectations() {
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(head("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").expect_continue);
        assert!(!head("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").expect_continue);
    }

    #[test]
    fn bare_lf_heads_are_read_like_crlf_ones() {
        let (h, n) = parse("GET / HTTP/1.1\nHost: x\n\nrest").unwrap().unwrap();
        assert_eq!(h.headers["host"], "x");
        assert_eq!(n, "GET / HTTP/1.1\nHost: x\n\n".len());
        assert_eq!(leading_blank_lines(b"\r\n\nGET"), 3);
    }
}
