//! A TLS ClientHello reader for the passthrough gateway: finds SNI and ALPN in buffered bytes
//! without terminating TLS, the way Envoy's `tls_inspector` listener filter does.
//!
//! Written by hand (rather than feeding a copy to `rustls::server::Acceptor`) so that it accepts
//! exactly what is on the wire: rustls drops SNI values that are not valid DNS names, and would
//! refuse some hellos a passthrough gateway must still route. Every length is checked; malformed
//! input is an error, never a panic.

/// Largest ClientHello the gateway buffers (Envoy's tls_inspector default `max_client_hello_size`
/// is 64 KiB).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const MAX_RECORD: usize = 16384 + 2048;

/// What the gateway routes on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// The `host_name` entry of the server_name extension, as sent (not normalised).
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order; empty when the extension is absent.
    pub alpn: Vec<Vec<u8>>,
}

/// Why a buffer is not a ClientHello the gateway can route on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS handshake record")]
    NotHandshake,
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Parses the ClientHello at the start of `buf` (possibly spread over several TLS records).
/// `Ok(None)` means more bytes are needed.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo>, HelloError> {
    // Reassemble the handshake message from as many records as the buffer holds.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Ok(None);
        }
        if rest[0] != CONTENT_TYPE_HANDSHAKE {
            return Err(HelloError::NotHandshake);
        }
        // Legacy record version: 3.x; anything else is not TLS.
        if rest[1] != 3 {
            return Err(HelloError::NotHandshake);
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::Malformed("record length"));
        }
        if rest.len() < 5 + len {
            return Ok(None);
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello);
            }
            let body_len =
                (usize::from(handshake[1]) << 16) | (usize::from(handshake[2]) << 8) | usize::from(handshake[3]);
            if body_len + 4 > MAX_CLIENT_HELLO {
                return Err(HelloError::TooLarge);
            }
            if handshake.len() >= body_len + 4 {
                return parse_body(&handshake[4..4 + body_len]).map(Some);
            }
        }
        if handshake.len() > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHelloInfo, HelloError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    r.vec_u8("session_id")?;
    r.vec_u16("cipher_suites")?;
    r.vec_u8("compression_methods")?;
    let mut info = ClientHelloInfo::default();
    if r.0.is_empty() {
        // A hello without extensions is legal TLS 1.2; it has neither SNI nor ALPN.
        return Ok(info);
    }
    let mut exts = Reader(r.vec_u16("extensions")?);
    let mut seen = Vec::new();
    while !exts.0.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec_u16("extension data")?;
        if seen.contains(&ty) {
            // RFC 8446 §4.2: duplicate extensions are illegal; Envoy/BoringSSL reject them.
            return Err(HelloError::Malformed("duplicate extension"));
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => info.sni = parse_sni(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(info)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec_u16("server_name_list")?);
    let mut sni = None;
    while !list.0.is_empty() {
        let name_type = list.u8("name_type")?;
        let name = list.vec_u16("host_name")?;
        if name_type == 0 {
            if sni.is_some() {
                return Err(HelloError::Malformed("two host_name entries"));
            }
            if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return Err(HelloError::Malformed("host_name not printable ASCII"));
            }
            sni = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(sni)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec_u16("protocol_name_list")?);
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let p = list.vec_u8("protocol_name")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol name"));
        }
        out.push(p.to_vec());
    }
    if out.is_empty() {
        return Err(HelloError::Malformed("empty ALPN list"));
    }
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }
    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello as rustls writes it.
    fn rustls_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn parses_rustls_hello_with_istio_sni_and_alpn() {
        let sni = "outbound_.9080_._.reviews.bookinfo.svc.cluster.local";
        let bytes = rustls_hello(sni, &["istio-h2", "istio", "h2"]);
        let info = parse_client_hello(&bytes).unwrap().unwrap();
        assert_eq!(info.sni.as_deref(), Some(sni));
        assert_eq!(info.alpn, vec![b"istio-h2".to_vec(), b"istio".to_vec(), b"h2".to_vec()]);
        // Every strict prefix needs more bytes; none is an error.
        for n in 0..bytes.len() {
            assert_eq!(parse_client_hello(&bytes[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let bytes = rustls_hello("a.example", &["istio"]);
        let hs = &bytes[5..];
        let (a, b) = hs.split_at(7);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let info = parse_client_hello(&split).unwrap().unwrap();
        assert_eq!(info.sni.as_deref(), Some("a.example"));
        assert_eq!(info.alpn, vec![b"istio".to_vec()]);
    }

    #[test]
    fn rejects_non_tls_and_garbage() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HelloError::NotHandshake)
        );
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello)
        );
        assert!(matches!(
            parse_client_hello(&[22, 3, 1, 0, 4, 1, 0, 0, 0]),
            Err(HelloError::Malformed(_))
        ));
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 4, 1, 0xff, 0, 0]),
            Err(HelloError::TooLarge)
        );
        // Lengths that point past the end are errors, never panics.
        let mut bytes = rustls_hello("x.example", &["istio"]);
        for i in 9..bytes.len() {
            let saved = bytes[i];
            bytes[i] = 0xff;
            let _ = parse_client_hello(&bytes);
            bytes[i] = saved;
        }
    }
}
