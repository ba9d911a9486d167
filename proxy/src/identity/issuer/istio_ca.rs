//! The Istio CA issuer (istiod or cert-manager istio-csr): `IstioCertificateService/CreateCertificate`
//! over gRPC (istio-wire.md §4.2/§4.3), its protobuf messages encoded by hand (two fields each).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustls::pki_types::CertificateDer;

use super::*;

pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

pub(super) fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `IstioCertificateRequest { string csr = 1; int64 validity_duration = 3; }`, protobuf-encoded.
pub fn encode_request(csr: &str, validity_secs: i64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0x0a);
    put_varint(&mut b, csr.len() as u64);
    b.extend_from_slice(csr.as_bytes());
    b.put_u8(0x18);
    put_varint(&mut b, validity_secs as u64);
    b.freeze()
}

/// Field 1 strings of a protobuf message (`IstioCertificateResponse.cert_chain`; also the
/// request's `csr`), skipping every other field as protobuf readers must.
/// The wanted length-delimited field's values, and every varint field as (number, value).
pub type Decoded = (Vec<String>, Vec<(u64, u64)>);

pub fn decode_strings(mut msg: Bytes, want_field: u64) -> Result<Decoded, String> {
    let mut strings = Vec::new();
    let mut varints = Vec::new();
    while msg.has_remaining() {
        let key = get_varint(&mut msg).ok_or("truncated field key")?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = get_varint(&mut msg).ok_or("truncated varint")?;
                varints.push((field, v));
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if msg.remaining() < n {
                    return Err("truncated fixed field".into());
                }
                msg.advance(n);
            }
            2 => {
                let len = get_varint(&mut msg).ok_or("truncated length")? as usize;
                if msg.remaining() < len {
                    return Err("truncated string".into());
                }
                let v = msg.split_to(len);
                if field == want_field {
                    strings.push(String::from_utf8(v.to_vec()).map_err(|_| "string field is not UTF-8")?);
                }
            }
            w => return Err(format!("unsupported wire type {w}")),
        }
    }
    Ok((strings, varints))
}

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.extend_from_slice(msg);
    b.freeze()
}

/// The one message of a unary gRPC answer.
pub fn grpc_unframe(mut body: Bytes) -> Result<Bytes, String> {
    if body.remaining() < 5 {
        return Err("empty gRPC answer".into());
    }
    if body.get_u8() != 0 {
        return Err("compressed gRPC answer (not negotiated)".into());
    }
    let len = body.get_u32() as usize;
    if body.remaining() < len {
        return Err("truncated gRPC message".into());
    }
    Ok(body.split_to(len))
}

pub(super) async fn istio_ca(
    spec: &IssuerSpec,
    current: Option<&Identity>,
    mesh_roots: &[CertificateDer<'static>],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IssueError> {
    let IssuerKind::IstioCa {
        address,
        server_name,
        ca_cert,
        token_file,
        cluster_id,
    } = &spec.kind
    else {
        unreachable!("called for an Istio CA issuer");
    };
    let ep = Endpoint::parse(address, true).map_err(err)?;
    let ca_roots = match ca_cert {
        Some(p) => Identity::load_roots(p).map_err(|e| err(e.to_string()))?,
        None => mesh_roots.to_vec(),
    };
    // The current certificate authenticates a renewal (istiod tries it first); a bootstrap or
    // pending stand-in that is not valid now would only make the handshake fail.
    let now = SystemTime::now();
    let client_cert = current
        .filter(|c| !c.is_pending() && c.not_before <= now && now < c.not_after)
        .map(|c| c.certified_key.clone());
    let token = token_file
        .as_deref()
        .map(|p| read_trimmed(p, "token file"))
        .transpose()?;
    if client_cert.is_none() && token.is_none() {
        return Err(err(
            "no way to authenticate: no valid current certificate and no token_file",
        ));
    }
    let (key, csr) = key_and_csr(&spec.spiffe_id)?;
    let io = dial(&ep, server_name, &ca_roots, client_cert, b"h2").await?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{server_name}{CREATE_CERTIFICATE_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = &token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(c) = cluster_id {
        req = req.header("clusterid", c.as_str());
    }
    let body = grpc_frame(&encode_request(&csr, spec.ttl.as_secs() as i64));
    let req = req.body(Full::new(body)).map_err(|e| err(e.to_string()))?;
    let (parts, data, trailers) = exchange(io, true, req).await?;
    if parts.status != http::StatusCode::OK {
        return Err(err(format!("CA answered HTTP {}", parts.status)));
    }
    // Trailers-only answers carry the status in the headers.
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|v| {
            let msg = h.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
            (v.to_str().unwrap_or("?").to_string(), msg.to_string())
        })
    };
    let status = trailers
        .as_ref()
        .and_then(status_of)
        .or_else(|| status_of(&parts.headers));
    match status {
        Some((code, _)) if code == "0" => {}
        Some((code, msg)) => {
            return Err(err(format!(
                "CA refused: grpc-status {code} ({}) {}",
                grpc_code_name(&code),
                percent_decode(&msg)
            )))
        }
        None => return Err(err("CA answer has no grpc-status")),
    }
    let msg = grpc_unframe(data).map_err(err)?;
    let (pems, _) = decode_strings(msg, 1).map_err(|e| err(format!("bad IstioCertificateResponse: {e}")))?;
    if pems.is_empty() {
        return Err(err("CA answered with an empty cert_chain"));
    }
    // "The leaf cert is the first element, and the root cert is the last element": present
    // the leaf and any intermediates, not the root (peers have it).
    let keep = if pems.len() > 1 { pems.len() - 1 } else { 1 };
    let mut chain = Vec::new();
    for p in &pems[..keep] {
        chain.extend(parse_pem_certs(p)?);
    }
    if chain.is_empty() {
        return Err(err("CA answer holds no certificate"));
    }
    Ok((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into())))
}

fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "7" => "PERMISSION_DENIED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "16" => "UNAUTHENTICATED",
        "2" => "UNKNOWN",
        "12" => "UNIMPLEMENTED",
        _ => "other",
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
