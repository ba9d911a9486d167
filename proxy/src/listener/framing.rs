//! Watches the HTTP/1 byte stream on its way into hyper to find what hyper hides: a request
//! carrying both `Content-Length` and `Transfer-Encoding`. hyper (RFC 9112 §6.3) silently drops
//! the `Content-Length`, frames the body as chunked and closes afterwards; that is safe for
//! hyper, but a front end that framed by length may disagree about where the request ended, so
//! we refuse such a request with 400 instead of forwarding it (issue #7, request smuggling).
//!
//! The watcher only reads the bytes hyper is about to parse: it finds each request head, notes
//! whether its framing is ambiguous, and skips the body by the same rules hyper applies
//! (chunked wins over length). Anything it does not understand (HTTP/2's preface, a malformed
//! head, the bytes after an upgrade) makes it stop following; every later HTTP/1 request on
//! that connection is then refused too, since nothing vouches for its framing. hyper rejects
//! the malformed input itself, and parses no request after an upgrade.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the watcher learnt, read by the request handler. hyper handles the requests of one
/// HTTP/1 connection in order, one at a time, and the watcher sees each head before hyper can
/// hand the request over; so numbering requests on both sides lines them up.
#[derive(Debug)]
pub struct Verdicts {
    /// Index of the first request with ambiguous framing (hyper closes after it), or `u64::MAX`.
    ambiguous: AtomicU64,
    /// From this request on the watcher could not follow the framing, so it cannot vouch for
    /// any later request on the connection either; `u64::MAX` while it follows.
    stopped: AtomicU64,
    handled: AtomicU64,
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts {
            ambiguous: AtomicU64::new(u64::MAX),
            stopped: AtomicU64::new(u64::MAX),
            handled: AtomicU64::new(0),
        }
    }
}

impl Verdicts {
    /// Called once per HTTP/1 request, in order: why this one must be refused, if it must (its
    /// framing was ambiguous, or the watcher lost track before it).
    pub fn next_refusal(&self) -> Option<&'static str> {
        let n = self.handled.fetch_add(1, Ordering::Relaxed);
        if self.ambiguous.load(Ordering::Acquire) == n {
            Some("both Content-Length and Transfer-Encoding (ambiguous framing)")
        } else if n >= self.stopped.load(Ordering::Acquire) {
            Some("an earlier request on this connection had framing that could not be followed")
        } else {
            None
        }
    }

    fn stop(&self, index: u64) {
        let _ = self
            .stopped
            .compare_exchange(u64::MAX, index, Ordering::AcqRel, Ordering::Relaxed);
    }

    fn mark(&self, index: u64) {
        let _ = self
            .ambiguous
            .compare_exchange(u64::MAX, index, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Longest chunk-size line we follow (extensions included); hyper allows 16 KiB of extensions.
const MAX_CHUNK_LINE: usize = 20 * 1024;

#[derive(Debug, PartialEq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping a body of known length.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer fields after the last chunk; `bool` = at the start of a line.
    Trailers(bool),
    /// Not HTTP/1 we can follow any more.
    Off,
}

/// The framing follower, separate from I/O so it can be tested byte by byte.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    buf: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    heads: u64,
}

impl Scanner {
    pub fn new(max_head: usize, max_headers: usize) -> Scanner {
        Scanner {
            state: State::Head,
            buf: Vec::new(),
            max_head,
            max_headers,
            heads: 0,
        }
    }

    fn off(&mut self) {
        self.state = State::Off;
        self.buf = Vec::new();
    }

