//! A request body as the pipeline sees it. A body that arrived whole with its head (the common
//! small request) is handed over as one chunk; a longer one is read by the connection task as
//! the pipeline consumes it (a pump feeding a channel of two chunks, so at most two chunks of a
//! request sit in meshgate at once), with `100 Continue` sent when the pipeline first asks for
//! it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use super::buf::ReadBuf;
use super::chunked::{ChunkError, ChunkedDecoder};
use super::write::write_all;
use crate::upstream::BoxError;

/// Why a request body ended early: the client's framing broke, it went away, or it is too large.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("request body: {0}")]
    Malformed(&'static str),
    #[error("request body larger than the limit")]
    TooLarge,
    #[error("client closed the connection before the end of its request body")]
    Truncated,
    #[error("reading the request body: {0}")]
    Io(String),
}

type Chunk = Result<Frame<Bytes>, BoxError>;

pub struct H1Body {
    inner: Inner,
}

enum Inner {
    Empty,
    Full(Option<Bytes>, Option<HeaderMap>),
    Stream {
        rx: mpsc::Receiver<Chunk>,
        /// Told when the body is first polled (for `100 Continue`); taken then.
        wanted: Option<Arc<Notify>>,
        remaining: Option<u64>,
        done: bool,
    },
}

impl H1Body {
    pub fn empty() -> H1Body {
        H1Body { inner: Inner::Empty }
    }

    pub fn full(data: Bytes, trailers: Option<HeaderMap>) -> H1Body {
        H1Body {
            inner: Inner::Full((!data.is_empty()).then_some(data), trailers),
        }
    }

