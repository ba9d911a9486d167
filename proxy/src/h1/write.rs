//! Writing HTTP/1.1 responses: the head encoded into a pooled buffer, the body framed by length,
//! by chunks or by close, and as few writes as the data allows (the head and a body that is
//! already there go out in one `writev`).

use std::io::IoSlice;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Version};
use tokio::net::TcpStream;

/// Writes all of `bufs`, waiting for the socket as needed.
pub async fn write_all(stream: &TcpStream, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body may follow (HEAD, 1xx, 204, 304, a 2xx to CONNECT).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// The framing of a response to `method` with `status`, for a client speaking `version`, given
/// the body's exact length if known.
pub fn response_framing(method: &Method, status: StatusCode, version: Version, exact: Option<u64>) -> BodyFraming {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (method == Method::CONNECT && status.is_success())
    {
        return BodyFraming::None;
    }
    match exact {
        Some(n) => BodyFraming::Length(n),
        None if version == Version::HTTP_11 => BodyFraming::Chunked,
        None => BodyFraming::Close,
    }
}

/// Encodes a response head into `out`: the status line, the fields (framing and connection
/// fields as decided here, whatever the map says), the blank line.
pub fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: BodyFraming,
    close: bool,
    keep_alive_10: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            // A HEAD or 304 answer keeps the length its GET would have had.
            if !(name == header::CONTENT_LENGTH && framing == BodyFraming::None) {
                continue;
            }
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyFraming::None | BodyFraming::Close => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The chunk-size line of a chunk of `len` bytes.
pub fn chunk_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = format_hex(len as u64, &mut line);
    line[digits] = b'\r';
    line[digits + 1] = b'\n';
    (line, digits + 2)
}

/// The end of a chunked body with `trailers` (only fields that may be trailers are kept).
pub fn encode_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if !may_trail(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields that must not be sent as trailers (RFC 9110 §6.5.1): framing, routing, connection
/// management and the like.
fn may_trail(name: &header::HeaderName) -> bool {
    ![
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::HOST,
        header::TE,
        header::TRAILER,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::SET_COOKIE,
    ]
    .contains(name)
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn format_hex(mut n: u64, out: &mut [u8; 18]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    let len = tmp.len() - i;
    out[..len].copy_from_slice(&tmp[i..]);
    len
}

/// A data frame as it goes out under `framing`: the chunk-size line, the data, the CRLF.
pub struct Framed {
    line: [u8; 18],
    line_len: usize,
    pub data: Bytes,
    chunked: bool,
}

impl Framed {
    pub fn new(data: Bytes, framing: BodyFraming) -> Framed {
        let chunked = framing == BodyFraming::Chunked;
        let (line, line_len) = if chunked { chunk_line(data.len()) } else { ([0; 18], 0) };
        Framed {
            line,
            line_len,
            data,
            chunked,
        }
    }

    /// Pushes this frame's slices after any already in `slices`.
    pub fn slices<'a>(&'a self, slices: &mut Vec<IoSlice<'a>>) {
        if self.chunked {
            slices.push(IoSlice::new(&self.line[..self.line_len]));
        }
        slices.push(IoSlice::new(&self.data));
        if self.chunked {
            slices.push(IoSlice::new(b"\r\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_carry_the_framing_decided_here() {
        let mut h = HeaderMap::new();
        h.insert("content-length", "999".parse().unwrap());
        h.insert("transfer-encoding", "gzip".parse().unwrap());
        h.insert("connection", "keep-alive".parse().unwrap());
        h.insert("x-a", "1".parse().unwrap());
        let mut out = Vec::new();
        encode_head(&mut out, StatusCode::OK, &h, BodyFraming::Length(5), false, false);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\n\r\n");
        let mut out = Vec::new();
        encode_head(&mut out, StatusCode::NOT_FOUND, &h, BodyFraming::Chunked, true, false);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        // HEAD: the length the GET would have had stays.
        let mut out = Vec::new();
        encode_head(&mut out, StatusCode::OK, &h, BodyFraming::None, false, true);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\ncontent-length: 999\r\nx-a: 1\r\nconnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn framing_by_method_status_and_version() {
        let f = response_framing;
        assert_eq!(
            f(&Method::GET, StatusCode::OK, Version::HTTP_11, Some(3)),
            BodyFraming::Length(3)
        );
        assert_eq!(
            f(&Method::GET, StatusCode::OK, Version::HTTP_11, None),
            BodyFraming::Chunked
        );
        assert_eq!(
            f(&Method::GET, StatusCode::OK, Version::HTTP_10, None),
            BodyFraming::Close
        );
        assert_eq!(
            f(&Method::HEAD, StatusCode::OK, Version::HTTP_11, None),
            BodyFraming::None
        );
        assert_eq!(
            f(&Method::GET, StatusCode::NO_CONTENT, Version::HTTP_11, None),
            BodyFraming::None
        );
        assert_eq!(
            f(&Method::CONNECT, StatusCode::OK, Version::HTTP_11, None),
            BodyFraming::None
        );
        assert_eq!(
            f(&Method::CONNECT, StatusCode::FORBIDDEN, Version::HTTP_11, Some(9)),
            BodyFraming::Length(9)
        );
    }

    #[test]
    fn chunk_lines_and_trailers() {
        let (l, n) = chunk_line(0x1a2b);
        assert_eq!(&l[..n], b"1a2b\r\n");
        let (l, n) = chunk_line(0);
        assert_eq!(&l[..n], b"0\r\n");
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        t.insert("content-length", "1".parse().unwrap());
        let mut out = Vec::new();
        encode_last_chunk(&mut out, Some(&t));
        assert_eq!(out, b"0\r\ngrpc-status: 0\r\n\r\n");
        let mut d = Vec::new();
        push_decimal(&mut d, 0);
        push_decimal(&mut d, 18446744073709551615);
        assert_eq!(d, b"018446744073709551615");
    }
}
