//! What the mesh's telemetry learns from meshgate: a tenant's workload names as Istio peer
//! metadata (istio-wire.md §2.5, §3.2), and the trace context of each request.
//!
//! The metadata is the `google.protobuf.Struct` a sidecar sends: keys as Istio's
//! `convertStructToWorkloadMetadata` reads them (istio/proxy `extensions/common/
//! metadata_object.h`: `NAME`, `NAMESPACE`, `CLUSTER_ID`, `OWNER`, `WORKLOAD_NAME`, `LABELS`).
//! It is encoded once per tenant and config generation; a request only clones the header
//! values (a reference count each).

use bytes::Bytes;
use http::HeaderValue;

use crate::config::Telemetry;

/// `x-envoy-peer-metadata` / `x-envoy-peer-metadata-id`.
pub static PEER_METADATA: http::HeaderName = http::HeaderName::from_static("x-envoy-peer-metadata");
pub static PEER_METADATA_ID: http::HeaderName = http::HeaderName::from_static("x-envoy-peer-metadata-id");

/// Istio's TCP metadata exchange (`metadata_exchange_initial_header.h`): the magic, then the
/// length of the `Any` that follows, both big-endian.
pub const MX_MAGIC: u32 = 0x3D23_0467;
/// The ALPN that asks the peer for the exchange (`ALPNInMeshWithMxc` offers it before `istio`).
pub const MX_ALPN: &[u8] = b"istio-peer-exchange";
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// A tenant's peer metadata, ready for the wire.
#[derive(Debug)]
pub struct PeerMetadata {
    /// Base64 (standard alphabet, padded, as Envoy's `Base64::encode`) of the Struct.
    pub header: HeaderValue,
    /// Istio's proxies cache decoded metadata by this id (500 entries per worker), so it must
    /// differ whenever the metadata does: it ends in a digest of the encoded Struct.
    pub id: HeaderValue,
    /// The whole TCP metadata-exchange preamble: header, then the `Any`.
    pub preamble: Bytes,
}

impl PeerMetadata {
    pub fn new(t: &Telemetry) -> PeerMetadata {
        let fields = encode_struct(&workload_fields(t));
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&fields);
        let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        // The four `~`-separated parts of an Envoy node id (type~ip~id~domain), as Istio's
        // proxies send; nothing reads them but the cache.
        let id = format!(
            "sidecar~0.0.0.0~{}-meshgate-{short}.{}~{}.svc.cluster.local",
            t.workload, t.namespace, t.namespace
        );
        let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &fields);
        let header = HeaderValue::from_str(&encoded).expect("base64 is a valid header value");
        let id_value = HeaderValue::from_str(&sanitize(&id)).expect("sanitized to visible ASCII");

        let mut outer = Vec::new();
        entry(&mut outer, "x-envoy-peer-metadata", &value_struct(&fields));
        entry(&mut outer, "x-envoy-peer-metadata-id", &value_string(&sanitize(&id)));
        let mut any = Vec::new();
        field(&mut any, 1, STRUCT_TYPE_URL.as_bytes());
        field(&mut any, 2, &outer);
        let mut preamble = Vec::with_capacity(8 + any.len());
        preamble.extend_from_slice(&MX_MAGIC.to_be_bytes());
        preamble.extend_from_slice(&(any.len() as u32).to_be_bytes());
        preamble.extend_from_slice(&any);
        PeerMetadata {
            header,
            id: id_value,
            preamble: Bytes::from(preamble),
        }
    }
}

