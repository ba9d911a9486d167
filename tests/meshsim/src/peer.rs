//! Peer metadata as a destination sidecar reads it (istio-wire §2.5, §3.2), and what Istio's
//! stats filter makes of it: the `source_*` labels of `istio_requests_total`.
//!
//! Decoded from the protobuf wire format here (`google.protobuf.Struct`, `Value`, `Any`),
//! sharing no code with meshgate's encoder, so a test that compares the two can fail.
//! Sources: istio/proxy `extensions/common/metadata_object.{h,cc}`
//! (`convertStructToWorkloadMetadata`), `filters/http/peer_metadata/filter.cc` (base64, padding
//! optional), `filters/http/istio_stats/istio_stats.cc` (`populatePeerInfo`: fallbacks, the
//! namespace taken from the peer certificate first), `filters/network/metadata_exchange/`.

use std::collections::BTreeMap;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MX_MAGIC: u32 = 0x3D23_0467;
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
/// Envoy's filter buffers at most this much before giving up on a peer.
const MAX_MX_LEN: usize = 64 * 1024;

/// A decoded `google.protobuf.Value`: the kinds Istio's metadata uses, the rest kept as a marker.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Struct(BTreeMap<String, Value>),
    Other,
}

/// The `source_*` labels Istio's stats filter would put on this peer's requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Source {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
    pub principal: String,
}

impl Source {
    /// What the stats filter reports for a peer with certificate URI `principal` and decoded
    /// metadata `meta` (none: every field falls back).
    pub fn attribute(principal: Option<&str>, meta: Option<&BTreeMap<String, Value>>) -> Source {
        let s = |k: &str| match meta.and_then(|m| m.get(k)) {
            Some(Value::Str(v)) => v.clone(),
            _ => String::new(),
        };
        let labels = match meta.and_then(|m| m.get("LABELS")) {
            Some(Value::Struct(l)) => l.clone(),
            _ => BTreeMap::new(),
        };
        let label = |k: &str| match labels.get(k) {
            Some(Value::Str(v)) => v.clone(),
            _ => String::new(),
        };
        let or = |v: String, fallback: &str| if v.is_empty() { fallback.to_string() } else { v };
        let first = |a: String, b: String| if a.is_empty() { b } else { a };
        // `spiffe://TD/ns/NS/...`: the segments after the trust domain.
        let cert_ns = principal
            .and_then(|p| p.strip_prefix("spiffe://"))
            .and_then(|p| p.split_once('/'))
            .and_then(|(_, path)| path.strip_prefix("ns/"))
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("")
            .to_string();
        Source {
            workload: or(s("WORKLOAD_NAME"), "unknown"),
            namespace: or(first(cert_ns, s("NAMESPACE")), "unknown"),
            app: or(first(label("app.kubernetes.io/name"), label("app")), "unknown"),
            version: or(first(label("app.kubernetes.io/version"), label("version")), "unknown"),
            canonical_service: or(label("service.istio.io/canonical-name"), "unknown"),
            canonical_revision: or(label("service.istio.io/canonical-revision"), "latest"),
            cluster: or(s("CLUSTER_ID"), "unknown"),
            principal: or(principal.unwrap_or("").to_string(), "unknown"),
        }
    }
}

/// `x-envoy-peer-metadata`: standard base64, padding optional (Envoy's `decodeWithoutPadding`),
/// of a serialized Struct.
pub fn decode_header(value: &[u8]) -> Result<BTreeMap<String, Value>, String> {
    use base64::Engine as _;
    let trimmed = value
        .strip_suffix(b"==")
        .or_else(|| value.strip_suffix(b"="))
        .unwrap_or(value);
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .map_err(|e| format!("base64: {e}"))?;
    decode_struct(&bytes)
}

/// A field number and, for length-delimited fields, the bytes.
type Tlv<'a> = (u64, Option<&'a [u8]>);

/// A protobuf reader over one message's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("varint too long".into())
    }

    /// The next field: its number and, for length-delimited ones, its bytes.
    fn field(&mut self) -> Result<Option<Tlv<'a>>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let (number, wire) = (tag >> 3, tag & 7);
        let bytes = match wire {
            0 => {
                self.varint()?;
                None
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if self.0.len() < n {
                    return Err("truncated fixed field".into());
                }
                self.0 = &self.0[n..];
                None
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                if self.0.len() < len {
                    return Err(format!("field {number}: {len} bytes declared, {} left", self.0.len()));
                }
                let (b, rest) = self.0.split_at(len);
                self.0 = rest;
                Some(b)
            }
            w => return Err(format!("field {number}: unsupported wire type {w}")),
        };
        Ok(Some((number, bytes)))
    }
}

