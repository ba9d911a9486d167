//! PROXY protocol v1 and v2 (haproxy.org proxy-protocol.txt), as cloud load balancers send it.
//!
//! Only a header from a trusted load balancer address is read, and only the first one: NLB
//! prepends its header without removing one a client sent, so a second header is client data
//! (and then fails as a malformed HTTP request). `LOCAL` (v2) and `UNKNOWN` (v1) mean "no
//! client address" — health checks — and keep the connection's own peer address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;
/// Largest v2 header accepted (16-byte prefix + addresses + TLVs); bounds what we buffer.
pub const V2_MAX: usize = 16 + 536;
const PP2_TYPE_AWS: u8 = 0xEA;
const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyInfo {
    /// The original client; `None` for LOCAL / UNKNOWN (use the connection's peer).
    pub source: Option<SocketAddr>,
    /// AWS PrivateLink: the VPC endpoint the client came through.
    pub vpce: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed to decide.
    Incomplete,
    /// The bytes do not start with a PROXY header.
    NotProxy,
    /// A header of `len` bytes.
    Header {
        len: usize,
        info: ProxyInfo,
    },
    Invalid(&'static str),
}

/// Looks at the first bytes of a connection.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] == V2_SIG[..n] {
        return if buf.len() < V2_SIG.len() {
            Parsed::Incomplete
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if buf.len() < 6 {
            Parsed::Incomplete
        } else {
            parse_v1(buf)
        };
    }
    Parsed::NotProxy
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).take(V1_MAX).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 header longer than 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    let line = match std::str::from_utf8(&buf[..end]) {
        Ok(l) => l,
        Err(_) => return Parsed::Invalid("PROXY v1 header is not ASCII"),
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Parsed::Header {
            len,
            info: ProxyInfo::default(),
        },
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = match src.parse() {
                Ok(ip) => ip,
                Err(_) => return Parsed::Invalid("PROXY v1 source address is invalid"),
            };
            if (*proto == "TCP4") != ip.is_ipv4() {
                return Parsed::Invalid("PROXY v1 address family mismatch");
            }
            let port: u16 = match sport.parse() {
                Ok(p) => p,
                Err(_) => return Parsed::Invalid("PROXY v1 source port is invalid"),
            };
            Parsed::Header {
                len,
                info: ProxyInfo {
                    source: Some(SocketAddr::new(ip, port)),
                    vpce: None,
                },
            }
        }
        _ => Parsed::Invalid("malformed PROXY v1 header"),
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2 header with unsupported version");
    }
    let fam = buf[13];
    let body_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body_len;
    if len > V2_MAX {
        return Parsed::Invalid("PROXY v2 header too long");
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let body = &buf[16..len];
    let (source, tlvs) = match ver_cmd & 0x0F {
        0x0 => (None, tlv_region(fam, body)),
        0x1 => match fam {
            0x11 => {
                if body.len() < 12 {
                    return Parsed::Invalid("PROXY v2 TCP4 block too short");
                }
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                (Some(SocketAddr::new(ip.into(), port)), &body[12..])
            }
            0x21 => {
                if body.len() < 36 {
                    return Parsed::Invalid("PROXY v2 TCP6 block too short");
                }
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                (Some(SocketAddr::new(Ipv6Addr::from(a).into(), port)), &body[36..])
            }
            // UNSPEC or a family we do not route (UDP, unix): no usable client address.
            _ => (None, tlv_region(fam, body)),
        },
        _ => return Parsed::Invalid("PROXY v2 header with unknown command"),
    };
    let vpce = match find_vpce(tlvs) {
        Ok(v) => v,
        Err(e) => return Parsed::Invalid(e),
    };
    Parsed::Header {
        len,
        info: ProxyInfo { source, vpce },
    }
}

/// The TLVs follow the address block, whose size depends on the family.
fn tlv_region(fam: u8, body: &[u8]) -> &[u8] {
    let skip = match fam {
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => 0,
    };
    body.get(skip..).unwrap_or(&[])
}

fn find_vpce(mut tlvs: &[u8]) -> Result<Option<String>, &'static str> {
    let mut vpce = None;
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err("truncated PROXY v2 TLV");
        }
        let t = tlvs[0];
        let l = u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        let v = tlvs.get(3..3 + l).ok_or("truncated PROXY v2 TLV")?;
        if t == PP2_TYPE_AWS && v.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID) {
            let id = std::str::from_utf8(&v[1..]).map_err(|_| "AWS VPCE TLV is not ASCII")?;
            vpce = Some(id.to_string());
        }
        tlvs = &tlvs[3 + l..];
    }
    Ok(vpce)
}