    /// Feeds bytes in stream order; calls `ambiguous(index)` for each ambiguous request head.
    pub fn feed(&mut self, mut data: &[u8], ambiguous: &mut impl FnMut(u64)) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => {
                    if self.buf.is_empty() {
                        // Empty lines before a request line are ignored (RFC 9112 §2.2), as hyper does.
                        let skip = data.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    if self.buf.is_empty() {
                        // The usual case: the whole head arrived in one read; look at it in place.
                        if let Some(end) = find_head_end(data) {
                            self.head(&data[..end], ambiguous);
                            data = &data[end..];
                            continue;
                        }
                    }
                    // Look for the blank line ending the head, including one split across reads.
                    let from = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(data);
                    let end = find_head_end(&self.buf[from..]).map(|e| from + e);
                    let Some(end) = end else {
                        if self.buf.len() > self.max_head {
                            self.off();
                        }
                        return;
                    };
                    let rest_in_buf = self.buf.len() - end;
                    data = &data[data.len() - rest_in_buf..];
                    let head = std::mem::take(&mut self.buf);
                    self.head(&head[..end], ambiguous);
                }
                State::Body(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if take == n { State::Head } else { State::Body(n - take) };
                }
                State::ChunkSize => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > MAX_CHUNK_LINE {
                            self.off();
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    match chunk_size(&line) {
                        Some(0) => self.state = State::Trailers(true),
                        Some(n) => self.state = State::ChunkData(n),
                        None => self.off(),
                    }
                }
                State::ChunkData(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.state = if take == n {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd => match data.iter().position(|b| *b == b'\n') {
                    Some(nl) => {
                        data = &data[nl + 1..];
                        self.state = State::ChunkSize;
                    }
                    None => return,
                },
                State::Trailers(line_start) => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match (b, line_start) {
                        (b'\n', true) => State::Head,
                        (b'\n', false) => State::Trailers(true),
                        (b'\r', s) => State::Trailers(s),
                        _ => State::Trailers(false),
                    };
                }
            }
        }
    }

    fn head(&mut self, head: &[u8], ambiguous: &mut impl FnMut(u64)) {
        // A line scan rather than a full parse: only the request line's method and version and
        // three header names matter here, and hyper validates everything else itself.
        let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let request_line = lines.next().unwrap_or_default();
        let version_ok = request_line.ends_with(b" HTTP/1.1") || request_line.ends_with(b" HTTP/1.0");
        // Anything else (HTTP/2's preface `PRI * HTTP/2.0` among them) is not ours to follow.
        if !version_ok || request_line.first().is_none_or(|b| !b.is_ascii_alphabetic()) {
            return self.off();
        }
        let index = self.heads;
        self.heads += 1;
        // hyper skips a Content-Length after a Transfer-Encoding without even parsing it, so
        // any Content-Length at all next to a Transfer-Encoding is the ambiguity, valid or not.
        let mut length: Option<Option<u64>> = None;
        let mut te: Option<&[u8]> = None;
        let mut count = 0;
        for line in lines.take_while(|l| !l.is_empty()) {
            count += 1;
            let colon = line.iter().position(|b| *b == b':');
            // Folded or nameless lines: hyper refuses the request, and we stop following.
            let (Some(colon), false) = (colon, line[0] == b' ' || line[0] == b'\t') else {
                return self.off();
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"content-length") {
                length = Some(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = Some(value);
            }
        }
        if count > self.max_headers {
            // hyper refuses it (431) and closes.
            return self.off();
        }
        if te.is_some() && length.is_some() {
            ambiguous(index);
        }
        // CONNECT and Upgrade requests are followed like any other: if the connection is
        // taken over, what follows is not HTTP/1 and the watcher stops on it, harmlessly, as
        // hyper parses no request after an upgrade.
        self.state = match (te, length) {
            (Some(v), _) if ends_chunked(v) => State::ChunkSize,
            (Some(_), _) => return self.off(),
            (None, Some(None)) => return self.off(),
            (None, Some(Some(0))) | (None, None) => State::Head,
            (None, Some(Some(n))) => State::Body(n),
        };
    }
}

/// Offset just past the blank line ending a head (`\r\n\r\n` or a bare `\n\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