    fn stream(rx: mpsc::Receiver<Chunk>, wanted: Arc<Notify>, length: Option<u64>) -> H1Body {
        H1Body {
            inner: Inner::Stream {
                rx,
                wanted: Some(wanted),
                remaining: length,
                done: false,
            },
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        match &mut self.inner {
            Inner::Empty => Poll::Ready(None),
            Inner::Full(data, trailers) => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            Inner::Stream {
                rx,
                wanted,
                remaining,
                done,
            } => {
                if let Some(w) = wanted.take() {
                    w.notify_one();
                }
                if *done {
                    return Poll::Ready(None);
                }
                let p = rx.poll_recv(cx);
                match &p {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(r), Some(d)) = (remaining.as_mut(), f.data_ref()) {
                            *r = r.saturating_sub(d.len() as u64);
                        }
                    }
                    Poll::Ready(Some(Err(_))) | Poll::Ready(None) => *done = true,
                    Poll::Pending => {}
                }
                p
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Full(d, t) => d.is_none() && t.is_none(),
            Inner::Stream { done, remaining, .. } => *done || *remaining == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full(d, _) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Stream { remaining, .. } => remaining.map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
}

/// How a streamed body is framed on the wire.
#[derive(Debug)]
pub enum Source {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// The connection task's side of a streamed body: reads it from the socket as the pipeline
/// takes it.
pub struct Pump {
    tx: mpsc::Sender<Chunk>,
    wanted: Arc<Notify>,
    source: Source,
    /// Send `100 Continue` when the body is first wanted (the client waits for it).
    expect_continue: bool,
    /// The body was read to its end (so the connection can carry another request).
    pub complete: bool,
}

/// Largest chunk read at once for a body of known length: one pooled buffer's worth.
const READ_CHUNK: usize = super::buf::SIZE;

impl Pump {
    /// The body (for the request) and the pump (for the connection task).
    pub fn new(source: Source, expect_continue: bool) -> (H1Body, Pump) {
        let (tx, rx) = mpsc::channel(2);
        let wanted = Arc::new(Notify::new());
        let length = match &source {
            Source::Length(n) => Some(*n),
            Source::Chunked(_) => None,
        };
        let body = H1Body::stream(rx, wanted.clone(), length);
        let pump = Pump {
            tx,
            wanted,
            source,
            expect_continue,
            complete: false,
        };
        (body, pump)
    }

    /// Reads the body into the channel until it ends, the pipeline drops it, or the client's
    /// framing breaks (the error goes to the pipeline, which answers 400). Returns when done;
    /// `complete` says whether the body was read to its end.
    pub async fn run(&mut self, stream: &TcpStream, rbuf: &mut ReadBuf) {
        self.wanted.notified().await;
        let continue_line = &mut [std::io::IoSlice::new(b"HTTP/1.1 100 Continue\r\n\r\n")];
        if self.expect_continue && rbuf.is_empty() && write_all(stream, continue_line).await.is_err() {
            return;
        }
        let result = match &mut self.source {
            Source::Length(n) => pump_length(&self.tx, stream, rbuf, *n).await,
            Source::Chunked(d) => pump_chunked(&self.tx, stream, rbuf, d).await,
        };
        match result {
            Ok(true) => self.complete = true,
            Ok(false) => {}
            Err(e) => {
                // Too large is the pipeline's own error (413); the rest are the client's (400).
                let e: BoxError = match e {
                    BodyError::TooLarge => Box::new(crate::pipeline::RequestTooLarge),
                    e => Box::new(e),
                };
                let _ = self.tx.send(Err(e)).await;
            }
        }
    }
}

/// Reads once from the socket into `buf`'s spare room (waiting for readiness first, so no
/// buffer is held while the client is silent); 0 means the client closed its side.
pub async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Ok(true): all `n` bytes delivered; Ok(false): the pipeline stopped taking them.
async fn pump_length(
    tx: &mpsc::Sender<Chunk>,
    stream: &TcpStream,
    rbuf: &mut ReadBuf,
    mut n: u64,
) -> Result<bool, BodyError> {
    if !rbuf.is_empty() {
        let take = rbuf.pending().len().min(usize::try_from(n).unwrap_or(usize::MAX));
        let chunk = Bytes::copy_from_slice(&rbuf.pending()[..take]);
        rbuf.consume(take);
        n -= take as u64;
        if tx.send(Ok(Frame::data(chunk))).await.is_err() {
            return Ok(false);
        }
    }
    while n > 0 {
        // Straight into a buffer of its own, which becomes the chunk: no copy, and never a
        // byte past the body (the next request's bytes stay in the socket).
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(READ_CHUNK);
        let mut chunk = BytesMut::with_capacity(want);
        let got = loop {
            stream.readable().await.map_err(|e| BodyError::Io(e.to_string()))?;
            match stream.try_read_buf(&mut chunk) {
                Ok(0) => return Err(BodyError::Truncated),
                Ok(k) => break k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(BodyError::Io(e.to_string())),
            }
        };
        n -= got as u64;
        if tx.send(Ok(Frame::data(chunk.freeze()))).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn pump_chunked(
    tx: &mpsc::Sender<Chunk>,
    stream: &TcpStream,
    rbuf: &mut ReadBuf,
    decoder: &mut ChunkedDecoder,
) -> Result<bool, BodyError> {
    loop {
        while !rbuf.is_empty() {
            let step = decoder.decode(rbuf.pending()).map_err(|e| match e {
                ChunkError::Malformed(why) => BodyError::Malformed(why),
                ChunkError::TooLarge => BodyError::TooLarge,
            })?;
            let data = step.data.map(|r| Bytes::copy_from_slice(&rbuf.pending()[r]));
            rbuf.consume(step.consumed);
            if let Some(d) = data {
                if tx.send(Ok(Frame::data(d))).await.is_err() {
                    return Ok(false);
                }
            }
            if decoder.is_done() {
                if let Some(t) = decoder.take_trailers() {
                    if tx.send(Ok(Frame::trailers(t))).await.is_err() {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
            if step.consumed == 0 {
                break;
            }
        }
        let n = read_some(stream, rbuf.spare(4096))
            .await
            .map_err(|e| BodyError::Io(e.to_string()))?;
        if n == 0 {
            return Err(BodyError::Truncated);
        }
    }
}