/// The workload's fields, as a sidecar's `convertWorkloadMetadataToStruct` writes them.
fn workload_fields(t: &Telemetry) -> Vec<(&str, Field<'_>)> {
    let mut labels: Vec<(&str, &str)> = vec![
        ("app", &t.app),
        ("service.istio.io/canonical-name", &t.canonical_service),
        ("service.istio.io/canonical-revision", &t.canonical_revision),
    ];
    if let Some(v) = &t.version {
        labels.push(("version", v));
    }
    labels.extend(t.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut fields = vec![
        ("NAME", Field::Str(&t.workload)),
        ("NAMESPACE", Field::Str(&t.namespace)),
        ("WORKLOAD_NAME", Field::Str(&t.workload)),
        // Istio derives the workload type from OWNER's `.../<kind>s/<WORKLOAD_NAME>` suffix.
        (
            "OWNER",
            Field::Owned(format!(
                "kubernetes://apis/apps/v1/namespaces/{}/deployments/{}",
                t.namespace, t.workload
            )),
        ),
        ("LABELS", Field::Map(labels)),
    ];
    if let Some(c) = &t.cluster_id {
        fields.push(("CLUSTER_ID", Field::Str(c)));
    }
    fields
}

enum Field<'a> {
    Str(&'a str),
    Owned(String),
    Map(Vec<(&'a str, &'a str)>),
}

/// A `google.protobuf.Struct`: `map<string, Value> fields = 1`, entries sorted by key as a
/// deterministic serializer writes them.
fn encode_struct(fields: &[(&str, Field<'_>)]) -> Vec<u8> {
    let mut sorted: Vec<&(&str, Field<'_>)> = fields.iter().collect();
    sorted.sort_by_key(|(k, _)| *k);
    let mut out = Vec::new();
    for (k, v) in sorted {
        let value = match v {
            Field::Str(s) => value_string(s),
            Field::Owned(s) => value_string(s),
            Field::Map(m) => {
                let inner: Vec<(&str, Field<'_>)> = m.iter().map(|(k, v)| (*k, Field::Str(v))).collect();
                value_struct(&encode_struct(&inner))
            }
        };
        entry(&mut out, k, &value);
    }
    out
}

/// One map entry of `Struct.fields`: `key = 1`, `value = 2`.
fn entry(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let mut e = Vec::with_capacity(key.len() + value.len() + 6);
    field(&mut e, 1, key.as_bytes());
    field(&mut e, 2, value);
    field(out, 1, &e);
}

/// `Value.string_value = 3`.
fn value_string(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 3);
    field(&mut v, 3, s.as_bytes());
    v
}

/// `Value.struct_value = 5`.
fn value_struct(encoded: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(encoded.len() + 4);
    field(&mut v, 5, encoded);
    v
}

/// A length-delimited field (wire type 2).
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    varint(out, u64::from(number << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Header values are visible ASCII; names from the config may hold anything printable.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect()
}

// ---- Trace context ----

static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");
// Constants, not `&str` keys (parsed into a name on each lookup): looked up on every request.
static B3: http::HeaderName = http::HeaderName::from_static("b3");
static X_B3_TRACEID: http::HeaderName = http::HeaderName::from_static("x-b3-traceid");

/// Gives a request a W3C trace context unless it has one: a valid `traceparent` (and its
/// `tracestate`) and B3 headers pass unchanged; an invalid `traceparent` is replaced and its
/// `tracestate` dropped (W3C Trace Context §4.3: restart the trace); a request with B3
/// context but no `traceparent` is left to B3, so the mesh does not see two traces.
pub fn ensure_trace_context(h: &mut http::HeaderMap, sample_rate: f64) {
    let mut found = h.get_all(&TRACEPARENT).iter();
    let valid = match (found.next(), found.next()) {
        (Some(v), None) => valid_traceparent(v.as_bytes()),
        (None, _) => {
            if h.contains_key(&B3) || h.contains_key(&X_B3_TRACEID) {
                return;
            }
            false
        }
        (Some(_), Some(_)) => false,
    };
    if valid {
        return;
    }
    // A new trace: vendor state that came without (or with a broken) traceparent belongs to
    // no trace of ours.
    h.remove(&TRACESTATE);
    h.insert(&TRACEPARENT, new_traceparent(rand::random::<f64>() < sample_rate));
}

/// `version-traceid-parentid-flags`: lower-case hex, version not `ff`, ids not all zero;
/// a later version may append fields after a `-` (W3C Trace Context §3.2).
fn valid_traceparent(v: &[u8]) -> bool {
    if v.len() < 55 {
        return false;
    }
    let hex = |s: &[u8]| s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let zero = |s: &[u8]| s.iter().all(|b| *b == b'0');
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    let dashes = v[2] == b'-' && v[35] == b'-' && v[52] == b'-';
    let tail_ok = match version {
        b"00" => v.len() == 55,
        _ => v.len() == 55 || v[55] == b'-',
    };
    dashes
        && tail_ok
        && hex(version)
        && version != b"ff"
        && hex(trace)
        && !zero(trace)
        && hex(parent)
        && !zero(parent)
        && hex(flags)
}

fn new_traceparent(sampled: bool) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut ids = [0u8; 24];
    loop {
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut ids);
        if ids[..16].iter().any(|b| *b != 0) && ids[16..].iter().any(|b| *b != 0) {
            break;
        }
    }
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (i, b) in ids.iter().enumerate() {
        let at = if i < 16 { 3 + 2 * i } else { 36 + 2 * (i - 16) };
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0x0f)];
    }
    if sampled {
        out[54] = b'1';
    }
    HeaderValue::from_bytes(&out).expect("hex and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Telemetry {
        Telemetry {
            workload: "billing-batch".into(),
            namespace: "billing".into(),
            app: "billing".into(),
            version: Some("v2".into()),
            canonical_service: "billing".into(),
            canonical_revision: "v2".into(),
            cluster_id: Some("vm-network".into()),
            labels: vec![("team".into(), "payments".into())],
        }
    }

    #[test]
    fn struct_encoding_is_protobuf() {
        // {"a": "b"}: fields(1) { key(1) "a", value(2) { string_value(3) "b" } }
        assert_eq!(
            encode_struct(&[("a", Field::Str("b"))]),
            [0x0a, 0x08, 0x0a, 0x01, b'a', 0x12, 0x03, 0x1a, 0x01, b'b']
        );
        // Nested: value(2) { struct_value(5) { ... } }
        let nested = encode_struct(&[("L", Field::Map(vec![("a", "b")]))]);
        assert_eq!(
            nested,
            [
                0x0a, 0x11, 0x0a, 0x01, b'L', 0x12, 0x0c, 0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x12, 0x03, 0x1a,
                0x01, b'b'
            ]
        );
    }

    #[test]
    fn metadata_id_follows_the_metadata() {
        let a = PeerMetadata::new(&names());
        let mut other = names();
        other.version = Some("v3".into());
        let b = PeerMetadata::new(&other);
        assert_ne!(a.id, b.id);
        assert_ne!(a.header, b.header);
        assert_eq!(a.id, PeerMetadata::new(&names()).id);
        assert_eq!(a.id.to_str().unwrap().split('~').count(), 4);
    }

    #[test]
    fn preamble_frames_an_any() {
        let m = PeerMetadata::new(&names());
        let p = &m.preamble;
        assert_eq!(&p[..4], &[0x3d, 0x23, 0x04, 0x67]);
        let len = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, p.len() - 8);
        // Any.type_url first.
        assert_eq!(p[8], 0x0a);
        assert_eq!(&p[10..10 + STRUCT_TYPE_URL.len()], STRUCT_TYPE_URL.as_bytes());
    }

    #[test]
    fn traceparent_kept_when_valid_replaced_when_not() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", good.parse().unwrap());
        h.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        ensure_trace_context(&mut h, 0.0);
        assert_eq!(h["traceparent"], good);
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", bad.parse().unwrap());
            h.insert("tracestate", "x=y".parse().unwrap());
            ensure_trace_context(&mut h, 1.0);
            let now = h["traceparent"].to_str().unwrap();
            assert_ne!(now, bad);
            assert!(valid_traceparent(now.as_bytes()), "{now}");
            assert!(now.ends_with("-01"), "sample_rate 1 marks it sampled");
            assert!(!h.contains_key("tracestate"));
        }
        // A future version may carry more fields.
        assert!(valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes"
        ));
    }

    #[test]
    fn new_trace_started_unless_b3_carries_one() {
        let mut h = http::HeaderMap::new();
        ensure_trace_context(&mut h, 0.0);
        let t = h["traceparent"].to_str().unwrap().to_string();
        assert!(valid_traceparent(t.as_bytes()) && t.ends_with("-00"), "{t}");

        let mut h = http::HeaderMap::new();
        h.insert("tracestate", "stray=1".parse().unwrap());
        ensure_trace_context(&mut h, 0.0);
        assert!(
            !h.contains_key("tracestate"),
            "a new trace drops state that came without one"
        );

        let mut h = http::HeaderMap::new();
        h.insert("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7".parse().unwrap());
        ensure_trace_context(&mut h, 1.0);
        assert!(!h.contains_key("traceparent"));
    }
}