fn ends_chunked(v: &[u8]) -> bool {
    v.rsplit(|b| *b == b',')
        .next()
        .map(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .unwrap_or(false)
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = line.split(|b| *b == b';').next()?.trim_ascii();
    if size.is_empty() {
        return None;
    }
    // Leading zeros are allowed and do not count towards the 16 hex digits of a u64.
    let digits = std::str::from_utf8(size).ok()?.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The client stream as hyper reads it, with the scanner looking on.
pub struct Watched<S> {
    inner: S,
    scanner: Scanner,
    verdicts: Arc<Verdicts>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, scanner: Scanner, verdicts: Arc<Verdicts>) -> Self {
        Watched {
            inner,
            scanner,
            verdicts,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if this.scanner.state != State::Off {
                let verdicts = &this.verdicts;
                this.scanner.feed(&buf.filled()[before..], &mut |i| verdicts.mark(i));
                if this.scanner.state == State::Off {
                    verdicts.stop(this.scanner.heads);
                }
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the ambiguous indices and heads seen.
    fn scan(input: &[u8], step: usize) -> (Vec<u64>, u64, bool) {
        let mut s = Scanner::new(64 * 1024, 100);
        let mut found = Vec::new();
        for piece in input.chunks(step) {
            s.feed(piece, &mut |i| found.push(i));
        }
        (found, s.heads, s.state == State::Off)
    }

    fn all_steps(input: &[u8]) -> (Vec<u64>, u64, bool) {
        let first = scan(input, input.len());
        for step in 1..input.len().min(40) {
            assert_eq!(scan(input, step), first, "step {step}");
        }
        first
    }

    #[test]
    fn follows_keep_alive_requests_with_each_framing() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: t\r\n\r\n\
            \r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(all_steps(input), (vec![], 4, false));
    }

    #[test]
    fn flags_the_request_with_both_length_and_chunked_in_either_order() {
        let a = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
            POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(all_steps(a).0, vec![1]);
        let b = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nHost: x\r\ncontent-length: 0\r\n\r\n0\r\n\r\n";
        assert_eq!(all_steps(b).0, vec![0]);
    }

    #[test]
    fn body_bytes_that_look_like_a_request_are_not_heads() {
        let body = b"GET /inner HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        input.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(all_steps(&input), (vec![], 2, false));
    }

    #[test]
    fn stops_watching_what_it_cannot_follow() {
        assert!(all_steps(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").2, "h2 preface");
        // After an upgrade the bytes are frames, not heads: the watcher stops there.
        let up = all_steps(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x81\x85frame\r\n\r\n");
        assert!(up.2 && up.1 == 1, "{up:?}");
        assert!(all_steps(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").2);
        assert!(all_steps(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").2);
        let mut s = Scanner::new(100, 100);
        s.feed(&[b'a'; 200], &mut |_| {});
        assert_eq!(s.state, State::Off, "an endless head");
    }

    #[test]
    fn any_content_length_next_to_transfer_encoding_is_flagged() {
        // hyper ignores a Content-Length after Transfer-Encoding without parsing it.
        for cl in ["5, 5", "5x", "", "5"] {
            let input = format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: {cl}\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"
            );
            assert_eq!(all_steps(input.as_bytes()), (vec![0], 2, false), "{cl:?}");
        }
    }

    #[test]
    fn chunk_sizes_with_leading_zeros_are_followed() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n000000000000000000005\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(all_steps(input), (vec![], 2, false));
    }

    #[test]
    fn requests_after_the_watcher_stopped_are_refused() {
        let v = Verdicts::default();
        v.stop(2);
        assert_eq!(
            (0..4).map(|_| v.next_refusal().is_some()).collect::<Vec<_>>(),
            vec![false, false, true, true]
        );
    }

    #[test]
    fn verdicts_line_up_with_requests_in_order() {
        let v = Verdicts::default();
        v.mark(2);
        v.mark(5);
        assert_eq!(
            (0..4).map(|_| v.next_refusal().is_some()).collect::<Vec<_>>(),
            vec![false, false, true, false]
        );
    }
}