/// Builds a v2 header (for tests and the load generator).
pub fn encode_v2(source: Option<SocketAddr>, dest: SocketAddr, vpce: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    let (cmd, fam) = match (source, dest) {
        (Some(SocketAddr::V4(s)), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            (0x21, 0x11)
        }
        (Some(SocketAddr::V6(s)), SocketAddr::V6(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            (0x21, 0x21)
        }
        _ => (0x20, 0x00),
    };
    if let Some(id) = vpce {
        body.push(PP2_TYPE_AWS);
        body.extend_from_slice(&((id.len() + 1) as u16).to_be_bytes());
        body.push(PP2_SUBTYPE_AWS_VPCE_ID);
        body.extend_from_slice(id.as_bytes());
    }
    let mut out = V2_SIG.to_vec();
    out.push(cmd);
    out.push(fam);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = b"PROXY TCP4 10.20.1.2 10.0.0.1 56324 8080\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Parsed::Header {
                len: 42,
                info: ProxyInfo {
                    source: Some(sa("10.20.1.2:56324")),
                    vpce: None
                }
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n";
        assert!(
            matches!(parse(h), Parsed::Header { info: ProxyInfo { source: Some(s), .. }, .. } if s == sa("[2001:db8::1]:1234"))
        );
    }

    #[test]
    fn v1_unknown_keeps_peer() {
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                len: 15,
                info: ProxyInfo::default()
            }
        );
    }

    #[test]
    fn v1_incomplete_and_invalid() {
        assert_eq!(parse(b"PRO"), Parsed::Incomplete);
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2"), Parsed::Incomplete);
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n"),
            Parsed::Invalid(_)
        ));
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
    }

    #[test]
    fn not_proxy() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NotProxy);
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n"), Parsed::NotProxy);
    }

    #[test]
    fn v2_roundtrip_with_vpce() {
        let h = encode_v2(Some(sa("10.20.1.2:4000")), sa("10.0.0.1:8080"), Some("vpce-0abc123"));
        let mut bytes = h.clone();
        bytes.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&bytes),
            Parsed::Header {
                len: h.len(),
                info: ProxyInfo {
                    source: Some(sa("10.20.1.2:4000")),
                    vpce: Some("vpce-0abc123".into())
                }
            }
        );
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "cut {cut}");
        }
    }

    #[test]
    fn v2_ipv6_and_local() {
        let h = encode_v2(Some(sa("[2001:db8::7]:5")), sa("[2001:db8::1]:80"), None);
        assert!(
            matches!(parse(&h), Parsed::Header { info: ProxyInfo { source: Some(s), .. }, .. } if s == sa("[2001:db8::7]:5"))
        );
        let local = encode_v2(None, sa("10.0.0.1:80"), None);
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: 16,
                info: ProxyInfo::default()
            }
        );
    }

    #[test]
    fn v2_invalid() {
        let mut h = encode_v2(Some(sa("1.2.3.4:5")), sa("5.6.7.8:9"), None);
        h[12] = 0x31; // version 3
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
        let mut h = encode_v2(Some(sa("1.2.3.4:5")), sa("5.6.7.8:9"), None);
        h[12] = 0x2F; // unknown command
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
        let mut h = encode_v2(Some(sa("1.2.3.4:5")), sa("5.6.7.8:9"), None);
        h[15] = 4; // TCP4 block claimed to be 4 bytes
        h.truncate(20);
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
        let mut h = encode_v2(Some(sa("1.2.3.4:5")), sa("5.6.7.8:9"), Some("vpce-1"));
        let n = h.len();
        h[15] = (n - 16 - 2) as u8; // cut into the TLV
        h.truncate(n - 2);
        assert!(matches!(parse(&h), Parsed::Invalid(_)));
    }
}

pub use crate::config::ProxyProtocolMode as Mode;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("PROXY header required but the connection did not start with one")]
    Missing,
    #[error("PROXY header not complete within the timeout")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How long a trusted peer has to send its PROXY header.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `listener` takes a PROXY header from `peer` (a configured load balancer).
pub fn trusts(listener: &crate::config::Listener, peer: std::net::SocketAddr) -> bool {
    listener.proxy_protocol != Mode::Off
        && listener
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer.ip().to_canonical()))
}

/// Who is behind a new connection on `listener`: the TCP peer, or the source a trusted load
/// balancer's PROXY header names (peers outside `trusted_proxies` are never asked for one, so
/// they cannot spoof an address). Also the VPC endpoint from the header, and the bytes read past
/// it, which belong to the application protocol.
pub async fn admit<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    listener: Option<&crate::config::Listener>,
    peer: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, Option<String>, bytes::Bytes), ReadError> {
    let Some(l) = listener.filter(|l| trusts(l, peer)) else {
        return Ok((peer, None, bytes::Bytes::new()));
    };
    let (info, rest) = read_header(stream, l.proxy_protocol == Mode::Required, HEADER_TIMEOUT).await?;
    Ok(match info {
        Some(info) => (info.source.unwrap_or(peer), info.vpce, rest),
        None => (peer, None, rest),
    })
}

/// Reads the PROXY header, if any, from the start of `stream`. Returns what it says and the bytes
/// read past it, which belong to the application protocol.
pub async fn read_header<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    required: bool,
    timeout: std::time::Duration,
) -> Result<(Option<ProxyInfo>, bytes::Bytes), ReadError> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(256);
    let work = async {
        loop {
            match parse(&buf) {
                Parsed::Header { len, info } => {
                    let rest = buf.split_off(len).freeze();
                    return Ok((Some(info), rest));
                }
                Parsed::NotProxy if required => return Err(ReadError::Missing),
                Parsed::NotProxy => return Ok((None, buf.split().freeze())),
                Parsed::Invalid(e) => return Err(ReadError::Invalid(e)),
                Parsed::Incomplete => {
                    if buf.len() >= V2_MAX {
                        return Err(ReadError::Invalid("PROXY header too long"));
                    }
                    let n = stream.read_buf(&mut buf).await?;
                    if n == 0 {
                        return if buf.is_empty() && !required {
                            Ok((None, bytes::Bytes::new()))
                        } else {
                            Err(ReadError::Missing)
                        };
                    }
                }
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ReadError::Timeout)?
}
