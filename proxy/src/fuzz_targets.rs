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
        let _ = table.resolve(s);
    }
}

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// The targets by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("proxy_header", proxy_header),
    ("api_key", api_key),
    ("authority", authority),
];