/// `message Struct { map<string, Value> fields = 1; }`; a map entry is `{ key = 1; value = 2 }`.
pub fn decode_struct(b: &[u8]) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    let mut r = Reader(b);
    while let Some((number, bytes)) = r.field()? {
        let (1, Some(entry)) = (number, bytes) else { continue };
        let (mut key, mut value) = (String::new(), Value::Other);
        let mut e = Reader(entry);
        while let Some((n, bytes)) = e.field()? {
            match (n, bytes) {
                (1, Some(k)) => key = String::from_utf8(k.to_vec()).map_err(|_| "key is not UTF-8")?,
                (2, Some(v)) => value = decode_value(v)?,
                _ => {}
            }
        }
        out.insert(key, value);
    }
    Ok(out)
}

/// `message Value { oneof kind { ... string string_value = 3; ... Struct struct_value = 5; ... } }`
fn decode_value(b: &[u8]) -> Result<Value, String> {
    let mut v = Value::Other;
    let mut r = Reader(b);
    while let Some((number, bytes)) = r.field()? {
        v = match (number, bytes) {
            (3, Some(s)) => Value::Str(String::from_utf8(s.to_vec()).map_err(|_| "string is not UTF-8")?),
            (5, Some(s)) => Value::Struct(decode_struct(s)?),
            _ => Value::Other,
        };
    }
    Ok(v)
}

/// `message Any { string type_url = 1; bytes value = 2; }` holding a Struct.
fn decode_any_struct(b: &[u8]) -> Result<BTreeMap<String, Value>, String> {
    let (mut url, mut value) = (None, None);
    let mut r = Reader(b);
    while let Some((number, bytes)) = r.field()? {
        match (number, bytes) {
            (1, Some(u)) => url = Some(u),
            (2, Some(v)) => value = Some(v),
            _ => {}
        }
    }
    if url != Some(STRUCT_TYPE_URL.as_bytes()) {
        return Err(format!(
            "Any type_url {:?}, expected {STRUCT_TYPE_URL}",
            url.map(String::from_utf8_lossy)
        ));
    }
    decode_struct(value.unwrap_or_default())
}

