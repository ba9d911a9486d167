//! The chunked transfer coding of a request body (RFC 9112 §7.1), decoded strictly: every line
//! ends in CRLF (a bare LF anywhere, trailers included, is an error, since a parser that
//! accepted it would end the body somewhere else than one that did not), a chunk size is one
//! run of hex digits (no sign, no `0x`, no spaces) small enough to count, extensions are
//! skipped within a bound, and trailer fields are checked like header fields.
//!
//! The decoder is a state machine over whatever bytes have arrived, so a body split across any
//! number of reads decodes the same as one read (the tests check every split).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Chunk sizes from this on are refused: no body meshgate forwards is 2^48 bytes (256 TiB), and
/// a bound far below u64::MAX keeps every sum of sizes exact.
const MAX_CHUNK_SIZE: u64 = 1 << 48;
/// Bytes of extensions allowed on one chunk-size line (hyper allows 16 KiB in all).
const MAX_EXTENSION: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// The coding is broken, or one chunk declares more than the whole body may hold (an
    /// absurd size, refused at once whether past what can be counted or past
    /// `limits.max_request_body`): 400, and the connection closed.
    Malformed(&'static str),
    /// Chunks of sensible sizes that add up to more than `limits.max_request_body`: 413.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits; `digits` seen so far.
    Size {
        digits: u8,
    },
    /// Whitespace after the size: only `;` may follow (BWS before an extension).
    SizeSpace,
    /// Skipping an extension up to CR; bytes of it seen.
    Extension(usize),
    /// After the CR ending a size line.
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    TrailerLf,
    /// After the CR of the final empty line.
    EndLf,
    Done,
}

/// What one call of [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input used.
    pub consumed: usize,
    /// Body data within the input (offsets into it), if this step reached some.
    pub data: Option<std::ops::Range<usize>>,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    total: u64,
    limit: Option<u64>,
    /// The trailer line being read, and all trailer bytes so far (bounded by `max_trailers`).
    line: Vec<u8>,
    trailer_bytes: usize,
    max_trailers: usize,
    trailers: Option<HeaderMap>,
}

