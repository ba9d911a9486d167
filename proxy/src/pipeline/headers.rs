//! Header rules for the hop into the mesh and back: what is hop-by-hop, what only the mesh may
//! set, the request id, and which authority a request names.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;

use crate::error::ProxyError;

pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Identity and telemetry headers only the mesh may set (istio-wire.md §0, §3).
static MESH_ONLY: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-client-cert"),
    HeaderName::from_static("x-envoy-peer-metadata"),
    HeaderName::from_static("x-envoy-peer-metadata-id"),
];

/// Hop-by-hop by definition (RFC 9110 §7.6.1).
static HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &PROXY_CONNECTION,
    &KEEP_ALIVE,
    &header::TE,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHORIZATION,
    &header::PROXY_AUTHENTICATE,
];

/// Whether any of `names` is in the map: one pass of comparisons over the few names a message
/// carries, where a lookup per name would hash each (most messages carry none of them).
fn has_any(h: &HeaderMap, names: &[&HeaderName]) -> bool {
    h.keys().any(|k| names.contains(&k))
}

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): those named in `Connection`, plus the ones that
/// are hop-by-hop by definition. `TE: trailers` survives: gRPC needs it end to end over h2.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Fields named in `Connection` count only when there is a `Connection`, which is one of these.
    if !has_any(h, &HOP_BY_HOP) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let te_trailers = h.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
    });
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes what a client must not send into the mesh, in one pass over the request's names:
/// the fields only the mesh may set, the API key that identified the client (`api_key`), and
/// every `x-envoy-*` field: Envoy obeys those from an internal peer (retries, timeouts, the
/// original path), and meshgate is one to the mesh, so a client must not reach them through it
/// (Envoy strips them from untrusted clients at the edge the same way).
pub(super) fn strip_client_controls(h: &mut HeaderMap, api_key: &HeaderName) {
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with("x-envoy-") || *n == api_key || MESH_ONLY.contains(n))
        .cloned()
        .collect();
    for n in found {
        h.remove(n);
    }
}

/// Removes what only the mesh may say about a response's origin before the VM sees it.
pub(super) fn strip_mesh_response(h: &mut HeaderMap) {
    if has_any(h, &[&MESH_ONLY[1], &MESH_ONLY[2]]) {
        h.remove(&MESH_ONLY[1]);
        h.remove(&MESH_ONLY[2]);
    }
}

pub(super) fn new_request_id() -> HeaderValue {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b[6] = (b[6] & 0x0f) | 0x40; // UUID v4
    b[8] = (b[8] & 0x3f) | 0x80;
    // Written in place: this runs for every request that arrives without an id.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(byte >> 4)];
        out[o + 1] = HEX[usize::from(byte & 0x0f)];
        o += 2;
    }
    HeaderValue::from_bytes(&out).expect("hex and dashes are a valid header value")
}

/// The authority the client asked for: absolute-form URI or `:authority` first, then `Host`.
pub(super) fn authority_of<B>(req: &Request<B>) -> Result<String, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::Malformed("more than one Host header"));
    }
    let host = host
        .map(|h| {
            h.to_str()
                .map_err(|_| ProxyError::Malformed("Host header is not ASCII"))
        })
        .transpose()?;
    if let Some(a) = req.uri().authority() {
        // Two names for one request: refuse rather than let policy and routing see different
        // ones. h2 has no Host header; HTTP/1.1 absolute-form must agree with it.
        if let Some(h) = host {
            let same = crate::route::split_authority(h).ok().map(|(n, _)| n)
                == crate::route::split_authority(a.as_str()).ok().map(|(n, _)| n);
            if !same {
                return Err(ProxyError::Malformed("Host header disagrees with the request target"));
            }
        }
        return Ok(a.as_str().to_string());
    }
    host.map(str::to_string)
        .ok_or(ProxyError::Malformed("missing Host header"))
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade: X`).
pub(super) fn requested_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let asks = req.headers().get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    });
    // `h2c` is this hop's business (HTTP/2 with prior knowledge is served on the same port);
    // such a request is served as plain HTTP/1.1, and the upgrade never forwarded.
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
        .filter(|p| !p.as_bytes().eq_ignore_ascii_case(b"h2c"))
}

pub(super) fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers().get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed_including_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Bearer k".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn each_hop_by_hop_field_alone_is_found_and_removed() {
        // The removal runs only when one pass over the names finds one: each must be found alone.
        for name in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert("x-kept", "1".parse().unwrap());
            h.append(name, "x".parse().unwrap());
            h.append(name, "y".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} kept: {h:?}");
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-kept", "1".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn client_controls_go_with_every_value() {
        let key = HeaderName::from_static("x-api-key");
        let mut h = HeaderMap::new();
        h.append(&key, "a".parse().unwrap());
        h.append(&key, "b".parse().unwrap());
        h.insert(&MESH_ONLY[0], "By=spiffe://x".parse().unwrap());
        h.insert(&MESH_ONLY[2], "sidecar~forged".parse().unwrap());
        h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_client_controls(&mut h, &key);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, "trailers, gzip".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_ne!(new_request_id(), id);
    }
}