/// The server side of the TCP metadata exchange, once ALPN `istio-peer-exchange` was chosen:
/// on the client's first bytes, our preamble goes out, then the client's is read. Returns the
/// client's workload metadata (`None` if it did not send a valid preamble) and any bytes read
/// that are the client's data (all of them when the magic was wrong: Envoy then passes them on).
pub async fn server_exchange<S>(s: &mut S, own: &[u8]) -> io::Result<(Option<BTreeMap<String, Value>>, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await?;
    if n == 0 {
        return Ok((None, buf));
    }
    buf.extend_from_slice(&chunk[..n]);
    s.write_all(own).await?;
    s.flush().await?;
    while buf.len() < 8 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok((None, buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let magic = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    if magic != MX_MAGIC || len > MAX_MX_LEN {
        tracing::debug!(magic, len, "Incorrect istio-peer-exchange ALPN magic");
        return Ok((None, buf));
    }
    while buf.len() < 8 + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed inside its preamble",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let rest = buf.split_off(8 + len);
    let meta = match decode_any_struct(&buf[8..]) {
        Ok(outer) => match outer.get("x-envoy-peer-metadata") {
            Some(Value::Struct(m)) => Some(m.clone()),
            _ => None,
        },
        Err(e) => {
            tracing::debug!(error = %e, "undecodable metadata-exchange preamble");
            None
        }
    };
    Ok((meta, rest))
}

// ---- What the sidecar itself sends ----

/// A field of a Struct this module encodes: a string, or one level of nested string map.
pub enum Field<'a> {
    Str(&'a str),
    Map(&'a [(&'a str, &'a str)]),
}

/// A Struct of string fields (and one level of nested string maps), serialized.
pub fn encode_struct(fields: &[(&str, Field<'_>)]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut n: usize) {
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        varint(out, bytes.len());
        out.extend_from_slice(bytes);
    }
    let mut msg = Vec::new();
    for (k, v) in fields {
        let mut value = Vec::new();
        match v {
            Field::Str(s) => field(&mut value, 0x1a, s.as_bytes()), // Value.string_value = 3
            Field::Map(map) => {
                let inner: Vec<(&str, Field<'_>)> = map.iter().map(|(k, v)| (*k, Field::Str(v))).collect();
                field(&mut value, 0x2a, &encode_struct(&inner)); // Value.struct_value = 5
            }
        }
        let mut entry = Vec::new();
        field(&mut entry, 0x0a, k.as_bytes()); // key = 1
        field(&mut entry, 0x12, &value); // value = 2
        field(&mut msg, 0x0a, &entry); // Struct.fields = 1 (map entry)
    }
    msg
}

/// The metadata-exchange preamble of a node: magic, length, `Any{Struct{x-envoy-peer-metadata,
/// x-envoy-peer-metadata-id}}`.
pub fn preamble(metadata: &[u8], id: &str) -> Vec<u8> {
    let mut outer = Vec::new();
    let mut push = |key: &str, value: Vec<u8>| {
        let mut entry = vec![0x0a, key.len() as u8];
        entry.extend_from_slice(key.as_bytes());
        entry.push(0x12);
        put_len(&mut entry, value.len());
        entry.extend_from_slice(&value);
        outer.push(0x0a);
        put_len(&mut outer, entry.len());
        outer.extend_from_slice(&entry);
    };
    let mut s = vec![0x2a];
    put_len(&mut s, metadata.len());
    s.extend_from_slice(metadata);
    push("x-envoy-peer-metadata", s);
    let mut i = vec![0x1a];
    put_len(&mut i, id.len());
    i.extend_from_slice(id.as_bytes());
    push("x-envoy-peer-metadata-id", i);
    let mut any = vec![0x0a, STRUCT_TYPE_URL.len() as u8];
    any.extend_from_slice(STRUCT_TYPE_URL.as_bytes());
    any.push(0x12);
    put_len(&mut any, outer.len());
    any.extend_from_slice(&outer);
    let mut out = MX_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&(any.len() as u32).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_roundtrip_and_attribution() {
        let labels: &[(&str, &str)] = &[
            ("app", "billing"),
            ("version", "v2"),
            ("service.istio.io/canonical-name", "billing-svc"),
        ];
        let bytes = encode_struct(&[
            ("WORKLOAD_NAME", Field::Str("billing-batch")),
            ("NAMESPACE", Field::Str("ignored-under-mtls")),
            ("CLUSTER_ID", Field::Str("vm-net")),
            ("LABELS", Field::Map(labels)),
        ]);
        let m = decode_struct(&bytes).unwrap();
        let src = Source::attribute(Some("spiffe://td/ns/billing/sa/x"), Some(&m));
        assert_eq!(src.workload, "billing-batch");
        assert_eq!(src.namespace, "billing", "the certificate's namespace wins");
        assert_eq!(src.app, "billing");
        assert_eq!(src.version, "v2");
        assert_eq!(src.canonical_service, "billing-svc");
        assert_eq!(src.canonical_revision, "latest");
        assert_eq!(src.cluster, "vm-net");

        let none = Source::attribute(Some("spiffe://td/ns/a/sa/b"), None);
        assert_eq!((none.workload.as_str(), none.namespace.as_str()), ("unknown", "a"));
    }

    #[test]
    fn header_base64_with_or_without_padding() {
        use base64::Engine as _;
        let bytes = encode_struct(&[("NAME", Field::Str("x"))]);
        let padded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let bare = padded.trim_end_matches('=');
        for v in [padded.as_str(), bare] {
            let m = decode_header(v.as_bytes()).unwrap();
            assert_eq!(m["NAME"], Value::Str("x".into()));
        }
        assert!(decode_header(b"-_-_").is_err());
    }

    #[test]
    fn truncated_messages_are_errors() {
        let bytes = encode_struct(&[("NAME", Field::Str("workload"))]);
        assert!(decode_struct(&bytes[..bytes.len() - 2]).is_err());
    }

    #[tokio::test]
    async fn exchange_reads_the_client_preamble() {
        let meta = encode_struct(&[("WORKLOAD_NAME", Field::Str("w"))]);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut client = preamble(&meta, "id");
        client.extend_from_slice(b"data");
        b.write_all(&client).await.unwrap();
        let (got, rest) = server_exchange(&mut a, b"SERVER").await.unwrap();
        assert_eq!(got.unwrap()["WORKLOAD_NAME"], Value::Str("w".into()));
        assert_eq!(rest, b"data");
        let mut own = [0u8; 6];
        b.read_exact(&mut own).await.unwrap();
        assert_eq!(&own, b"SERVER");
    }
}
