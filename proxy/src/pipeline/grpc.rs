//! gRPC on the request path: the client's `grpc-timeout` bounds meshgate's wait, and refusals of
//! gRPC requests are answered as gRPC statuses (a "trailers-only" response) so a gRPC client
//! sees a status code rather than a protocol error.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::Response;

use super::body::ResponseBody;
use crate::error::ProxyError;

/// A constant rather than a `&str` key: a string is parsed into a header name on each lookup,
/// and this one is looked up on every request.
static GRPC_TIMEOUT: header::HeaderName = header::HeaderName::from_static("grpc-timeout");

/// `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit H, M, S, m, u or n).
pub(super) fn grpc_timeout(h: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = h.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`: at most 8 digits, in milliseconds when they fit (`1500m`),
/// else the finest coarser unit; rounded up, so the service never sees less time than is left.
pub(super) fn grpc_timeout_header(d: std::time::Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let mut n = d.as_nanos().div_ceil(1_000_000);
    let mut unit = "m";
    for (factor, coarser) in [(1000, "S"), (60, "M"), (60, "H")] {
        if n <= MAX {
            break;
        }
        n = n.div_ceil(factor);
        unit = coarser;
    }
    HeaderValue::from_str(&format!("{}{unit}", n.min(MAX))).expect("digits and a letter")
}

pub(super) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A refusal as a gRPC client understands it: HTTP 200, no body, and the status in
/// `grpc-status` / `grpc-message` (a "trailers-only" response).
pub(super) fn grpc_local_response(e: &ProxyError) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(e.grpc_status()));
    let msg = format!("meshgate: {e}");
    h.insert(
        "grpc-message",
        HeaderValue::from_str(&percent_encode(&msg)).unwrap_or(HeaderValue::from_static("meshgate")),
    );
    if let ProxyError::RateLimited { retry_after_secs } = e {
        h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
    }
    resp
}

/// `grpc-message` is percent-encoded: everything outside printable ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_and_messages() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h)
        };
        use std::time::Duration;
        assert_eq!(t("300m"), Some(Duration::from_millis(300)));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("1M"), Some(Duration::from_secs(60)));
        assert_eq!(t("10u"), Some(Duration::from_micros(10)));
        assert_eq!(t("10n"), Some(Duration::from_nanos(10)));
        for bad in ["", "m", "5", "5s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(percent_encode("a b%c\u{e9}\n"), "a b%25c%C3%A9%0A");
    }

    #[test]
    fn grpc_timeout_values() {
        use std::time::Duration;
        let f = |d: Duration| grpc_timeout_header(d).to_str().unwrap().to_string();
        let cases = [
            (Duration::from_millis(1500), "1500m"),
            (Duration::from_secs(30), "30000m"),
            (Duration::ZERO, "0m"),
            // Rounded up: never less time than is left.
            (Duration::from_nanos(1), "1m"),
            (Duration::from_micros(1_500_300), "1501m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_millis(100_000_000), "100000S"),
            (Duration::from_millis(100_000_001), "100001S"),
            (Duration::from_secs(100_000_000), "1666667M"),
            (Duration::from_secs(6_000_000_000), "1666667H"),
            (Duration::MAX, "99999999H"),
        ];
        for (d, want) in cases {
            let v = f(d);
            assert_eq!(v, want, "{d:?}");
            // What meshgate writes, meshgate (and any gRPC server) reads back.
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(&v).unwrap());
            let back = grpc_timeout(&h).expect(&v);
            assert!(back >= d.min(Duration::from_secs(99_999_999 * 3600)), "{d:?} -> {v}");
        }
    }
}