impl ChunkedDecoder {
    /// `limit`: the most body bytes accepted; `max_trailers`: the most trailer bytes.
    pub fn new(limit: Option<u64>, max_trailers: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            size: 0,
            total: 0,
            limit,
            line: Vec::new(),
            trailer_bytes: 0,
            max_trailers,
            trailers: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes decoded so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The trailer fields, once the body is done (if it had any).
    pub fn take_trailers(&mut self) -> Option<HeaderMap> {
        self.trailers.take()
    }

    /// Decodes from `input` until it yields data, finishes, or needs more bytes. Call again with
    /// the rest of the input (from `consumed`) while progress is made.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => break,
                State::Size { digits } => {
                    if let Some(d) = hex(b) {
                        if self.size >= MAX_CHUNK_SIZE >> 4 {
                            return Err(ChunkError::Malformed("chunk size too large"));
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        self.state = State::Size {
                            digits: digits.saturating_add(1),
                        };
                    } else if digits == 0 {
                        return Err(ChunkError::Malformed("invalid chunk size"));
                    } else {
                        match b {
                            b';' => self.state = State::Extension(0),
                            b' ' | b'\t' => self.state = State::SizeSpace,
                            b'\r' => self.state = State::SizeLf,
                            _ => return Err(ChunkError::Malformed("invalid chunk size")),
                        }
                    }
                    i += 1;
                }
                State::SizeSpace => {
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = State::Extension(0),
                        _ => return Err(ChunkError::Malformed("invalid chunk size line")),
                    }
                    i += 1;
                }
                State::Extension(n) => {
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        // Visible characters, spaces, tabs and obs-text: what tokens, quoted
                        // strings and BWS are made of. Control characters (LF included) are not.
                        b'\t' | b' '..=b'~' | 0x80..=0xff => {
                            if n >= MAX_EXTENSION {
                                return Err(ChunkError::Malformed("chunk extension too long"));
                            }
                            self.state = State::Extension(n + 1);
                        }
                        _ => return Err(ChunkError::Malformed("invalid chunk extension")),
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Malformed("chunk size line not ended by CRLF"));
                    }
                    i += 1;
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        if self.limit.is_some_and(|l| self.size > l) {
                            return Err(ChunkError::Malformed("chunk size beyond limits.max_request_body"));
                        }
                        self.total += self.size;
                        if self.limit.is_some_and(|l| self.total > l) {
                            return Err(ChunkError::TooLarge);
                        }
                        self.state = State::Data(self.size);
                        self.size = 0;
                    }
                }
                State::Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    let start = i;
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataCr } else { State::Data(left) };
                    return Ok(Step {
                        consumed: i,
                        data: Some(start..i),
                    });
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::Malformed("chunk data not followed by CRLF"));
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Malformed("chunk data not followed by CRLF"));
                    }
                    self.state = State::Size { digits: 0 };
                    i += 1;
                }
                State::TrailerStart => {
                    match b {
                        b'\r' => self.state = State::EndLf,
                        b'\n' => return Err(ChunkError::Malformed("bare LF in the trailer section")),
                        _ => {
                            self.line.clear();
                            self.line.push(b);
                            self.trailer_bytes += 1;
                            self.state = State::Trailer;
                        }
                    }
                    i += 1;
                }
                State::Trailer => {
                    match b {
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError::Malformed("bare LF in the trailer section")),
                        _ => {
                            self.trailer_bytes += 1;
                            if self.trailer_bytes > self.max_trailers {
                                return Err(ChunkError::Malformed("trailer section too large"));
                            }
                            self.line.push(b);
                        }
                    }
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Malformed("trailer line not ended by CRLF"));
                    }
                    self.trailer_field()?;
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Malformed("chunked body not ended by CRLF"));
                    }
                    self.state = State::Done;
                    self.line = Vec::new();
                    i += 1;
                    break;
                }
            }
        }
        Ok(Step {
            consumed: i,
            data: None,
        })
    }

    /// One trailer line, checked like a header field (`token ":" OWS value OWS`).
    fn trailer_field(&mut self) -> Result<(), ChunkError> {
        let line = std::mem::take(&mut self.line);
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(ChunkError::Malformed("trailer line without a colon"))?;
        let name =
            HeaderName::from_bytes(&line[..colon]).map_err(|_| ChunkError::Malformed("invalid trailer field name"))?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| ChunkError::Malformed("invalid trailer field value"))?;
        self.trailers.get_or_insert_with(HeaderMap::new).append(name, value);
        self.line = line;
        self.line.clear();
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the body, the bytes used, the trailers.
    fn run(input: &[u8], step: usize, limit: Option<u64>) -> Result<(Vec<u8>, usize, Option<HeaderMap>), ChunkError> {
        let mut d = ChunkedDecoder::new(limit, 1024);
        let mut body = Vec::new();
        let mut used = 0;
        let mut fed = 0;
        while !d.is_done() {
            if fed == input.len() && used == fed {
                break;
            }
            fed = (fed + step).min(input.len()).max(used);
            let s = d.decode(&input[used..fed])?;
            if let Some(r) = s.data {
                body.extend_from_slice(&input[used + r.start..used + r.end]);
            }
            used += s.consumed;
            if s.consumed == 0 && fed == input.len() {
                break;
            }
        }
        Ok((body, used, d.take_trailers()))
    }

    fn all_steps(input: &[u8]) -> Result<(Vec<u8>, usize, Option<HeaderMap>), ChunkError> {
        let whole = run(input, input.len(), None);
        for step in 1..input.len().min(24) {
            assert_eq!(run(input, step, None), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers_across_every_split() {
        let input = b"5;a=b;c=\"d e\"\r\nhello\r\n010\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\nY: two \r\n\r\nNEXT";
        let (body, used, trailers) = all_steps(input).unwrap();
        assert_eq!(body, b"hello0123456789abcdef");
        assert_eq!(&input[used..], b"NEXT");
        let t = trailers.unwrap();
        assert_eq!(t["x-t"], "1");
        assert_eq!(t["y"], "two");
    }

    #[test]
    fn an_empty_body_and_leading_zeros() {
        assert_eq!(all_steps(b"0\r\n\r\n").unwrap().0, b"");
        assert_eq!(
            all_steps(b"0000000000000000000003\r\nabc\r\n0\r\n\r\n").unwrap().0,
            b"abc"
        );
    }

    #[test]
    fn malformed_codings_are_refused() {
        for bad in [
            &b"\r\nhello\r\n0\r\n\r\n"[..],
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5;a\x00\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\nX: 1\r\n\n",
            b"0\r\n\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\nbad name: 1\r\n\r\n",
            b"ffffffffffffffff\r\n",
            b"1000000000000\r\n",
        ] {
            assert!(
                matches!(run(bad, bad.len(), None), Err(ChunkError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                run(bad, bad.len(), None)
            );
            for step in 1..bad.len() {
                assert!(
                    run(bad, step, None).is_err(),
                    "{:?} step {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
    }

    #[test]
    fn the_limit_is_checked_against_declared_sizes_before_data_arrives() {
        // One absurd chunk: malformed at once. Sensible chunks adding up past it: too large.
        let absurd = Err(ChunkError::Malformed("chunk size beyond limits.max_request_body"));
        assert_eq!(run(b"10\r\n", 4, Some(15)), absurd);
        assert_eq!(run(b"8\r\n12345678\r\n8\r\n", 64, Some(15)), Err(ChunkError::TooLarge));
        assert!(run(b"8\r\n12345678\r\n7\r\n1234567\r\n0\r\n\r\n", 64, Some(15)).is_ok());
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(MAX_EXTENSION + 1));
        assert!(matches!(run(long.as_bytes(), 64, None), Err(ChunkError::Malformed(_))));
        let trailer = format!("0\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert!(matches!(
            run(trailer.as_bytes(), 64, None),
            Err(ChunkError::Malformed(_))
        ));
    }
}
